"""The optimizer: how it is built, the learning rate of each step, and how its state is restored."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dtl.config import OptimConfig


def build_optimizer(optim: OptimConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach is the fast path on both CPU and GPU; fused only exists for (and helps on) CUDA.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, betas=(optim.momentum, 0.999),
                                 weight_decay=optim.weight_decay, **fast)
    return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay, **fast)


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


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict`, then give every per-parameter state tensor its parameter's memory layout.
    Checkpoints store tensors contiguous (NCHW); load_state_dict keeps that layout, while the parameters of a
    channels_last model are NHWC. The fused CUDA kernels refuse such a mix (RuntimeError at the first step
    after a resume), and the fused CPU kernels silently pair the wrong elements."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            pstate = optimizer.state.get(param, {})
            for name, value in pstate.items():
                if (isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 1
                        and value.stride() != param.stride()):
                    pstate[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)
