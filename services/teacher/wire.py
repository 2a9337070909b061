"""Binary wire format of the teacher's top-k answers (media type ``application/x-ddk-topk``).

One *frame* per sequence; a response is the frames of its sequences back to back, in the order
they became ready (each frame names its sequence). Everything is little-endian; there is no pickle
and no framing beyond what is written here, so any language can read it with a struct and two
array views.

Frame, version 1 (header 24 bytes, then the payload)::

    offset size  field
    0      4     magic          b"DDKT"
    4      2     version        uint16, 1
    6      1     dtype          uint8, 1 = float16, 2 = float32 (the logprobs' and target's type)
    7      1     flags          uint8, 0 (reserved; a reader rejects anything else)
    8      4     index          uint32, the sequence's row in the request's input_ids
    12     4     rows           uint32, positions R = L - 1 (L: this sequence's length; they may differ)
    16     4     k              uint32, top-k
    20     4     crc32          uint32, zlib.crc32 of header bytes 0..19 followed by the payload
    24     4*R*k ids            int32 [R, k], token ids, logprob descending in each row
    ..     s*R*k logprobs       dtype [R, k], natural-log probabilities (s = 2 or 4 bytes)
    ..     s*R   target_logprob dtype [R], logprob of the actual next token input_ids[j + 1]

The checksum makes a corrupt frame fail loudly instead of feeding wrong numbers to a training run.
``encode_frame``/``decode_frame`` are pure functions over bytes; ``FrameReader`` parses a stream
incrementally (feed it chunks as they arrive). Any malformed input raises :class:`WireError`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

MEDIA_TYPE = "application/x-ddk-topk"
MAGIC = b"DDKT"
VERSION = 1
HEADER = struct.Struct("<4sHBBIIII")  # magic, version, dtype, flags, index, rows, k, crc32
HEADER_SIZE = HEADER.size  # 24
DTYPES = {"float16": 1, "float32": 2}
_CODE_TO_DTYPE = {1: np.dtype("<f2"), 2: np.dtype("<f4")}
IDS_DTYPE = np.dtype("<i4")
# A single frame larger than this is treated as corrupt (a garbled header must not make a reader
# wait for, or allocate, gigabytes): 2**20 positions x 1024 top-k entries is far above any real use.
MAX_FRAME_ELEMENTS = 1 << 30


class WireError(ValueError):
    """Bytes that are not a valid frame (bad magic, unknown version, truncated, checksum mismatch)."""


@dataclass
class Frame:
    """One decoded sequence: numpy views over the frame's bytes (read-only)."""

    index: int
    ids: np.ndarray  # int32 [R, k]
    logprobs: np.ndarray  # float16 or float32 [R, k]
    target_logprob: np.ndarray  # same dtype [R]


def payload_size(rows: int, k: int, dtype_code: int) -> int:
    item = _CODE_TO_DTYPE[dtype_code].itemsize
    return rows * k * IDS_DTYPE.itemsize + rows * k * item + rows * item


def encode_frame(index: int, ids, logprobs, target_logprob, dtype: str = "float32") -> bytes:
    """One sequence's answer -> frame bytes. ``ids``/``logprobs`` [R, k], ``target_logprob`` [R]."""
    if dtype not in DTYPES:
        raise WireError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    code = DTYPES[dtype]
    fdt = _CODE_TO_DTYPE[code]
    ids = np.ascontiguousarray(ids, dtype=IDS_DTYPE)
    logprobs = np.ascontiguousarray(logprobs, dtype=fdt)
    target_logprob = np.ascontiguousarray(target_logprob, dtype=fdt)
    if ids.ndim != 2 or logprobs.shape != ids.shape or target_logprob.shape != ids.shape[:1]:
        raise WireError(f"shapes do not match: ids {ids.shape}, logprobs {logprobs.shape}, "
                        f"target_logprob {target_logprob.shape}")
    rows, k = ids.shape
    payload = ids.tobytes() + logprobs.tobytes() + target_logprob.tobytes()
    head = HEADER.pack(MAGIC, VERSION, code, 0, index, rows, k, 0)[:20]
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I", crc) + payload


def _parse_header(buf, offset: int = 0) -> tuple[int, int, int, int, int]:
    """Validate a header -> (dtype_code, index, rows, k, crc); ``buf[offset:]`` holds HEADER_SIZE bytes."""
    magic, version, code, flags, index, rows, k, crc = HEADER.unpack_from(buf, offset)
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not a ddk top-k frame")
    if version != VERSION:
        raise WireError(f"unsupported frame version {version} (this reader knows {VERSION})")
    if code not in _CODE_TO_DTYPE:
        raise WireError(f"unknown dtype code {code}")
    if flags != 0:
        raise WireError(f"unknown flags {flags:#x}")
    if rows < 1 or k < 1 or rows * k > MAX_FRAME_ELEMENTS:
        raise WireError(f"implausible frame size rows={rows} k={k}")
    return code, index, rows, k, crc


def _decode_payload(buf, start: int, code: int, index: int, rows: int, k: int, crc: int) -> Frame:
    mv = memoryview(buf)
    size = payload_size(rows, k, code)
    body = mv[start:start + size]
    if zlib.crc32(body, zlib.crc32(mv[start - HEADER_SIZE:start - 4])) != crc:
        raise WireError(f"checksum mismatch in frame {index}: corrupt data")
    fdt = _CODE_TO_DTYPE[code]
    n = rows * k
    ids = np.frombuffer(body, dtype=IDS_DTYPE, count=n).reshape(rows, k)
    off = n * IDS_DTYPE.itemsize
    logprobs = np.frombuffer(body, dtype=fdt, count=n, offset=off).reshape(rows, k)
    off += n * fdt.itemsize
    target = np.frombuffer(body, dtype=fdt, count=rows, offset=off)
    return Frame(index=index, ids=ids, logprobs=logprobs, target_logprob=target)


def decode_frame(data) -> Frame:
    """Exactly one frame's bytes -> Frame. Raises WireError when truncated, padded or corrupt."""
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise WireError(f"truncated frame: {len(data)} bytes, header needs {HEADER_SIZE}")
    code, index, rows, k, crc = _parse_header(data)
    size = HEADER_SIZE + payload_size(rows, k, code)
    if len(data) != size:
        kind = "truncated" if len(data) < size else "trailing bytes after"
        raise WireError(f"{kind} frame {index}: {len(data)} bytes, expected {size}")
    return _decode_payload(data, HEADER_SIZE, code, index, rows, k, crc)


def decode_frames(data) -> list[Frame]:
    """A whole response body -> its frames (convenience for non-streaming readers)."""
    reader = FrameReader()
    frames = reader.feed(data)
    reader.close()
    return frames


class FrameReader:
    """Incremental parser: ``feed(chunk)`` returns the frames completed by that chunk.

    Call ``close()`` at the end of the stream: it raises WireError if a partial frame is left over
    (the connection broke mid-frame).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._need: tuple[int, int, int, int, int] | None = None  # parsed header of the pending frame

    def feed(self, chunk) -> list[Frame]:
        if chunk:
            self._buf += chunk
        frames = []
        while True:
            avail = len(self._buf) - self._pos
            if self._need is None:
                if avail < HEADER_SIZE:
                    break
                self._need = _parse_header(self._buf, self._pos)
            code, index, rows, k, crc = self._need
            size = HEADER_SIZE + payload_size(rows, k, code)
            if avail < size:
                break
            # Copy the frame out so the arrays do not pin (or get clobbered by) the growing buffer.
            frame_bytes = bytes(self._buf[self._pos:self._pos + size])
            frames.append(_decode_payload(frame_bytes, HEADER_SIZE, code, index, rows, k, crc))
            self._pos += size
            self._need = None
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > (1 << 20):  # compact now and then
            del self._buf[:self._pos]
            self._pos = 0
        return frames

    @property
    def pending_bytes(self) -> int:
        return len(self._buf) - self._pos

    def close(self) -> None:
        if self.pending_bytes:
            raise WireError(f"stream ended inside a frame ({self.pending_bytes} bytes left over)")
