"""What the Trainer needs to scale a step: mixed precision, gradient accumulation, activation checkpointing,
torch.compile, the hidden-state (chunked) loss path and the FLOPs count behind MFU (issue 12).

Pure helpers and one small module, :class:`StudentStep`, so that loop.py stays about the order of things:

* :func:`resolve_precision` / :func:`autocast` / :func:`grad_scaler`: ``train.precision`` (auto: bf16 on CUDA,
  fp32 elsewhere). The weights and AdamW's state stay float32 (master weights); only the forward and the loss
  run under ``torch.autocast``; fp16 adds a ``torch.amp.GradScaler``. The loss functions cast to float32
  before their softmaxes and reductions, so those stay float32 whatever the autocast dtype.
* :func:`micro_weights` / :func:`no_sync`: ``train.grad_accum_steps`` N. One optimiser step is N micro-batches;
  micro-batch m's loss (a mean over its labelled tokens n_m) is scaled by ``n_m / sum(n)`` before its
  backward, so the summed gradient is that of the whole step's batch; DDP's all-reduce runs on the last
  micro-batch only (``model.no_sync()`` on the others).
* :class:`StudentStep`: the student *and* its loss as one module, the module that DDP wraps. Its forward
  returns ``(loss, {"ce", "kl"})``. With ``kd.chunk_tokens != 0`` it runs the student's base model for the
  last hidden states and :func:`ddk.trainer.loss.chunked_distill_loss` with the output projection's weight,
  so the full ``[B, T, V]`` logits never exist; with 0 it is the plain path (``student(...).logits`` and
  :func:`ddk.trainer.loss.distill_loss`). Because the loss is inside the wrapped module's forward, every
  parameter use (the lm_head weight included) happens inside DDP's forward and the gradient sync is DDP's
  ordinary one.
* :func:`flops_per_token` / :func:`mfu`: model FLOPs utilisation as nanoGPT and torchtitan count it: 6 x
  (non-embedding) parameters per token for forward + backward, against the accelerator's peak.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
from typing import Any

import torch

log = logging.getLogger("ddk.trainer")

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity) of a few accelerators, for MFU when train.peak_tflops
# is not set. Matched on torch.cuda.get_device_name(); anything else needs train.peak_tflops.
KNOWN_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                     ("A10G", 70.0), ("L4", 121.0))


# ---------------------------------------------------------------------------------------------------------
# precision

def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``train.precision`` -> ``fp32`` | ``bf16`` | ``fp16`` on ``device``. auto: bf16 on CUDA (fp16 where the GPU
    has no bf16), fp32 elsewhere. ValueError naming the key for bf16 on a GPU without it."""
    kind = torch.device(device).type
    if precision == "auto":
        if kind != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision: unknown {precision!r} (auto, {', '.join(PRECISIONS)})")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision: bf16 is not supported by this GPU; use fp16 or fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """The forward's (and loss's) autocast context for a resolved precision; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (disabled it passes the loss and the step through unchanged)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


# ---------------------------------------------------------------------------------------------------------
# gradient accumulation

def micro_weights(counts: list[int]) -> list[float]:
    """The factor of each micro-batch's mean loss: its labelled tokens over the step's (so that the sum of the
    scaled means is the mean over the whole step). All-zero counts: equal shares."""
    total = sum(int(c) for c in counts)
    if total <= 0:
        return [1.0 / len(counts)] * len(counts)
    return [int(c) / total for c in counts]


def no_sync(model: torch.nn.Module, sync: bool):
    """No gradient sync on this micro-batch unless ``sync`` (the step's last): DDP's ``model.no_sync()``, or for
    FSDP2 (the sharded student inside :class:`StudentStep`) ``set_requires_gradient_sync(False)`` for the
    backward, so its reduce-scatter too runs once a step; nothing on one unwrapped rank."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    sharded = getattr(model, "student", model)
    if hasattr(sharded, "set_requires_gradient_sync"):
        return _fsdp_no_sync(sharded)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: torch.nn.Module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


# ---------------------------------------------------------------------------------------------------------
# activation checkpointing, compile

def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Hugging Face gradient checkpointing (non-reentrant); ValueError naming the key where the model has none."""
    if not getattr(model, "supports_gradient_checkpointing", False) or \
            not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(f"train.activation_checkpointing: {type(model).__name__} does not support gradient "
                         "checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_problem(device: torch.device | str) -> str | None:
    """Why ``torch.compile`` (inductor) cannot run on ``device`` here, or None. CPU code needs a C++ compiler,
    CUDA code needs Triton."""
    kind = torch.device(device).type
    try:
        inductor_config = importlib.import_module("torch._inductor.config")
        importlib.import_module("torch._dynamo")
    except Exception as e:  # noqa: BLE001 - a broken or stripped torch
        return f"torch.compile is not available in this torch ({type(e).__name__}: {e})"
    if kind == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return "torch.compile on CUDA needs Triton, which this torch cannot find"
        return None if has_triton() else "torch.compile on CUDA needs Triton (pip install triton)"
    cxx = inductor_config.cpp.cxx
    names = [c for c in (cxx if isinstance(cxx, (tuple, list)) else (cxx,)) if c]
    names = ([os.environ["CXX"]] if os.environ.get("CXX") else []) + names + ["g++", "clang++", "c++"]
    if not any(shutil.which(n) for n in names):
        return "torch.compile on CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX); none found"
    return None


def compile_target(student: torch.nn.Module) -> torch.nn.Module:
    """What ``train.compile`` compiles: the decoder stack (the base model), which both the plain and the hidden-
    state path run; the whole student when it has no separate base model."""
    base = getattr(student, "base_model", None)
    return base if isinstance(base, torch.nn.Module) and base is not student else student


def compile_student(student: torch.nn.Module, device: torch.device) -> None:
    """``torch.compile`` the student's decoder in place (``Module.compile``: the state dict keeps its keys);
    RuntimeError naming ``train.compile`` where it cannot run."""
    problem = compile_problem(device)
    if problem is not None:
        raise RuntimeError(f"train.compile: {problem}; set train.compile: false")
    compile_target(student).compile()


def compile_error(e: BaseException) -> RuntimeError:
    """The error a failed compiled forward becomes: one line naming the key."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return RuntimeError(f"train.compile: torch.compile failed ({type(e).__name__}: {first}); "
                        "set train.compile: false")


# ---------------------------------------------------------------------------------------------------------
# the student + its loss, the module that DDP wraps

def last_hidden_states(student: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The student's final hidden states (after its last norm), through the student's *own* forward with the
    logits of the last position only (``logits_to_keep=1``). Going through the student's forward, not its base
    model's, is what lets DDP and FSDP2 see every parameter use: FSDP2 gathers the root's parameters (embeddings,
    final norm, LM head) in the root's forward and, being the root, keeps them gathered for the backward, so
    the LM head's weight read after it is the whole matrix."""
    out = student(input_ids=input_ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def hidden_state_problem(student: torch.nn.Module) -> str | None:
    """Why the hidden-state path cannot stand in for the student's logits, or None.

    Checked, not assumed: the student's logits on a short input must equal its output projection of its base
    model's last hidden states (the last of ``output_hidden_states``; models with logit soft-capping or scaling, say, fail this and take the plain
    path)."""
    head = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        return "the student has no output projection to split off"
    vocab = head.weight.shape[0]
    ids = (torch.arange(8, device=head.weight.device) * 7 + 3).remainder(vocab).unsqueeze(0)
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            logits = student(input_ids=ids, use_cache=False).logits.float()
            hidden = last_hidden_states(student, ids)
            mine = torch.nn.functional.linear(hidden, head.weight, getattr(head, "bias", None)).float()
    except Exception as e:  # noqa: BLE001 - any model that does not work this way takes the plain path
        return f"its forward with output_hidden_states and logits_to_keep failed ({type(e).__name__}: {e})"
    finally:
        student.train(was_training)
    if logits.shape != mine.shape or not torch.allclose(logits, mine, rtol=1e-4, atol=1e-4):
        return "its logits are not the output projection of its last hidden states"
    return None


class StudentStep(torch.nn.Module):
    """``forward(input_ids, labels, teacher_ids, teacher_logprobs) -> (loss, {"ce", "kl"})`` of the student.

    ``chunk_tokens``: ``kd.chunk_tokens`` (None: auto-sized chunks, 0: the plain path). The student is the
    submodule ``student`` (checkpoints and the export use it directly, so its keys stay Hugging Face's)."""

    def __init__(self, student: torch.nn.Module, kd: Any, chunk_tokens: int | None) -> None:
        super().__init__()
        self.student = student
        self.gamma, self.temperature = float(kd.gamma), float(kd.temperature)
        self.loss_name, self.beta, self.skew = kd.loss, float(kd.beta), float(kd.skew)
        self.chunked = chunk_tokens != 0
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor | None = None,
                teacher_logprobs: torch.Tensor | None = None, xtok: Any = None):
        """``xtok``: a cross-tokenizer batch's alignment (``ddk.trainer.xtok_teacher.XtokBatch``); such a batch
        takes the full-logits path and :func:`ddk.trainer.xtok_loss.xtok_batch_loss`, whatever ``chunk_tokens``."""
        kw = dict(loss=self.loss_name, beta=self.beta, skew=self.skew)
        if xtok is not None and teacher_ids is not None:
            from ddk.trainer.xtok_loss import xtok_batch_loss

            logits = self.student(input_ids=input_ids, use_cache=False).logits
            return xtok_batch_loss(logits, labels, teacher_ids, teacher_logprobs, xtok.compared, xtok.family,
                                   xtok.families, self.gamma, self.temperature, **kw)
        if self.chunked:
            from ddk.trainer.loss import chunked_distill_loss

            hidden = last_hidden_states(self.student, input_ids)
            head = self.student.get_output_embeddings()
            return chunked_distill_loss(hidden, head.weight, labels, teacher_ids, teacher_logprobs, self.gamma,
                                        self.temperature, chunk_tokens=self.chunk_tokens,
                                        bias=getattr(head, "bias", None), **kw)
        from ddk.trainer.loss import distill_loss

        logits = self.student(input_ids=input_ids, use_cache=False).logits
        return distill_loss(logits, labels, teacher_ids, teacher_logprobs, self.gamma, self.temperature, **kw)


# ---------------------------------------------------------------------------------------------------------
# FLOPs and MFU

def flop_parameters(model: torch.nn.Module) -> int:
    """The parameters that count for the FLOPs: all of them but the input embedding table (a lookup, no
    matmul), unless it is tied to the output projection (then it is the projection and counts), as torchtitan
    counts (nanoGPT ties them and leaves out only its position embeddings)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        tied = out is not None and getattr(out, "weight", None) is emb.weight
        if not tied:
            total -= emb.weight.numel()
    return int(total)


def flops_per_token(n_params: int) -> float:
    """Training FLOPs per token: 2 N for the forward, 4 N for the backward (the attention term left out)."""
    return 6.0 * float(n_params)


def mfu(n_params: int, tokens: int, seconds: float, peak_tflops: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation of a step: ``6 N tokens / seconds`` over ``devices x peak``; None without a peak
    or a duration."""
    if not peak_tflops or seconds <= 0 or devices < 1:
        return None
    return flops_per_token(n_params) * tokens / seconds / (devices * peak_tflops * 1e12)


def known_peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a known accelerator by its CUDA name (:data:`KNOWN_PEAK_TFLOPS`), else None."""
    if not device_name:
        return None
    for key, peak in KNOWN_PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None


def peak_tflops(configured: float | None, device: torch.device, precision: str) -> float | None:
    """``train.peak_tflops``, else on CUDA the known bf16/fp16 peak of the GPU (fp32 has none in the table)."""
    if configured:
        return float(configured)
    if device.type != "cuda" or precision == "fp32":
        return None
    try:
        return known_peak_tflops(torch.cuda.get_device_name(device))
    except Exception:  # noqa: BLE001
        return None


def is_compile_error(e: BaseException) -> bool:
    """An error of torch.compile's machinery (Dynamo, Inductor, the C++/Triton build) rather than of the model."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:
        return False
    return isinstance(e, TorchDynamoException) or type(e).__module__.startswith(("torch._inductor", "torch._dynamo"))
