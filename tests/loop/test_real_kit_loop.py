"""The trainer's paths on the real kit (``ddk fixtures --real``: SmolLM2-135M teacher, 20-layer student, 49,152
tokens, seq_len 256): FSDP against DDP, and training from a precomputed top-k store against the live service.

* FSDP: one spawn of 2 processes (gloo, as tests/unit/test_fsdp.py) train the real student with the Trainer's
  own placement (``ddk.trainer.parallel.Distributed.place``: DDP, then FSDP2 from the same weights) for 2 steps
  of the distillation loss (chunked path, 1 x 128 tokens per rank and step) against the real teacher's top-16
  answers (from the session's real-teacher server, before the spawn). The two strategies compute the same sums in
  another order (FSDP reduce-scatters the gradients, DDP all-reduces them in buckets), so in float32 they agree
  to rounding: the step-1 loss (same weights, same forward) to 1e-5 relative, the step-2 loss (after one AdamW
  step at lr 1e-4 on the averaged gradient; AdamW divides by sqrt(v), so a reordered float32 gradient moves a
  weight by at most ~lr) to 1e-4 absolute.
* The top-k store: a slice of the real kit's data (2 training and 2 validation documents per domain, 700 characters each, blocks of 128 tokens) precomputed
  through ``ddk teacher serve --backend hf`` on the real teacher (``ddk teacher precompute``'s command function),
  then a batch's answers from the store (the trainer's ``checked_store_source``, no teacher) equal the service's
  (float16 both ways), and the student's loss and gradients from each answer are the same.
"""

from __future__ import annotations

import io
import json
import os
import socket
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml


pytestmark = pytest.mark.slow

WORLD, STEPS, K, LR = 2, 2, 16, 1e-4
FSDP_SEQ = 128  # half the kit's seq_len: the equality does not depend on the length, and it halves the test's time


def kd(gamma: float = 0.5):
    from types import SimpleNamespace

    return SimpleNamespace(gamma=gamma, temperature=1.0, loss="forward_kl", beta=0.5, skew=0.1)


def val_blocks(kit: Path, n: int, length: int) -> np.ndarray:
    """``n`` rows of ``length`` token ids of the kit's code validation text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(kit / "tokenizer")
    docs = (kit / "data" / "code" / "val.jsonl").read_text().splitlines()[:40]
    text = "\n".join(json.loads(line)["text"] for line in docs)
    ids = tok(text, add_special_tokens=False).input_ids
    return np.array([ids[i * length:(i + 1) * length] for i in range(n)], dtype=np.int64)


# ----------------------------------------------------------------------------- FSDP against DDP

def _fsdp_worker(rank: int, port: int, kit: str, out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ddk.trainer.optim import build_optimizer
    from ddk.trainer.parallel import Distributed
    from ddk.trainer.scale import StudentStep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    data = load_file(Path(out) / "batches.safetensors")

    from types import SimpleNamespace

    # the loop's context under Ray Train with 2 workers (ray.train.torch.prepare_model): DDP places the student
    ctx = SimpleNamespace(rank=rank, world_size=WORLD, prepare_model=torch.nn.parallel.DistributedDataParallel)

    result = {}
    try:
        for strategy in ("ddp", "fsdp"):
            student = AutoModelForCausalLM.from_pretrained(Path(kit) / "student", dtype=torch.float32)
            student.config.use_cache = False
            model = Distributed(strategy, ctx, "cpu", "fp32").place(StudentStep(student.train(), kd(), None))
            opt = build_optimizer(model, LR, 0.1)
            losses = []
            for s in range(STEPS):
                ids = data["ids"][s, rank:rank + 1]
                loss, _ = model(ids[:, :-1], ids[:, 1:], data["t_ids"][s, rank:rank + 1],
                                data["t_lp"][s, rank:rank + 1])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                losses.append(mean.item() / WORLD)
            result[strategy] = losses
            del model, opt, student
        (Path(out) / f"result-{rank}.json").write_text(json.dumps(result))
    except Exception as e:
        (Path(out) / f"error-{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        raise
    finally:
        dist.destroy_process_group()


def test_fsdp_on_the_real_student_equals_ddp(real_kit, real_teacher, tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import save_file

    from ddk.teacher.client import TeacherClient

    seq = FSDP_SEQ
    rows = val_blocks(real_kit, STEPS * WORLD, seq + 1)
    with TeacherClient(real_teacher) as client:  # the session's server on the real teacher (tests/conftest.py)
        answers = client.topk(torch.from_numpy(rows), K)
    shape = (STEPS, WORLD, seq)
    save_file({"ids": torch.from_numpy(rows).reshape(*shape[:2], seq + 1),
               "t_ids": answers.ids.reshape(*shape, K).contiguous(),
               "t_lp": answers.logprobs.float().reshape(*shape, K).contiguous()},
              str(tmp_path / "batches.safetensors"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.start_processes(_fsdp_worker, args=(port, str(real_kit), str(tmp_path)), nprocs=WORLD,
                           start_method="spawn")
    except Exception:  # noqa: BLE001 - the workers wrote what failed
        pytest.fail("workers failed:\n" + "\n".join(p.read_text() for p in tmp_path.glob("error-*.txt")))
    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(WORLD)]
    ddp, fsdp = results[0]["ddp"], results[0]["fsdp"]
    print(f"real student, 2 ranks: DDP losses {ddp}, FSDP losses {fsdp}")  # shown with pytest -s
    assert results[1] == results[0]  # every rank saw the same averaged losses
    assert all(np.isfinite(ddp + fsdp)) and all(1.0 < v < 20.0 for v in ddp), ddp
    assert fsdp[0] == pytest.approx(ddp[0], rel=1e-5)  # the same weights: the same forward
    assert fsdp[1] == pytest.approx(ddp[1], abs=1e-4)  # after one AdamW step on the averaged gradient


# ----------------------------------------------------------------------------- the top-k store

DOCS = {"train": 2, "val": 2}
CHARS = 700  # of each document: about 190 SmolLM2 tokens, so a domain is 2-3 blocks per split (the teacher scores them all)
SEQ = 128    # half the kit's seq_len, as the FSDP test: the store's bytes do not depend on the length


def small_config(kit: Path, d: Path) -> Path:
    """A train config over a slice of the real kit's data (its own token cache): the first documents of each
    split, each cut to ``CHARS`` characters, in blocks of ``SEQ`` tokens."""
    domains = []
    for dom in sorted(p for p in (kit / "data").iterdir() if p.is_dir()):
        files = {}
        for split, n in DOCS.items():
            target = d / "data" / dom.name / f"{split}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            docs = [json.loads(line)["text"][:CHARS] for line in (dom / f"{split}.jsonl").read_text().splitlines()[:n]]
            target.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
            files[split] = str(target)
        domains.append({"name": dom.name, "files": [files["train"]], "val_files": [files["val"]]})
    raw = yaml.safe_load((kit / "train.yaml").read_text())
    raw.update(student={"model": str(kit / "student")}, output_dir=str(d / "runs"),
               data={"domains": domains, "seq_len": SEQ, "cache_dir": str(d / "tokens")},
               eval={"sequences_per_domain": 2}, ray={"num_workers": 1, "address": "", "use_gpu": False})
    (d / "small.yaml").write_text(yaml.safe_dump(raw))
    return d / "small.yaml"


def test_a_step_from_the_precomputed_store_equals_one_from_the_service(real_kit, real_teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    from ddk.cli import build_parser
    from ddk.data.cache import prepare_data
    from ddk.data.tokenizer import student_tokenizer
    from ddk.teacher.client import TeacherClient
    from ddk.trainer.config import load_config
    from ddk.trainer.scale import StudentStep
    from ddk.trainer.topk_source import checked_store_source

    small = small_config(real_kit, tmp_path)
    url = real_teacher  # the session's server on the real teacher (tests/conftest.py)
    args = build_parser().parse_args(["teacher", "precompute", str(small), "--teacher", url,
                                      "--out", str(tmp_path / "topk"), "--quiet"])
    with redirect_stdout(io.StringIO()) as printed:
        assert args.func(args) == 0
    cfg = load_config(str(small), [f"cache.dir={tmp_path / 'topk'}", "teacher.urls=[]", "controller.url=null",
                                   "mixture.policy=fixed"])
    tok, _ = student_tokenizer(cfg)
    domains = prepare_data(cfg, tok)
    rows = torch.from_numpy(np.stack([np.asarray(domains[d].train[0], dtype=np.int64) for d in domains]))
    client = TeacherClient([url])
    try:
        live = client.topk(rows, K)
    finally:
        client.close()
    assert "blocks of 4 domains" in printed.getvalue() and "there before" in printed.getvalue()
    source = checked_store_source(cfg, tok, domains)  # no teacher: every block must be in the store
    try:
        stored = source.topk(rows, K)
        assert (source.hits, source.misses) == (len(rows), 0)
    finally:
        source.close()
    assert rows.shape == (4, cfg.data.seq_len + 1) and stored.ids.shape == (4, cfg.data.seq_len, K)
    torch.testing.assert_close(stored.ids, live.ids, rtol=0, atol=0)
    torch.testing.assert_close(stored.logprobs, live.logprobs, rtol=0, atol=0)
    torch.testing.assert_close(stored.target_logprob, live.target_logprob, rtol=0, atol=0)

    student = AutoModelForCausalLM.from_pretrained(real_kit / "student", dtype=torch.float32)
    step = StudentStep(student.train(), kd(), None)
    losses, grads = [], []
    for answer in (stored, live):
        student.zero_grad(set_to_none=True)
        loss, parts = step(rows[:2, :-1], rows[:2, 1:], answer.ids[:2], answer.logprobs[:2])
        loss.backward()
        losses.append(loss.item())
        grads.append(student.model.layers[0].mlp.down_proj.weight.grad.clone())
    assert np.isfinite(losses[0]) and losses[0] == losses[1]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
