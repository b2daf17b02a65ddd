"""Batched, exact image preprocessing on uint8 image tensors (CPU or GPU).

The training set lives on the device as a single uint8 tensor ``(N, 3, H, W)``. Running torchvision's
per-image transforms in a Python loop would make the input pipeline the bottleneck (and would force a
host round-trip per image), so this module reproduces the *same* results with a handful of batched tensor
ops:

* train: ``RandomResizedCrop(size, scale, ratio)`` + ``RandomHorizontalFlip()`` + ``ToDtype(scale=True)``
  + ``Normalize(mean, std)``;
* eval: ``Resize(size)`` + ``ToDtype(scale=True)`` + ``Normalize(mean, std)``.

How it stays exact: antialiased bilinear resampling (what ``F.interpolate(mode="bilinear",
antialias=True)`` and hence torchvision's ``resize``/``resized_crop`` do) is separable. For every image
the output is ``Ry @ img @ Rx^T`` where ``Ry`` (out_h x H) and ``Rx`` (out_w x W) hold the per-axis
interpolation weights. The crop is folded into those matrices (weights are zero outside the crop box and
the filter is renormalised at the box edges exactly like aten does at image edges), the horizontal flip is
folded into ``Rx`` (reversed rows), and ``ToDtype`` + ``Normalize`` become one per-channel affine map
applied to the (small) source images -- exact because every row of ``Ry``/``Rx`` sums to one.

Nothing here synchronises with the host: with a generator on the images' device, boxes and flips are
drawn there, every shape depends only on Python ints and nothing is read back, so the whole pipeline
can be queued asynchronously on a GPU. The matmuls run in float32; if the caller enables TF32 matmuls
(``torch.backends.cuda.matmul.allow_tf32`` / ``set_float32_matmul_precision("high")``) they inherit
TF32's ~1e-3 relative error, still well below one uint8 grey level.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchTransform",
    "resize",
    "resized_crop",
    "sample_crop_boxes",
    "sample_flips",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# torchvision's RandomResizedCrop tries this many random boxes before falling back to a central crop.
_NUM_ATTEMPTS = 10
#: On a CPU, sources at least this many pixels on their shorter side are resampled by torch's native antialiased
#: kernel (``F.interpolate(mode="bilinear", antialias=True)``: the same weights, computed per output pixel),
#: per image for crops: the batched matmuls cost O(H x W x size) per image -- about 135 MFLOP for a 224 px
#: source and output, 5-8 ms on one core against ~1.2 ms -- while on small sources such as CIFAR's 32 px
#: they win (one call for the batch instead of one per image).
NATIVE_MIN_SIDE = 64


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
    u_area = torch.rand((_NUM_ATTEMPTS, n), generator=generator, device=device, dtype=f64)
    u_ratio = torch.rand((_NUM_ATTEMPTS, n), generator=generator, device=device, dtype=f64)
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


def _aa_weights(
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
def _affine(
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


def _input_kind(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> bool:
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


def _normalized_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``normalize(to_dtype(images, float32, scale=True), mean, std)`` on the *source* pixels.

    Normalising before resampling is exact because it is a per-channel affine map and every row of the
    resampling matrices sums to one: ``R (a x + b) R'^T = a (R x R'^T) + b``. Doing it on the small
    source images instead of the (up to 49x larger) output saves a full pass over the output.
    Floating point images are taken to be in ``[0, 1]`` already (to_dtype(scale=True) leaves them as is).
    """
    uint8_input = _input_kind(images, mean, std)
    a, b = _affine(tuple(float(m) for m in mean), tuple(float(s) for s in std), uint8_input, images.device)
    # uint8 values are exact in float32, so the only rounding is the affine map itself.
    return torch.addcmul(b, images.to(torch.float32), a)


def _separable_resample(
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


def resized_crop(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    flips: torch.Tensor | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
) -> torch.Tensor:
    """Crop, resize, optionally flip and normalise a batch of images, one box per image.

    For uint8 ``images`` ``(B, C, H, W)`` and int64 ``boxes`` ``(B, 4)`` of ``(top, left, h, w)`` the
    result ``(B, C, size, size)`` in ``dtype`` equals, image by image and within float tolerance,
    ``torchvision.transforms.v2.functional.resized_crop(img, top, left, h, w, [size, size],
    antialias=True)``, then ``hflip`` if ``flips[i]``, then ``to_dtype(torch.float32, scale=True)`` and
    ``normalize(mean, std)`` -- computed without rounding the resized image to uint8 (torchvision's uint8
    kernel rounds, and differs from the float result by up to about one grey level).

    Boxes must lie inside the image (as boxes from :func:`sample_crop_boxes` do); this is not checked
    because checking would need a host synchronisation. Floating point ``images`` are accepted too and
    are assumed to be in ``[0, 1]``. The resampling is done in float32 whatever ``dtype`` is (the matmuls
    are small, and low-precision weights would add error on top of the final rounding to ``dtype``).
    With ``channels_last`` the result is contiguous in ``torch.channels_last`` memory format, otherwise
    it is contiguous NCHW.
    """
    bsz, _, height, width = images.shape
    if boxes.shape != (bsz, 4):
        raise ValueError(f"expected boxes of shape ({bsz}, 4), got {tuple(boxes.shape)}")
    if images.device.type == "cpu" and images.dim() == 4 and min(height, width) >= NATIVE_MIN_SIDE:
        return _native_resized_crop(images, boxes, size, flips, mean, std, dtype, channels_last)
    x = _normalized_input(images, mean, std)
    top, left, h, w = boxes.to(device=x.device).unbind(dim=1)
    ry = _aa_weights(top, h, size, height, x.device)  # (B, size, H)
    rx = _aa_weights(left, w, size, width, x.device)  # (B, size, W)
    if flips is not None:
        # hflip of the output == reversing the output columns == reversing the rows of Rx.
        flips = flips.to(device=x.device, dtype=torch.bool).view(-1, 1, 1)
        rx = torch.where(flips, rx.flip(1), rx)
    return _separable_resample(x, ry, rx, dtype, channels_last)


def _native_resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flips: torch.Tensor | None,
                         mean: Sequence[float], std: Sequence[float], dtype: torch.dtype,
                         channels_last: bool) -> torch.Tensor:
    """`resized_crop` on a CPU for large sources (see `NATIVE_MIN_SIDE`): each crop through the native kernel in
    float32, flipped after (the filter is symmetric), normalised straight into the output's format (after the
    resampling rather than before: the same map, since every row of weights sums to one; the crop is smaller
    than the source)."""
    import torch.nn.functional as F

    uint8_input = _input_kind(images, mean, std)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    a, b = _affine(tuple(float(m) for m in mean), tuple(float(s) for s in std), uint8_input, images.device)
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.float32, memory_format=fmt)
    flipped = flips.tolist() if flips is not None else [False] * images.shape[0]
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        crop = images[i:i + 1, :, top:top + h, left:left + w].to(torch.float32)
        y = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        torch.addcmul(b, y.flip(-1) if flipped[i] else y, a, out=out[i:i + 1])
    return out.to(dtype)


def _resize_output_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output size of ``Resize(size)`` with an int size: shorter side -> ``size``, aspect kept.

    Same arithmetic as torchvision's ``_compute_resized_output_size`` (long side truncated with int()).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def resize(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
) -> torch.Tensor:
    """Eval path: resize (shorter side to ``size``) and normalise a batch of images.

    Equals, per image and within float tolerance, ``torchvision.transforms.v2.functional.resize(img,
    [size], antialias=True)`` (a square image becomes ``size`` x ``size``; for a non-square one the
    shorter side becomes ``size`` and the longer one ``int(size * long / short)``, as ``Resize(size)``
    does), followed by ``to_dtype(torch.float32, scale=True)`` and ``normalize(mean, std)``. As in
    :func:`resized_crop`, the resized image is not rounded to uint8 and the matmuls run in float32.
    """
    x = _normalized_input(images, mean, std)
    bsz, _, height, width = x.shape
    out_h, out_w = _resize_output_size(height, width, size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if (out_h, out_w) == (height, width):  # the weights are the identity then (scale 1: one tap of weight 1)
        return x.to(dtype).contiguous(memory_format=fmt)
    if x.device.type == "cpu" and min(height, width) >= NATIVE_MIN_SIDE:
        import torch.nn.functional as F

        y = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
        return y.to(dtype).contiguous(memory_format=fmt)
    # All images share the same weights: build them once (filled on the device, so no host copy) and
    # broadcast over the batch.
    zero = torch.zeros(1, dtype=torch.int64, device=x.device)
    ry = _aa_weights(zero, zero + height, out_h, height, x.device).expand(bsz, -1, -1)
    rx = _aa_weights(zero, zero + width, out_w, width, x.device).expand(bsz, -1, -1)
    return _separable_resample(x, ry, rx, dtype, channels_last)


class BatchTransform:
    """Batched train/eval preprocessing: uint8 ``(B, C, H, W)`` in, normalised ``(B, C, size, size)`` out.

    ``train=True``: RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip + ToDtype + Normalize,
    with boxes and flips drawn from the generator passed to :meth:`__call__` (so a seeded generator gives
    reproducible batches). ``train=False``: Resize(size) + ToDtype + Normalize (deterministic).

    For a host-sync-free GPU pipeline pass a generator that lives on the images' device; a CPU generator
    also works, the few random numbers are then copied to the device.
    """

    def __init__(
        self,
        train: bool,
        size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
    ) -> None:
        self.train = train
        self.size = size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.dtype = dtype
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.train:
            return resize(images, self.size, self.mean, self.std, self.dtype, self.channels_last)
        bsz, _, height, width = images.shape
        boxes = sample_crop_boxes(bsz, height, width, self.scale, self.ratio, generator, images.device)
        flips = sample_flips(bsz, generator, images.device)
        return resized_crop(
            images, boxes, self.size, flips, self.mean, self.std, self.dtype, self.channels_last
        )

    def skip(self, n: int, image_hw: Sequence[int], generator: torch.Generator | None = None) -> None:
        """Consume exactly the random numbers ``__call__`` would for ``n`` images of ``image_hw``, without
        touching pixels: a resume in the middle of an epoch replays the skipped batches cheaply and lands
        on the same random stream as the uninterrupted run."""
        if not self.train:
            return
        rng_device = generator.device if generator is not None else None
        sample_crop_boxes(n, int(image_hw[0]), int(image_hw[1]), self.scale, self.ratio, generator, rng_device)
        sample_flips(n, generator, rng_device)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(train={self.train}, size={self.size}, scale={self.scale}, "
            f"ratio={self.ratio}, mean={self.mean}, std={self.std}, dtype={self.dtype}, "
            f"channels_last={self.channels_last})"
        )
