"""Batched automatic augmentation on uint8 images: TrivialAugmentWide, RandAugment and AugMix.

Each image draws its own op and magnitude (the rule of torchvision's ``TrivialAugmentWide``, ``RandAugment``
and ``AugMix`` in ``torchvision/transforms/v2/_auto_augment.py``: the same op lists, magnitude bins, signs and
parameters, interpolation ``nearest`` for TA/RA and ``bilinear`` for AugMix, fill ``None``), and the ops run on
whole batches (NCHW or channels_last, kept) as tensor ops, grouped by op: one ``grid_sample`` for the
geometric ops, batched blends, bit masks, thresholds, min/max and a batched histogram for equalize.

Exactness (tests/unit/data/augment/test_autoaugment.py compares every op and a grid of magnitudes with
``torchvision.transforms.v2.functional`` applied per image): the results are **integer-exact** on uint8.
What makes that so: the affine matrices are computed in Python floats exactly as torchvision does and only
then become float32 tensors (a table per slot, see `SlotTable`); torchvision's ``add_(x, alpha=a)`` is a fused
multiply-add on the CPU's vector units and on GPUs, and ``addcmul`` with a per-image ``alpha`` is too (checked
bit for bit against a float64 reference); the sharpness blur is exact (see `sharpness`). AugMix mixes in
float32 and truncates to uint8 like torchvision; given the same draws it is within one grey level of
torchvision's (a sum of chains that lands next to an integer may truncate differently).

Random numbers: every image draws the same number of values whatever op it gets (all bins and signs too), so
the generator state after a batch does not depend on the data and `draw` replays without pixels (``skip``).
Host syncs: grouping by op reads the group sizes, one small device-to-host copy per `apply_slots` call.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

from dtl.data.augment.uint8 import is_channels_last, to_uint8

__all__ = ["POLICIES", "AugmentDraws", "AutoAugment", "SlotTable", "equalize", "fma", "slot_table"]

POLICIES = ("ta_wide", "randaugment", "augmix")
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
BLENDS = ("Brightness", "Color", "Contrast")
_TA_OPS = ("Identity", *GEOMETRIC, *BLENDS, "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
_AUGMIX_OPS = (*GEOMETRIC, "Posterize", "Solarize", "AutoContrast", "Equalize", *BLENDS, "Sharpness")
#: the ops whose magnitude torchvision negates with probability 1/2
_SIGNED = {*GEOMETRIC, *BLENDS, "Sharpness"}



def affine(images: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """``affine_image``/``rotate_image`` (fill None) with one inverse matrix per image, as one grid_sample:
    shear, rotate and translate exactly as torchvision builds its grid. (Whole-pixel translations as shifted
    copies were measured: per image on a CPU they beat the grid, but that is a Python loop over the images; as
    one batched gather they ran 2x slower than the grid.)"""
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


def _magnitudes(policy: str, op: str, bins: int, height: int, width: int) -> list[float] | None:
    """torchvision's ``_AUGMENTATION_SPACE[op][0](bins, height, width)`` as Python floats (None: no magnitude)."""
    lin = {"ta_wide": {"Shear": 0.99, "Translate": (32.0, 32.0), "Rotate": 135.0, "Colour": 0.99},
           "randaugment": {"Shear": 0.3, "Translate": (150.0 / 331.0 * width, 150.0 / 331.0 * height),
                           "Rotate": 30.0, "Colour": 0.9},
           "augmix": {"Shear": 0.3, "Translate": (width / 3.0, height / 3.0), "Rotate": 30.0, "Colour": 0.9}}[policy]
    if op in ("Identity", "AutoContrast", "Equalize"):
        return None
    if op == "Posterize":
        top, span = {"ta_wide": (8, 6), "randaugment": (8, 4), "augmix": (4, 4)}[policy]
        values = (top - (torch.arange(bins) / ((bins - 1) / span))).round().int()
        return [float(v) for v in values]
    if op == "Solarize":
        end = torch.linspace(1.0, 0.0, bins)
        return [float(v) for v in end]
    if op.startswith("Translate"):
        high = lin["Translate"][0 if op == "TranslateX" else 1]
    else:
        high = lin["Shear" if op.startswith("Shear") else "Rotate" if op == "Rotate" else "Colour"]
    return [float(v) for v in torch.linspace(0.0, high, bins)]


def _inverse_affine(center: tuple[float, float], angle: float, translate: tuple[float, float],
                    shear: tuple[float, float]) -> list[float]:
    """torchvision's ``_get_inverse_affine_matrix(center, angle, translate, 1.0, shear)``, same float steps."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    cos_sy, tan_sx, rot_minus_sy = math.cos(sy), math.tan(sx), rot - sy
    a = math.cos(rot_minus_sy) / cos_sy
    b = -(a * tan_sx + math.sin(rot))
    c = math.sin(rot_minus_sy) / cos_sy
    d = math.cos(rot) - c * tan_sx
    m = [d / 1.0, -b / 1.0, 0.0, -c / 1.0, a / 1.0, 0.0]
    m[2] += cx - m[0] * (cx + tx) - m[1] * (cy + ty)
    m[5] += cy - m[3] * (cx + tx) - m[4] * (cy + ty)
    return m


def _theta(op: str, magnitude: float, height: int, width: int) -> list[float]:
    """The inverse affine matrix torchvision's TA/RA/AugMix builds for a geometric op."""
    corner = (-width * 0.5, -height * 0.5)  # center=[0, 0] in pixel coordinates, shifted like affine_image
    if op == "ShearX":
        return _inverse_affine(corner, 0.0, (0.0, 0.0), (math.degrees(math.atan(magnitude)), 0.0))
    if op == "ShearY":
        return _inverse_affine(corner, 0.0, (0.0, 0.0), (0.0, math.degrees(math.atan(magnitude))))
    if op == "TranslateX":
        return _inverse_affine((0.0, 0.0), 0.0, (float(int(magnitude)), 0.0), (0.0, 0.0))
    if op == "TranslateY":
        return _inverse_affine((0.0, 0.0), 0.0, (0.0, float(int(magnitude))), (0.0, 0.0))
    return _inverse_affine((0.0, 0.0), -(magnitude % 360), (0.0, 0.0), (0.0, 0.0))  # rotate_image's -angle


@dataclass
class SlotTable:
    """Every (op, magnitude bin, sign) a policy can draw, with its parameters as tensors indexed by slot.

    ``op``: index into ``ops``; ``theta``: float32 (S, 2, 3) affine matrices (identity for other ops);
    ``factor``: float32 1 + magnitude and ``alpha``: float32 of the float64 ``1 - (1 + magnitude)`` (blends,
    sharpness: torchvision rounds both from Python floats); ``mask``: uint8 posterize bit masks (255: none);
    ``threshold``: float32 solarize thresholds (256: never); ``magnitude``: torchvision's float per slot."""

    ops: tuple[str, ...]
    bins: int
    op: torch.Tensor
    theta: torch.Tensor
    factor: torch.Tensor
    alpha: torch.Tensor
    mask: torch.Tensor
    threshold: torch.Tensor
    magnitude: list[float]

    def slot(self, op: torch.Tensor, bin_: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return (op * self.bins + bin_) * 2 + negative.long()


def slot_table(policy: str, height: int, width: int, bins: list[int], num_bins: int,
               device: torch.device) -> SlotTable:
    """The slots of `policy` for images of `height` x `width`: `bins` are the magnitude bins it may draw (all
    of ``range(num_bins)`` for TA, the one --ra-magnitude for RandAugment, ``range(severity)`` for AugMix)."""
    ops = _AUGMIX_OPS if policy == "augmix" else _TA_OPS
    rows: list[tuple[int, float, list[float], float, int, float]] = []  # op, factor, theta, threshold, mask, alpha
    magnitudes: list[float] = []
    for k, op in enumerate(ops):
        values = _magnitudes(policy, op, num_bins, height, width)
        for b in bins:
            for negative in (False, True):
                mag = 0.0 if values is None else values[b]
                if negative and op in _SIGNED:
                    mag = -mag
                theta = _theta(op, mag, height, width) if op in GEOMETRIC else [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
                bits = int(mag) if op == "Posterize" else 8
                mask = 255 if bits >= 8 else ((1 << bits) - 1) << (8 - bits)
                threshold = 255 * mag if op == "Solarize" else 256.0
                rows.append((k, 1.0 + mag, theta, threshold, mask, 1.0 - (1.0 + mag)))
                magnitudes.append(mag)
    return SlotTable(
        ops, len(bins), torch.tensor([r[0] for r in rows], device=device),
        torch.tensor([r[2] for r in rows], dtype=torch.float32, device=device).view(-1, 2, 3),
        torch.tensor([r[1] for r in rows], dtype=torch.float32, device=device),
        torch.tensor([r[5] for r in rows], dtype=torch.float32, device=device),
        torch.tensor([r[4] for r in rows], dtype=torch.uint8, device=device),
        torch.tensor([r[3] for r in rows], dtype=torch.float32, device=device), magnitudes)


# ---- the ops, batched (each takes uint8 (n, C, H, W) and per-image parameters) ----------------------

def fma(x: torch.Tensor, alpha: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float32 ``y + alpha * x`` rounded once, as torch's ``y.add_(x, alpha=alpha)`` computes it (an FMA).

    ``addcmul`` with per-image ``alpha`` is an FMA too (checked bit for bit against a float64 reference in
    tests/unit/data/augment/test_autoaugment.py, which would catch a build where it is not)."""
    return torch.addcmul(y, x.float(), alpha)


def _fma_(y: torch.Tensor, alpha: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y += alpha x`` in place with one ``alpha`` per image, for the whole batch at once (`fma`). On a CPU a
    per-image ``y[i].add_(x[i], alpha=a)`` measured 5-10x faster than this broadcast ``addcmul``, but it is a
    Python loop over the images (and a host read of ``alpha`` on a GPU): the batch stays one op."""
    return y.copy_(fma(x, alpha.view(-1, 1, 1, 1), y))


def _gray(images: torch.Tensor) -> torch.Tensor:
    """``_rgb_to_grayscale_image(preserve_dtype=False)`` then floor, (n, 1, H, W) float32: torchvision's own
    ``r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114)`` (a scalar ``alpha``, so no `fma` needed)."""
    r, g, b = (c.float() for c in images.unbind(dim=-3))
    return r.mul_(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3).floor_()


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``adjust_brightness_image``: ``image * factor``, clamped, truncated to uint8."""
    return to_uint8((images.float() * factor.view(-1, 1, 1, 1)).clamp_(0, 255))


def blend(images: torch.Tensor, contrast: bool, factor: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``adjust_saturation_image`` (blend with the floored grey image) or ``adjust_contrast_image`` (blend with
    its mean): ``_blend(image, degenerate, factor)`` per image."""
    degenerate = _gray(images)
    if contrast:
        degenerate = degenerate.mean(dim=(-3, -2, -1), keepdim=True)
    out = _fma_(images.float() * factor.view(-1, 1, 1, 1), alpha, degenerate)
    return to_uint8(out.clamp_(0, 255))


def sharpness(images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``adjust_sharpness_image`` per image: the rounded 3x3 smoothing (weights 1/13, centre 5/13) blended into
    the interior. ``round((box3x3 + 4 centre) / 13)``, sums of integers in float32 (exact): ``k / 13`` is never
    within float error of a half (13 is odd), so it equals torchvision's ``conv2d`` + ``round_`` in any summation
    order; several times faster than a batched depthwise ``conv2d`` (or integer division) on a CPU."""
    n, c, h, w = images.shape
    if h <= 2 or w <= 2:
        return images
    out = images.float()
    rows = out[..., :-2, :] + out[..., 1:-1, :]
    rows += out[..., 2:, :]
    view = out[..., 1:-1, 1:-1]
    total = torch.add(rows[..., :-2], view, alpha=4)
    total += rows[..., 1:-1]
    total += rows[..., 2:]
    blurred = total.mul_(1.0 / 13).round_().sub_(view)  # never a tie: |k/13 - half| >= 1/26
    _fma_(view, alpha, blurred)
    return to_uint8(out.clamp_(0, 255))


def _pixel_rows(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A channels_last batch as (n, HW / k, k C) rows, k | HW: per-channel reductions and broadcasts over it run
    with a long inner loop (over (n, C, H, W) they have one of C elements, several times slower)."""
    n, c, h, w = images.shape
    k = math.gcd(h * w, 64)
    return images.permute(0, 2, 3, 1).reshape(n, h * w // k, k * c), k


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """``autocontrast_image``: per image and channel, stretch [min, max] to [0, 255]."""
    n, c, h, w = images.shape
    last = is_channels_last(images)
    rows, k = _pixel_rows(images) if last else (images, 1)
    if last:
        lo = rows.amin(dim=1).view(n, k, c).amin(dim=1).float().view(n, 1, c)
        hi = rows.amax(dim=1).view(n, k, c).amax(dim=1).float().view(n, 1, c)
    else:
        lo, hi = images.amin(dim=(-2, -1), keepdim=True).float(), images.amax(dim=(-2, -1), keepdim=True).float()
    flat = hi == lo
    minimum = torch.where(flat, 0.0, lo)
    inv_scale = torch.where(flat, 1.0, hi.sub_(lo).mul_(1.0 / 255))
    if last:  # one value per channel, repeated for the k pixels of a row
        minimum, inv_scale = minimum.repeat(1, 1, k), inv_scale.repeat(1, 1, k)
    out = to_uint8(rows.float().sub_(minimum).div_(inv_scale).clamp_(0, 255))
    return out.view(n, h, w, c).permute(0, 3, 1, 2) if last else out


def equalize(images: torch.Tensor) -> torch.Tensor:
    """``equalize_image`` (PIL's LUT scheme), batched: one ``bincount`` of ``value + 256 * (image, channel)`` in
    memory order; the LUTs (identity for a channel left as is) applied by ``index_select`` of that index."""
    n, c, h, w = images.shape
    last = is_channels_last(images)
    rows = torch.arange(n * c, device=images.device).view((n, 1, 1, c) if last else (n, c, 1, 1))
    index = (images.permute(0, 2, 3, 1) if last else images).long().add_(256 * rows).reshape(-1)
    hist = torch.bincount(index, minlength=n * c * 256).view(n * c, 256)
    cum = hist.cumsum(dim=-1)
    top = cum.argmax(dim=-1, keepdim=True)  # the first bin holding the total: the image's maximum value
    step = torch.div(h * w - hist.gather(-1, top), 255, rounding_mode="floor")
    lut = torch.div(cum[:, :-1] + step // 2, step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], dim=-1)
    lut = torch.where(step != 0, lut, torch.arange(256, device=images.device)).to(torch.uint8)
    out = lut.view(-1).index_select(0, index)
    return out.view(n, h, w, c).permute(0, 3, 1, 2) if last else out.view(n, c, h, w)


def _apply_group(op: str, x: torch.Tensor, slots: torch.Tensor, table: SlotTable, mode: str) -> torch.Tensor:
    if op == "Geometric":  # shear, translate, rotate: one affine grid per image
        return affine(x, table.theta[slots], mode)
    if op == "Brightness":
        return brightness(x, table.factor[slots])
    if op in ("Color", "Contrast"):
        return blend(x, op == "Contrast", table.factor[slots], table.alpha[slots])
    if op == "Sharpness":
        return sharpness(x, table.alpha[slots])
    if op == "Posterize":
        return x & table.mask[slots].view(-1, 1, 1, 1)
    if op == "Solarize":
        # x >= t <=> x >= ceil(t) for integers; a Solarize slot's t = 255 * magnitude is at most 255
        limit = table.threshold[slots].ceil().clamp_(max=255).to(torch.uint8)  # invert = xor 255 (torch.where
        return x ^ (x >= limit.view(-1, 1, 1, 1)).view(torch.uint8).mul_(255)  # on uint8 is ~4x slower on a CPU)
    return autocontrast(x) if op == "AutoContrast" else equalize(x)


#: the op families `apply_slots` runs as one call each (shear/rotate share one affine grid per image)
FAMILIES = ("Identity", "Geometric", *BLENDS, "Sharpness", "Posterize", "Solarize", "AutoContrast",
            "Equalize")


@functools.lru_cache(maxsize=16)
def _family_codes(ops: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """op index + 1 -> index into FAMILIES (slot -1, identity, is family 0); cached per device so a GPU does not
    get a host-to-device copy per call."""
    names = ["Identity", *("Geometric" if op in GEOMETRIC else op for op in ops)]
    return torch.tensor([FAMILIES.index(n) for n in names], device=device)


def apply_slots(images: torch.Tensor, slots: torch.Tensor, table: SlotTable, mode: str) -> torch.Tensor:
    """One op per image (``slots``: (n,) indices into `table`, -1: identity). The batch is sorted by op family
    (a stable argsort), each family runs once on its slice, the inverse permutation puts every image back
    (``index_select``: boolean-mask scatters were several times slower on a CPU). One host sync: the sizes."""
    op = torch.where(slots >= 0, table.op[slots.clamp(min=0)], -1)
    family = _family_codes(table.ops, images.device)[op + 1]
    counts = torch.bincount(family, minlength=len(FAMILIES)).tolist()
    if counts[0] == len(images):
        return images
    order = torch.argsort(family, stable=True)
    x, s = _rows(images, order), slots.index_select(0, order)
    parts, start = [], 0
    for name, count in zip(FAMILIES, counts):
        if count:
            part = x[start:start + count]
            parts.append(part if name == "Identity" else _apply_group(name, part, s[start:start + count], table, mode))
        start += count
    return _rows(torch.cat(parts), torch.argsort(order))


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` keeping channels_last (on a channels_last view it is ~10x slower)."""
    if is_channels_last(x):
        return x.permute(0, 2, 3, 1).index_select(0, index).permute(0, 3, 1, 2)
    return x.index_select(0, index)


@dataclass
class AugmentDraws:
    """One batch's draws: ``slots`` (n, steps) for TA/RA; for AugMix ``slots`` (n, width, depth) with -1 where
    a chain is shorter than the depth, ``mix`` (n, 1 + width) float32: original weight, chain weights."""

    slots: torch.Tensor
    mix: torch.Tensor | None = None


class AutoAugment:
    """``TrivialAugmentWide()`` | ``RandAugment(num_ops, magnitude)`` | ``AugMix(severity, width, depth, alpha)``
    on uint8 batches (torchvision's defaults), with the draws taken from a given generator."""

    def __init__(self, policy: str, num_ops: int = 2, magnitude: int = 9, severity: int = 3, width: int = 3,
                 depth: int = -1, alpha: float = 1.0, num_bins: int = 31) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.num_ops, self.magnitude, self.num_bins = policy, num_ops, magnitude, num_bins
        self.severity, self.width, self.depth, self.alpha = severity, width, depth, alpha
        if policy == "augmix":
            self.num_bins, self.bins = 10, list(range(severity))  # AugMix's _PARAMETER_MAX bins, the first `severity`
        else:
            self.bins = [magnitude] if policy == "randaugment" else list(range(num_bins))
        self.mode = "bilinear" if policy == "augmix" else "nearest"
        self._tables: dict[tuple[int, int, str], SlotTable] = {}

    def table(self, height: int, width: int, device: torch.device) -> SlotTable:
        key = (height, width, str(device))
        if key not in self._tables:
            self._tables[key] = slot_table(self.policy, height, width, self.bins, self.num_bins, device)
        return self._tables[key]

    def draw(self, n: int, hw: tuple[int, int], generator: torch.Generator | None,
             device: torch.device) -> AugmentDraws:
        """The same amount of randomness for every image (replayable without pixels)."""
        table = self.table(hw[0], hw[1], device)
        n_ops = len(table.ops)
        if self.policy == "augmix":
            shape = (n, self.width, 3)
            alpha = torch.full((n, 2), self.alpha, device=device)
            # torch._sample_dirichlet (private; checked against torch 2.14.1, torchvision 0.29.1): the sampler
            # torchvision's AugMix draws its weights with, and the only Dirichlet sampler that takes a generator
            # (torch.distributions.Dirichlet.sample draws from the global one), which the seeded draws need.
            m = torch._sample_dirichlet(alpha, generator=generator)
            w = torch._sample_dirichlet(torch.full((n, self.width), self.alpha, device=device), generator=generator)
            mix = torch.cat([m[:, :1], w * m[:, 1:]], dim=1).float()
        else:
            shape, mix = (n, 1 if self.policy == "ta_wide" else self.num_ops), None
        u = torch.rand((4, *shape), generator=generator, device=device, dtype=torch.float64)
        op = (u[0] * n_ops).long()
        bin_ = (u[1] * len(self.bins)).long()
        slots = table.slot(op, bin_, u[2] <= 0.5)  # torchvision negates when rand() <= 0.5
        if self.policy == "augmix":
            depth = (u[3][:, :, :1] * 3).long() + 1 if self.depth <= 0 else torch.full_like(op[:, :, :1], self.depth)
            steps = torch.arange(3, device=device).view(1, 1, 3)
            slots = torch.where(steps < depth, slots, -1)
        return AugmentDraws(slots, mix)

    def apply(self, images: torch.Tensor, draws: AugmentDraws) -> torch.Tensor:
        table = self.table(images.shape[-2], images.shape[-1], images.device)
        if draws.mix is None:
            for k in range(draws.slots.shape[1]):
                images = apply_slots(images, draws.slots[:, k], table, self.mode)
            return images
        view = (-1, 1, 1, 1)
        mix = draws.mix[:, 0].view(view) * images.float()
        for i in range(self.width):
            aug = images
            for d in range(draws.slots.shape[2]):
                aug = apply_slots(aug, draws.slots[:, i, d], table, self.mode)
            mix.add_(draws.mix[:, 1 + i].view(view) * aug.float())
        return mix.to(torch.uint8)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(images, self.draw(images.shape[0], images.shape[-2:], generator, images.device))

    def __repr__(self) -> str:
        extra = {"ta_wide": "", "randaugment": f", num_ops={self.num_ops}, magnitude={self.magnitude}",
                 "augmix": f", severity={self.severity}, width={self.width}, depth={self.depth}, "
                           f"alpha={self.alpha}"}[self.policy]
        return f"AutoAugment({self.policy!r}{extra})"
