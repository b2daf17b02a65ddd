"""Antialiased bilinear resampling as matrices: the arithmetic behind the batched crops and resizes.

Antialiased bilinear resampling (what ``F.interpolate(mode="bilinear", antialias=True)`` and hence torchvision's
``resize``/``resized_crop`` do) is separable: for every image the output is ``Ry @ img @ Rx^T``, where ``Ry``
(out_h x H) and ``Rx`` (out_w x W) hold the per-axis weights (`aa_weights`). A crop is folded into those
matrices (weights are zero outside the crop box and the filter is renormalised at the box edges exactly like
aten does at image edges), a horizontal flip reverses the rows of ``Rx``, and ``ToDtype`` + ``Normalize`` become
one per-channel affine map (`normalize_affine`) that can be applied before the resampling -- exact because every
row of ``Ry``/``Rx`` sums to one. `separable_resample` applies the two matrices as batched matmuls in float32; if
the caller enables TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32`` / ``set_float32_matmul_precision
("high")``) they inherit TF32's ~1e-3 relative error, still well below one uint8 grey level.

The output geometry of torchvision's ``Resize(size)`` and ``CenterCrop(size)`` is here too
(`resize_output_size`, `center_crop_offset`), so the batched ops and the uint8 chain size their outputs alike.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

__all__ = [
    "aa_weights",
    "center_crop_offset",
    "check_batch",
    "normalize_affine",
    "normalized_input",
    "resize_output_size",
    "separable_resample",
]


def aa_weights(
    start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int, device: torch.device
) -> torch.Tensor:
    """Antialiased bilinear interpolation weights along one axis, as a ``(B, out_size, in_size)`` matrix.

    Row ``i`` of matrix ``b`` holds the weights with which source pixels ``0 .. in_size - 1`` contribute
    to output pixel ``i`` when the segment ``[start[b], start[b] + length[b])`` is resized to ``out_size``
    pixels. This mirrors aten's ``_compute_weights_aa`` (used by ``upsample_bilinear2d_aa``, i.e.
    ``F.interpolate(..., mode="bilinear", antialias=True)``) applied to the cropped segment:

    * ``scale = length / out_size``; ``support = max(scale, 1)`` (the triangle filter is widened when
      downsampling so that it low-pass filters; it is plain bilinear when upsampling);
    * pixel-centre mapping with ``align_corners=False``: ``center = scale * (i + 0.5)``;
    * the weight of source pixel ``j`` (segment coordinates) is ``tri((j + 0.5 - center) / support)``
      with ``tri(x) = max(0, 1 - |x|)``; aten's window ``[trunc(center - support + 0.5),
      trunc(center + support + 0.5))`` is exactly the triangle's support clipped to the segment;
    * pixels outside the segment get zero weight and each row is renormalised to sum to one, which is
      how aten treats the image border (for upsampling this is bilinear with edge clamping).

    Computed in float32 like aten does for float32 images (``start``/``length`` are int64 tensors
    ``(B,)``; integers up to 2**24 are exact in float32, so the segment mask is exact).
    """
    f32 = torch.float32
    start = start.to(f32).view(-1, 1, 1)
    length = length.to(f32).view(-1, 1, 1)
    scale = length / out_size
    inv_support = 1.0 / torch.clamp(scale, min=1.0)
    center = scale * (torch.arange(out_size, device=device, dtype=f32).view(1, -1, 1) + 0.5)
    # Pixel centres in segment coordinates; pixels outside the segment are moved to +inf, which gives
    # them weight 0 below (1 - inf -> clamped to 0) without an extra pass over the (B, out, in) matrix.
    local = torch.arange(in_size, device=device, dtype=f32).view(1, 1, -1) - start
    pos = torch.where((local >= 0) & (local < length), local + 0.5, torch.inf)
    weights = (pos - center).abs_().mul_(inv_support).neg_().add_(1.0).clamp_(min=0.0)
    # Every row has a positive weight (the pixel containing `center` is at distance <= 0.5 < support),
    # so the normalisation never divides by zero.
    return weights.div_(weights.sum(dim=-1, keepdim=True))


@functools.lru_cache(maxsize=32)
def normalize_affine(
    mean: tuple[float, ...], std: tuple[float, ...], uint8_input: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(a, b)`` of shape ``(1, C, 1, 1)`` with ``normalize(to_dtype(x)) == x * a + b``.

    Cached per device because building a small tensor from Python numbers on a GPU is a blocking
    host-to-device copy; with the cache it happens once per (mean, std, device) instead of per batch.
    """
    div = 255.0 if uint8_input else 1.0  # to_dtype(float32, scale=True) divides uint8 by 255
    mean_t = torch.tensor(mean, dtype=torch.float64)
    std_t = torch.tensor(std, dtype=torch.float64)
    a = (1.0 / (div * std_t)).to(torch.float32).view(1, -1, 1, 1)
    b = (-mean_t / std_t).to(torch.float32).view(1, -1, 1, 1)
    return a.to(device), b.to(device)


def check_batch(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> bool:
    """Checks a batch and its mean/std; True for uint8 images, False for floating point ones in [0, 1]."""
    if images.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) image batch, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        uint8_input = True
    elif images.is_floating_point():
        uint8_input = False
    else:
        raise TypeError(f"expected uint8 or floating point images, got {images.dtype}")
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(f"mean/std need {images.shape[1]} entries, got {len(mean)} and {len(std)}")
    return uint8_input


def normalized_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``normalize(to_dtype(images, float32, scale=True), mean, std)`` on the *source* pixels.

    Normalising before resampling is exact because it is a per-channel affine map and every row of the
    resampling matrices sums to one: ``R (a x + b) R'^T = a (R x R'^T) + b``. Doing it on the small
    source images instead of the (up to 49x larger) output saves a full pass over the output.
    Floating point images are taken to be in ``[0, 1]`` already (to_dtype(scale=True) leaves them as is).
    """
    uint8_input = check_batch(images, mean, std)
    a, b = normalize_affine(tuple(float(m) for m in mean), tuple(float(s) for s in std), uint8_input,
                            images.device)
    # uint8 values are exact in float32, so the only rounding is the affine map itself.
    return torch.addcmul(b, images.to(torch.float32), a)


def separable_resample(
    x: torch.Tensor, ry: torch.Tensor, rx: torch.Tensor, dtype: torch.dtype, channels_last: bool
) -> torch.Tensor:
    """``ry[b] @ x[b, c] @ rx[b]^T`` for every image/channel, as two batched matmuls.

    ``x``: float32 ``(B, C, H, W)``; ``ry``: ``(B, out_h, H)``; ``rx``: ``(B, out_w, W)``. The matmul
    operands are arranged so that the large second product is written directly in the requested
    memory format (no extra pass over the output to change the layout).
    """
    bsz, chans, height, width = x.shape
    out_h, out_w = ry.shape[1], rx.shape[1]
    if channels_last:
        # Columns first: (B, C*H, W) @ (B, W, out_w) -> (B, C, H, out_w); move C last (a small copy),
        # then rows: (B, out_h, H) @ (B, H, out_w*C) -> (B, out_h, out_w, C), i.e. NHWC memory.
        cols = torch.bmm(x.reshape(bsz, chans * height, width), rx.transpose(1, 2))
        cols = cols.view(bsz, chans, height, out_w).permute(0, 2, 3, 1).reshape(bsz, height, out_w * chans)
        out = torch.bmm(ry, cols).view(bsz, out_h, out_w, chans).permute(0, 3, 1, 2)
    else:
        # Rows first (ry broadcast over channels): (B, C, out_h, W); then columns:
        # (B, C*out_h, W) @ (B, W, out_w) -> (B, C, out_h, out_w) contiguous NCHW.
        rows = torch.matmul(ry.unsqueeze(1), x)
        out = torch.bmm(rows.view(bsz, chans * out_h, width), rx.transpose(1, 2))
        out = out.view(bsz, chans, out_h, out_w)
    # .to() keeps the memory format, so a bf16/fp16 result stays channels_last without another copy.
    return out.to(dtype)


def resize_output_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output size of ``Resize(size)`` with an int size: shorter side -> ``size``, aspect kept.

    Same arithmetic as torchvision's ``_compute_resized_output_size`` (long side truncated with int()).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop_offset(length: int, size: int) -> int:
    """Where ``CenterCrop(size)`` starts along an axis of ``length >= size`` pixels: torchvision's
    ``int(round((length - size) / 2))`` (Python's round: half to even)."""
    return int(round((length - size) / 2.0))
