"""The CPU path of the batched crops and resizes for large sources: torch's native antialiased kernel
(``F.interpolate(mode="bilinear", antialias=True)``), which computes the same weights as `resample.aa_weights`
per output pixel.

On a CPU the batched matmuls cost O(H x W x size) per image -- about 135 MFLOP for a 224 px source and output,
5-8 ms on one core against ~1.2 ms for the native kernel -- while on small sources such as CIFAR's 32 px they win
(one call for the batch instead of one per image). `takes_native` draws that line at `NATIVE_MIN_SIDE`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dtl.data.augment.resample import check_batch, normalize_affine

__all__ = ["NATIVE_MIN_SIDE", "native_resize", "native_resized_crop", "takes_native"]

#: On a CPU, sources at least this many pixels on their shorter side are resampled by the native kernel.
NATIVE_MIN_SIDE = 64


def takes_native(images: torch.Tensor) -> bool:
    """Whether a (B, C, H, W) batch takes the native kernel: on a CPU, with a shorter side of NATIVE_MIN_SIDE or
    more."""
    return images.device.type == "cpu" and images.dim() == 4 and min(images.shape[-2:]) >= NATIVE_MIN_SIDE


def native_resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flips: torch.Tensor | None,
                        mean: Sequence[float], std: Sequence[float], dtype: torch.dtype,
                        channels_last: bool) -> torch.Tensor:
    """`transform.resized_crop` for large sources on a CPU: each crop through the native kernel in float32, flipped
    after (the filter is symmetric), normalised straight into the output's format (after the resampling rather
    than before: the same map, since every row of weights sums to one; the crop is smaller than the source)."""
    uint8_input = check_batch(images, mean, std)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    a, b = normalize_affine(tuple(float(m) for m in mean), tuple(float(s) for s in std), uint8_input, images.device)
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.float32, memory_format=fmt)
    flipped = flips.tolist() if flips is not None else [False] * images.shape[0]
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        crop = images[i:i + 1, :, top:top + h, left:left + w].to(torch.float32)
        y = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        torch.addcmul(b, y.flip(-1) if flipped[i] else y, a, out=out[i:i + 1])
    return out.to(dtype)


def native_resize(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """A float32 batch resized to (out_h, out_w) by the native kernel, the whole batch in one call (all images
    share the weights)."""
    return F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
