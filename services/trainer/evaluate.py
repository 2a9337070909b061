"""Per-domain validation loss of a model (and of the teacher), and the ``ddk eval`` command.

The DDK weights compare student and teacher on *the same* validation blocks: the first
``sequences_per_domain`` validation blocks of each domain (deterministic, see data.py). A block of
``seq_len + 1`` tokens gives ``seq_len`` next-token predictions; the loss is their mean in nats per token,
and perplexity is ``exp(loss)``. The teacher's loss on a block is the mean of ``-target_logprob`` the teacher
service returns for it -- the same predictions, since row j of the teacher's answer is its distribution over
``block[j + 1]`` given ``block[: j + 1]``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddk.errors import UsageError
from ddk.trainer.data import PackedDomain

log = logging.getLogger(__name__)


def evaluate_loss(model, blocks: np.ndarray, batch_size: int, device: str | torch.device = "cpu") -> float:
    """Mean next-token CE (nats per token) of ``model`` over ``blocks`` ``[n, seq_len + 1]``."""
    if len(blocks) == 0:
        raise ValueError("blocks: nothing to evaluate")
    total, count = loss_sums(model, blocks, batch_size, device)
    return total / count


@torch.no_grad()
def loss_sums(model, blocks: np.ndarray, batch_size: int, device: str | torch.device = "cpu") -> tuple[float, int]:
    """``(sum of the next-token CE over every prediction, number of predictions)`` of ``model`` on ``blocks``
    (``(0.0, 0)`` for none): what a shard of an evaluation adds to the whole."""
    if len(blocks) == 0:
        return 0.0, 0
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(blocks), batch_size):
            chunk = torch.from_numpy(np.asarray(blocks[i:i + batch_size], dtype=np.int64)).to(device)
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            labels = chunk[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     reduction="sum").item()
            count += labels.numel()
    finally:
        model.train(was_training)
    return total, count


def evaluation_blocks(domain: PackedDomain, sequences_per_domain: int) -> np.ndarray:
    """The blocks every evaluation of this domain uses: the first ``sequences_per_domain`` of its val split."""
    return domain.val[:sequences_per_domain]


def evaluate_domains(model, domains: dict[str, PackedDomain], sequences_per_domain: int, batch_size: int,
                     device: str | torch.device = "cpu") -> dict[str, float]:
    """``{domain: student loss}`` on each domain's evaluation blocks."""
    return {name: evaluate_loss(model, evaluation_blocks(d, sequences_per_domain), batch_size, device)
            for name, d in domains.items()}


def shard_of(blocks: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous part of ``blocks`` when ``world_size`` ranks share an evaluation (the parts
    cover every block once; some are empty when there are fewer blocks than ranks)."""
    n = len(blocks)
    return blocks[rank * n // world_size:(rank + 1) * n // world_size]


def domain_loss_sums(model, domains: dict[str, PackedDomain], sequences_per_domain: int, batch_size: int,
                     device: str | torch.device = "cpu", rank: int = 0,
                     world_size: int = 1) -> dict[str, tuple[float, int]]:
    """``{domain: (loss sum, predictions)}`` on this rank's shard (:func:`shard_of`) of each domain's evaluation
    blocks. Summed over the ranks and divided, they give :func:`evaluate_domains` of the whole, split W ways."""
    return {name: loss_sums(model, shard_of(evaluation_blocks(d, sequences_per_domain), rank, world_size),
                            batch_size, device)
            for name, d in domains.items()}


def losses_from_sums(sums: dict[str, tuple[float, int]]) -> dict[str, float]:
    """``{domain: loss sum / predictions}`` of (all-reduced) :func:`domain_loss_sums`."""
    return {name: total / count for name, (total, count) in sums.items()}


def teacher_losses_from_client(client, domains: dict[str, PackedDomain], sequences_per_domain: int,
                               top_k: int, batch_size: int = 16) -> dict[str, float]:
    """``{domain: teacher loss}``: mean ``-target_logprob`` from the teacher service over the same blocks."""
    return {name: teacher_loss_on_blocks(client, evaluation_blocks(d, sequences_per_domain), top_k, batch_size,
                                         domain=name)
            for name, d in domains.items()}


def teacher_loss_on_blocks(client, blocks, top_k: int = 1, batch_size: int = 16, domain: str | None = None) -> float:
    """Mean ``-target_logprob`` of the teacher service over ``blocks`` (``[n, seq_len + 1]`` token ids), from
    ``domain``'s teacher when the client routes by domain (ddk.teacher.routes)."""
    from ddk.teacher.routes import ask

    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(np.asarray(blocks[i:i + batch_size], dtype=np.int64))
        target = ask(client, ids, top_k, [domain] * len(ids)).target_logprob.double()
        total += -target.sum().item()
        count += target.numel()
    return total / count


def teacher_topk_on_blocks(client, blocks, top_k: int, batch_size: int = 16, domain: str | None = None):
    """``(ids, logprobs)`` ``[n, seq_len, k]`` of the teacher for ``blocks``, asked ``batch_size`` blocks at a time
    (through ``domain``'s route when the client routes by domain: ddk.teacher.routes.ask)."""
    from ddk.teacher.routes import ask

    ids, logprobs = [], []
    for i in range(0, len(blocks), batch_size):
        chunk = torch.from_numpy(np.asarray(blocks[i:i + batch_size], dtype=np.int64))
        out = ask(client, chunk, top_k, [domain] * len(chunk))
        ids.append(out.ids)
        logprobs.append(out.logprobs.float())
    return torch.cat(ids), torch.cat(logprobs)


@torch.no_grad()
def distill_sums(model, blocks: np.ndarray, teacher: tuple[torch.Tensor, torch.Tensor], batch_size: int,
                 device: str | torch.device, kd) -> tuple[float, float, float, int]:
    """``(CE sum, divergence sum, teacher top-k mass sum, predictions)`` of ``model`` on ``blocks`` against the
    teacher's top-k for them (:func:`teacher_topk_on_blocks`): the per-domain diagnostics of one shard. The
    divergence is ``kd.loss`` at ``kd.temperature`` with its T^2 scaling, as in training; the mass is
    ``sum_k exp(logprob)``, how much of the teacher's distribution its k tokens cover."""
    from ddk.trainer.loss import topk_divergence

    if len(blocks) == 0:
        return 0.0, 0.0, 0.0, 0
    t_ids, t_lp = teacher
    was_training = model.training
    model.eval()
    ce = kl = mass = 0.0
    count = 0
    try:
        for i in range(0, len(blocks), batch_size):
            chunk = torch.from_numpy(np.asarray(blocks[i:i + batch_size], dtype=np.int64)).to(device)
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            labels = chunk[:, 1:]
            ids, lp = t_ids[i:i + batch_size].to(device), t_lp[i:i + batch_size].to(device)
            ce += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").item()
            kl += topk_divergence(logits, labels, ids, lp, kd.temperature, kd.loss, kd.beta, kd.skew).item() \
                * labels.numel()
            mass += lp.double().exp().sum(-1).sum().item()
            count += labels.numel()
    finally:
        model.train(was_training)
    return ce, kl, mass, count


# ---------------------------------------------------------------------------------------------------------
# ddk eval

def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def format_table(rows: list[dict], with_teacher: bool) -> str:
    head = ["domain", "tokens", "loss", "PPL"] + (["teacher PPL", "ratio"] if with_teacher else [])
    lines = []
    for r in rows:
        cells = [r["domain"], str(r["tokens"]), f"{r['loss']:.4f}", f"{r['ppl']:.3f}"]
        if with_teacher:
            cells += [f"{r['teacher_ppl']:.3f}", f"{r['ratio']:.3f}"]
        lines.append(cells)
    widths = [max(len(h), *(len(c[j]) for c in lines)) for j, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if j == 0 else c.rjust(w)  # noqa: E731
                                  for j, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def _train_config_defaults(path: Path) -> dict:
    """seq_len and sequences per domain from a train config passed as ``--data`` (else nothing), read by the
    train config's own parser (its defaults included: data.seq_len 128, eval.sequences_per_domain 32)."""
    from ddk.trainer.config import load_train_sections

    sections = load_train_sections(path)
    if sections is None:
        return {}  # not a train config (or unreadable: load_domain_specs reports it)
    return {"seq_len": sections.data.seq_len, "sequences": sections.eval.sequences_per_domain}


def _routed_teacher_losses(url: str | None, routes: dict[str, str], fingerprint: str, domains, n_seq: int,
                           batch_size: int) -> dict[str, float]:
    """The teacher losses of ``ddk eval``: ``--teacher`` for every domain without a ``--route``; each teacher's
    tokenizer checked against the model's (exit 2 naming the flag and URL)."""
    from ddk.teacher.client import TeacherClient
    from ddk.teacher.routes import RoutedTeacher

    client = RoutedTeacher([url] if url else [], {d: [u] for d, u in routes.items()},
                           make_client=lambda urls: TeacherClient(urls))
    try:
        for domain in [None, *sorted(routes)]:
            if domain is None and not url:
                continue
            flag = "--teacher" if domain is None else f"--route {domain}"
            theirs = client.client(domain).info().get("tokenizer_fingerprint")
            if theirs != fingerprint:
                raise UsageError(f"{flag}: the teacher at {','.join(client.urls_of(domain))} has tokenizer "
                                 f"fingerprint {theirs}, the model's is {fingerprint}")
        return teacher_losses_from_client(client, domains, n_seq, top_k=1, batch_size=batch_size)
    finally:
        client.close()


def main(args) -> int:
    """``ddk eval --model PATH --data DATA [--teacher URL] [--json]``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddk.fingerprint import tokenizer_fingerprint
    from ddk.trainer.data import load_domain_specs, prepare_domains

    model_dir = Path(args.model).expanduser()
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model: no Hugging Face model directory at {model_dir}")
    if not Path(args.data).expanduser().exists():
        raise UsageError(f"--data: no such file or directory: {args.data}")
    defaults = _train_config_defaults(Path(args.data).expanduser())
    seq_len = int(getattr(args, "seq_len", None) or defaults.get("seq_len", 128))
    n_seq = int(getattr(args, "sequences", None) or defaults.get("sequences", 32))
    batch_size = int(getattr(args, "batch_size", None) or 16)
    if seq_len < 2 or n_seq < 1 or batch_size < 1:
        raise UsageError("--seq-len must be >= 2, --sequences and --batch-size >= 1")

    specs = load_domain_specs(args.data)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    domains = prepare_domains(specs, tokenizer, seq_len)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=False).float().to(device)
    losses = evaluate_domains(model, domains, n_seq, batch_size, device)

    teacher_losses = None
    routes = dict(getattr(args, "route", None) or [])
    unknown = sorted(set(routes) - set(domains))
    if unknown:
        raise UsageError(f"--route: unknown domain {unknown[0]!r} (domains: {', '.join(domains)})")
    if routes and not args.teacher and set(routes) != set(domains):
        raise UsageError("--teacher: required for the domains without a --route "
                         f"({', '.join(sorted(set(domains) - set(routes)))})")
    if args.teacher or routes:
        teacher_losses = _routed_teacher_losses(args.teacher, routes, tokenizer_fingerprint(tokenizer), domains,
                                                n_seq, batch_size)

    rows = []
    for name, d in domains.items():
        blocks = d.val[:n_seq]
        row = {"domain": name, "tokens": int(blocks.shape[0] * (blocks.shape[1] - 1)),
               "loss": losses[name], "ppl": _ppl(losses[name])}
        if teacher_losses is not None:
            row["teacher_loss"] = teacher_losses[name]
            row["teacher_ppl"] = _ppl(teacher_losses[name])
            row["ratio"] = row["ppl"] / row["teacher_ppl"]
        rows.append(row)

    if args.json:
        print(json.dumps({"model": str(model_dir.resolve()), "seq_len": seq_len, "sequences_per_domain": n_seq,
                          "domains": {r.pop("domain"): r for r in rows}}, indent=2))
    else:
        print(format_table(rows, teacher_losses is not None))
    return 0
