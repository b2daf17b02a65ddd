"""The geometric ops of `dtl.autoaugment` on uint8 batches (NCHW or channels_last, kept), and the two helpers
the other ops share: the channels_last test and the fast float -> uint8 truncation.

``affine``: shear, rotate and translate as one ``grid_sample`` with one inverse matrix per image, exactly as
torchvision's ``affine_image``/``rotate_image`` builds its grid. (Whole-pixel translations as shifted copies
were measured: per image on a CPU they beat the grid, but that is a Python loop over the images; as one batched
gather they ran 2x slower than the grid.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

__all__ = ["affine", "is_channels_last", "to_uint8"]


def is_channels_last(images: torch.Tensor) -> bool:
    return images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 255] -> uint8 as ``.to(torch.uint8)`` truncates, via int16: the same, ~2x faster on a CPU."""
    return x.to(torch.int16).to(torch.uint8)


def affine(images: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """``affine_image``/``rotate_image`` (fill None) with one inverse matrix per image, as one grid_sample."""
    n, _, h, w = images.shape
    dev = images.device
    base = torch.empty(1, h, w, 3, device=dev)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scale = torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32, device=dev)
    rescaled = theta.transpose(1, 2).div(scale)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(rescaled).view(n, h, w, 2)
    out = nnf.grid_sample(images.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    if is_channels_last(images):  # grid_sample writes NCHW: back in float (2x faster than a uint8 layout copy)
        out = out.contiguous(memory_format=torch.channels_last)
    return to_uint8(out if mode == "nearest" else out.round_().clamp_(0, 255))  # nearest: integers already
