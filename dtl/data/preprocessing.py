"""What a model expects of its input: normalisation and resampling, recorded with every run.

torchvision backbones keep ImageNet's mean/std; timm backbones bring their own (`pretrained_cfg`: e.g.
0.5/0.5 for many ViTs). A run records the `Preprocessing` it trained with (config.json and every checkpoint,
``run.preprocessing``) so that `dtl eval`, `dtl predict` and `dtl export` feed the model exactly what it
saw. The eval geometry lives here too, once: `eval_resize` (Resize + CenterCrop), and `eval_transform` built on
it. Pure data and torchvision: no dtl imports beyond `dtl.data.constants`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from dtl.data.constants import IMAGENET_MEAN, IMAGENET_STD

#: The only resampling the batched device pipeline implements (antialiased, exact vs torchvision).
DEVICE_INTERPOLATION = "bilinear"


@dataclass(frozen=True)
class Preprocessing:
    """Normalisation and resampling of a model's input: Resize(shorter side to `size`) with
    `interpolation` (antialiased) + CenterCrop(`size`) + scale to [0, 1] + Normalize(`mean`, `std`)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    """bilinear | bicubic | nearest (torchvision's InterpolationMode names)."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Preprocessing | None:
        """The recorded preprocessing of a run, or None when `values` holds none."""
        if not values:
            return None
        return cls(tuple(float(v) for v in values["mean"]), tuple(float(v) for v in values["std"]),
                   str(values.get("interpolation", "bilinear")))

    def for_pipeline(self, pipeline: str) -> Preprocessing:
        """What a data pipeline actually applies: the device and decode pipelines resample bilinearly whatever
        the model prefers (the run records that, so evaluation and export resample the same way)."""
        if pipeline in ("device", "decode") and self.interpolation != DEVICE_INTERPOLATION:
            return Preprocessing(self.mean, self.std, DEVICE_INTERPOLATION)
        return self


IMAGENET = Preprocessing()


def v2_interpolation(name: str) -> Any:
    """torchvision's InterpolationMode for a name (`bicubic`, ...)."""
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode(name)
    except ValueError:
        return InterpolationMode.BILINEAR


def eval_resize(image: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """The eval resize, the one geometry every evaluation uses: ``Resize(size)`` (shorter side to `size`, antialiased,
    `interpolation`) then ``CenterCrop(size)``, on a uint8 (..., 3, H, W) tensor -- torchvision's v2 functional ops.
    The workers pipeline's evaluation, `dtl predict`/`dtl export` (through `eval_transform`), the decoded-image cache
    and the decode pipeline's squares all call it; the device pipeline's batched form, in float, is
    `dtl.data.augment.transform.resize_center_crop`."""
    from torchvision.transforms.v2 import functional as F

    resized = F.resize(image, [size], interpolation=v2_interpolation(interpolation), antialias=True)
    return F.center_crop(resized, [size, size])


class EvalResize:
    """`eval_resize` as a per-image transform: a class, so that DataLoader workers can pickle it."""

    def __init__(self, size: int, interpolation: str = "bilinear") -> None:
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return eval_resize(image, self.size, self.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation!r})"


def eval_normalize(prep: Preprocessing = IMAGENET):  # noqa: ANN201 - a torchvision v2 Compose
    """ToDtype(float32, scale=True) + Normalize(`prep` mean/std) on uint8 images, one or a batch (the same
    element-wise ops, so the same numbers either way)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)])


def eval_transform(size: int, prep: Preprocessing = IMAGENET):  # noqa: ANN201 - a torchvision v2 Compose
    """The one per-image eval preprocessing (the workers loader's evaluation, `dtl predict`, `dtl export`), on
    uint8 tensors: `eval_resize` (Resize(size) + CenterCrop(size), `prep.interpolation`) + `eval_normalize`
    (ToDtype(float, scale) + Normalize(`prep` mean/std; ImageNet's by default))."""
    from torchvision.transforms import v2

    return v2.Compose([EvalResize(size, prep.interpolation), eval_normalize(prep)])
