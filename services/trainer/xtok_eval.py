"""``ddk eval --teacher URL`` with a teacher of another tokenizer (issue 29): the gap in bits per byte.

A loss per token does not compare across tokenizers (the teacher's tokens are other pieces of the same text), so
when a teacher's tokenizer fingerprint differs from the model's, ``ddk eval`` reports both models in **bits per
byte** of the same evaluation text and the ratio of their per-byte perplexities:

- ``bits_per_byte = NLL_sum / ln 2 / n_bytes`` (``align.bits_per_byte``), ``n_bytes`` the UTF-8 bytes of the
  evaluation set's scored tokens (each block's tokens 1 .. length - 1: ``xtok_teacher.scored_bytes``);
- the student's ``NLL_sum`` is its summed next-token CE over those predictions (``evaluate.block_sums``, as a
  same-tokenizer ``ddk eval``); the teacher's is its NLL of the same text tokenised its way, through the
  cross-tokenizer wrapper (``xtok_teacher.CrossTokenizerTeacher``: each block re-tokenised, aligned by bytes, the
  teacher's log-probabilities summed onto the student's positions);
- ``ratio = 2 ** (bpb_S - bpb_T)`` = exp(``align.log_ratio_per_byte``), the per-byte perplexity ratio, with its
  standard error grouped by document (``evaluate.log_ratio_se`` over per-document sums per byte).

The table says so in its last line; ``--json`` adds ``"ratio_unit": "per_byte"`` and ``"cross_tokenizer": true``.
A teacher of the model's tokenizer leaves ``ddk eval`` as it was (``evaluate.main``); with ``--route`` teachers of
both kinds, every domain is reported per byte. ``kd.cross_tokenizer``'s handshake applies (exit 2 naming the flag:
no tokenizer served, a pair that cannot round-trip text).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ddk.errors import UsageError

RATIO_UNIT = "per_byte"
NOTE = ("the teacher's tokenizer differs from the model's: losses per token are not comparable across tokenizers, "
        "so both models are in bits per byte of the same text and the ratio is 2^(bpb - teacher bpb), the "
        "per-byte perplexity ratio")


def teacher_urls(args) -> list[tuple[str, str]]:
    """``[(flag, URL)]`` of ``--teacher`` and every ``--route domain=URL``."""
    pairs = [("--teacher", args.teacher)] if getattr(args, "teacher", None) else []
    return pairs + [(f"--route {d}", u) for d, u in (getattr(args, "route", None) or [])]


def cross_teachers(args, model_dir: Path) -> tuple[object, list[str]] | None:
    """The model's tokenizer and the flags of the teachers whose tokenizer differs from it (each checked by
    ``xtok_teacher.checked_teacher_tokenizer``: exit 2 naming the flag); None when every teacher shares it."""
    from transformers import AutoTokenizer

    from ddk.fingerprint import tokenizer_fingerprint
    from ddk.teacher.client import TeacherClient, TeacherUnavailable
    from ddk.trainer.xtok_teacher import checked_teacher_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    mine, cross = tokenizer_fingerprint(tokenizer), []
    for flag, url in teacher_urls(args):
        with TeacherClient([url]) as client:
            try:
                theirs = client.info().get("tokenizer_fingerprint")
            except TeacherUnavailable as e:
                raise UsageError(f"{flag}: no teacher answers at {url} ({e})") from None
            if theirs != mine:
                checked_teacher_tokenizer(client, tokenizer, f"{flag} ({url})")
                cross.append(flag)
    return (tokenizer, cross) if cross else None


def main(args) -> int:
    """``ddk eval`` (perplexity): :func:`evaluate.main` unless a teacher has another tokenizer (module docstring)."""
    from ddk.trainer import evaluate

    model_dir = Path(args.model).expanduser()
    if not teacher_urls(args) or not (model_dir / "config.json").is_file() \
            or not Path(args.data or "").expanduser().exists():
        return evaluate.main(args)  # no teacher, or input evaluate.main refuses naming it
    found = cross_teachers(args, model_dir)
    if found is None:
        return evaluate.main(args)
    tokenizer, flags = found
    report = cross_report(args, model_dir, tokenizer)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report["domains"]))
        print(f"{', '.join(flags)}: {NOTE}")
    return 0


def eval_spec(args):
    """seq_len, the evaluation-set spec and the batch size of ``ddk eval``'s flags (a train config's ``eval``
    section as the default: ``evaluate.train_config_eval``), as ``evaluate.main`` reads them."""
    from ddk.trainer.evaluate import train_config_eval

    cfg_seq_len, eval_cfg = train_config_eval(Path(args.data).expanduser())
    seq_len = int(getattr(args, "seq_len", None) or cfg_seq_len or 128)
    n_seq = int(getattr(args, "sequences", None) or (eval_cfg.sequences_per_domain if eval_cfg else 32))
    batch_size = int(getattr(args, "batch_size", None) or 16)
    if seq_len < 2 or n_seq < 1 or batch_size < 1:
        raise UsageError("--seq-len must be >= 2, --sequences and --batch-size >= 1")
    tokens = None if getattr(args, "sequences", None) else getattr(eval_cfg, "tokens_per_domain", None)
    spec = SimpleNamespace(sequences_per_domain=n_seq, tokens_per_domain=tokens,
                           seed=int(getattr(eval_cfg, "seed", 0) or 0),
                           documents=getattr(eval_cfg, "documents", "all") or "all")
    return seq_len, spec, batch_size


def cross_report(args, model_dir: Path, tokenizer) -> dict:
    """Both models on every domain's evaluation set, in bits per byte (module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ddk.data.cache import prepare_domains
    from ddk.data.domains import load_domain_specs
    from ddk.trainer.evaluate import block_sums, evaluation_sets, teacher_nlls
    from ddk.trainer.xtok_teacher import Side

    seq_len, spec, batch_size = eval_spec(args)
    domains = prepare_domains(load_domain_specs(args.data), tokenizer, seq_len)
    routes = dict(getattr(args, "route", None) or [])
    unknown = sorted(set(routes) - set(domains))
    if unknown:
        raise UsageError(f"--route: unknown domain {unknown[0]!r} (domains: {', '.join(domains)})")
    if routes and not args.teacher and set(routes) != set(domains):
        raise UsageError("--teacher: required for the domains without a --route "
                         f"({', '.join(sorted(set(domains) - set(routes)))})")
    sets = evaluation_sets(domains, spec)
    teacher = open_teacher(args.teacher, routes, tokenizer)
    try:
        t_nll = teacher_nlls(teacher, sets, batch_size)
    finally:
        teacher.close()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=False).float().to(device)
    lengths = byte_lengths(Side(tokenizer))
    out = {}
    for name, es in sets.items():
        sums = block_sums(model, es, batch_size, device)
        out[name] = domain_row(es, sums["ce"], t_nll[name], sums["count"], block_bytes(es, lengths))
    return {"model": str(model_dir.resolve()), "seq_len": seq_len, "sequences_per_domain": spec.sequences_per_domain,
            "tokens_per_domain": spec.tokens_per_domain, "cross_tokenizer": True, "ratio_unit": RATIO_UNIT,
            "note": NOTE, "domains": out}


def open_teacher(url: str | None, routes: dict[str, str], tokenizer):
    """The cross-tokenizer wrapper over ``--teacher`` and the ``--route`` teachers (``xtok_teacher``)."""
    from ddk.teacher.client import TeacherClient
    from ddk.teacher.routes import RoutedTeacher
    from ddk.trainer.xtok_teacher import open_cross_tokenizer

    cfg = SimpleNamespace(kd=SimpleNamespace(cross_tokenizer="auto"), cache=SimpleNamespace(dir=None),
                          teacher=SimpleNamespace(urls=[url] if url else [], routes={d: [u] for d, u in routes.items()},
                                                  all_urls=lambda: ([url] if url else []) + list(routes.values())))
    base = RoutedTeacher(cfg.teacher.urls, cfg.teacher.routes, make_client=lambda urls: TeacherClient(urls))
    try:
        return open_cross_tokenizer(cfg, base, tokenizer)
    except BaseException:
        base.close()
        raise


def byte_lengths(side) -> np.ndarray:
    """UTF-8 bytes of each token id of a tokenizer (0 for specials)."""
    return np.array([len(b) if b else 0 for b in side.id_bytes], dtype=np.int64)


def block_bytes(es, lengths: np.ndarray) -> np.ndarray:
    """Per block of an evaluation set, the UTF-8 bytes of its scored tokens (:func:`xtok_teacher.scored_bytes`
    block by block)."""
    from ddk.trainer.xtok_teacher import scored_bytes

    return np.array([scored_bytes(es.part(i, i + 1), lengths) for i in range(len(es))], dtype=np.int64)


def domain_row(es, s_nll: np.ndarray, t_nll: np.ndarray, counts: np.ndarray, n_bytes: np.ndarray) -> dict:
    """One domain: both models' bits per byte, the per-byte ratio and its SE (documents grouped). Pure."""
    from ddk.data.evalset import log_ratio_se, per_document
    from ddk.trainer.align import bits_per_byte, log_ratio_per_byte

    total = int(n_bytes.sum())
    s_sum, t_sum = float(np.sum(s_nll)), float(np.sum(t_nll))
    s_doc, t_doc, b_doc = per_document(es.docs, s_nll, t_nll, n_bytes)
    return {"documents": es.documents, "blocks": len(es), "tokens": int(np.sum(counts)), "bytes": total,
            "loss": s_sum / float(np.sum(counts)), "bits_per_byte": bits_per_byte(s_sum, total),
            "teacher_bits_per_byte": bits_per_byte(t_sum, total),
            "ratio": math.exp(log_ratio_per_byte(s_sum, t_sum, total)),
            "log_ratio_se": log_ratio_se(s_doc, t_doc, b_doc)}


def format_table(rows: dict[str, dict]) -> str:
    head = ["domain", "docs", "bytes", "bits/byte", "teacher bits/byte", "ratio/byte", "SE log-ratio"]
    lines = []
    for name, r in rows.items():
        se = r["log_ratio_se"]
        lines.append([name, str(r["documents"]), str(r["bytes"]), f"{r['bits_per_byte']:.4f}",
                      f"{r['teacher_bits_per_byte']:.4f}", f"{r['ratio']:.4f}",
                      "n/a (1 doc)" if se is None else f"{se:.4f}"])
    widths = [max(len(h), *(len(c[j]) for c in lines)) for j, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])
