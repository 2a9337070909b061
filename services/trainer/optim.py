"""The optimiser and the learning-rate schedule of the student (shared by the trainer and the kit builder)."""

from __future__ import annotations

import math

import torch


def lr_lambda(warmup_steps: int, total_steps: int, floor: float = 0.1, peak: float = 1.0):
    """Linear warm-up, then cosine decay to ``floor`` x the peak at ``total_steps``.

    With the default ``peak`` 1.0 it is a factor for ``LambdaLR`` (the trainer); with ``peak`` the peak LR it
    is the LR itself, rounded as ``peak * (step + 1) / warmup_steps`` (the kit builder sets it by hand).
    """

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return peak * (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))

    return f


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (the 1-d parameters), as nanoGPT does."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), foreach=False)
