"""Batched, exact image preprocessing on uint8 image tensors (CPU or GPU): the fused train and eval transforms.

The training set lives on the device as a single uint8 tensor ``(N, 3, H, W)``. Running torchvision's
per-image transforms in a Python loop would make the input pipeline the bottleneck (and would force a
host round-trip per image), so this module reproduces the *same* results with a handful of batched tensor
ops:

* train: ``RandomResizedCrop(size, scale, ratio)`` + ``RandomHorizontalFlip()`` + ``ToDtype(scale=True)``
  + ``Normalize(mean, std)`` (`resized_crop`, with the boxes and flips of `dtl.data.augment.boxes`);
* eval: ``Resize(size)`` + ``CenterCrop(size)`` + ``ToDtype(scale=True)`` + ``Normalize(mean, std)``
  (`resize_center_crop`: the batched form of `dtl.data.preprocessing.eval_resize`, the one eval geometry).

How it stays exact is `dtl.data.augment.resample`'s separable resampling (crop, flip and normalisation folded
into per-axis weight matrices); large sources on a CPU take torch's native kernel instead
(`dtl.data.augment.native`), which computes the same weights.

Nothing here synchronises with the host: with a generator on the images' device, boxes and flips are
drawn there, every shape depends only on Python ints and nothing is read back, so the whole pipeline
can be queued asynchronously on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dtl.data.augment.boxes import sample_crop_boxes, sample_flips
from dtl.data.augment.native import native_resize, native_resized_crop, takes_native
from dtl.data.augment.resample import (
    aa_weights,
    center_crop_offset,
    normalized_input,
    resize_output_size,
    separable_resample,
)
from dtl.data.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["BatchTransform", "resize_center_crop", "resized_crop"]


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
    if takes_native(images):
        return native_resized_crop(images, boxes, size, flips, mean, std, dtype, channels_last)
    x = normalized_input(images, mean, std)
    top, left, h, w = boxes.to(device=x.device).unbind(dim=1)
    ry = aa_weights(top, h, size, height, x.device)  # (B, size, H)
    rx = aa_weights(left, w, size, width, x.device)  # (B, size, W)
    if flips is not None:
        # hflip of the output == reversing the output columns == reversing the rows of Rx.
        flips = flips.to(device=x.device, dtype=torch.bool).view(-1, 1, 1)
        rx = torch.where(flips, rx.flip(1), rx)
    return separable_resample(x, ry, rx, dtype, channels_last)


def resize_center_crop(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
) -> torch.Tensor:
    """Eval path: resize (shorter side to ``size``), centre-crop to ``size`` x ``size`` and normalise a batch.

    Equals, per image and within float tolerance, ``torchvision.transforms.v2.functional.resize(img, [size],
    antialias=True)`` then ``center_crop(img, [size, size])`` (the geometry of `dtl.data.preprocessing.eval_resize`),
    followed by ``to_dtype(torch.float32, scale=True)`` and ``normalize(mean, std)``. As in :func:`resized_crop`,
    the resized image is not rounded to uint8 and the matmuls run in float32. The crop selects rows of the weight
    matrices, so only the kept pixels are computed.
    """
    x = normalized_input(images, mean, std)
    bsz, _, height, width = x.shape
    out_h, out_w = resize_output_size(height, width, size)
    top, left = center_crop_offset(out_h, size), center_crop_offset(out_w, size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if (out_h, out_w) == (height, width):  # the weights are the identity then (scale 1: one tap of weight 1)
        return x[:, :, top:top + size, left:left + size].to(dtype).contiguous(memory_format=fmt)
    if takes_native(x):
        y = native_resize(x, out_h, out_w)[:, :, top:top + size, left:left + size]
        return y.to(dtype).contiguous(memory_format=fmt)
    # All images share the same weights: build them once (filled on the device, so no host copy) and
    # broadcast over the batch.
    zero = torch.zeros(1, dtype=torch.int64, device=x.device)
    ry = aa_weights(zero, zero + height, out_h, height, x.device)[:, top:top + size].expand(bsz, -1, -1)
    rx = aa_weights(zero, zero + width, out_w, width, x.device)[:, left:left + size].expand(bsz, -1, -1)
    return separable_resample(x, ry, rx, dtype, channels_last)


class BatchTransform:
    """Batched train/eval preprocessing: uint8 ``(B, C, H, W)`` in, normalised ``(B, C, size, size)`` out.

    ``train=True``: RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip + ToDtype + Normalize,
    with boxes and flips drawn from the generator passed to :meth:`__call__` (so a seeded generator gives
    reproducible batches). ``train=False``: Resize(size) + CenterCrop(size) + ToDtype + Normalize
    (deterministic).

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
            return resize_center_crop(images, self.size, self.mean, self.std, self.dtype, self.channels_last)
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
