"""The learning-rate schedule: the rate of each optimizer step (linear scaling, warm-up, cosine decay), a pure
function of the step, so a resume needs no scheduler state."""

from __future__ import annotations

import math

from dtl.config import OptimConfig


def lr_at(optim: OptimConfig, step: int, steps_per_epoch: int, world_size: int) -> float:
    """Learning rate for an optimizer step: a pure function of the step, so resume needs no scheduler state."""
    base = optim.lr * (world_size * optim.grad_accum if optim.lr_scale == "linear" else 1)
    warmup = optim.warmup_epochs * steps_per_epoch
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if optim.lr_schedule == "cosine":
        total = max(optim.epochs * steps_per_epoch - warmup, 1)
        return base * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / total, 1.0)))
    return base
