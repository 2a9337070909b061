"""The chat kit (issue 27, foundation): four conversation domains of checkable tasks that small models can learn,
generated from a seed, a character-level tokenizer with a ChatML template, and (when trained) a teacher and a
student fine-tuned on the conversations, with their greedy accuracy per domain.

Domains (one user question, one assistant answer; ``answer`` is the reference for ``task: exact``):

=========== ====================================== ===========
domain      user                                   assistant
=========== ====================================== ===========
``add``     ``What is 47 + 85?``                   ``132``
``sort``    ``Sort: 42 17 93 10``                  ``10 17 42 93``
``reverse`` ``Reverse: planet``                    ``tenalp``
``units``   ``Convert 37 km to m.``                ``37000``
=========== ====================================== ===========

Questions are unique within a domain and split into train and validation by a hash of (seed, question), so a
validation question is never a training one. The generators are pure (``random.Random(seed)``); the build writes
``data/<domain>/{train,val}.jsonl`` (``messages`` rows with ``answer``), ``data.yaml`` (each domain with
``task: {check: exact, field: answer}``), ``tokenizer/`` and, unless ``train=False``, ``teacher/`` and
``student/`` (Llama, SFT on the assistant tokens with conversations packed by :mod:`ddk.data.packing`; safetensors,
the tokenizer files, a generation config whose EOS is ``<|im_end|>``), ``train.yaml`` and ``kit.json`` (written
last) with the greedy accuracies. ``ddk fixtures --chat --out DIR`` (:func:`fixtures_main`) builds it beside
``DIR`` and renames it into place, or reuses the finished kit there (same seed and sizes).

What made the teacher learn (docs/kit.md, "Chat kit"): the learning rate, 1e-3 (units alone, 4 x 128, batch 8:
0 % after 100 steps at 3e-3, 50 % at 1e-3, 96 % after 200; all four domains at 5e-3: 0-1 % after 600), two-digit
addition operands, 3-5 numbers to sort, 3-7 letters to reverse. Decoding, left-padded generation and packed
attention were checked and were not the problem: the tokenizer round-trips text, batched left-padded greedy
answers equal one-by-one ones, and a packed block's logits equal each conversation's alone (to 1e-7).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

CHAT_DOMAINS = ("add", "sort", "reverse", "units")
CHAT_KIT_FORMAT = 1
CHAT_TASK = {"check": "exact", "field": "answer"}  # data.yaml's task: for every domain
PAD, BOS, EOS, IM_START, IM_END = "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
CHAT_SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]  # ids 0..4
# ChatML, as SmolLM2's, without its default system turn
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
UNITS = [("km", "m", 1000), ("m", "cm", 100), ("m", "mm", 1000), ("cm", "mm", 10), ("dm", "cm", 10),
         ("t", "kg", 1000), ("kg", "g", 1000), ("g", "mg", 1000), ("l", "ml", 1000), ("l", "cl", 100)]
# Two-digit numbers (10-99) in add and sort: with 0-99 the teacher's errors were where a one-digit number shifted
# the digits (add: 73 % after 2000 steps, the last digit wrong; sort: 86 %, the one-digit numbers misplaced); with
# 3-digit operands, answered most significant digit first, addition did not train at all in this budget.
TWO_DIGITS = (10, 100)
SORT_LENGTHS = (3, 5)  # how many numbers a sort question lists
WORD_LENGTHS = (3, 7)  # letters in a word to reverse
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ---------------------------------------------------------------------------------------------------------------
# the tasks (pure)

def make_example(domain: str, rng: random.Random) -> tuple[str, str]:
    """One (question, answer) of ``domain``."""
    if domain == "add":
        a, b = rng.randrange(*TWO_DIGITS), rng.randrange(*TWO_DIGITS)
        return f"What is {a} + {b}?", str(a + b)
    if domain == "sort":
        xs = [rng.randrange(*TWO_DIGITS) for _ in range(rng.randint(*SORT_LENGTHS))]
        return "Sort: " + " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))
    if domain == "reverse":
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(*WORD_LENGTHS)))
        return f"Reverse: {w}", w[::-1]
    if domain == "units":
        src, dst, k = rng.choice(UNITS)
        n = rng.randrange(1, 1000)
        return f"Convert {n} {src} to {dst}.", str(n * k)
    raise ValueError(f"unknown chat kit domain {domain!r} (one of {', '.join(CHAT_DOMAINS)})")


def is_validation(question: str, seed: int, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(f"{seed}:{question}".encode()).digest()[:8], "big") / 2.0**64
    return h < val_fraction


def generate_domain(domain: str, n_train: int, n_val: int, seed: int, val_fraction: float = 0.2
                    ) -> tuple[list[dict], list[dict]]:
    """``n_train`` and ``n_val`` rows ``{"messages": [user, assistant], "answer": ...}`` of unique questions, split
    by a hash of (seed, question); deterministic in (domain, sizes, seed)."""
    rng = random.Random(f"{seed}:{domain}")
    seen: set[str] = set()
    train: list[dict] = []
    val: list[dict] = []
    tries = 0
    while len(train) < n_train or len(val) < n_val:
        tries += 1
        if tries > 50 * (n_train + n_val) + 1000:
            raise ValueError(f"{domain}: not enough distinct questions for {n_train} + {n_val} rows")
        q, a = make_example(domain, rng)
        if q in seen:
            continue
        seen.add(q)
        side = val if is_validation(q, seed, val_fraction) else train
        if len(side) < (n_val if side is val else n_train):
            side.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                         "answer": a})
    return train, val


def check_answers(domain: str, rows: list[dict], generated: list[str]) -> tuple[int, int]:
    """(right, total) with the ``exact`` checker of :mod:`ddk.data.tasks` on each row's ``answer``."""
    from ddk.data.tasks import accuracy, make_checker, parse_task

    return accuracy(make_checker(parse_task("exact", f"domain {domain}.task")), zip(generated, rows))


# ---------------------------------------------------------------------------------------------------------------
# tokenizer

def chat_tokenizer(max_length: int):
    """Character-level (byte-level BPE without merges: every ASCII character is one token, digits included) with
    the ChatML specials and template; ``<|im_end|>`` is its EOS, ``<pad>`` its padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(CHAT_SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(CHAT_SPECIAL_TOKENS)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=IM_END, pad_token=PAD,
                                  clean_up_tokenization_spaces=False, model_max_length=max_length)
    out.chat_template = CHAT_TEMPLATE
    return out


# ---------------------------------------------------------------------------------------------------------------
# models: SFT on packed conversations, greedy accuracy

@dataclass
class ChatModelSize:
    layers: int
    hidden: int
    heads: int
    ffn: int
    steps: int
    lr: float = 1e-3  # at 3e-3 and 5e-3 (AdamW, these sizes) the teacher did not learn to copy (module docstring)
    batch_blocks: int = 16


@dataclass
class ChatKitSpec:
    seq_len: int = 128
    n_train: int = 6000
    n_val: int = 200
    teacher: ChatModelSize = field(default_factory=lambda: ChatModelSize(4, 128, 4, 384, 2400))
    student: ChatModelSize = field(default_factory=lambda: ChatModelSize(2, 64, 2, 192, 1500))
    max_new_tokens: int = 24
    # how many times each domain's training rows go into the SFT mixture (1 when absent): addition and sorting
    # learn slowest (teacher, 1600 steps, uniform: add 9 %, sort 86 %, reverse and units 100 %)
    repeat: dict[str, int] = field(default_factory=lambda: {"add": 3, "sort": 2})
    # the ready `ddk train` config (train.yaml; ddk.kit.fixtures.train_yaml reads these names)
    train_steps: int = 200
    train_batch_size: int = 8
    train_lr: float = 5e-4
    interval_steps: int = 25
    eval_sequences: int = 16
    checkpoint_every: int = 100


def sft(model, blocks: list, size: ChatModelSize, seed: int, desc: str = "sft") -> list[float]:
    """Next-token loss on the blocks' targets (assistant tokens only), blocks drawn at random; AdamW, warm-up then
    cosine to 10 %. Position ids restart per conversation and the model runs without a cache, so packed
    conversations do not attend to each other (ddk.data.packing). The losses every 50 steps."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    ids = torch.from_numpy(np.stack([b.input_ids for b in blocks]))
    tgt = torch.from_numpy(np.stack([b.targets for b in blocks]))
    pos = torch.from_numpy(np.stack([b.position_ids for b in blocks]))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=size.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, size.steps // 20)
    model.train()
    losses = []
    for step in range(size.steps):
        lr = size.lr * (step + 1) / warm if step < warm else size.lr * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, size.steps - warm))))
        for g in opt.param_groups:
            g["lr"] = lr
        pick = torch.randint(0, len(blocks), (size.batch_blocks,), generator=gen)
        logits = model(input_ids=ids[pick], position_ids=pos[pick], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt[pick].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == size.steps - 1:
            losses.append(round(loss.item(), 4))
            log.info("%s step %d/%d loss %.4f", desc, step, size.steps, loss.item())
    model.eval()
    return losses


def greedy_answers(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 100) -> list[str]:
    """The model's greedy answer to each row's user turn(s): rendered with the generation prompt, left-padded,
    stopped at ``<|im_end|>``."""
    import torch

    end = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.convert_tokens_to_ids(PAD)
    out: list[str] = []
    for i in range(0, len(rows), batch_size):
        prompts = [tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
                   for r in rows[i:i + batch_size]]
        enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(map(len, enc))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
        att = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=end, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            row = row[: row.index(end)] if end in row else row
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def accuracies(model, tokenizer, val: dict[str, list[dict]], max_new_tokens: int) -> dict[str, float]:
    acc = {}
    for d, rows in val.items():
        right, total = check_answers(d, rows, greedy_answers(model, tokenizer, rows, max_new_tokens))
        acc[d] = right / total if total else 0.0
    return acc


def llama(size: ChatModelSize, vocab: int, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=size.hidden, intermediate_size=size.ffn,
                      num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
                      max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=CHAT_SPECIAL_TOKENS.index(IM_END))
    cfg.dtype = "float32"
    return LlamaForCausalLM(cfg)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def chat_data_yaml() -> dict:
    """``data.yaml``: the four conversation domains, each with its files and its ``task`` (exact match on the
    rows' ``answer``)."""
    return {"domains": [{"name": d, "files": [f"data/{d}/train.jsonl"], "val_files": [f"data/{d}/val.jsonl"],
                         "task": dict(CHAT_TASK)} for d in CHAT_DOMAINS]}


def chat_train_yaml(spec: ChatKitSpec, seed: int) -> dict:
    """``train.yaml``: the demo kit's ready config (:func:`ddk.kit.fixtures.train_yaml`) with this kit's sizes and
    run id; teacher/ and student/ as there."""
    from ddk.kit.fixtures import train_yaml

    cfg = train_yaml(spec, seed)  # reads seq_len and the train_* / interval / eval / checkpoint fields
    cfg["run_id"] = "ddk-chat"
    cfg["output_dir"] = "runs/ddk-chat"
    return cfg


def train_models(root: Path, data: dict, tok, spec: ChatKitSpec, seed: int,
                 on_model: Callable[[str, dict], Any] | None = None) -> dict:
    """SFT the teacher and the student on the packed training conversations (each domain's ``spec.repeat``
    times), save each (safetensors, tokenizer files, generation config with ``<|im_end|>`` as EOS) and measure its
    greedy accuracy per domain."""
    import torch

    from ddk.data.chat import Conversation, prepare_conversations
    from ddk.data.packing import pack, packing_efficiency

    convs = [Conversation(tuple(r["messages"]), (1,)) for d in CHAT_DOMAINS for _ in range(spec.repeat.get(d, 1))
             for r in data[d][0]]
    prepared = prepare_conversations(tok, convs, spec.seq_len, "drop")
    blocks = pack([(t.input_ids, t.assistant_mask) for t in prepared.items], spec.seq_len,
                  pad_id=tok.convert_tokens_to_ids(PAD))
    info: dict[str, Any] = {"packing": {"blocks": len(blocks), "efficiency": round(packing_efficiency(blocks), 4),
                                        **prepared.stats.as_dict()}}
    val = {d: data[d][1] for d in CHAT_DOMAINS}
    torch.set_num_threads(os.cpu_count() or 1)
    for i, name in enumerate(("teacher", "student")):
        size = spec.teacher if name == "teacher" else spec.student
        torch.manual_seed(seed * 1000 + i)
        model = llama(size, len(tok), 2 * spec.seq_len)
        t0 = time.monotonic()
        losses = sft(model, blocks, size, seed * 1000 + i, desc=name)
        took = time.monotonic() - t0
        t0 = time.monotonic()
        acc = accuracies(model, tok, val, spec.max_new_tokens)
        model.generation_config.eos_token_id = tok.convert_tokens_to_ids(IM_END)
        model.generation_config.pad_token_id = tok.convert_tokens_to_ids(PAD)
        model.generation_config.bos_token_id = tok.convert_tokens_to_ids(BOS)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        info[name] = {"params": sum(p.numel() for p in model.parameters()), **asdict(size),
                      "train_seconds": round(took, 1), "eval_seconds": round(time.monotonic() - t0, 1),
                      "losses": losses, "accuracy": acc}
        log.info("%s: trained in %.0fs, accuracy %s", name, took, {d: round(v, 3) for d, v in acc.items()})
        if on_model:
            on_model(name, info[name])
    return info


def build_chat_kit(out: str | Path, seed: int = 0, spec: ChatKitSpec | None = None, train: bool = True,
                   on_model: Callable[[str, dict], Any] | None = None) -> dict:
    """Write the chat kit into ``out`` (a new or empty folder) and return its ``kit.json`` record (written last).
    ``train=False``: the data, ``data.yaml`` and the tokenizer only (no ``train.yaml``: nothing to train)."""
    import yaml

    spec = spec or ChatKitSpec()
    started = time.monotonic()
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    root.mkdir(parents=True, exist_ok=True)
    data = {d: generate_domain(d, spec.n_train, spec.n_val, seed) for d in CHAT_DOMAINS}
    for d, (tr, va) in data.items():
        _write_jsonl(root / "data" / d / "train.jsonl", tr)
        _write_jsonl(root / "data" / d / "val.jsonl", va)
    (root / "data.yaml").write_text(yaml.safe_dump(chat_data_yaml(), sort_keys=False))
    tok = chat_tokenizer(2 * spec.seq_len)
    tok.save_pretrained(root / "tokenizer")
    info: dict[str, Any] = {"format": CHAT_KIT_FORMAT, "kind": "chat", "seed": seed, "spec": asdict(spec),
                            "domains": list(CHAT_DOMAINS), "task": dict(CHAT_TASK), "vocab_size": len(tok)}
    if train:
        info.update(train_models(root, data, tok, spec, seed, on_model))
        (root / "train.yaml").write_text(yaml.safe_dump(chat_train_yaml(spec, seed), sort_keys=False))
    info["build_seconds"] = round(time.monotonic() - started, 1)
    (root / "kit.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# ---------------------------------------------------------------------------------------------------------------
# the finished kit: reuse, rebuild, the CLI

def read_chat_kit(out: str | Path) -> dict | None:
    """kit.json of a finished chat kit in ``out`` (trained), or None (absent, half-written, another kit)."""
    try:
        info = json.loads((Path(out) / "kit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("kind") != "chat" or info.get("format") != CHAT_KIT_FORMAT:
        return None
    return info if "teacher" in info else None


def spec_from_dict(d: dict) -> ChatKitSpec:
    """A ChatKitSpec from its ``asdict`` form (kit.json's "spec")."""
    return ChatKitSpec(**{**d, "teacher": ChatModelSize(**d["teacher"]), "student": ChatModelSize(**d["student"])})


def build_into(root: str, spec: dict, seed: int) -> None:
    """:func:`build_chat_kit` with plain arguments: what :func:`ensure_chat_kit` runs in a fresh process."""
    build_chat_kit(root, seed, spec_from_dict(spec))


def ensure_chat_kit(out: str | Path, seed: int = 0, force: bool = False, spec: ChatKitSpec | None = None) -> Path:
    """Build the chat kit into ``out`` (or reuse the finished one there, same seed and spec); return its path.
    Built beside ``out`` and renamed into place, under the demo kit's lock; with ``OMP_WAIT_POLICY=PASSIVE``
    (:mod:`ddk.runtime`: in a fresh process when this one loaded torch before the default was set)."""
    import shutil

    from ddk.errors import UsageError
    from ddk.kit.fixtures import _check_out, _lock
    from ddk.runtime import apply_process_defaults, call_in_fresh_process

    late = apply_process_defaults()
    spec = spec or ChatKitSpec()
    out = Path(out).expanduser().absolute()
    _check_out(out)
    with _lock(out):
        info = read_chat_kit(out)
        if info is not None and not force:
            if info.get("seed") == seed and info.get("spec") == json.loads(json.dumps(asdict(spec))):
                log.info("reusing the finished chat kit in %s", out)
                return out
            raise UsageError(f"--out {out} holds a chat kit built with seed {info.get('seed')} or other sizes; "
                             f"pass --force to rebuild or choose another directory")
        if (out / "kit.json").exists() and info is None and not force:
            raise UsageError(f"--out {out} holds another kit (its kit.json is not a chat kit's); "
                             f"pass --force to replace it or choose another directory")
        for stale in out.parent.glob(f"{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
        try:
            if late:
                call_in_fresh_process("ddk.kit.chat:build_into", {"root": str(tmp), "spec": asdict(spec),
                                                                    "seed": seed})
            else:
                build_chat_kit(tmp, seed, spec)
            _check_out(out)
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def accuracy_table(info: dict) -> str:
    """Greedy accuracy per domain on the validation rows: teacher, student, and the gap (teacher - student)."""
    lines = [f"{'domain':<8} {'teacher':>8} {'student':>8} {'gap':>6}"]
    for d in info["domains"]:
        t, s = info["teacher"]["accuracy"][d], info["student"]["accuracy"][d]
        lines.append(f"{d:<8} {t:>8.3f} {s:>8.3f} {t - s:>6.3f}")
    return "\n".join(lines)


def fixtures_main(args) -> int:
    """CLI: ``ddk fixtures --chat --out DIR [--seed N] [--force]``."""
    from ddk.errors import UsageError

    if args.quick or getattr(args, "real", False) or getattr(args, "specialist", None) \
            or getattr(args, "gguf", None) or getattr(args, "teacher", None):
        raise UsageError("--chat takes only --out, --seed and --force (not --quick, --real, --specialist, "
                         "--gguf or --teacher)")
    out = ensure_chat_kit(args.out, seed=args.seed, force=args.force)
    info = read_chat_kit(out)
    print(f"kit: {out} (chat, seed {info['seed']}, built in {info['build_seconds']}s; teacher "
          f"{info['teacher']['train_seconds']}s, student {info['student']['train_seconds']}s of training)")
    print(accuracy_table(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ddk.kit.chat --out DIR [--seed N] [--data-only]``: :func:`build_chat_kit` into a new folder
    (``ddk fixtures --chat`` is the command that reuses a finished kit)."""
    import argparse

    from ddk.runtime import apply_process_defaults

    p = argparse.ArgumentParser(prog="python -m ddk.kit.chat", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-only", action="store_true", help="write the data and the tokenizer, train nothing")
    a = p.parse_args(argv)
    apply_process_defaults()  # before torch loads
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        info = build_chat_kit(a.out, a.seed, train=not a.data_only)
    except FileExistsError as e:
        p.error(str(e))
    if "teacher" in info:
        print(accuracy_table(info))
    print(f"built in {info['build_seconds']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
