"""MixUp and CutMix on a training batch (the soft-target cross-entropy they train with is `dtl.train.loss`).

The same semantics as timm's ``Mixup(mode="batch")`` (``timm/data/mixup.py``): each batch is paired with
itself reversed (``x.flip(0)``); with probability ``mix_prob`` it is mixed, by CutMix with probability
``switch_prob`` when both are on, with ``lam ~ Beta(alpha, alpha)``; CutMix pastes one box whose side is
``sqrt(1 - lam)`` of the image's, centred uniformly, clipped at the border, and ``lam`` is then corrected to
the area actually kept (timm's ``correct_lam``); the targets are ``lam * y + (1 - lam) * y.flip(0)`` of
label-smoothed one-hot rows (timm's ``mixup_target``). Unlike timm, an odd batch is allowed (its middle image
pairs with itself), since an epoch's last batch may be odd.

Where: in the training loop's micro-step, on the batch the loader yielded, so the `device` and `workers`
pipelines share this one code path and the loop (which knows the epoch and the batch index) seeds it.

Randomness: every draw of a batch (apply, switch, lam, box centre) comes from its own generator seeded by
``stream_seed(seed, epoch, rank, batch_index, "mix")``, so a resume in the middle of an epoch draws the same
as the uninterrupted run without replaying anything. The draws are a handful of scalars made on the host by
numpy's legacy ``RandomState`` (whose streams numpy keeps frozen across versions, and whose calls are the
ones timm makes: the same seed gives timm's own draws); nothing is read back from the device, so there is no
host sync per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dtl.config import OptimConfig
from dtl.data.splits import stream_seed


@dataclass(frozen=True)
class MixDraw:
    """One batch's draw: `kind` (none, mixup or cutmix), `lam` (the weight of the original images, after the
    CutMix box correction) and the CutMix box (y0, y1, x0, x1)."""

    kind: str
    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class MixedBatch:
    images: torch.Tensor
    targets: torch.Tensor
    """Soft targets (batch, classes), rows summing to 1."""
    labels: torch.Tensor
    """The dominant label of each mixed image (weight >= 0.5): what train accuracy is counted against."""


def enabled(cfg: OptimConfig) -> bool:
    return cfg.mixup > 0 or cfg.cutmix > 0


def seed_words(seed: int) -> list[int]:
    """A 63-bit stream seed as the two 32-bit words numpy's RandomState takes (np.random.seed accepts them
    too, which is how a test replays a batch's draw through timm)."""
    return [seed & 0xFFFFFFFF, seed >> 32]


def draw(rng: np.random.RandomState, mixup: float, cutmix: float, prob: float, switch_prob: float,
         height: int, width: int) -> MixDraw:
    """timm's `_params_per_batch` + `cutmix_bbox_and_lam`, call for call, from `rng`."""
    if not (mixup > 0 or cutmix > 0) or rng.rand() >= prob:
        return MixDraw("none")
    if mixup > 0 and cutmix > 0:
        use_cutmix = rng.rand() < switch_prob
        lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    elif mixup > 0:
        use_cutmix, lam = False, float(rng.beta(mixup, mixup))
    else:
        use_cutmix, lam = True, float(rng.beta(cutmix, cutmix))
    if not use_cutmix:
        return MixDraw("mixup", lam)
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.randint(0, height)), int(rng.randint(0, width))
    y0, y1 = min(max(cy - cut_h // 2, 0), height), min(max(cy + (cut_h + 1) // 2, 0), height)
    x0, x1 = min(max(cx - cut_w // 2, 0), width), min(max(cx + (cut_w + 1) // 2, 0), width)
    return MixDraw("cutmix", 1.0 - (y1 - y0) * (x1 - x0) / float(height * width), (y0, y1, x0, x1))


#: values (pixels x channels) per chunk of the mixup blend, so that a chunk and its partners stay in a CPU's
#: caches: the whole-batch blend makes four passes over a batch far larger than them (measured at 224 px, batch
#: 32: chunks 5-20% faster in paired runs, bitwise the same result)
CHUNK_VALUES = 1 << 18


def mix_images(images: torch.Tensor, d: MixDraw) -> torch.Tensor:
    """The batch mixed with its reverse (a new tensor; the input is left as it was)."""
    if d.lam == 1.0:
        return images
    n = images.shape[0]
    if d.box is None:
        # timm's ops in timm's order (x * lam + x.flip(0) * (1 - lam), each rounded), bitwise timm's result;
        # chunk by chunk, each with its partners (rows n - hi .. n - lo reversed)
        out = torch.empty_like(images)
        step = max(1, CHUNK_VALUES // images[0].numel())
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            partners = images[n - hi:n - lo].flip(0).mul_(1.0 - d.lam)
            torch.mul(images[lo:hi], d.lam, out=out[lo:hi]).add_(partners)
        return out
    y0, y1, x0, x1 = d.box
    out = images.clone()
    out[:, :, y0:y1, x0:x1] = images[:, :, y0:y1, x0:x1].flip(0)  # only the box is flipped
    return out


def mix_targets(labels: torch.Tensor, num_classes: int, lam: float, smoothing: float) -> torch.Tensor:
    """timm's `mixup_target`: label-smoothed one-hot rows, mixed with the reversed batch's."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels.long().view(-1, 1), on)
    return y1 * lam + y1.flip(0) * (1.0 - lam)


class Mixer:
    """Mixes the training batches of one rank: `mixer(images, labels, epoch, batch_index)`."""

    def __init__(self, cfg: OptimConfig, num_classes: int, seed: int, rank: int) -> None:
        self.cfg, self.num_classes, self.seed, self.rank = cfg, num_classes, seed, rank
        # one generator, re-seeded per batch: constructing a RandomState costs ~210 us, seeding one ~17 us
        self._rng = np.random.RandomState(0)

    def draw(self, epoch: int, batch_index: int, height: int, width: int) -> MixDraw:
        self._rng.seed(seed_words(stream_seed(self.seed, epoch, self.rank, batch_index, "mix")))
        c = self.cfg
        return draw(self._rng, c.mixup, c.cutmix, c.mix_prob, c.mix_switch_prob, height, width)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, batch_index: int) -> MixedBatch:
        d = self.draw(epoch, batch_index, images.shape[-2], images.shape[-1])
        targets = mix_targets(labels, self.num_classes, d.lam, self.cfg.label_smoothing)
        return MixedBatch(mix_images(images, d), targets, labels if d.lam >= 0.5 else labels.flip(0))
