"""A teacher with another tokenizer behind the feed (issue 29): the student's rows re-tokenised the teacher's way,
its top-k fetched on its own ids and aligned back to the student's positions by UTF-8 byte spans.

The trainer tokenises with the teacher's tokenizer, which it fetches from the teacher service
(``TeacherClient.tokenizer()``: ``GET /v1/tokenizer``, fingerprint-checked against ``/v1/info``). So ``/v1/topk``
keeps taking the teacher's own token ids, and replicas, failover, auth, routes and the top-k store (keyed by the
teacher's ids) work as they do for a same-tokenizer teacher.

Per student row (``[L + 1]`` ids of a token block):

1. **Text.** The row's bytes are its pieces' bytes (``ddk.trainer.align``'s byte tables; no decode of the whole
   row, so nothing is normalised away). The row is cut into *segments* at special tokens (the student's eos
   between documents); a student eos becomes the teacher's eos between the teacher's segments (an empty span on
   both sides), other specials nothing. A block is a window of a token stream, so a segment can start inside a
   multi-byte character (byte-level BPE splits one into several tokens) and end inside one: its leading tokens
   are dropped while its first byte is a UTF-8 continuation byte, its trailing tokens while its bytes do not
   decode. Dropped tokens keep their CE but get no distillation term, and the teacher does not read their bytes.
2. **Teacher tokens.** Each segment's text is encoded by the teacher's tokenizer with offsets
   (``return_offsets_mapping``); its byte spans come from ``align.byte_spans`` (pieces where they decode).
   The teacher's row is the segments' ids in order (each document led by the teacher's ``<bos>`` when its
   tokenizer puts one before a text, as Gemma's does: context, never scored), cut to its ``max_seq_len``
   (groups past the cut are not compared), right-padded to the batch's longest with its eos (a causal model's
   answer at a position does not depend on what comes after it), and sent with the rows of the other routes
   through the wrapped teacher.
3. **Alignment.** Per segment ``align.align_groups``; a group is compared where the student's last token of the
   group has a label and the teacher's has a next token in its row (``align.compared_positions``).

The answer (:class:`XtokOutput`) is in the student's layout, ``[B, L, k]`` like a same-tokenizer answer: at each
compared student position the teacher's top-k (its ids) at its aligned position; ``xtok.compared`` says which
positions are compared. ``target_logprob[b, p]`` is the sum of the teacher's log-probabilities of the teacher
tokens of the group whose last student token is ``p + 1`` (0 elsewhere), so the evaluation's teacher loss, the
mean of ``-target_logprob`` over the student's predictions, is ``NLL_T(text) / n_student_tokens`` and the ratio
``exp(loss_S - loss_T)`` is ``exp(align.log_ratio_per_student_token)``: the fair gap across tokenizers.

Rows of a route whose teacher shares the student's tokenizer pass through unchanged (family 0, the identity), so
one batch can mix a cross-family route with same-family ones; the loss (``ddk.trainer.xtok_loss``) takes each
row's family (its shared vocabulary and GOLD weights).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ddk.errors import UsageError
from ddk.teacher.client import TeacherOutput
from ddk.teacher.routes import DEFAULT_ROUTE, RoutedTeacher, ask, route_plan
from ddk.trainer.align import (align_groups, byte_spans, compared_positions, piece_scheme, shared_vocab,
                               vocab_bytes)
from ddk.trainer.xtok_loss import gold_weights

log = logging.getLogger("ddk.trainer")

# what the handshake asks every teacher tokenizer to round-trip (with the domains' own text)
PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.\n", "def f(x):\n\treturn x ** 2  # 3.14159",
               "naïve café, Ümlaute, ½ € ☕ 日本語 🙂", "  leading and   inner  spaces\n\n\nlines ")


# ---------------------------------------------------------------------------------------------------------
# one tokenizer as alignment needs it

class Side:
    """A fast Hugging Face tokenizer with what alignment needs: its piece scheme, special tokens, each id's bytes.

    ValueError when its pieces cannot be mapped to bytes (``align.piece_scheme``) or it gives no offsets (a slow
    tokenizer)."""

    def __init__(self, tok) -> None:
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"{type(tok).__name__} is not a fast tokenizer: it gives no character offsets")
        self.tok = tok
        spec = json.loads(tok.backend_tokenizer.to_str())
        self.scheme = piece_scheme(spec.get("decoder"))
        self.vocab = tok.get_vocab()
        self.special = set(tok.all_special_tokens) | {a["content"] for a in spec.get("added_tokens", [])
                                                      if a.get("special")}
        self.special_ids = {int(self.vocab[t]) for t in self.special if t in self.vocab}
        size = max(self.vocab.values()) + 1
        self.id_bytes: list[bytes | None] = [None] * size
        for i, b in vocab_bytes(self.vocab, self.scheme, self.special).items():
            self.id_bytes[i] = b
        self.eos_id = tok.eos_token_id
        self.bos_id = leading_special(tok, self.special_ids)

    def __len__(self) -> int:
        return len(self.id_bytes)

    def encode(self, texts: list[str]) -> list[tuple[list[int], np.ndarray]]:
        """``[(ids, byte spans [n, 2])]`` of each text (no special tokens added)."""
        if not texts:
            return []
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
            pieces = self.tok.convert_ids_to_tokens(ids)
            out.append((list(ids), byte_spans(text, offsets, pieces, self.scheme)))
        return out


def leading_special(tok, special_ids: set) -> int | None:
    """The special id the tokenizer puts before a text by default (Gemma's ``<bos>``), else None. A teacher row
    starts with it (and so does each document after an eos in it): Gemma 3 scores text without its ``<bos>``
    far worse (on the real kit's validation text, 5.5 against 2.4 nats per token on prose)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    if len(full) > len(plain) and full[0] in special_ids and full[1:len(plain) + 1] == plain:
        return int(full[0])
    return None


@dataclass
class Family:
    """One teacher tokenizer's relation to the student's: ``teacher_to_student [V_T]`` (-1: no counterpart),
    ``student_shared [V_S]`` and GOLD's ``weights`` (w_match, w_uld); family 0 of a batch is the identity."""

    name: str
    teacher_to_student: torch.Tensor
    student_shared: torch.Tensor
    weights: tuple[float, float]


def identity_family(vocab_size: int) -> Family:
    return Family("identity", torch.arange(int(vocab_size), dtype=torch.long),
                  torch.ones(int(vocab_size), dtype=torch.bool), (1.0, 0.0))


def pair_family(student: Side, teacher: Side, teacher_vocab_size: int, name: str) -> Family:
    """The shared vocabulary of a student/teacher pair (``align.shared_vocab``) and GOLD's adaptive weights."""
    sv = shared_vocab(student.vocab, student.scheme, teacher.vocab, teacher.scheme, student.special, teacher.special)
    v_t = max(int(teacher_vocab_size), len(teacher))
    return Family(name, torch.from_numpy(sv.teacher_to_student(v_t)),
                  torch.from_numpy(sv.student_mask(len(student))), gold_weights(len(sv.teacher_ids), v_t))


# ---------------------------------------------------------------------------------------------------------
# one student row

@dataclass
class Segment:
    """Student tokens ``[start, end)`` of a row (no special among them), their byte spans (from 0) and text;
    ``eos_before``: a student eos stands right before ``start``."""

    start: int
    end: int
    spans: np.ndarray
    text: str
    eos_before: bool = False


def _trimmed(row: Sequence[int], a: int, b: int, id_bytes: list, eos_before: bool) -> Segment | None:
    """Tokens ``[a, b)`` without leading continuation bytes and trailing undecodable bytes; None when empty."""
    pieces = [id_bytes[int(i)] for i in row[a:b]]
    while pieces and (not pieces[0] or 0x80 <= pieces[0][0] <= 0xBF):
        pieces.pop(0)
        a += 1
    while pieces:
        try:
            text = b"".join(pieces).decode("utf-8")
            break
        except UnicodeDecodeError:
            pieces.pop()
            b -= 1
    if not pieces or not text:
        return None
    ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
    return Segment(a, a + len(pieces), np.stack([ends - [len(p) for p in pieces], ends], axis=1), text, eos_before)


def student_segments(row: Sequence[int], side: Side) -> list[Segment]:
    """The row's segments between special (or byte-less) tokens, trimmed to whole characters (module docstring)."""
    segments, start, eos_before = [], 0, False
    n = len(row)
    for i in range(n + 1):
        cut = i == n or int(row[i]) in side.special_ids or int(row[i]) >= len(side.id_bytes) \
            or side.id_bytes[int(row[i])] is None
        if not cut:
            continue
        if i > start:
            seg = _trimmed(row, start, i, side.id_bytes, eos_before)
            if seg is not None:
                segments.append(seg)
        if i < n:
            eos_before = side.eos_id is not None and int(row[i]) == side.eos_id
        start = i + 1
    return segments


@dataclass
class RowAlignment:
    """A student row against the teacher's tokens of its text: ``teacher_ids``; ``pairs [C, 2]`` (student
    position, teacher position) compared; ``nll_to [len(teacher_ids)]``: the student position whose teacher loss
    each teacher token's log-probability adds to (-1: none)."""

    teacher_ids: list[int]
    pairs: np.ndarray
    nll_to: np.ndarray


def align_row(row: Sequence[int], student: Side, teacher: Side, max_len: int) -> RowAlignment:
    """Steps 1-3 of the module docstring for one student row of ``L + 1`` ids."""
    segments = student_segments(row, student)
    encoded = teacher.encode([s.text for s in segments])
    t_ids: list[int] = []
    placed = []  # (segment, teacher offset, groups)
    nll: list[int] = []
    for seg, (ids, spans) in zip(segments, encoded):
        if seg.eos_before and teacher.eos_id is not None and t_ids:
            t_ids.append(int(teacher.eos_id))
            nll.append(seg.start - 2)  # the teacher's eos: with the student's prediction of its eos
        if teacher.bos_id is not None and (not t_ids or t_ids[-1] == teacher.eos_id):
            t_ids.append(int(teacher.bos_id))  # a document's start the teacher's way: context, never scored
            nll.append(-1)
        placed.append((seg, len(t_ids), align_groups(seg.spans, spans)))
        t_ids.extend(int(i) for i in ids)
        nll.extend([-1] * len(ids))
    t_ids, nll_to = t_ids[:max_len], np.asarray(nll[:max_len], dtype=np.int64).reshape(-1)
    n_s, n_t = len(row) - 1, len(t_ids)  # student positions with a label; teacher tokens
    pairs = []
    for seg, off, groups in placed:
        if not len(groups):
            continue
        s_ok = seg.start + np.arange(seg.end - seg.start) < n_s
        t_ok = off + np.arange(int(groups.teacher_end.max())) < n_t - 1
        _, s_last, t_last = compared_positions(groups, s_ok, t_ok)
        pairs.append(np.stack([seg.start + s_last, off + t_last], axis=1))
        # each group's teacher tokens: their log-probabilities add to the student position predicting the group's
        # last student token (the first teacher token of the row has none)
        for t0, t1, s1 in zip(groups.teacher_start.tolist(), groups.teacher_end.tolist(), groups.student_end.tolist()):
            p = seg.start + s1 - 2
            for j in range(off + t0, min(off + t1, n_t)):
                nll_to[j] = p if 0 <= p < n_s else -1
    nll_to[:1 + int(bool(t_ids) and t_ids[0] == teacher.bos_id)] = -1  # the row's first text token: no context
    nll_to[(nll_to < 0) | (nll_to >= n_s)] = -1
    pairs_arr = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
    return RowAlignment(t_ids, pairs_arr.astype(np.int64), nll_to)


# ---------------------------------------------------------------------------------------------------------
# the batch answer

@dataclass
class XtokBatch:
    """What the cross-tokenizer loss needs beside the top-k: ``compared [B, L]`` bool, ``family [B]`` (an index
    into ``families``)."""

    compared: torch.Tensor
    family: torch.Tensor
    families: tuple[Family, ...]


@dataclass
class XtokOutput(TeacherOutput):
    """A :class:`~ddk.teacher.client.TeacherOutput` in the student's layout plus :class:`XtokBatch`."""

    xtok: XtokBatch | None = field(default=None)


def fill_aligned(out: XtokOutput, row: int, al: RowAlignment, answer_ids: torch.Tensor, answer_lp: torch.Tensor,
                 answer_target: torch.Tensor) -> None:
    """Write one aligned row's teacher answer (``[M - 1, k]``, ``[M - 1]``) into ``out`` at ``row``."""
    if len(al.pairs):
        s = torch.from_numpy(al.pairs[:, 0])
        t = torch.from_numpy(al.pairs[:, 1])
        out.ids[row, s] = answer_ids[t]
        out.logprobs[row, s] = answer_lp[t].float()
        out.xtok.compared[row, s] = True
    j = np.flatnonzero(al.nll_to >= 0)
    if len(j):
        lp = answer_target[torch.from_numpy(j - 1)].double()
        target = torch.zeros(out.target_logprob.shape[1], dtype=torch.float64)
        target.index_add_(0, torch.from_numpy(al.nll_to[j]), lp)
        out.target_logprob[row] = target.float()


# ---------------------------------------------------------------------------------------------------------
# the wrapper the feed and the evaluation ask

@dataclass
class Route:
    """One route's teacher as the wrapper sees it: ``side`` None for a teacher with the student's tokenizer;
    else its tokenizer, its family index and the longest row it scores."""

    side: Side | None = None
    family: int = 0
    max_len: int = 0


class CrossTokenizerTeacher(RoutedTeacher):
    """``topk(input_ids, top_k, domains=None)`` over the wrapped teacher (a TeacherClient, a RoutedTeacher or the
    top-k store), rows of cross-family routes re-tokenised and aligned (module docstring). A RoutedTeacher, so that
    ``routes.ask`` hands it every row's domain; ``urls_of`` and ``close`` are the wrapped teacher's."""

    cross_tokenizer = True

    def __init__(self, base: Any, student: Side, routes_cfg: dict[str, Sequence[str]], urls: Sequence[str],
                 routes: dict[str, Route], families: Sequence[Family]) -> None:  # noqa: D107 - no super(): no clients
        self.base, self.student = base, student
        self.urls = list(urls)
        self.routes = {d: list(u) for d, u in routes_cfg.items()}
        self.route_info, self.families = dict(routes), tuple(families)
        self.clients = getattr(base, "clients", {})

    def info(self) -> dict:
        return self.base.info()

    def client(self, domain: str | None = None):
        return self.base.client(domain) if isinstance(self.base, RoutedTeacher) else self.base

    def topk(self, input_ids, top_k: int, domains: Sequence[str | None] | None = None) -> XtokOutput:
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(input_ids)
        B, L, k = ids.shape[0], ids.shape[1] - 1, int(top_k)
        out = XtokOutput(ids=torch.zeros((B, L, k), dtype=torch.int64), logprobs=torch.zeros((B, L, k)),
                         target_logprob=torch.zeros((B, L)),
                         xtok=XtokBatch(torch.zeros((B, L), dtype=torch.bool), torch.zeros(B, dtype=torch.long),
                                        self.families))
        doms = list(domains) if domains is not None else [None] * B
        for name, rows in route_plan(doms, self.routes).items():
            route = self.route_info.get(name, Route())
            idx = torch.tensor(rows, dtype=torch.long)
            if route.side is None:  # the student's tokenizer: today's answer, every position compared
                part = ask(self.base, ids[idx], k, [doms[i] for i in rows])
                out.ids[idx], out.logprobs[idx] = part.ids, part.logprobs.float()
                out.target_logprob[idx] = part.target_logprob.float()
                out.xtok.compared[idx] = True
                continue
            self._ask_aligned(out, ids, rows, [doms[i] for i in rows], route, k)
        return out

    def _ask_aligned(self, out: XtokOutput, ids: torch.Tensor, rows: list[int], doms: list, route: Route,
                     k: int) -> None:
        aligned = [align_row(ids[r].tolist(), self.student, route.side, route.max_len) for r in rows]
        pad = route.side.eos_id if route.side.eos_id is not None else 0
        if hasattr(self.base, "topk_rows"):  # the top-k store: each teacher row its own key, unpadded
            answers = self.base.topk_rows([a.teacher_ids for a in aligned], k, pad)
            for r, a, ans in zip(rows, aligned, answers):
                out.xtok.family[r] = route.family
                if ans is not None:  # None: fewer than 2 teacher ids, nothing compared
                    fill_aligned(out, r, a, ans.ids, ans.logprobs, ans.target_logprob)
            return
        width = max(2, max(len(a.teacher_ids) for a in aligned))
        batch = torch.full((len(rows), width), int(pad), dtype=torch.long)
        for i, a in enumerate(aligned):
            batch[i, :len(a.teacher_ids)] = torch.tensor(a.teacher_ids, dtype=torch.long)
        part = ask(self.base, batch, k, doms)
        for i, (r, a) in enumerate(zip(rows, aligned)):
            out.xtok.family[r] = route.family
            fill_aligned(out, r, a, part.ids[i], part.logprobs[i], part.target_logprob[i])

    def close(self) -> None:
        if hasattr(self.base, "close"):
            self.base.close()


def route_urls(cfg) -> list[tuple[str, list[str]]]:
    """``[(route name, its URLs)]``: the default route (``teacher.urls``, when set) and every ``teacher.routes``."""
    pairs = [(DEFAULT_ROUTE, list(cfg.teacher.urls))] if cfg.teacher.urls else []
    return pairs + [(d, list(u)) for d, u in sorted(cfg.teacher.routes.items())]


def open_cross_tokenizer(cfg, base: Any, student_tok, token: str | None = None, make_client=None) -> Any:
    """``base`` itself when every route's teacher shares the student's tokenizer (or ``kd.cross_tokenizer:
    off``); else a :class:`CrossTokenizerTeacher` over it, each cross-family route's tokenizer fetched from its
    teacher (``TeacherClient.tokenizer()``) and its shared vocabulary computed once per teacher tokenizer."""
    if base is None or cfg.kd.cross_tokenizer == "off":
        return base
    if not cfg.teacher.all_urls():  # cache.dir alone: a store scored across tokenizers names its teacher itself
        return store_cross_teacher(base, student_tok)
    from ddk.fingerprint import tokenizer_fingerprint
    from ddk.teacher.client import TeacherClient

    make_client = make_client or (lambda urls: TeacherClient(urls, token=token, retry_for=60.0))
    mine = tokenizer_fingerprint(student_tok)
    student = None
    routes: dict[str, Route] = {}
    families: list[Family] = [identity_family(len(student_tok))]  # resized below to its teachers' vocabulary
    same_vocab = len(student_tok)
    by_fp: dict[str, tuple[Side, int]] = {}
    for name, urls in route_urls(cfg):
        with make_client(urls) as client:
            info = client.info()
            fp = info.get("tokenizer_fingerprint")
            if fp == mine:
                routes[name] = Route()
                same_vocab = max(same_vocab, int(info.get("vocab_size", 0)))
                continue
            student = student or Side(student_tok)
            if fp not in by_fp:
                side = Side(client.tokenizer())
                families.append(pair_family(student, side, int(info.get("vocab_size", 0)), fp))
                by_fp[fp] = (side, len(families) - 1)
        side, fam = by_fp[fp]
        routes[name] = Route(side, fam, teacher_max_len(info))
    if student is None:
        return base
    families[0] = identity_family(same_vocab)
    log.info("cross-tokenizer teacher on %s (shared vocabulary: %s)",
             ", ".join(n or "teacher.urls" for n, r in routes.items() if r.side is not None),
             ", ".join(f"{int((f.teacher_to_student >= 0).sum())} of {len(f.teacher_to_student)}"
                       for f in families[1:]))
    return CrossTokenizerTeacher(base, student, cfg.teacher.routes, cfg.teacher.urls, routes, families)


def teacher_max_len(info: dict) -> int:
    """The longest teacher row a cross-tokenizer row is cut to: ``/v1/info``'s ``max_seq_len``."""
    return int(info.get("max_seq_len", 1 << 30))


# ---------------------------------------------------------------------------------------------------------
# the top-k store across tokenizers (ddk teacher precompute, cache.dir: ddk.trainer.topk_source)

ALIGNMENT = {"method": "utf8-byte-spans", "version": 2}  # a new version when align_row's teacher rows change


def alignment_settings(student_fp: str, max_len: int) -> dict:
    """A cross-tokenizer store's ``alignment`` (its manifest): what its keys, the teacher's rows of the student's
    blocks, depend on beside the teacher's tokenizer: the rule (:func:`align_row`, its version), the student's
    tokenizer and the teacher's longest row. Pure."""
    return {**ALIGNMENT, "student_tokenizer_fingerprint": student_fp, "teacher_max_len": int(max_len)}


class StoreKeys:
    """The store keys of student blocks: the blocks themselves for a same-tokenizer teacher (``teacher`` None);
    for one of another tokenizer each block's teacher row (:func:`align_row`), None where it has fewer than 2 ids
    (nothing to score). ``pad``: the id that right-pads teacher rows into one request."""

    def __init__(self, student_tok=None, teacher_tok=None, max_len: int = 0) -> None:
        self.student = Side(student_tok) if teacher_tok is not None else None
        self.teacher = Side(teacher_tok) if teacher_tok is not None else None
        self.max_len = int(max_len)
        eos = self.teacher.eos_id if self.teacher is not None else None
        self.pad = int(eos) if eos is not None else 0

    def __call__(self, blocks) -> list:
        rows = np.asarray(blocks, dtype=np.int64)
        if self.teacher is None:
            return list(rows)
        out = []
        for row in rows:
            t = align_row(row.tolist(), self.student, self.teacher, self.max_len).teacher_ids
            out.append(np.asarray(t, dtype=np.int64) if len(t) >= 2 else None)
        return out


def store_cross_teacher(base: Any, student_tok) -> Any:
    """``cache.dir`` without ``teacher.urls``: ``base`` (a ``topk_source.StoreTeacher``) itself for a store of the
    student's tokenizer; a :class:`CrossTokenizerTeacher` over it for one scored across tokenizers (its manifest's
    ``alignment``), with the teacher's tokenizer the store folder keeps."""
    manifest = getattr(base, "manifest", None) or {}
    alignment = manifest.get("alignment")
    if not alignment:
        return base
    from ddk.trainer.topk_source import load_teacher_tokenizer

    teacher_tok = load_teacher_tokenizer(base.directory, manifest["tokenizer_fingerprint"])
    student, side = Side(student_tok), Side(teacher_tok)
    family = pair_family(student, side, int(manifest.get("vocab_size") or 0), manifest["tokenizer_fingerprint"])
    log.info("cross-tokenizer teacher from the top-k store %s (shared vocabulary: %d of %d)", base.directory,
             int((family.teacher_to_student >= 0).sum()), len(family.teacher_to_student))
    route = Route(side, 1, int(alignment["teacher_max_len"]))
    return CrossTokenizerTeacher(base, student, {}, [], {DEFAULT_ROUTE: route}, [identity_family(len(student_tok)), family])


# ---------------------------------------------------------------------------------------------------------
# the handshake (ddk train's checks before Ray)

def checked_teacher_tokenizer(client, student_tok, where: str):
    """The teacher's tokenizer (``client.tokenizer()``) once :func:`check_pair` accepts the pair; UsageError
    (exit 2) naming ``where`` when the teacher serves none or the pair cannot work."""
    from ddk.teacher.client import TeacherRequestError

    try:
        teacher_tok = client.tokenizer()
    except TeacherRequestError as e:
        raise UsageError(f"{where}: the teacher's tokenizer differs from the student's and it serves none to "
                         f"distil across tokenizers ({e.detail})") from None
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None
    check_pair(student_tok, teacher_tok, where=where)
    return teacher_tok


def check_pair(student_tok, teacher_tok, texts: Sequence[str] = (), where: str = "teacher.urls") -> None:
    """UsageError (exit 2) naming ``where`` unless a cross-tokenizer run can work with this pair: both fast
    tokenizers whose pieces map to bytes, the student's pieces giving back each text's bytes and the teacher's
    tokens decoding back to each text, their byte spans tiling it (``PROBE_TEXTS`` and ``texts``)."""
    try:
        student, teacher = Side(student_tok), Side(teacher_tok)
    except ValueError as e:
        raise UsageError(f"{where}: cross-tokenizer distillation cannot use this pair of tokenizers ({e}); "
                         "set kd.cross_tokenizer: off to see the fingerprint check") from None
    for text in [*PROBE_TEXTS, *texts]:
        ids = student_tok(text, add_special_tokens=False)["input_ids"]
        if b"".join(student.id_bytes[i] or b"" for i in ids) != text.encode("utf-8"):
            raise UsageError(f"student.model: the student's tokenizer cannot round-trip the text {text[:40]!r} "
                             "(its pieces do not give back the text's bytes)")
        try:
            (t_ids, spans), = teacher.encode([text])
        except ValueError as e:  # offsets and pieces that do not fit the text
            raise UsageError(f"{where}: the teacher's tokenizer gives no usable byte offsets for {text[:40]!r} "
                             f"({e})") from None
        back = teacher_tok.decode(t_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if back != text or (len(spans) and int(spans[-1, 1]) != len(text.encode("utf-8"))):
            raise UsageError(f"{where}: the teacher's tokenizer cannot round-trip the text {text[:40]!r} "
                             f"(it decodes to {back[:40]!r}); cross-tokenizer distillation needs the same text "
                             "on both sides")


# ---------------------------------------------------------------------------------------------------------
# what an evaluation record says about a cross-tokenizer teacher

RATIO_UNIT = "per_student_token"  # exp((NLL_S - NLL_T) / n_student_tokens): align.log_ratio_per_student_token


def scored_bytes(es, byte_lengths: np.ndarray) -> int:
    """The UTF-8 bytes of an evaluation set's scored tokens (each block's tokens 1 .. length - 1, or its
    ``mask``'s labels): the text both models' summed NLL is over."""
    blocks = np.asarray(es.blocks, dtype=np.int64)
    per = byte_lengths[np.clip(blocks, 0, len(byte_lengths) - 1)]
    pos = np.arange(blocks.shape[1])[None, :]
    scored = (pos >= 1) & (pos < np.asarray(es.lengths)[:, None])
    if getattr(es, "mask", None) is not None:
        scored = np.zeros_like(scored)
        scored[:, 1:] = np.asarray(es.mask, dtype=bool)[:, 1:]
    return int(per[scored].sum())


def bits_per_byte_record(sets: dict, student_loss: dict, teacher_loss: dict, student: Side) -> dict:
    """``{domain: {"student", "teacher"}}`` bits per byte of each domain's evaluation text (``align.bits_per_byte``:
    the losses are per student token, so each NLL sum is the loss times the set's predictions)."""
    from ddk.trainer.align import bits_per_byte

    lengths = np.array([len(b) if b else 0 for b in student.id_bytes], dtype=np.int64)
    out = {}
    for name, es in sets.items():
        n_bytes, preds = scored_bytes(es, lengths), es.predictions
        if n_bytes <= 0 or name not in student_loss or name not in teacher_loss:
            continue
        out[name] = {"student": bits_per_byte(student_loss[name] * preds, n_bytes),
                     "teacher": bits_per_byte(teacher_loss[name] * preds, n_bytes)}
    return out


def eval_record(trainer, student_loss: dict, teacher_loss: dict | None) -> dict:
    """The fields an evaluation line adds for a cross-tokenizer teacher (``{}`` otherwise): ``ratio_unit`` and
    ``bits_per_byte`` per domain. ``trainer``: the Trainer (its teacher, its evaluator's sets)."""
    teacher = getattr(trainer, "teacher", None) or getattr(trainer, "_own_eval_teacher", None)
    evaluator = getattr(trainer, "_eval", None)
    if not getattr(teacher, "cross_tokenizer", False) or evaluator is None or not teacher_loss:
        return {}
    return {"ratio_unit": RATIO_UNIT,
            "bits_per_byte": bits_per_byte_record(evaluator.sets, student_loss, teacher_loss, teacher.student)}
