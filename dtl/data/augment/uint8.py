"""What the uint8 augmentation ops share: the channels_last test and the fast float -> uint8 truncation."""

from __future__ import annotations

import torch

__all__ = ["is_channels_last", "to_uint8"]


def is_channels_last(images: torch.Tensor) -> bool:
    return images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 255] -> uint8 as ``.to(torch.uint8)`` truncates, via int16: the same, ~2x faster on a CPU."""
    return x.to(torch.int16).to(torch.uint8)
