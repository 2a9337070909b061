"""The gap the controller sees (``mixture.signal``, issues 27 and 28): the DDK policies read per domain
``q = exp(student_loss - teacher_loss)``; this module puts other gaps into that one contract, so the policies stay
as they are.

- ``ratio`` (the default; not computed here): the evaluator's losses on the validation blocks, q = PPL_S / PPL_T.
- ``accuracy``: per domain the greedy answers of the current student to the domain's validation prompts (the
  first ``eval.sequences_per_domain`` conversations of its ``val_files``, without their last assistant turn),
  judged by the domain's task checker (:mod:`ddk.data.tasks`); the teacher answers the same prompt ids through
  the teacher service's ``POST /v1/generate`` once per run attempt. With ``n`` prompts and ``eps = 1 / (2n)``::

      student_loss = -log((acc_S + eps) / (1 + eps)),   teacher_loss = -log((acc_T + eps) / (1 + eps))
      q = exp(student_loss - teacher_loss) = (acc_T + eps) / (acc_S + eps)

  (the ``1 + eps`` divides out of q; it keeps the losses >= 0, as the controller requires of losses: a perfect
  score is loss 0 rather than -log(1 + eps) < 0.)

  ``eps`` is half of one prompt's worth of accuracy: it keeps q finite when the student gets nothing right, and is
  small enough that one more right answer always moves q by more than the smoothing does (the +1/2 of a
  Jeffreys-style continuity correction on the counts: (c_T + 1/2) / (c_S + 1/2)).
- ``onpolicy``: per domain, the current student's completions of the same validation prompts (the run's
  ``rollout.*`` sampling settings, one fixed seed for every evaluation), scored by the student (its forward pass)
  and by the teacher (``/v1/topk``'s ``target_logprob`` over prompt + completion, completion positions only)::

      student_loss = mean over completion tokens of -log p_T(x_t)   (the teacher's surprise at the student's text)
      teacher_loss = mean over completion tokens of -log p_S(x_t)   (the student's own surprise: its entropy)
      q = exp(student_loss - teacher_loss) = exp(mean of (log p_S - log p_T))   (= onpolicy_loss.onpolicy_gap)

  the exponentiated per-token reverse KL on the student's own text: KL(S || T) = CE(S, T) - H(S), so the
  "student" side carries the cross-entropy the student's text costs under the teacher and the "teacher" side the
  student's entropy, its floor. (The other assignment, student_loss = mean -log p_S, would give exp of the
  *negative* reverse KL, 1 / q: a student far from the teacher would look ahead of it.)

**Error bars** (issue 24 for these signals; posted as ``log_ratio_se``, so the controller's "steering by noise"
warning and ``gap_estimate: shrunk`` work as for ``ratio``), the standard error of log q per domain:

- ``onpolicy``: log q = sum_i d_i / sum_i n_i with, per completion i, d_i = its sum of (log p_S - log p_T) and
  n_i its tokens: the ratio of sums of :func:`ddk.data.evalset.log_ratio_se` with each completion a group
  (``S_i`` = sum of -log p_T, ``T_i`` = sum of -log p_S): SE = sqrt(m / (m - 1) sum_i (d_i - R n_i)^2) / sum_i n_i
  over the domain's m completions. None for one completion (no spread to measure) or no tokens.
- ``accuracy``: per prompt i the outcomes (x_S,i, x_T,i) in {0, 1}^2 of the same n prompts (paired). With
  a_S, a_T the accuracies, the delta method linearises log q = log(a_T + eps) - log(a_S + eps) (eps = 1 / (2n),
  fixed by n) into the mean of z_i = x_T,i / (a_T + eps) - x_S,i / (a_S + eps), so
  Var(log q) = Var(z) / n = [s_T^2 / (a_T + eps)^2 + s_S^2 / (a_S + eps)^2 - 2 c_ST / ((a_T + eps)(a_S + eps))] / n
  with the sample variances and covariance (n - 1 in the denominator):
  SE = sqrt(sum_i (z_i - mean z)^2 / (n (n - 1))). None for n = 1; 0 when every prompt has the same outcome pair
  (all right on both sides, say: the binomial delta method sees no spread).

Pure: :func:`accuracy_eps`, :func:`accuracy_log_ratio_se`, :func:`accuracy_losses`, :func:`onpolicy_losses`.
The launch check :func:`check_signal` (every domain judged / conversational: exit 2 naming the domains) runs before
Ray starts; :class:`GapSignal` is what rank 0's Trainer calls at an evaluation.

The prompts, where an answer stops and the judging are ``ddk eval --tasks``'s own, from their one owner
:mod:`ddk.data.tasks` (the trainer cannot import ``ddk.experiments``, which imports the trainer); the generation is
``ddk.teacher.generation``'s.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ddk.data.tasks import TaskPrompt, fit_prompt, judge, render_prompt, stop_ids, task_prompts
from ddk.errors import UsageError

log = logging.getLogger("ddk.trainer")


# ---------------------------------------------------------------------------------------------------------
# the mappings (pure)

def accuracy_eps(n: int) -> float:
    """``1 / (2n)`` for ``n`` prompts (module docstring: why)."""
    if n < 1:
        raise ValueError(f"n: need at least one prompt, got {n}")
    return 1.0 / (2 * int(n))


def accuracy_log_ratio_se(student: Sequence[int], teacher: Sequence[int]) -> float | None:
    """Standard error of ``log q = log(acc_T + eps) - log(acc_S + eps)`` (``eps = 1 / (2n)``) from the per-prompt
    outcomes of both on the same ``n`` prompts, in the same order (1 right, 0 wrong): the delta method over prompts
    with the pairing (module docstring). None for fewer than 2 prompts (no spread to measure)."""
    x_s, x_t = (np.asarray(x, dtype=np.float64) for x in (student, teacher))
    if x_s.shape != x_t.shape or x_s.ndim != 1:
        raise ValueError(f"student judged on {x_s.shape} prompts, teacher on {x_t.shape}; need the same prompts")
    if not np.isin(x_s, (0.0, 1.0)).all() or not np.isin(x_t, (0.0, 1.0)).all():
        raise ValueError("per-prompt outcomes must be 0 (wrong) or 1 (right)")
    n = len(x_s)
    if n < 2:
        return None
    eps = accuracy_eps(n)
    z = x_t / (x_t.mean() + eps) - x_s / (x_s.mean() + eps)  # each prompt's term of the linearised log q
    return float(math.sqrt(float(np.sum((z - z.mean()) ** 2)) / (n * (n - 1))))


def accuracy_losses(student: Mapping[str, Sequence[int]], teacher: Mapping[str, Sequence[int]],
                    ) -> tuple[dict[str, float], dict[str, float], dict[str, float | None]]:
    """``(student_loss, teacher_loss, log_ratio_se)`` per domain from the per-prompt outcomes (1 right, 0 wrong) of
    both on the same prompts: ``-log((correct / total + eps) / (1 + eps))``, ``eps = 1 / (2 total)``, >= 0 and 0
    for all right; the SE of log q by :func:`accuracy_log_ratio_se` (None for one prompt)."""
    s_loss, t_loss, se = {}, {}, {}
    for d, s in student.items():
        s, t = list(s), list(teacher[d])
        n = len(s)
        if len(t) != n:
            raise ValueError(f"domain {d}: student judged on {n} prompts, teacher on {len(t)}; need the same prompts")
        eps = accuracy_eps(n)
        s_loss[d] = max(0.0, math.log1p(eps) - math.log(sum(s) / n + eps))
        t_loss[d] = max(0.0, math.log1p(eps) - math.log(sum(t) / n + eps))
        se[d] = accuracy_log_ratio_se(s, t)
    return s_loss, t_loss, se


def onpolicy_losses(rows: Iterable[tuple[str, Sequence[float], Sequence[float]]],
                    ) -> tuple[dict[str, float], dict[str, float], dict[str, int], dict[str, float | None]]:
    """``(student_loss, teacher_loss, tokens, log_ratio_se)`` per domain from ``(domain, student logprobs, teacher
    logprobs)`` of each completion: ``student_loss`` the mean of ``-log p_T`` and ``teacher_loss`` the mean of
    ``-log p_S`` over the domain's completion tokens (token-weighted), so that ``exp(student_loss - teacher_loss)``
    is :func:`ddk.trainer.onpolicy_loss.onpolicy_gap`'s q (module docstring). A domain without completion tokens gets
    0 and 0 (q = 1: no evidence of a gap). The SE of log q: each completion a group, by
    :func:`ddk.data.evalset.log_ratio_se` (None for one completion or no tokens)."""
    from ddk.data.evalset import log_ratio_se

    groups: dict[str, list[tuple[float, float, int]]] = {}  # per completion: sum -log p_T, sum -log p_S, tokens
    for d, s, t in rows:
        if len(s) != len(t):
            raise ValueError(f"domain {d}: {len(s)} student and {len(t)} teacher log-probabilities")
        groups.setdefault(d, []).append((-math.fsum(float(x) for x in t), -math.fsum(float(x) for x in s), len(s)))
    count = {d: sum(g[2] for g in gs) for d, gs in groups.items()}
    # the student side: the teacher's cross-entropy on the student's tokens; the teacher side: the student's own
    s_loss = {d: math.fsum(g[0] for g in gs) / count[d] if count[d] else 0.0 for d, gs in groups.items()}
    t_loss = {d: math.fsum(g[1] for g in gs) / count[d] if count[d] else 0.0 for d, gs in groups.items()}
    se = {d: log_ratio_se(*np.asarray(gs, dtype=np.float64).T) for d, gs in groups.items()}
    return s_loss, t_loss, count, se


# ---------------------------------------------------------------------------------------------------------
# the launch check

def check_signal(cfg, specs) -> None:
    """``mixture.signal`` against the domains (UsageError naming the key and the domains, before Ray starts):
    ``accuracy`` needs a task checker (``task:``) and ``val_files`` on every domain; ``onpolicy`` needs every
    domain to be a conversation domain with ``val_files``. (The config's own checks: kd.on_policy, teacher.urls.)"""
    signal = cfg.mixture.signal
    if signal == "ratio":
        return
    if signal == "accuracy":
        bad = sorted(s.name for s in specs if getattr(s, "task", None) is None or not s.val_files)
        if bad:
            raise UsageError(f"mixture.signal: accuracy needs a task checker (task: in data.yaml) and val_files on "
                             f"every domain; {', '.join(bad)} lack(s) one (use mixture.signal: ratio)")
        return
    from ddk.trainer.onpolicy import is_conversation_domain

    bad = sorted(s.name for s in specs if not s.val_files or not is_conversation_domain(s))
    if bad:
        raise UsageError(f"mixture.signal: onpolicy needs every domain to be a conversation domain with val_files "
                         f"(its prompts); {', '.join(bad)} is/are not (use mixture.signal: ratio)")


# ---------------------------------------------------------------------------------------------------------
# the prompts and the generation (I/O)

def validation_prompts(spec, tokenizer, limit: int, room: int) -> list[tuple[list[int], TaskPrompt]]:
    """``(prompt ids, prompt)`` of the first ``limit`` conversations of ``spec.val_files``
    (:func:`ddk.data.tasks.task_prompts`), rendered with the tokenizer's chat template and its generation prompt,
    cut to ``room`` ids."""
    return [(fit_prompt(render_prompt(tokenizer, p.messages, f"{p.file}:{p.line}"), room)[0], p)
            for p in task_prompts(spec.val_files, limit)]


def teacher_generate(urls: Sequence[str], prompts: list[list[int]], max_new: int, stops: list[int],
                     token: str | None) -> list[tuple[list[int], str]]:
    """Greedy answers of the teacher service (``POST /v1/generate``), the next URL when one cannot be reached."""
    import httpx

    from ddk.teacher.generation import generate_remote

    err: Exception | None = None
    for url in urls:
        try:
            return generate_remote(url, prompts, max_new, stops, token=token)
        except httpx.TransportError as e:
            err = e
            log.warning("gap signal: teacher %s unreachable for /v1/generate (%s)", url, e)
    raise RuntimeError(f"mixture.signal: no teacher in {list(urls)} answered /v1/generate ({err})")


# ---------------------------------------------------------------------------------------------------------
# the Trainer's part

class GapSignal:
    """Rank 0's measurement of ``mixture.signal`` (accuracy or onpolicy) at an evaluation: :meth:`measure` returns
    the record whose ``student_loss`` / ``teacher_loss`` are posted instead of the evaluator's. The prompts are read
    at the first call; the teacher's accuracy is asked once per run attempt (the prompts are fixed)."""

    def __init__(self, cfg, tokenizer, teacher_token: str | None = None) -> None:
        from ddk.data.domains import load_domain_specs

        self.cfg, self.tokenizer, self.token = cfg, tokenizer, teacher_token
        self.signal = cfg.mixture.signal
        self.specs = {s.name: s for s in load_domain_specs(cfg.data.source())}
        self.max_new = int(cfg.rollout.max_new_tokens)
        self.prompts: dict[str, list[tuple[list[int], TaskPrompt]]] | None = None
        self.teacher_right: dict[str, list[int]] | None = None  # per domain, per prompt: 1 right, 0 wrong
        self._grader = None

    def _prompts(self, model) -> dict[str, list[tuple[list[int], TaskPrompt]]]:
        if self.prompts is None:
            positions = getattr(model.config, "max_position_embeddings", None)
            room = int(self.cfg.data.seq_len)
            if positions:
                room = max(1, min(room, int(positions) - self.max_new))
            self.prompts = {n: validation_prompts(s, self.tokenizer, self.cfg.eval.sequences_per_domain, room)
                            for n, s in sorted(self.specs.items())}
        return self.prompts

    def _urls(self, domain: str) -> list[str]:
        routes = self.cfg.teacher.routes or {}
        return list(routes.get(domain) or self.cfg.teacher.urls or self.cfg.teacher.all_urls())

    def measure(self, model) -> dict[str, Any]:
        """The evaluation's record: ``signal``, ``student_loss``, ``teacher_loss``, ``q``, ``log_ratio_se`` (per
        domain the SE of log q, None where there is none) and the numbers behind them (``accuracy`` per domain, or
        completion ``tokens`` per domain), ``seconds``."""
        t0 = time.perf_counter()
        rec = self._accuracy(model) if self.signal == "accuracy" else self._onpolicy(model)
        from ddk.vocab import ratio

        rec["q"] = ratio(rec["student_loss"], rec["teacher_loss"])
        rec["seconds"] = time.perf_counter() - t0
        log.info("gap signal %s: q %s", self.signal, ", ".join(f"{d} {v:.4g}" for d, v in rec["q"].items()))
        return rec

    def _accuracy(self, model) -> dict[str, Any]:
        from ddk.teacher.generation import greedy_generate, model_stop_ids

        prompts, stops = self._prompts(model), stop_ids(self.tokenizer, model_stop_ids(model))
        batch = int(self.cfg.eval.batch_size)
        teacher_right = self.teacher_right if self.teacher_right is not None else {}
        student, acc = {}, {}
        for d, items in prompts.items():
            ids, asked = [x for x, _ in items], [p for _, p in items]
            outs = greedy_generate(model, ids, self.max_new, stops, self.tokenizer.pad_token_id, batch)
            student[d] = self._judged(d, asked, outs)
            if d not in teacher_right:
                teacher_right[d] = self._judged(d, asked, teacher_generate(self._urls(d), ids, self.max_new, stops,
                                                                           self.token))
            n, right, t_right = len(items), sum(student[d]), sum(teacher_right[d])
            acc[d] = {"student": right / n, "teacher": t_right / n, "correct": right,
                      "teacher_correct": t_right, "total": n, "eps": accuracy_eps(n)}
        self.teacher_right = teacher_right
        s_loss, t_loss, se = accuracy_losses(student, {d: teacher_right[d] for d in student})
        return {"signal": "accuracy", "student_loss": s_loss, "teacher_loss": t_loss, "log_ratio_se": se,
                "accuracy": acc}

    def _judged(self, domain: str, asked: list[TaskPrompt], outs: list[tuple[list[int], str]]) -> list[int]:
        """Per prompt 1 (the domain's checker accepts the decoded answer) or 0: :func:`ddk.data.tasks.judge` of
        each answer alone, in order (the pairing of student and teacher is by prompt)."""
        answers = [self.tokenizer.decode(o[0], skip_special_tokens=True) for o in outs]
        if len(answers) != len(asked):
            raise ValueError(f"{len(asked)} prompts but {len(answers)} answers")
        return [judge(self.specs[domain].task, [p], [a]) for p, a in zip(asked, answers)]

    def _onpolicy(self, model) -> dict[str, Any]:
        import torch

        from ddk.trainer.onpolicy import grade_by_domain, open_grader, rollout, train_batch
        from ddk.trainer.onpolicy_loss import token_logprobs
        from ddk.trainer.rollout import HFRollout

        r = self.cfg.rollout
        engine = HFRollout(self.cfg.rollout_seed, 0, self.max_new, r.temperature, r.top_p)  # step 0: a fixed seed
        if self._grader is None:
            self._grader = open_grader(self.cfg, self.token)
        prompts = self._prompts(model)
        names = [d for d, items in prompts.items() for _ in items]
        got = rollout(engine, model, [p for items in prompts.values() for p, _ in items])
        graded = grade_by_domain(self._grader, got.rollouts, names, self.cfg.kd.top_k)
        pad = model.config.pad_token_id
        rows, step = [], max(1, int(self.cfg.eval.batch_size))
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            for a in range(0, len(names), step):
                sub = type(graded)(graded.outputs[a:a + step], 0.0)
                batch = train_batch(got.rollouts[a:a + step], sub, 0 if pad is None else int(pad)).to(device)
                with torch.no_grad():
                    lp = token_logprobs(model(input_ids=batch.input_ids, use_cache=False).logits, batch.labels)
                mask = batch.completion_mask
                for i in range(mask.shape[0]):
                    m = mask[i]
                    rows.append((names[a + i], lp[i][m].tolist(), batch.teacher_token_logprobs[i][m].tolist()))
        finally:
            model.train(was_training)
        s_loss, t_loss, tokens, se = onpolicy_losses(rows)
        return {"signal": "onpolicy", "student_loss": s_loss, "teacher_loss": t_loss, "log_ratio_se": se,
                "tokens": tokens, "generation_s": got.seconds, "grading_s": graded.seconds}

    def close(self) -> None:
        close = getattr(self._grader, "close", None)
        if close is not None:
            close()
        self._grader = None
