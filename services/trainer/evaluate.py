"""Per-domain validation loss of a model (and of the teacher), with error bars, and the ``ddk eval`` command.

**What is scored.** Each domain's *evaluation set* (:func:`evaluation_set`) is a fixed sample of whole-document
windows spread over its whole validation set (:mod:`ddk.data.evalset`: documents by a seeded hash, one or a
few windows each, a short document scored whole), the same at every evaluation, on every rank and across
resumes. A window of ``L = seq_len + 1`` tokens gives ``L - 1`` next-token predictions; a shorter document's
block is padded (``eos``) and its padding never scored. A conversation domain's set scores its assistant tokens
only (``EvalSet.mask``), for the student and the teacher alike, so the ratio is over assistant tokens. The loss
is the mean over every prediction of the set in nats per token; perplexity is ``exp(loss)``. The teacher's loss
on a block is the sum of ``-target_logprob`` the teacher service returns for it (row j of its answer is its
distribution over ``block[j + 1]``).

**How.** The student's CE (and, against the teacher's top-k, its divergence) comes from the training loss
itself, :func:`ddk.trainer.loss.chunked_distill_loss` on the student's final hidden states, under
``train.precision``'s autocast: the full ``[batch, positions, vocab]`` logits never exist (a student whose logits
are not its output projection of its hidden states takes the full-logits path of
:func:`ddk.trainer.loss.distill_loss`). The teacher is asked once per block (:func:`teacher_answers`): its
``target_logprob`` is the teacher loss, its top-k the divergence's reference.

**Error bars.** Per-block sums are grouped by document and give the standard error of the log-ratio
``log(PPL_S / PPL_T)`` (:func:`ddk.data.evalset.log_ratio_se`, the grouped delta method).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddk.errors import UsageError
from ddk.data.evalset import (PARTS, EvalSet, coverage, evaluation_set, evaluation_sets, full_blocks,  # noqa: F401
                              log_ratio_se, per_document, sets_fingerprint, validation_windows)

log = logging.getLogger(__name__)


def shard_of(blocks, rank: int, world_size: int):
    """Rank ``rank``'s contiguous part of ``blocks`` (an array or an :class:`EvalSet`) when ``world_size`` ranks
    share an evaluation (the parts cover every block once; some are empty with fewer blocks than ranks)."""
    a, b = shard_range(len(blocks), rank, world_size)
    return blocks.part(a, b) if isinstance(blocks, EvalSet) else blocks[a:b]


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    return rank * n // world_size, (rank + 1) * n // world_size


# ---------------------------------------------------------------------------------------------------------
# scoring

@dataclass
class TeacherAnswers:
    """The teacher's answer for an evaluation set's blocks, asked once: ``nll [n]`` (sum of ``-target_logprob``
    over each block's scored predictions); ``ids``/``logprobs [n, L - 1, k]`` when the top-k was kept."""

    nll: np.ndarray
    ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None


def teacher_answers(client, es: EvalSet, top_k: int, batch_size: int = 16, domain: str | None = None,
                    keep_topk: bool = True) -> TeacherAnswers:
    """One request per ``batch_size`` blocks (through ``domain``'s route when the client routes by domain)."""
    from ddk.teacher.routes import ask

    nll, ids, logprobs = [], [], []
    for i in range(0, len(es), batch_size):
        chunk = torch.from_numpy(es.blocks[i:i + batch_size])
        out = ask(client, chunk, top_k, [domain] * len(chunk))
        target = out.target_logprob.double()
        mask = torch.from_numpy(es.part(i, i + batch_size).scored())  # [b, L - 1]: the predictions that count
        nll.append((-(target * mask)).sum(1).numpy())
        if keep_topk:
            ids.append(out.ids)
            logprobs.append(out.logprobs.float())
    return TeacherAnswers(np.concatenate(nll) if nll else np.zeros(0),
                          torch.cat(ids) if ids else None, torch.cat(logprobs) if logprobs else None)


def _labels(chunk: torch.Tensor, scored: np.ndarray) -> torch.Tensor:
    """``chunk[:, 1:]`` with IGNORE_INDEX where the prediction is not scored (``scored``: EvalSet.scored())."""
    from ddk.trainer.loss import IGNORE_INDEX

    labels = chunk[:, 1:].clone()
    labels[~torch.as_tensor(scored, device=labels.device)] = IGNORE_INDEX
    return labels


@torch.no_grad()
def block_sums(model, es: EvalSet, batch_size: int, device: str | torch.device = "cpu", precision: str = "fp32",
               chunk_tokens: int | None = None, teacher: TeacherAnswers | None = None, kd: Any = None,
               hidden_ok: bool | None = None) -> dict[str, np.ndarray]:
    """Per block of ``es``: ``ce`` (the student's summed next-token CE), ``kl`` (the summed divergence ``kd.loss``
    at ``kd.temperature``, T^2-scaled as in training, against ``teacher``'s top-k; 0 without), ``mass`` (the
    teacher's summed top-k mass) and ``count`` (predictions). The loss is the training loss's own: chunked from
    the hidden states (``chunk_tokens``: ``kd.chunk_tokens``; 0 or ``hidden_ok`` False: full logits) under
    ``precision``'s autocast."""
    from ddk.trainer import scale
    from ddk.trainer.loss import chunked_distill_loss, distill_loss

    n = len(es)
    out = {k: np.zeros(n, np.float64) for k in ("ce", "kl", "mass", "count")}
    if n == 0:
        return out
    device = torch.device(device)
    if hidden_ok is None:
        hidden_ok = chunk_tokens != 0 and scale.hidden_state_problem(model) is None
    topk = teacher is not None and teacher.ids is not None and kd is not None
    kw = dict(loss=kd.loss, beta=kd.beta, skew=kd.skew) if kd is not None else {}
    temperature = float(kd.temperature) if kd is not None else 1.0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, n, batch_size):
            chunk = torch.from_numpy(es.blocks[i:i + batch_size]).to(device)
            scored = es.part(i, i + batch_size).scored()  # [b, L - 1]: text, below the length; chat, assistant
            labels = _labels(chunk, scored)
            t_ids = teacher.ids[i:i + batch_size].to(device) if topk else None
            t_lp = teacher.logprobs[i:i + batch_size].to(device) if topk else None
            with scale.autocast(device, precision):
                if hidden_ok:
                    hidden = scale.last_hidden_states(model, chunk[:, :-1])
                    head = model.get_output_embeddings()
                for j in range(len(chunk)):
                    row_t = (t_ids[j:j + 1], t_lp[j:j + 1]) if topk else (None, None)
                    if hidden_ok:
                        _, parts = chunked_distill_loss(hidden[j:j + 1], head.weight, labels[j:j + 1], *row_t,
                                                        1.0 if topk else 0.0, temperature,
                                                        chunk_tokens=chunk_tokens or None,
                                                        bias=getattr(head, "bias", None), **kw)
                    else:
                        if j == 0:
                            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits
                        _, parts = distill_loss(logits[j:j + 1], labels[j:j + 1], *row_t, 1.0 if topk else 0.0,
                                                temperature, **kw)
                    c = int(scored[j].sum())
                    out["ce"][i + j] = float(parts["ce"]) * c
                    out["kl"][i + j] = float(parts["kl"]) * c
                    out["count"][i + j] = c
                    if topk:
                        keep = torch.as_tensor(scored[j], device=t_lp.device)
                        out["mass"][i + j] = float(t_lp[j][keep].double().exp().sum())
    finally:
        model.train(was_training)
    return out


@dataclass
class DomainResult:
    """One domain's evaluation: losses (nats per prediction), the log-ratio's SE (None: fewer than two
    documents, or no teacher), and the set's size."""

    loss: float
    teacher_loss: float | None
    se: float | None
    documents: int
    tokens: int
    kl: float = 0.0
    topk_mass: float = 0.0


def summarize(es: EvalSet, sums: dict[str, np.ndarray], teacher_nll: np.ndarray | None) -> DomainResult:
    """Per-block sums over the whole set (all ranks') -> the domain's losses and standard error."""
    count = float(sums["count"].sum())
    loss = float(sums["ce"].sum()) / count
    t_loss = se = None
    if teacher_nll is not None:
        t_loss = float(np.sum(teacher_nll)) / count
        s_doc, t_doc, n_doc = per_document(es.docs, sums["ce"], teacher_nll, sums["count"])
        se = log_ratio_se(s_doc, t_doc, n_doc)
    return DomainResult(loss, t_loss, se, es.documents, es.predictions, float(sums["kl"].sum()) / count,
                        float(sums["mass"].sum()) / count)


# the trainer's evaluation (one per rank) -------------------------------------------------------------------

@dataclass
class Evaluation:
    """One evaluation of a run, every rank's shard summed: per domain the student and teacher losses (teacher
    None without one), the log-ratio's SE (left out for domains without one) and the diagnostics (with the
    teacher's top-k)."""

    student_loss: dict[str, float]
    teacher_loss: dict[str, float] | None
    log_ratio_se: dict[str, float]
    diagnostics: dict[str, dict] | None


class Evaluator:
    """A rank's share of the run's evaluations. The evaluation sets (``eval.*``) are built once from the
    cache (each rank the same ones); rank r scores its contiguous part (:func:`shard_range`) of each domain's
    blocks. The teacher (``teacher``: the feed's client, or one opened for the evaluation alone) is asked once per
    block for the whole run, at the first evaluation, with ``kd.top_k`` when the loss uses the teacher (its
    top-k gives the diagnostics), else ``top_k=1``; its ``target_logprob`` is the teacher loss. The per-block
    sums of every rank are all-reduced (``all_reduce(list) -> list``), so every rank ends with the whole
    evaluation, standard errors included."""

    def __init__(self, cfg, domains: dict, rank: int, world: int, device, precision: str, hidden_ok: bool,
                 teacher=None, all_reduce=None) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.precision, self.hidden_ok, self.teacher = precision, hidden_ok, teacher
        self.all_reduce = all_reduce or (lambda values: values)
        self.names = sorted(domains)
        self.sets = evaluation_sets(domains, cfg.eval)
        self.fingerprint = sets_fingerprint(self.sets)
        self.ranges = {n: shard_range(len(self.sets[n]), rank, world) for n in self.names}
        self.uses_topk = teacher is not None and cfg.kd.gamma > 0
        self._answers: dict[str, TeacherAnswers] | None = None
        self.teacher_blocks_asked = 0

    def record(self) -> dict:
        """What a run records about its evaluation sets: the fingerprint and, per domain, the coverage."""
        return {"fingerprint": self.fingerprint, "documents": getattr(self.cfg.eval, "documents", "all"),
                "domains": coverage(self.sets),
                "notes": {n: s.note for n, s in self.sets.items() if s.note}}

    def _shard(self, name: str) -> EvalSet:
        return self.sets[name].part(*self.ranges[name])

    def _ask_teacher(self) -> None:
        cfg = self.cfg
        k = cfg.kd.top_k if self.uses_topk else 1
        self._answers = {}
        for n in self.names:
            shard = self._shard(n)
            self._answers[n] = teacher_answers(self.teacher, shard, k, cfg.eval.batch_size, n,
                                               keep_topk=self.uses_topk)
            self.teacher_blocks_asked += len(shard)

    def evaluate(self, model, tokens: dict[str, float] | None = None, route=None) -> Evaluation:
        cfg = self.cfg
        if self.teacher is not None and self._answers is None:
            self._ask_teacher()
        fields = ("ce", "kl", "mass", "count", "teacher")
        flat: list[float] = []
        for n in self.names:  # every rank lays out the whole set, its own blocks filled, the rest zero
            total = len(self.sets[n])
            a, b = self.ranges[n]
            t = self._answers[n] if self._answers is not None else None
            sums = block_sums(model, self._shard(n), cfg.eval.batch_size, self.device, self.precision,
                              cfg.kd.chunk_tokens, t if self.uses_topk else None, cfg.kd, self.hidden_ok)
            sums["teacher"] = t.nll if t is not None else np.zeros(b - a)
            for f in fields:
                full = np.zeros(total)
                full[a:b] = sums[f]
                flat.extend(full.tolist())
        flat = list(self.all_reduce(flat))
        student, teacher, se, diagnostics = {}, {}, {}, {}
        pos = 0
        for n in self.names:
            total = len(self.sets[n])
            got = {f: np.asarray(flat[pos + i * total:pos + (i + 1) * total]) for i, f in enumerate(fields)}
            pos += len(fields) * total
            r = summarize(self.sets[n], got, got["teacher"] if self.teacher is not None else None)
            student[n] = r.loss
            if r.teacher_loss is not None:
                teacher[n] = r.teacher_loss
            if r.se is not None:
                se[n] = r.se
            if self.uses_topk:
                diagnostics[n] = {"kl": r.kl, "ce": max(0.0, r.loss), "topk_mass": min(1.0, max(0.0, r.topk_mass)),
                                  "tokens": int((tokens or {}).get(n, 0)), "route": route(n) if route else None}
        return Evaluation(student, teacher if self.teacher is not None else None, se,
                          diagnostics if self.uses_topk else None)


# the older entry points, over the new scoring ------------------------------------------------------------

def evaluate_loss(model, blocks, batch_size: int, device: str | torch.device = "cpu") -> float:
    """Mean next-token CE (nats per token) of ``model`` over whole ``blocks`` ``[n, seq_len + 1]``."""
    if len(blocks) == 0:
        raise ValueError("blocks: nothing to evaluate")
    total, count = loss_sums(model, blocks, batch_size, device)
    return total / count


def loss_sums(model, blocks, batch_size: int, device: str | torch.device = "cpu") -> tuple[float, int]:
    """``(sum of the next-token CE over every prediction, number of predictions)`` of ``model`` on whole
    ``blocks`` (``(0.0, 0)`` for none)."""
    if len(blocks) == 0:
        return 0.0, 0
    sums = block_sums(model, full_blocks(blocks), batch_size, device)
    return float(sums["ce"].sum()), int(sums["count"].sum())


def evaluate_domains(model, domains: dict, sequences_per_domain: int, batch_size: int,
                     device: str | torch.device = "cpu") -> dict[str, float]:
    """``{domain: student loss}`` on each domain's evaluation set (default sampling)."""
    out = {}
    for name, d in domains.items():
        es = evaluation_set(d, sequences_per_domain)
        sums = block_sums(model, es, batch_size, device)
        out[name] = float(sums["ce"].sum() / sums["count"].sum())
    return out


# ---------------------------------------------------------------------------------------------------------
# ddk eval

def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def format_table(rows: list[dict], with_teacher: bool) -> str:
    head = ["domain", "docs", "tokens", "loss", "PPL"] + (["teacher PPL", "ratio", "SE log-ratio"]
                                                          if with_teacher else [])
    lines = []
    for r in rows:
        cells = [r["domain"], str(r["documents"]), str(r["tokens"]), f"{r['loss']:.4f}", f"{r['ppl']:.3f}"]
        if with_teacher:
            se = r.get("log_ratio_se")
            cells += [f"{r['teacher_ppl']:.3f}", f"{r['ratio']:.3f}", "n/a (1 doc)" if se is None else f"{se:.4f}"]
        lines.append(cells)
    widths = [max(len(h), *(len(c[j]) for c in lines)) for j, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if j == 0 else c.rjust(w)  # noqa: E731
                                  for j, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def train_config_eval(path: Path) -> tuple[int | None, Any]:
    """seq_len and the ``eval`` section of a train config passed as ``--data`` (else ``(None, None)``), read by
    the train config's own parser (its defaults included: data.seq_len 128, eval.sequences_per_domain 32)."""
    from ddk.trainer.config import load_train_sections

    sections = load_train_sections(path)
    if sections is None:
        return None, None  # not a train config (or unreadable: load_domain_specs reports it)
    return sections.data.seq_len, sections.eval


def _routed_teacher(url: str | None, routes: dict[str, str], fingerprint: str):
    """The teacher of ``ddk eval``: ``--teacher`` for every domain without a ``--route``; each teacher's
    tokenizer checked against the model's (exit 2 naming the flag and URL). The caller closes it."""
    from ddk.teacher.client import TeacherClient
    from ddk.teacher.routes import RoutedTeacher

    client = RoutedTeacher([url] if url else [], {d: [u] for d, u in routes.items()},
                           make_client=lambda urls: TeacherClient(urls))
    try:
        for domain in client.route_domains():
            flag = "--teacher" if domain is None else f"--route {domain}"
            theirs = client.client(domain).info().get("tokenizer_fingerprint")
            if theirs != fingerprint:
                raise UsageError(f"{flag}: the teacher at {','.join(client.urls_of(domain))} has tokenizer "
                                 f"fingerprint {theirs}, the model's is {fingerprint}")
    except BaseException:
        client.close()
        raise
    return client


def score_sets(model, sets: dict[str, EvalSet], batch_size: int, device, teacher=None,
               precision: str = "fp32") -> dict[str, DomainResult]:
    """Student (and, with ``teacher``, teacher: asked once per block) on every domain's evaluation set."""
    t_nll = teacher_nlls(teacher, sets, batch_size) if teacher is not None else None
    return score_sets_with(model, sets, batch_size, device, t_nll, precision)


def teacher_nlls(teacher, sets: dict[str, EvalSet], batch_size: int = 16) -> dict[str, np.ndarray]:
    """``{domain: the teacher's per-block summed loss}`` (top_k=1: its ``target_logprob`` alone)."""
    return {n: teacher_answers(teacher, es, 1, batch_size, n, keep_topk=False).nll for n, es in sets.items()}


def score_sets_with(model, sets: dict[str, EvalSet], batch_size: int, device,
                    teacher_nll: dict[str, np.ndarray] | None = None, precision: str = "fp32") -> dict[str, DomainResult]:
    """:func:`score_sets` with the teacher's per-block losses already known (``ddk compare`` scores many
    students against one teacher)."""
    hidden_ok = _hidden_ok(model)
    return {n: summarize(es, block_sums(model, es, batch_size, device, precision, hidden_ok=hidden_ok),
                         None if teacher_nll is None else teacher_nll[n]) for n, es in sets.items()}


def _hidden_ok(model) -> bool:
    from ddk.trainer.scale import hidden_state_problem

    return hidden_state_problem(model) is None


def main(args) -> int:
    """``ddk eval --model PATH --data DATA [--teacher URL] [--json]``."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddk.fingerprint import tokenizer_fingerprint
    from ddk.data.cache import prepare_domains
    from ddk.data.domains import load_domain_specs

    model_dir = Path(args.model).expanduser()
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model: no Hugging Face model directory at {model_dir}")
    if not Path(args.data).expanduser().exists():
        raise UsageError(f"--data: no such file or directory: {args.data}")
    cfg_seq_len, eval_cfg = train_config_eval(Path(args.data).expanduser())
    seq_len = int(getattr(args, "seq_len", None) or cfg_seq_len or 128)
    n_seq = int(getattr(args, "sequences", None) or (eval_cfg.sequences_per_domain if eval_cfg else 32))
    batch_size = int(getattr(args, "batch_size", None) or 16)
    if seq_len < 2 or n_seq < 1 or batch_size < 1:
        raise UsageError("--seq-len must be >= 2, --sequences and --batch-size >= 1")
    tokens = None if getattr(args, "sequences", None) else getattr(eval_cfg, "tokens_per_domain", None)
    eval_spec = SimpleNamespace(sequences_per_domain=n_seq, tokens_per_domain=tokens,
                                seed=int(getattr(eval_cfg, "seed", 0) or 0),
                                documents=getattr(eval_cfg, "documents", "all") or "all")

    specs = load_domain_specs(args.data)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    domains = prepare_domains(specs, tokenizer, seq_len)
    routes = dict(getattr(args, "route", None) or [])
    unknown = sorted(set(routes) - set(domains))
    if unknown:
        raise UsageError(f"--route: unknown domain {unknown[0]!r} (domains: {', '.join(domains)})")
    if routes and not args.teacher and set(routes) != set(domains):
        raise UsageError("--teacher: required for the domains without a --route "
                         f"({', '.join(sorted(set(domains) - set(routes)))})")
    teacher = (_routed_teacher(args.teacher, routes, tokenizer_fingerprint(tokenizer))
               if args.teacher or routes else None)
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=False).float().to(device)
        sets = evaluation_sets(domains, eval_spec)
        results = score_sets(model, sets, batch_size, device, teacher)
    finally:
        if teacher is not None:
            teacher.close()

    rows = []
    for name, r in results.items():
        row = {"domain": name, "documents": r.documents, "blocks": len(sets[name]), "tokens": r.tokens,
               "loss": r.loss, "ppl": _ppl(r.loss)}
        if r.teacher_loss is not None:
            row["teacher_loss"] = r.teacher_loss
            row["teacher_ppl"] = _ppl(r.teacher_loss)
            row["ratio"] = row["ppl"] / row["teacher_ppl"]
            row["log_ratio_se"] = r.se
        rows.append(row)

    if args.json:
        print(json.dumps({"model": str(model_dir.resolve()), "seq_len": seq_len, "sequences_per_domain": n_seq,
                          "tokens_per_domain": tokens, "evaluation_set": sets_fingerprint(sets),
                          "domains": {r.pop("domain"): r for r in rows}}, indent=2))
    else:
        print(format_table(rows, teacher is not None))
        if teacher is not None:
            one = [r["domain"] for r in rows if r.get("log_ratio_se") is None]
            if one:
                print(f"no standard error for {', '.join(one)}: the evaluation set holds one document")
            print("SE log-ratio: the standard error of log(PPL_S / PPL_T), grouped by document; "
                  "docs/training.md says how to size the evaluation from it")
    return 0
