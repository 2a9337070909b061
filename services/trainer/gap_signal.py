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

Pure: :func:`accuracy_eps`, :func:`accuracy_losses`, :func:`onpolicy_losses`.
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


def accuracy_losses(student: Mapping[str, tuple[int, int]], teacher: Mapping[str, tuple[int, int]],
                    ) -> tuple[dict[str, float], dict[str, float]]:
    """``(student_loss, teacher_loss)`` per domain from ``{domain: (correct, total)}`` of both on the same
    prompts: ``-log((correct / total + eps) / (1 + eps))``, ``eps = 1 / (2 total)``; >= 0, 0 for all right."""
    s_loss, t_loss = {}, {}
    for d, (c, n) in student.items():
        tc, tn = teacher[d]
        if tn != n:
            raise ValueError(f"domain {d}: student judged on {n} prompts, teacher on {tn}; need the same prompts")
        eps = accuracy_eps(n)
        s_loss[d] = max(0.0, math.log1p(eps) - math.log(c / n + eps))
        t_loss[d] = max(0.0, math.log1p(eps) - math.log(tc / n + eps))
    return s_loss, t_loss


def onpolicy_losses(rows: Iterable[tuple[str, Sequence[float], Sequence[float]]],
                    ) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """``(student_loss, teacher_loss, tokens)`` per domain from ``(domain, student logprobs, teacher logprobs)`` of
    each completion: ``student_loss`` the mean of ``-log p_T`` and ``teacher_loss`` the mean of ``-log p_S`` over the
    domain's completion tokens (token-weighted), so that ``exp(student_loss - teacher_loss)`` is
    :func:`ddk.trainer.onpolicy_loss.onpolicy_gap`'s q (module docstring). A domain without completion tokens gets
    0 and 0 (q = 1: no evidence of a gap)."""
    s_sum: dict[str, float] = {}
    t_sum: dict[str, float] = {}
    count: dict[str, int] = {}
    for d, s, t in rows:
        if len(s) != len(t):
            raise ValueError(f"domain {d}: {len(s)} student and {len(t)} teacher log-probabilities")
        s_sum[d] = s_sum.get(d, 0.0) - math.fsum(float(x) for x in s)
        t_sum[d] = t_sum.get(d, 0.0) - math.fsum(float(x) for x in t)
        count[d] = count.get(d, 0) + len(s)
    # the student side: the teacher's cross-entropy on the student's tokens; the teacher side: the student's own
    s_loss = {d: t_sum[d] / count[d] if count[d] else 0.0 for d in count}
    t_loss = {d: s_sum[d] / count[d] if count[d] else 0.0 for d in count}
    return s_loss, t_loss, count


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
        self.teacher_correct: dict[str, int] | None = None
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
        """The evaluation's record: ``signal``, ``student_loss``, ``teacher_loss``, ``q`` and the numbers behind them
        (``accuracy`` per domain, or completion ``tokens`` per domain), ``seconds``."""
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
        teacher_correct = self.teacher_correct if self.teacher_correct is not None else {}
        student, teacher, acc = {}, {}, {}
        for d, items in prompts.items():
            ids, asked = [x for x, _ in items], [p for _, p in items]
            outs = greedy_generate(model, ids, self.max_new, stops, self.tokenizer.pad_token_id, batch)
            right = judge(self.specs[d].task, asked, [self.tokenizer.decode(o[0], skip_special_tokens=True)
                                                     for o in outs])
            if d not in teacher_correct:
                t_outs = teacher_generate(self._urls(d), ids, self.max_new, stops, self.token)
                teacher_correct[d] = judge(self.specs[d].task, asked, [
                    self.tokenizer.decode(o[0], skip_special_tokens=True) for o in t_outs])
            n = len(items)
            student[d], teacher[d] = (right, n), (teacher_correct[d], n)
            acc[d] = {"student": right / n, "teacher": teacher_correct[d] / n, "correct": right,
                      "teacher_correct": teacher_correct[d], "total": n, "eps": accuracy_eps(n)}
        self.teacher_correct = teacher_correct
        s_loss, t_loss = accuracy_losses(student, teacher)
        return {"signal": "accuracy", "student_loss": s_loss, "teacher_loss": t_loss, "accuracy": acc}

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
        s_loss, t_loss, tokens = onpolicy_losses(rows)
        return {"signal": "onpolicy", "student_loss": s_loss, "teacher_loss": t_loss, "tokens": tokens,
                "generation_s": got.seconds, "grading_s": graded.seconds}

    def close(self) -> None:
        close = getattr(self._grader, "close", None)
        if close is not None:
            close()
        self._grader = None
