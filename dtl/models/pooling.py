"""Adaptive average pooling from deterministic ops (`--deterministic` on CUDA), swapped into any model."""

from __future__ import annotations

import torch
from torch import nn


class DeterministicAdaptiveAvgPool2d(nn.Module):
    """AdaptiveAvgPool2d for the shapes classifiers use, built from ops whose CUDA backward is deterministic
    (`adaptive_avg_pool2d_backward_cuda` accumulates with atomics and has no deterministic kernel): output 1x1
    -> a mean; input size a multiple of the output -> avg_pool2d; a 1x1 input -> expand. Other shapes run the
    original op (which then stops a --deterministic run with torch's message naming it)."""

    def __init__(self, output_size: int | tuple) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool.output_size
        oh, ow = (out, out) if isinstance(out, int) else out
        h, w = x.shape[-2:]
        oh, ow = oh or h, ow or w
        if (oh, ow) == (h, w):
            return x
        if (oh, ow) == (1, 1):
            return x.mean(dim=(-2, -1), keepdim=True)
        if (h, w) == (1, 1):
            return x.expand(*x.shape[:-2], oh, ow)
        if h % oh == 0 and w % ow == 0:
            return nn.functional.avg_pool2d(x, (h // oh, w // ow))
        return self.pool(x)


def deterministic_pooling(model: nn.Module) -> int:
    """Swap every AdaptiveAvgPool2d for `DeterministicAdaptiveAvgPool2d` (same outputs up to summation
    order; no parameters, so state dicts are unchanged); returns how many were swapped."""
    swaps = [(name, m) for name, m in model.named_modules() if type(m) is nn.AdaptiveAvgPool2d]
    for name, module in swaps:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, DeterministicAdaptiveAvgPool2d(module.output_size))
    return len(swaps)
