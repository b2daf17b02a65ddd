"""Splits of a data set, whatever holds them: the in-memory `Split` (CIFAR, synthetic), the `DatasetSplit`
protocol an image folder's `dtl.folder.FolderSplit` shares with it, the `Splits` pair a run trains and
evaluates on, and the two rules every source applies the same way: how streams are seeded
(`stream_seed`) and which images a subset keeps (`subset_indices`).

A leaf module: it imports torch and the standard library only, so `dtl.cifar`, `dtl.folder` and
`dtl.data` can all build on it without importing one another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


def stream_seed(*parts: int | str) -> int:
    """A 63-bit seed from (seed, epoch, rank, ...) or (seed, class name) that does not collide the way
    `seed + rank` does. A hash of the parts' repr: stable across processes, platforms and Python versions
    (unlike `hash()` of a string), and distinct for (1, 23) and (12, 3)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def subset_indices(total: int, n: int | None, order: str = "first", seed: int = 0) -> list[int] | None:
    """Which of `total` items a subset of `n` keeps, in their original order: the first n (`order="first"`)
    or a random n drawn by a generator seeded with `seed`. None when the subset is the whole split
    (`n` is None or at least `total`), so callers can return the split itself."""
    if n is None or n >= total:
        return None
    if order == "first":
        return list(range(n))
    picked = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return picked.sort().values.tolist()


class DatasetSplit(Protocol):
    """What the loaders need of a split: `images[i]` (a uint8 (3, H, W) tensor, or the whole (N, 3, H, W)
    tensor for in-memory splits), int64 `labels` (N,), class names and `subset`."""

    labels: torch.Tensor
    classes: list[str]

    @property
    def images(self) -> torch.Tensor | Sequence[torch.Tensor]: ...

    def __len__(self) -> int: ...

    def subset(self, n: int | None, order: str = "first", seed: int = 0) -> DatasetSplit: ...


@dataclass
class Split:
    """A whole split in memory: uint8 images (N, 3, H, W), int64 labels (N,), class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int | None, order: str = "first", seed: int = 0) -> Split:
        """The first n images, or a seeded random n (kept in split order); see `subset_indices`."""
        idx = subset_indices(len(self), n, order, seed)
        if idx is None:
            return self
        rows = torch.tensor(idx, dtype=torch.int64)
        return Split(self.images[rows], self.labels[rows], self.classes)


@dataclass
class Splits:
    """The train and held-out splits of one run (same classes, in the same order)."""

    train: DatasetSplit
    test: DatasetSplit

    @property
    def classes(self) -> list[str]:
        return self.train.classes
