"""``ddk data prepare CONFIG`` / ``ddk data inspect CONFIG``: the token cache (:mod:`ddk.data.cache`) of a train
config (its data section, ``student.model``'s tokenizer, ``--set`` applies) or of a data.yaml / data folder with
``--tokenizer``. Here, beside the train config's parser, so that :mod:`ddk.data` needs nothing of the trainer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from ddk.data.cache import prepare_domains
from ddk.data.domains import (DomainSpec, PackedDomain, default_cache_dir, is_train_config, load_domain_specs,
                              natural_proportions)
from ddk.data.evalset import evaluation_sets
from ddk.data.tokenizer import load_tokenizer
from ddk.errors import UsageError
from ddk.trainer.config import load_config, load_train_sections


def _cli_inputs(args) -> tuple[list[DomainSpec], Any, int, Path, str | None]:
    """(specs, tokenizer, seq_len, cache_dir, ray address) from a train config (``--set`` applies) or a
    data.yaml / data folder (then ``--tokenizer`` is needed)."""
    path = Path(args.config).expanduser()
    if not path.exists():
        raise UsageError(f"config: no such file or directory: {path}")
    raw = None
    if path.is_file():
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise UsageError(f"config {path}: cannot read ({str(e).splitlines()[0]})") from None
    overrides = getattr(args, "overrides", None) or []
    ray_address = None
    if is_train_config(raw):
        cfg = load_config(str(path), overrides, for_job="data")  # data, student.model, ray: no teacher needed
        specs = load_domain_specs(cfg.data.source())
        seq_len = cfg.data.seq_len
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
        tok_path = getattr(args, "tokenizer", None) or cfg.student.model
        ray_address = cfg.ray.address or None
    else:
        if overrides:
            raise UsageError("--set: needs a train config (CONFIG here is a data.yaml or a data folder)")
        tok_path = getattr(args, "tokenizer", None)
        if not tok_path:
            raise UsageError("--tokenizer: required when CONFIG is a data.yaml or a data folder (no student.model)")
        specs = load_domain_specs(path)
        seq_len = 128
        cache = default_cache_dir()
    if getattr(args, "seq_len", None):
        seq_len = int(args.seq_len)
    if getattr(args, "cache_dir", None):
        cache = Path(args.cache_dir).expanduser()
    if seq_len < 2:
        raise UsageError("--seq-len: must be at least 2")
    return specs, _tokenizer(str(tok_path), specs), seq_len, cache, ray_address


def _tokenizer(path: str, specs: list[DomainSpec]):
    """The tokenizers-only reader for text (ddk.data.tokenizer.load_tokenizer); transformers' tokenizer, which
    carries the chat template, when a domain holds conversations."""
    from ddk.data.chat_cache import KIND, domain_form

    if not any(domain_form(s) == KIND for s in specs):
        return load_tokenizer(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"tokenizer: cannot load one from {path} ({e})") from None


def summary_rows(domains: dict[str, PackedDomain], eval_cfg: Any = None) -> list[dict]:
    """Per domain: documents, tokens, train/val blocks, natural proportion (share of the training tokens), and
    what its evaluation set covers (``eval.*`` of the train config, else the defaults: ddk.data.evalset)."""
    natural = natural_proportions(domains)
    sets = evaluation_sets(domains, eval_cfg or SimpleNamespace(sequences_per_domain=32))
    rows = []
    for name, d in domains.items():
        info = d.info or {}
        tr, va = info.get("train", {}), info.get("val", {})
        rows.append({"domain": name, "train_documents": tr.get("documents"), "val_documents": va.get("documents"),
                     "train_tokens": tr.get("tokens"), "val_tokens": va.get("tokens"),
                     "train_blocks": len(d.train), "val_blocks": len(d.val), "natural": natural[name],
                     "dtype": str(d.train.dtype), "shards": len(info.get("shards", {})),
                     "eval_blocks": len(sets[name]), "eval_documents": sets[name].documents,
                     "eval_tokens": sets[name].predictions})
        if d.conversations:  # what fitting to seq_len + 1 did, per split (ddk.data.chat_cache)
            rows[-1]["conversations"] = {s: {k: info.get(s, {}).get(k) for k in CHAT_COUNTS}
                                         for s in ("train", "val")}
            rows[-1]["overflow"] = info.get("overflow")
    return rows


CHAT_COUNTS = ("conversations", "truncated", "dropped", "assistant_tokens", "padding_share")


def format_conversations(rows: list[dict]) -> str:
    """The conversation domains' counts (train / val): conversations read, truncated from the left, dropped,
    assistant (label) tokens kept, the padding's share of the blocks' positions; "" when there are none."""
    chat = [r for r in rows if r.get("conversations")]
    if not chat:
        return ""
    head = ["conversation domain", "overflow", "conversations", "truncated", "dropped", "assistant tokens",
            "padding"]
    cells = []
    for r in chat:
        c = r["conversations"]
        pair = lambda k, f="{:,}": " / ".join(f.format(c[s][k] or 0) for s in ("train", "val"))  # noqa: E731
        cells.append([r["domain"], str(r.get("overflow")), pair("conversations"), pair("truncated"), pair("dropped"),
                      pair("assistant_tokens"), pair("padding_share", "{:.1%}")])
    widths = [max(len(h), *(len(c[j]) for c in cells)) for j, h in enumerate(head)]

    def fmt(cs):
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cs, widths)))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in cells])


def format_summary(rows: list[dict]) -> str:
    head = ["domain", "docs (train/val)", "tokens (train/val)", "train blocks", "val blocks", "natural", "dtype",
            "shards", "eval docs / tokens"]
    cells = [[r["domain"], f"{r['train_documents']:,} / {r['val_documents']:,}",
              f"{r['train_tokens']:,} / {r['val_tokens']:,}", f"{r['train_blocks']:,}", f"{r['val_blocks']:,}",
              f"{r['natural']:.3f}", r["dtype"], str(r["shards"]),
              f"{r['eval_documents']:,} / {r['eval_tokens']:,}"] for r in rows]
    widths = [max(len(h), *(len(c[j]) for c in cells)) for j, h in enumerate(head)]

    def fmt(cs):
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cs, widths)))

    table = "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in cells])
    chat = format_conversations(rows)
    return table + ("\n\n" + chat + "\n(train / val; docs: conversations kept, one padded block each)"
                    if chat else "")


def prepare_main(args) -> int:
    """``ddk data prepare CONFIG [--set k=v] [--workers N] [--ray]``: build (or resume, or check and repair)
    the token cache of every domain, with a progress bar in tokens/s."""
    specs, tokenizer, seq_len, cache, ray_address = _cli_inputs(args)
    t0 = time.perf_counter()
    domains = prepare_domains(specs, tokenizer, seq_len, cache, workers=getattr(args, "workers", None),
                              use_ray=bool(getattr(args, "ray", False)),
                              ray_address=getattr(args, "ray_address", None) or ray_address,
                              verify=True, progress=None if not getattr(args, "quiet", False) else False,
                              shard_chars=getattr(args, "shard_chars", None))
    built = [d for d in domains.values() if d.build is not None]
    tokens = sum(d.build["tokens"] for d in built)
    print(format_summary(summary_rows(domains)))
    dt = time.perf_counter() - t0
    print(f"\ncache {cache}: {len(built)} of {len(domains)} domains built, {tokens:,} tokens tokenised "
          f"in {dt:.1f} s" + (f" ({tokens / dt:,.0f} tokens/s)" if tokens else ""))
    return 0


def inspect_main(args) -> int:
    """``ddk data inspect CONFIG``: per domain documents, tokens, train/val blocks, natural proportions (the
    cache is prepared first when it is missing)."""
    specs, tokenizer, seq_len, cache, _ = _cli_inputs(args)
    domains = prepare_domains(specs, tokenizer, seq_len, cache, workers=getattr(args, "workers", None),
                              progress=None)
    sections = load_train_sections(Path(args.config).expanduser())  # its eval.* (None: a data.yaml)
    rows = summary_rows(domains, sections.eval if sections is not None else None)
    if getattr(args, "json", False):
        print(json.dumps({"cache_dir": str(cache), "seq_len": seq_len, "domains": rows}, indent=1))
    else:
        print(format_summary(rows))
        print(f"\ncache {cache}, seq_len {seq_len}; eval docs / tokens: the whole-document windows every evaluation "
              "scores (docs/training.md)")
    return 0
