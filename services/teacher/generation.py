"""Greedy generation: the teacher's ``POST /v1/generate`` and ``ddk eval --tasks`` (one implementation for both).

- :func:`greedy_generate` (transformers): prompts (token-id lists, ragged) left-padded into batches with an
  attention mask, ``generate`` with ``do_sample=False`` under a fresh :class:`~transformers.GenerationConfig` (the
  model folder's sampling defaults are not applied: greedy is greedy), stopped at any of ``stop_ids``. transformers
  derives the position ids from the attention mask (``cumsum - 1``), so a left-padded prompt gets the positions it
  has alone; ``tests/unit/test_task_eval.py`` checks that batched answers equal one-prompt-at-a-time answers. Each
  answer is the generated ids up to (not including) the first stop id, and ``"stop"`` or ``"length"``.
- :func:`parse_generate_request` (pure): the body of ``POST /v1/generate``, ``{"input_ids": [[int, ...], ...],
  "max_new_tokens": int, "stop_ids"?: [int, ...]}``, checked; every problem a
  :class:`~ddk.teacher.validate.RequestError` naming the field (422 malformed, 413 too long).
- :func:`generate_remote`: the client side of ``/v1/generate`` (the service owns its client).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

from .validate import RequestError

MAX_NEW_TOKENS = 4096  # the most one request may ask per prompt (the model's positions bound it further)
FINISH_REASONS = ("stop", "length")


@dataclass
class GenerateRequest:
    input_ids: list[list[int]]
    max_new_tokens: int
    stop_ids: list[int] | None  # None: the model's own eos (its generation config)


def _strict_int(v: Any) -> bool:
    return type(v) is int


def parse_generate_request(body: bytes, *, vocab_size: int, max_seq_len: int,
                           max_batch_tokens: int) -> GenerateRequest:
    """Check a ``/v1/generate`` body: each prompt 1..``max_seq_len - max_new_tokens`` ids within the vocabulary,
    ``max_new_tokens`` 1..min(MAX_NEW_TOKENS, max_seq_len - 1), and sum(prompt + max_new_tokens) at most
    ``max_batch_tokens``."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(422, f"body: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise RequestError(422, "body: expected a JSON object with input_ids and max_new_tokens")
    unknown = set(doc) - {"input_ids", "max_new_tokens", "stop_ids"}
    if unknown:
        raise RequestError(422, f"body: unknown field(s) {sorted(unknown)}")
    if "max_new_tokens" not in doc:
        raise RequestError(422, "max_new_tokens: required")
    n_new = doc["max_new_tokens"]
    top = min(MAX_NEW_TOKENS, max_seq_len - 1)
    if not _strict_int(n_new) or not 1 <= n_new <= top:
        raise RequestError(422, f"max_new_tokens: must be an integer in 1..{top}, got {n_new!r}")
    stops = doc.get("stop_ids")
    if stops is not None:
        if not isinstance(stops, list) or not all(_strict_int(s) and 0 <= s < vocab_size for s in stops):
            raise RequestError(422, f"stop_ids: must be a list of token ids in 0..{vocab_size - 1}")
    if "input_ids" not in doc:
        raise RequestError(422, "input_ids: required")
    rows = doc["input_ids"]
    if not isinstance(rows, list) or not rows:
        raise RequestError(422, "input_ids: must be a non-empty list of token-id lists")
    total = 0
    for i, row in enumerate(rows):
        if not isinstance(row, list) or not row:
            raise RequestError(422, f"input_ids[{i}]: must be a non-empty list of token ids")
        for j, v in enumerate(row):
            if not _strict_int(v) or not 0 <= v < vocab_size:
                raise RequestError(422, f"input_ids[{i}][{j}]: must be a token id in 0..{vocab_size - 1}, got {v!r}")
        if len(row) + n_new > max_seq_len:
            raise RequestError(413, f"input_ids[{i}]: {len(row)} ids + max_new_tokens {n_new} exceed max_seq_len "
                                    f"{max_seq_len}")
        total += len(row) + n_new
    if total > max_batch_tokens:
        raise RequestError(413, f"input_ids: {len(rows)} prompts of {total} tokens with their new tokens exceed the "
                                f"limit of {max_batch_tokens} per request")
    return GenerateRequest([list(r) for r in rows], n_new, None if stops is None else [int(s) for s in stops])


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], str]:
    """``(the ids before the first stop id, "stop")``, or ``(all of them, "length")`` when none stops them."""
    stops = {int(s) for s in stop_ids}
    for i, t in enumerate(ids):
        if int(t) in stops:
            return [int(x) for x in ids[:i]], "stop"
    return [int(x) for x in ids], "length"


def model_stop_ids(model) -> list[int]:
    """The model's eos ids (generation config, else config)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int):
    """``(input_ids, attention_mask)`` int64 ``[B, max_len]``, each prompt right-aligned (left padding): the one
    batching of ragged prompts for generation (this module's greedy answers and the trainer's rollouts)."""
    import torch

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: need at least one prompt, and no empty prompt")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor([int(t) for t in p], dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_ids: Sequence[int] | None = None, pad_id: int | None = None,
                    batch_size: int = 16) -> list[tuple[list[int], str]]:
    """Greedy answers of ``model`` to ``prompts`` (see the module's docstring), in the prompts' order. Batches
    hold prompts of similar lengths (sorted by length), so little of a batch is padding."""
    import torch
    from transformers import GenerationConfig

    stops = list(model_stop_ids(model) if stop_ids is None else stop_ids)
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None)
        pad_id = int(pad_id) if pad_id is not None else (stops[0] if stops else 0)
    cfg = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1,
                           eos_token_id=stops or None, pad_token_id=int(pad_id))
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[tuple[list[int], str] | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for a in range(0, len(order), max(1, int(batch_size))):
            idx = order[a:a + batch_size]
            ids, mask = left_pad([prompts[i] for i in idx], pad_id)
            width = ids.shape[1]
            with torch.no_grad():
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=cfg)
            for r, i in enumerate(idx):
                out[i] = cut_at_stop(gen[r, width:].tolist(), stops)
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def generate_remote(url: str, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int],
                    token: str | None = None, per_request: int = 32, timeout: float = 600.0,
                    retry_for: float = 60.0) -> list[tuple[list[int], str]]:
    """Greedy answers from the teacher service at ``url`` (``POST /v1/generate``, ``per_request`` prompts at a
    time; a 503 (loading, queue full) is retried for ``retry_for`` seconds; another 4xx raises
    :class:`ddk.teacher.client.TeacherRequestError`)."""
    import httpx

    from .client import TeacherRequestError

    headers = {"Authorization": f"Bearer {token}"} if token else None
    out: list[tuple[list[int], str]] = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout, headers=headers) as http:
        for a in range(0, len(prompts), per_request):
            body = {"input_ids": [[int(t) for t in p] for p in prompts[a:a + per_request]],
                    "max_new_tokens": int(max_new_tokens), "stop_ids": [int(s) for s in stop_ids]}
            deadline = time.monotonic() + retry_for
            while True:
                r = http.post("/v1/generate", json=body)
                if r.status_code == 503 and time.monotonic() < deadline:
                    time.sleep(float(r.headers.get("retry-after") or 1))
                    continue
                break
            if r.status_code != 200:
                try:
                    detail = r.json().get("detail")
                except ValueError:
                    detail = r.text[:500]
                raise TeacherRequestError(r.status_code, detail)
            out += [(list(s["ids"]), s["finish_reason"]) for s in r.json()["sequences"]]
    return out
