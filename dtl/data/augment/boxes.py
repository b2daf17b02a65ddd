"""Where the training crops and flips fall: RandomResizedCrop's boxes and RandomHorizontalFlip's coin, drawn for a
whole batch at once on the generator's device.

The draws follow torchvision's distributions, not its random stream, and a call consumes the same amount of
randomness whatever the image sizes or the outcome, so a skipped batch can be replayed by drawing alone (a
mid-epoch resume lands on the stream of the uninterrupted run). Nothing here reads a value back to the host.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NUM_ATTEMPTS", "sample_crop_boxes", "sample_flips"]

#: torchvision's RandomResizedCrop tries this many random boxes before falling back to a central crop.
NUM_ATTEMPTS = 10


def _devices(
    generator: torch.Generator | None, device: torch.device | str | None
) -> tuple[torch.device, torch.device]:
    """(device to draw random numbers on, device of the result).

    Random numbers must be drawn on the generator's own device; the result goes to ``device`` (default:
    that same device). Use a generator on the target device to avoid a host-to-device copy.
    """
    if generator is not None:
        rng_device = generator.device
    else:
        rng_device = torch.device(device) if device is not None else torch.device("cpu")
    return rng_device, (torch.device(device) if device is not None else rng_device)


def _fallback_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's (w, h) when no attempt fits: depends on the image shape only, so Python numbers."""
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        return width, int(round(width / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(height * max(ratio))), height
    return width, height


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``n`` RandomResizedCrop boxes for a ``height`` x ``width`` image.

    Returns an ``(n, 4)`` int64 tensor of ``(top, left, h, w)``, drawn with the rule of torchvision's
    ``RandomResizedCrop.get_params`` but vectorised over images: 10 attempts per image (target area =
    ``area * U(scale)``, log-uniform aspect ratio, ``w = round(sqrt(a * r))``, ``h = round(sqrt(a / r))``);
    the first attempt with ``0 < w <= width`` and ``0 < h <= height`` is accepted, then
    ``top ~ randint(0, height - h + 1)`` and ``left ~ randint(0, width - w + 1)``. If no attempt is valid,
    torchvision's fallback is used (central crop with the aspect ratio clamped to ``ratio``).

    The boxes follow the same distribution as torchvision's, not the same random stream. All ten attempts
    are drawn for every image (even when the first one is accepted) so the amount of randomness consumed,
    and therefore the generator state afterwards, does not depend on the data.

    ``scale``: range of the crop area as a fraction of the image area; ``ratio``: range of the aspect ratio
    (w / h), sampled log-uniformly. The random numbers are drawn on the ``generator``'s device (default:
    torch's global generator); ``device`` (default: the generator's) receives the boxes -- a small copy if
    it differs (pass a generator on the target device to keep a GPU pipeline free of host transfers).
    """
    device, out_device = _devices(generator, device)
    area = float(height * width)
    # float64 keeps sqrt/round and the randint emulation free of float32 edge effects.
    f64 = torch.float64
    u_area = torch.rand((NUM_ATTEMPTS, n), generator=generator, device=device, dtype=f64)
    u_ratio = torch.rand((NUM_ATTEMPTS, n), generator=generator, device=device, dtype=f64)
    u_pos = torch.rand((2, n), generator=generator, device=device, dtype=f64)

    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    # torch.round rounds half to even, like Python's round() used by torchvision.
    w_all = torch.round(torch.sqrt(target_area * aspect)).to(torch.int64)
    h_all = torch.round(torch.sqrt(target_area / aspect)).to(torch.int64)
    valid = (w_all > 0) & (w_all <= width) & (h_all > 0) & (h_all <= height)

    # Index of the first valid attempt (argmax returns the first maximum); 0 if none is valid, which is
    # then overridden by the fallback below.
    first = valid.to(torch.uint8).argmax(dim=0, keepdim=True)
    any_valid = valid.any(dim=0)
    w = w_all.gather(0, first).squeeze(0)
    h = h_all.gather(0, first).squeeze(0)

    fb_w, fb_h = _fallback_crop(height, width, ratio)
    w = torch.where(any_valid, w, fb_w)
    h = torch.where(any_valid, h, fb_h)

    # randint(0, k) == floor(U * k); U < 1 in float64 so the result is always <= k - 1.
    top = torch.floor(u_pos[0] * (height - h + 1)).to(torch.int64)
    left = torch.floor(u_pos[1] * (width - w + 1)).to(torch.int64)
    top = torch.where(any_valid, top, (height - fb_h) // 2)
    left = torch.where(any_valid, left, (width - fb_w) // 2)
    return torch.stack((top, left, h, w), dim=1).to(out_device, non_blocking=True)


def sample_flips(
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    p: float = 0.5,
) -> torch.Tensor:
    """Bool tensor ``(n,)``: ``True`` where the image is flipped horizontally (probability ``p``).

    ``generator``/``device`` behave as in :func:`sample_crop_boxes`.
    """
    device, out_device = _devices(generator, device)
    # Same comparison as RandomHorizontalFlip: flip when U < p.
    return (torch.rand(n, generator=generator, device=device) < p).to(out_device, non_blocking=True)
