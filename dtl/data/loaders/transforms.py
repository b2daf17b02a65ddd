"""Which transforms a run's loaders apply, from its config: the batched ones of the `device` and `decode`
pipelines (the fused `BatchTransform`, or the uint8 `AugmentChain` when --crop pad, --auto-augment or
--random-erasing asks for it) and the per-image ones of the `workers` pipeline (torchvision v2's reference recipe,
or the same chain on a batch of one)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dtl.config import Config
from dtl.data.augment.autoaugment import AutoAugment
from dtl.data.augment.chain import AugmentChain
from dtl.data.augment.transform import BatchTransform
from dtl.data.preprocessing import IMAGENET, Preprocessing, eval_normalize, eval_transform, v2_interpolation

__all__ = ["ChainPerImage", "augment_chain", "batch_transform", "eval_finish", "per_image_transform", "v2_transform"]


def v2_transform(train: bool, size: int, augment: bool, prep: Preprocessing = IMAGENET,
                 scale: tuple[float, float] = (0.5, 1.0)):  # noqa: ANN201 - a torchvision v2 Compose
    """The reference recipe's per-image transforms, on uint8 tensors, with the model's normalisation and
    resampling: RandomResizedCrop + flip for augmented training, else `eval_transform`."""
    if not (train and augment):
        return eval_transform(size, prep)
    from torchvision.transforms import v2

    mode = v2_interpolation(prep.interpolation)
    return v2.Compose([v2.RandomResizedCrop(size, scale=scale, interpolation=mode, antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(prep.mean, prep.std)])


def augment_chain(cfg: Config, prep: Preprocessing = IMAGENET, dtype: torch.dtype = torch.float32,
                  channels_last: bool = True) -> AugmentChain | None:
    """The uint8 training chain when --crop pad, --auto-augment or --random-erasing asks for it (normalised with
    `prep`; it resamples bilinearly); None when the fused `BatchTransform` (crop + flip + normalise) is all the
    run needs."""
    d = cfg.data
    if not d.augment or (d.crop == "resized" and d.auto_augment == "none" and d.random_erasing == 0):
        return None
    auto = (AutoAugment(d.auto_augment, num_ops=d.ra_num_ops, magnitude=d.ra_magnitude, severity=d.augmix_severity)
            if d.auto_augment != "none" else None)
    return AugmentChain(d.image_size, d.crop, d.crop_scale, padding=d.crop_padding, padding_mode=d.padding_mode,
                        auto_augment=auto, erasing=d.random_erasing, erasing_value=d.random_erasing_value,
                        mean=prep.mean, std=prep.std, dtype=dtype, channels_last=channels_last)


def batch_transform(cfg: Config, train: bool, prep: Preprocessing = IMAGENET, dtype: torch.dtype = torch.float32,
                    channels_last: bool = True) -> BatchTransform | AugmentChain:
    """The batched transform of the `device` and `decode` pipelines: for training the chain (`augment_chain`) or
    the fused crop + flip + normalise (`--no-augment`: the eval transform); for evaluation the fused
    Resize + CenterCrop + normalise."""
    size = cfg.data.image_size
    if not train:
        return BatchTransform(train=False, size=size, mean=prep.mean, std=prep.std, dtype=dtype,
                              channels_last=channels_last)
    return augment_chain(cfg, prep, dtype, channels_last) or BatchTransform(
        train=cfg.data.augment, size=size, scale=cfg.data.crop_scale, mean=prep.mean, std=prep.std, dtype=dtype,
        channels_last=channels_last)


class ChainPerImage:
    """The `workers` pipeline's per-image transform when `AugmentChain` is in use: the same batched code on a
    batch of one, drawing from torch's global generator (which the workers loader seeds per image)."""

    def __init__(self, chain: AugmentChain) -> None:
        self.chain = chain

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.chain(image.unsqueeze(0))[0]


def per_image_transform(cfg: Config, prep: Preprocessing = IMAGENET) -> Callable[[torch.Tensor], torch.Tensor]:
    """The `workers` pipeline's training transform: the chain on a batch of one, or v2's reference recipe."""
    chain = augment_chain(cfg, prep, channels_last=False)
    if chain is not None:
        return ChainPerImage(chain)
    return v2_transform(True, cfg.data.image_size, cfg.data.augment, prep, cfg.data.crop_scale)


def eval_finish(prep: Preprocessing, channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The kept `workers` evaluation's step from its uint8 `eval_resize` batches to the model's input:
    `eval_normalize` on the whole batch (the same element-wise ops as per image, so the same numbers), in float32
    and the memory format asked for."""
    normalize = eval_normalize(prep)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def finish(images: torch.Tensor) -> torch.Tensor:
        return normalize(images).contiguous(memory_format=memory_format)
    return finish
