"""`dtl bench`'s extra input phases: dtl's batched augmentation against torchvision v2 doing the same ops.

The plain ``input`` phase compares dtl's pipeline with the reference recipe's (PIL, RandomResizedCrop + flip).
With ``--auto-augment``, ``--crop pad``, ``--random-erasing``, ``--mixup`` or ``--cutmix`` dtl's pipeline does
more than that recipe, so ``input_augment`` compares it with what a torchvision user would write for the same
settings: a per-image v2 ``Compose`` on uint8 tensors (crop, flip, TrivialAugmentWide/RandAugment/AugMix,
ToDtype, Normalize, RandomErasing) in a ``DataLoader`` (``num_workers=0``, ``shuffle=True``) whose collate
function applies v2's ``MixUp``/``CutMix`` to the batch (as torchvision's reference ``train.py`` does), batches
moved to the device. The dtl side of the phase is dtl's own training input (loader, then the `Mixer`: the same
code as its ``input`` phase).

Each extra phase is an entry of `INPUT_PHASES`: when it applies to a config, and the reference side's
batch source.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2

from dtl.config import Config
from dtl.data.augment import mix
from dtl.data.constants import IMAGENET_MEAN, IMAGENET_STD
from dtl.data.loaders.transforms import augment_chain
from dtl.data.splits import Split
from dtl.tools.bench.reference_loop import endless


def v2_augment_transform(cfg: Config) -> v2.Compose:
    """The torchvision v2 per-image pipeline equal (in distribution) to dtl's `AugmentChain` for `cfg`."""
    d, size = cfg.data, cfg.data.image_size
    if d.crop == "resized":
        crop = [v2.RandomResizedCrop(size, scale=d.crop_scale, antialias=True)]
    else:
        crop = [v2.Resize(size, antialias=True), v2.RandomCrop(size, padding=d.crop_padding,
                                                                padding_mode=d.padding_mode)]
    auto = {"none": [], "ta_wide": [v2.TrivialAugmentWide()],
            "randaugment": [v2.RandAugment(num_ops=d.ra_num_ops, magnitude=d.ra_magnitude)],
            "augmix": [v2.AugMix(severity=d.augmix_severity)]}[d.auto_augment]
    erasing = ([v2.RandomErasing(d.random_erasing, value=0 if d.random_erasing_value == "0" else "random")]
               if d.random_erasing > 0 else [])
    return v2.Compose([*crop, v2.RandomHorizontalFlip(), *auto, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), *erasing])


def v2_mix_transform(cfg: Config, num_classes: int) -> v2.Transform | None:
    """timm's batch mixing in torchvision v2's terms: with probability --mix-prob, ``CutMix`` with probability
    --mix-switch-prob when both are on, else ``MixUp`` (None when mixing is off)."""
    o = cfg.optim
    choices = [*([v2.MixUp(alpha=o.mixup, num_classes=num_classes)] if o.mixup > 0 else []),
               *([v2.CutMix(alpha=o.cutmix, num_classes=num_classes)] if o.cutmix > 0 else [])]
    if not choices:
        return None
    chosen = (v2.RandomChoice(choices, p=[1.0 - o.mix_switch_prob, o.mix_switch_prob]) if len(choices) == 2
              else choices[0])
    return v2.RandomApply([chosen], p=o.mix_prob)


class _MixCollate:
    """``default_collate``, then the batch transform (torchvision's reference scripts mix in the collate)."""

    def __init__(self, transform: v2.Transform) -> None:
        self.transform = transform

    def __call__(self, samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(*default_collate(samples))


class _UInt8Images(Dataset):
    def __init__(self, split: Split, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images, self.labels, self.transform = split.images, split.labels, transform

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]


class V2Input:
    """The reference side of ``input_augment``: calling it produces ``steps`` batches, returns the image count."""

    def __init__(self, cfg: Config, split: Split, device: torch.device) -> None:
        mixing = v2_mix_transform(cfg, len(split.classes))
        loader = DataLoader(_UInt8Images(split, v2_augment_transform(cfg)), batch_size=cfg.optim.batch_size,
                            shuffle=True, num_workers=0, collate_fn=_MixCollate(mixing) if mixing else None)
        self.batches: Iterator[Any] = endless(loader)
        self.device = device

    def __call__(self, steps: int) -> int:
        count = 0
        for _ in range(steps):
            images, labels = next(self.batches)
            images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            count += int(labels.shape[0])
        return count


#: extra input phase -> (does it apply to this config?, the reference side's batch source)
INPUT_PHASES: dict[str, tuple[Callable[[Config], bool], Callable[[Config, Split, torch.device], Callable]]] = {
    "input_augment": (lambda cfg: augment_chain(cfg) is not None or mix.enabled(cfg.optim), V2Input),
}


def extra_phases(cfg: Config) -> tuple[str, ...]:
    return tuple(name for name, (applies, _) in INPUT_PHASES.items() if applies(cfg))


def reference_runner(phase: str, cfg: Config, split: Split, device: torch.device) -> Callable[[int], int]:
    return INPUT_PHASES[phase][1](cfg, split, device)
