"""The optimizer: its parameter groups (layer-wise LR decay, head LR multiplier, no weight decay on biases and
norms), the optimizer built over them, and how its state is restored. The rate of each step is `lr`'s."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dtl import models
from dtl.config import OptimConfig

log = logging.getLogger("dtl")


@dataclass(frozen=True)
class GroupRow:
    """One line of the parameter-group table printed at start and saved in config.json."""

    block: str
    params: int
    lr_mult: float
    weight_decay: float


def param_groups(model: nn.Module, model_name: str, optim: OptimConfig) -> tuple[list[dict[str, Any]], list[GroupRow]]:
    """(optimizer param groups, the per-block table) of the parameters that train. The head learns at
    `head_lr_mult` x the rate; backbone block k of n (forward order, dtl/models/torchvision_backbones.py's table) at
    `layer_decay`^(n - k) x, so the block below the head gets D and the stem D^n; parameters outside the
    table learn with the stem. Biases and normalisation weights (tensors of one dimension) get no weight decay
    unless `wd_norm_bias`. Groups with the same (multiplier, decay) are merged: with every feature off there
    is one group."""
    head = models.head_name(model)
    blocks = models.backbone_blocks(model, model_name)
    n = len(blocks)

    def block_of(name: str) -> tuple[str, float]:
        if name == head or name.startswith(head + "."):
            return "head", optim.head_lr_mult
        for k, prefixes in enumerate(blocks):
            if any(name == p or name.startswith(p + ".") for p in prefixes):
                return prefixes[0], optim.layer_decay ** (n - k)
        return "(other)", optim.layer_decay ** n

    merged: dict[tuple[float, float], list[nn.Parameter]] = {}
    rows: dict[tuple[str, float], GroupRow] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        block, mult = block_of(name)
        decay = optim.weight_decay if (optim.wd_norm_bias or p.ndim > 1) else 0.0
        merged.setdefault((mult, decay), []).append(p)
        old = rows.get((block, decay))
        rows[(block, decay)] = GroupRow(block, (old.params if old else 0) + p.numel(), mult, decay)
    groups = [{"params": ps, "lr_mult": mult, "weight_decay": decay} for (mult, decay), ps in merged.items()]
    return groups, list(rows.values())


def log_groups(rows: list[GroupRow]) -> None:
    if len({(r.lr_mult, r.weight_decay) for r in rows}) <= 1:
        return  # one group: nothing to show
    log.info("parameter groups (block, parameters, lr multiplier, weight decay):\n  %s",
             "\n  ".join(f"{r.block:<28} {r.params:>12,}  x{r.lr_mult:<10.4g} wd {r.weight_decay:g}"
                          for r in reversed(rows)))


def table(rows: list[GroupRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def build_optimizer(optim: OptimConfig, model: nn.Module, model_name: str, device: torch.device,
                    grad_scaler: bool = False) -> tuple[torch.optim.Optimizer, list[GroupRow]]:
    """SGD or AdamW over the parameter groups; `grad_scaler`: an fp16 GradScaler steps it (and may skip steps)."""
    groups, rows = param_groups(model, model_name, optim)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.momentum, 0.999), **_kernels(device)), rows
    # torch's fused SGD takes the scaler's found_inf and skips an overflowed step itself, but it has already
    # allocated the momentum buffers with empty_like: after a skipped *first* step they hold uninitialised
    # memory that the next step treats as momentum (non-finite on CUDA, whose allocator hands back the inf
    # gradients; reproduced on the CPU in tests/unit/train/optimisation/test_optimizer.py). foreach SGD under a
    # scaler is skipped whole by GradScaler.step. Fused AdamW zero-fills its state first and honours found_inf.
    kernels = {"foreach": True} if grad_scaler else _kernels(device)
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, **kernels), rows


def _kernels(device: torch.device) -> dict[str, bool]:
    # foreach is the fast path on both CPU and GPU; fused only exists for (and helps on) CUDA.
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


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
