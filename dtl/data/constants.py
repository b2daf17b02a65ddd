"""Numbers every part of the data package shares: ImageNet's per-channel mean and std (on [0, 1] pixels), the
normalisation of torchvision's pretrained backbones and the default of every transform."""

from __future__ import annotations

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
