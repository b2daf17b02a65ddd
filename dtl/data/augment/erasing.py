"""Batched random erasing: torchvision's ``RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)``
(or ``value="random"``: per-pixel standard normal noise) on a normalised float batch, one box per image.

The rule of ``RandomErasing.make_params``, vectorised: erase with probability ``p`` (``rand() < p``); up to 10
attempts of ``area = H W U(scale)``, ``r = exp(U(log ratio))``, ``h = round(sqrt(area r))``,
``w = round(sqrt(area / r))``; the first attempt with ``h < H`` and ``w < W`` is taken, at
``top ~ randint(0, H - h + 1)``, ``left ~ randint(0, W - w + 1)``; if none fits, nothing is erased (torchvision
returns ``v=None`` then). Boxes follow torchvision's distribution, not its random stream. Every image draws
the same amount of randomness (all attempts; the noise for the whole image with ``value="random"``), so a
batch's draws can be replayed without pixels.
"""

from __future__ import annotations

import math

import torch

__all__ = ["erase", "sample_erasing", "sample_noise"]

_ATTEMPTS = 10


def sample_erasing(n: int, height: int, width: int, p: float, generator: torch.Generator | None = None,
                   device: torch.device | None = None, scale: tuple[float, float] = (0.02, 0.33),
                   ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """``(n, 4)`` int64 ``(top, left, h, w)`` per image; ``h = w = 0`` where nothing is erased."""
    f64 = torch.float64
    u_apply = torch.rand(n, generator=generator, device=device, dtype=f64)
    u_area = torch.rand((_ATTEMPTS, n), generator=generator, device=device, dtype=f64)
    u_ratio = torch.rand((_ATTEMPTS, n), generator=generator, device=device, dtype=f64)
    u_pos = torch.rand((2, n), generator=generator, device=device, dtype=f64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    # torchvision: h from sqrt(area * ratio), w from sqrt(area / ratio) (the other way round from RandomResizedCrop)
    h_all = torch.round(torch.sqrt(area * aspect)).long()
    w_all = torch.round(torch.sqrt(area / aspect)).long()
    valid = (h_all < height) & (w_all < width)
    first = valid.to(torch.uint8).argmax(dim=0, keepdim=True)
    ok = valid.any(dim=0) & (u_apply < p)
    h = torch.where(ok, h_all.gather(0, first).squeeze(0), 0)
    w = torch.where(ok, w_all.gather(0, first).squeeze(0), 0)
    top = torch.floor(u_pos[0] * (height - h + 1)).long()
    left = torch.floor(u_pos[1] * (width - w + 1)).long()
    return torch.stack((top, left, h, w), dim=1)


def sample_noise(n: int, channels: int, height: int, width: int, generator: torch.Generator | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
    """The ``value="random"`` fill: standard normal float32 noise for whole images (only the box is used)."""
    return torch.randn((n, channels, height, width), generator=generator, device=device)


def erase(x: torch.Tensor, boxes: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``F.erase(x[i], top, left, h, w, value)`` for every image: 0 (or ``noise``) inside the box."""
    _, _, height, width = x.shape
    top, left, h, w = (v.view(-1, 1, 1, 1) for v in boxes.to(x.device).unbind(dim=1))
    rows = torch.arange(height, device=x.device).view(1, 1, -1, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, 1, -1)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    fill = torch.zeros((), dtype=x.dtype, device=x.device) if noise is None else noise.to(x.device, x.dtype)
    return torch.where(inside, fill, x)
