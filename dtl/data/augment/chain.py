"""The training transform when auto-augment, the pad crop or random erasing is on: torchvision's reference
recipe order on whole uint8 batches.

    RandomResizedCrop(size, scale, ratio) | [Resize(size)] + RandomCrop(size, padding, padding_mode)
    -> RandomHorizontalFlip -> TrivialAugmentWide | RandAugment | AugMix (uint8)
    -> ToDtype(float32, scale=True) -> Normalize(mean, std) -> RandomErasing(p, value)

With the resized crop and no auto-augment (random erasing alone) the crop is `dtl.data.augment.transform`'s
fused float path (the same output as `BatchTransform`), then erasing. Otherwise, unlike `BatchTransform` (which
fuses crop, flip and normalisation into float matmuls and never rounds), the crop here produces uint8 images as
torchvision v2 does on uint8 tensors, because the auto-augment ops are defined on uint8 (posterize, solarize,
equalize...). The resized crop is the same separable antialiased resampling (`dtl.data.augment.resample`,
batched: no per-image call, on any device), rounded to uint8: torchvision's native uint8 kernel (CPUs with
AVX2/AVX-512) uses fixed-point weights, so the two differ by at most one grey level (1/255) on some pixels
(measured: ~15% of them); against torchvision's float kernel + round (its path on GPUs) they are equal up to
float32 ties. The pad crop and the flip are index arithmetic and exact. The ops
(`dtl.data.augment.autoaugment`) and erasing (`dtl.data.augment.erasing`) are exact.

Randomness: per call, in this order, crop boxes (or pad offsets), flips, the auto-augment draws, the erasing
draws, all from the one generator given, the same amount per image whatever the pixels; `skip` consumes
exactly those numbers without touching pixels (a mid-epoch resume lands on the same stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dtl.data.augment.autoaugment import AugmentDraws, AutoAugment
from dtl.data.augment.boxes import sample_crop_boxes, sample_flips
from dtl.data.augment.erasing import erase, sample_erasing, sample_noise
from dtl.data.augment.resample import aa_weights, normalize_affine, resize_output_size, separable_resample
from dtl.data.augment.transform import resized_crop
from dtl.data.augment.uint8 import to_uint8
from dtl.data.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["AugmentChain", "pad_crop", "resize_uint8", "resized_crop_uint8", "sample_pad_offsets"]

#: output pixels per slice of the pixel work (see AugmentChain.__call__)
SLICE_PIXELS = 1 << 18
#: dtl's images are RGB (the splits hold (N, 3, H, W)); the erasing noise is drawn for 3 channels in `skip` too.
CHANNELS = 3


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float -> uint8 the way torchvision's resize does for integer images: round, then cast. No clamp: the
    antialiased bilinear weights are non-negative and sum to one, so every output is a convex combination of
    uint8 values and rounds into [0, 255]; the cast goes through int16 (torch's float -> uint8 cast is not
    vectorised on a CPU: 2x)."""
    return to_uint8(x.round_())


def resized_crop_uint8(images: torch.Tensor, boxes: torch.Tensor, size: int,
                       flips: torch.Tensor | None = None) -> torch.Tensor:
    """``v2.functional.resized_crop(img, *box, [size, size], antialias=True)`` on uint8 (+ ``hflip``), batched:
    float matmuls, rounded (channels_last; within one grey level of v2's uint8 kernel, see the module docstring)."""
    _, _, height, width = images.shape
    top, left, h, w = boxes.to(images.device).unbind(dim=1)
    ry = aa_weights(top, h, size, height, images.device)
    rx = aa_weights(left, w, size, width, images.device)
    if flips is not None:
        rx = torch.where(flips.to(images.device).view(-1, 1, 1), rx.flip(1), rx)
    # channels_last: the layout the auto-augment ops and the normalisation run fastest in on a CPU
    return _to_uint8(separable_resample(images.float(), ry, rx, torch.float32, channels_last=True))


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """``v2.functional.resize(img, [size], antialias=True)`` on uint8 (shorter side -> size); as is if equal."""
    bsz, _, height, width = images.shape
    out_h, out_w = resize_output_size(height, width, size)
    if (out_h, out_w) == (height, width):
        return images
    zero = torch.zeros(1, dtype=torch.int64, device=images.device)
    ry = aa_weights(zero, zero + height, out_h, height, images.device).expand(bsz, -1, -1)
    rx = aa_weights(zero, zero + width, out_w, width, images.device).expand(bsz, -1, -1)
    # channels_last: the layout the auto-augment ops and the normalisation run fastest in on a CPU
    return _to_uint8(separable_resample(images.float(), ry, rx, torch.float32, channels_last=True))


def sample_pad_offsets(n: int, height: int, width: int, size: int, padding: int,
                       generator: torch.Generator | None = None, device: torch.device | None = None) -> torch.Tensor:
    """``(n, 2)`` int64 (top, left) of ``RandomCrop(size, padding)`` in the padded image: ``randint(0, H + 2p -
    size + 1)`` each (0 when the padded side equals ``size``), as ``RandomCrop.make_params`` draws them."""
    u = torch.rand((2, n), generator=generator, device=device, dtype=torch.float64)
    top = torch.floor(u[0] * (height + 2 * padding - size + 1)).long()
    left = torch.floor(u[1] * (width + 2 * padding - size + 1)).long()
    return torch.stack((top, left), dim=1)


def _source_index(coord: torch.Tensor, length: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded coordinate (minus padding) -> source index and whether it is inside (constant) ."""
    if mode == "reflect":  # torch's "reflect": the edge pixel is not repeated
        coord = torch.where(coord < 0, -coord, coord)
        coord = torch.where(coord >= length, 2 * (length - 1) - coord, coord)
        return coord, torch.ones_like(coord, dtype=torch.bool)
    inside = (coord >= 0) & (coord < length)
    return coord.clamp(0, length - 1), inside


def pad_crop(images: torch.Tensor, offsets: torch.Tensor, size: int, padding: int, mode: str,
             flips: torch.Tensor | None = None) -> torch.Tensor:
    """``v2.functional.pad(img, padding, fill=0, padding_mode=mode)`` then ``crop(top, left, size, size)`` (and
    ``hflip``) for every image, without building the padded batch: one gather of source pixels per image."""
    n, _, height, width = images.shape
    offsets = offsets.to(images.device)
    steps = torch.arange(size, device=images.device)
    rows, row_in = _source_index(offsets[:, :1] - padding + steps, height, mode)  # (n, size)
    cols = offsets[:, 1:] - padding + steps
    if flips is not None:
        cols = torch.where(flips.to(images.device).view(-1, 1), cols.flip(1), cols)
    cols, col_in = _source_index(cols, width, mode)
    batch = torch.arange(n, device=images.device).view(-1, 1, 1)
    out = images.permute(0, 2, 3, 1)[batch, rows.unsqueeze(2), cols.unsqueeze(1)]  # (n, size, size, C)
    out = torch.where((row_in.unsqueeze(2) & col_in.unsqueeze(1)).unsqueeze(-1), out, 0)
    return out.permute(0, 3, 1, 2).contiguous()


@dataclass
class ChainDraws:
    crop: torch.Tensor
    flips: torch.Tensor
    augment: AugmentDraws | None
    erasing: torch.Tensor | None
    noise: torch.Tensor | None

    def slice(self, lo: int, hi: int) -> ChainDraws:
        """The draws of images lo..hi-1."""
        aug = (AugmentDraws(self.augment.slots[lo:hi], None if self.augment.mix is None else self.augment.mix[lo:hi])
               if self.augment is not None else None)
        return ChainDraws(self.crop[lo:hi], self.flips[lo:hi], aug, _rows(self.erasing, lo, hi),
                          _rows(self.noise, lo, hi))


def _rows(t: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    return None if t is None else t[lo:hi]


class AugmentChain:
    """Train transform: uint8 ``(B, C, H, W)`` in, normalised ``(B, C, size, size)`` in ``dtype`` out.

    ``crop``: ``"resized"`` (RandomResizedCrop(size, scale, ratio)) or ``"pad"`` (Resize(size) when the
    shorter side differs, then RandomCrop(size, padding, padding_mode) with fill 0); then a horizontal flip,
    ``auto_augment`` (or none), normalisation and RandomErasing(``erasing``, value 0 or ``"random"``)."""

    train = True

    def __init__(self, size: int, crop: str = "resized", scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), padding: int = 4, padding_mode: str = "constant",
                 auto_augment: AutoAugment | None = None, erasing: float = 0.0, erasing_value: str = "0",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 dtype: torch.dtype = torch.float32, channels_last: bool = True) -> None:
        if crop not in ("resized", "pad") or padding_mode not in ("reflect", "constant"):
            raise ValueError(f"crop must be resized|pad and padding_mode reflect|constant, got {crop!r}, "
                             f"{padding_mode!r}")
        self.size, self.crop, self.scale, self.ratio = size, crop, tuple(scale), tuple(ratio)
        self.padding, self.padding_mode, self.auto_augment = padding, padding_mode, auto_augment
        self.erasing, self.erasing_value = erasing, erasing_value
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.dtype, self.channels_last = dtype, channels_last

    def draw(self, n: int, image_hw: Sequence[int], generator: torch.Generator | None,
             device: torch.device) -> ChainDraws:
        """Every random number one call uses, in a fixed order and amount (see the module docstring)."""
        height, width = int(image_hw[0]), int(image_hw[1])
        if self.crop == "resized":
            crop = sample_crop_boxes(n, height, width, self.scale, self.ratio, generator, device)  # type: ignore[arg-type]
        else:
            out_h, out_w = resize_output_size(height, width, self.size)
            crop = sample_pad_offsets(n, out_h, out_w, self.size, self.padding, generator, device)
        flips = sample_flips(n, generator, device)
        hw = (self.size, self.size)
        augment = self.auto_augment.draw(n, hw, generator, device) if self.auto_augment else None
        boxes = sample_erasing(n, *hw, self.erasing, generator, device) if self.erasing > 0 else None
        noise = (sample_noise(n, CHANNELS, *hw, generator, device)
                 if boxes is not None and self.erasing_value == "random" else None)
        return ChainDraws(crop, flips, augment, boxes, noise)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        rng_device = generator.device if generator is not None else images.device
        n = images.shape[0]
        d = self.draw(n, images.shape[-2:], generator, rng_device)
        if self.crop == "resized" and self.auto_augment is None:
            # erasing alone needs no uint8 stage: BatchTransform's fused float crop, then erasing
            out = resized_crop(images, d.crop, self.size, d.flips, self.mean, self.std, torch.float32,
                               self.channels_last)
            return (erase(out, d.erasing, d.noise) if d.erasing is not None else out).to(self.dtype)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty((n, images.shape[1], self.size, self.size), dtype=self.dtype, device=images.device,
                          memory_format=fmt)
        # The pixel work goes in slices of about SLICE_PIXELS output pixels: a whole 224 px batch in float32
        # is far larger than a CPU's caches, and each op makes several passes over it (measured here: the
        # ops ran 2-3x slower per image on a batch of 32 than on slices of a few images).
        step = max(1, SLICE_PIXELS // (self.size * self.size))
        # ToDtype + Normalize in one pass straight into the output (its dtype and memory format), with the
        # per-channel factors expanded to a whole image in that format: with (1, C, 1, 1) factors a
        # channels_last pass has an inner loop of C elements (2-3x slower).
        a, b = (t.expand(1, -1, self.size, self.size).contiguous(memory_format=fmt)
                for t in normalize_affine(self.mean, self.std, True, images.device))
        for lo in range(0, n, step):
            part = out[lo:lo + step]
            draws = d.slice(lo, lo + step)
            x = self._uint8(images[lo:lo + step], draws).float().contiguous(memory_format=fmt)
            torch.addcmul(b, x, a, out=part)
            if draws.erasing is not None:
                part.copy_(erase(part, draws.erasing, draws.noise))
        return out

    def _uint8(self, images: torch.Tensor, d: ChainDraws) -> torch.Tensor:
        """crop -> flip -> auto-augment, on uint8."""
        if self.crop == "resized":
            x = resized_crop_uint8(images, d.crop, self.size, d.flips)
        else:
            x = pad_crop(resize_uint8(images, self.size), d.crop, self.size, self.padding, self.padding_mode, d.flips)
        if d.augment is not None and self.auto_augment is not None:
            x = self.auto_augment.apply(x, _to_device(d.augment, x.device))
        return x

    def skip(self, n: int, image_hw: Sequence[int], generator: torch.Generator | None = None) -> None:
        """Consume exactly the random numbers `__call__` would for ``n`` images of ``image_hw``, no pixels."""
        self.draw(n, image_hw, generator, generator.device if generator is not None else torch.device("cpu"))

    def __repr__(self) -> str:
        crop = (f"RandomResizedCrop(scale={self.scale}, ratio={self.ratio})" if self.crop == "resized"
                else f"RandomCrop(padding={self.padding}, padding_mode={self.padding_mode!r})")
        return (f"{type(self).__name__}(size={self.size}, {crop}, flip, {self.auto_augment}, "
                f"erasing={self.erasing} value={self.erasing_value}, dtype={self.dtype}, "
                f"channels_last={self.channels_last})")


def _to_device(draws: AugmentDraws, device: torch.device) -> AugmentDraws:
    mix = draws.mix.to(device) if draws.mix is not None else None
    return AugmentDraws(draws.slots.to(device), mix)
