"""Splits of a data set, whatever holds them: the in-memory `Split` (CIFAR, synthetic), the `DatasetSplit`
protocol an image folder's `dtl.data.folder_split.FolderSplit` shares with it, the `Splits` pair a run trains and
evaluates on, the `EncodedSplit` protocol of the splits whose images are decoded when read (folders, HF data sets),
and the rules every source applies the same way: how streams are seeded (`stream_seed`), which images a subset keeps
(`subset_indices`) and the one stratified sampler (`stratified_pick`) behind a stratified subset
(`stratified_indices`) and a held-out split (`stratified_split`).

A leaf module: it imports torch and the standard library only, so `dtl.data.cifar`, `dtl.data.folder` and the
loaders can all build on it without importing one another.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

log = logging.getLogger("dtl")


def stream_seed(*parts: int | str) -> int:
    """A 63-bit seed from (seed, epoch, rank, ...) or (seed, class name) that does not collide the way
    `seed + rank` does. A hash of the parts' repr: stable across processes, platforms and Python versions
    (unlike `hash()` of a string), and distinct for (1, 23) and (12, 3)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def subset_indices(total: int, n: int | None, order: str = "first", seed: int = 0,
                   labels: Sequence[int] | None = None, classes: Sequence[str] | None = None) -> list[int] | None:
    """Which of `total` items a subset of `n` keeps, in their original order: the first n (`order="first"`),
    a random n drawn by a generator seeded with `seed` (`"random"`), or a stratified n (`"stratified"`: each
    class keeps its share of n, see `stratified_indices`; needs `labels`). None when the subset is the whole
    split (`n` is None or at least `total`), so callers can return the split itself."""
    if n is None or n >= total:
        return None
    if order == "first":
        return list(range(n))
    if order == "stratified":
        if labels is None:
            raise ValueError("a stratified subset needs the labels")
        return stratified_indices(labels, n, seed, classes)
    picked = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return picked.sort().values.tolist()


def stratified_pick(labels: Sequence[int], quotas: Mapping[int, int], seed: int, stream: str,
                    classes: Sequence[str] | None = None) -> list[int]:
    """The one stratified sampler: `quotas[c]` images of every class c, as sorted indices. Each class's images are
    picked by a generator seeded from (seed, `stream`, class name) -- so an image added to one class does not
    reshuffle the others, and the held-out split and a subset draw apart -- taking the first `quotas[c]` of a
    permutation of that class's indices."""
    picked: list[int] = []
    for c, idx in _by_class(labels).items():
        name = classes[c] if classes is not None and c < len(classes) else str(c)
        gen = torch.Generator().manual_seed(stream_seed(seed, stream, name))
        order = torch.randperm(len(idx), generator=gen)[:quotas[c]].tolist()
        picked.extend(idx[k] for k in order)
    return sorted(picked)


def stratified_indices(labels: Sequence[int], n: int, seed: int, classes: Sequence[str] | None = None) -> list[int]:
    """A stratified subset (`--subset-order stratified`): n indices, sorted, with every class represented in
    proportion to its size: class c keeps floor(n x n_c / N) images, and the remaining images go to the classes
    with the largest remainders (ties: the lower class index), so the subset has exactly n images. Picked by
    `stratified_pick` (stream "subset")."""
    by_class = _by_class(labels)
    total = len(labels)
    quota = {c: n * len(idx) // total for c, idx in by_class.items()}
    rest = sorted(by_class, key=lambda c: (-(n * len(by_class[c]) % total), c))
    for c in rest[:n - sum(quota.values())]:
        quota[c] += 1
    return stratified_pick(labels, quota, seed, "subset", classes)


def stratified_split(labels: Sequence[int], classes: Sequence[str], fraction: float,
                     seed: int) -> tuple[list[int], list[int]]:
    """A held-out split (`--val-split fraction`): (train indices, val indices), both sorted. Each class holds out
    round(fraction x n_c) of its images, at least 1 and at most n_c - 1 when it has two or more (a fraction of
    every class, not a total: no class is left without evaluation images). Picked by `stratified_pick` (stream
    "held-out")."""
    quota = {}
    for c, idx in _by_class(labels).items():
        n = len(idx)
        k = round(n * fraction)
        quota[c] = min(max(k, 1), n - 1) if (fraction > 0 and n >= 2) else (0 if n < 2 else k)
    val = stratified_pick(labels, quota, seed, "held-out", classes)
    held = set(val)
    return [i for i in range(len(labels)) if i not in held], val


def _by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    """Each class's indices, classes in order of first appearance."""
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(int(lab), []).append(i)
    return by_class


class DatasetSplit(Protocol):
    """What the loaders need of a split: `images[i]` (a uint8 (3, H, W) tensor, or the whole (N, 3, H, W)
    tensor for in-memory splits), int64 `labels` (N,), class names and `subset`."""

    labels: torch.Tensor
    classes: list[str]

    @property
    def images(self) -> torch.Tensor | Sequence[torch.Tensor]: ...

    def __len__(self) -> int: ...

    def subset(self, n: int | None, order: str = "first", seed: int = 0) -> DatasetSplit: ...


@runtime_checkable
class EncodedSplit(DatasetSplit, Protocol):
    """A split of encoded images, decoded when read (an image folder's `dtl.data.folder_split.FolderSplit`, an HF
    data set's `dtl.data.hf_split.HFSplit`): what the decode pipeline and the decoded-image cache use beyond
    `DatasetSplit`. `images[i]` decodes image i; served from its cache (`with_images`), `images` is one
    (N, 3, S, S) uint8 tensor instead."""

    decoder: str
    """--image-decoder, for the encoded images."""

    def encoded(self, i: int) -> torch.Tensor:
        """Image i's encoded bytes (a 1-D uint8 CPU tensor: what the decoders take)."""
        ...

    def describe(self, i: int) -> str:
        """Where image i lives, for messages (a path; a data set, split and row)."""
        ...

    def cache_identity(self) -> tuple[str, list[list[Any]]]:
        """What a cache of this split is built from: (where the split is read from, one entry per image -- its name
        first, then what changes when the image does), as `dtl.data.image_cache` records and compares it."""
        ...

    def with_images(self, images: torch.Tensor) -> EncodedSplit:
        """The same split served from decoded images (row i: image i), e.g. its cache."""
        ...


@dataclass
class Split:
    """A whole split in memory: uint8 images (N, 3, H, W), int64 labels (N,), class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int | None, order: str = "first", seed: int = 0) -> Split:
        """The first n images, a seeded random n or a stratified n (kept in split order); see `subset_indices`."""
        idx = subset_indices(len(self), n, order, seed, self.labels.tolist(), self.classes)
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


def apply_subsets(train: DatasetSplit, test: DatasetSplit, train_n: int | None, eval_n: int | None, order: str,
                  seed: int) -> Splits:
    """`--train-subset`/`--eval-subset` (`order`: first | random | stratified; the eval subset draws with
    seed + 1), logging which images each kept."""
    how = {"first": "the first {n}", "random": "a random {n} (seed {seed})",
           "stratified": "a stratified {n} (each class in proportion, seed {seed})"}[order]
    out = []
    for name, split, n, s in (("train", train, train_n, seed), ("eval", test, eval_n, seed + 1)):
        sub = split.subset(n, order, s)
        if sub is not split:
            log.info("--%s-subset: %s of %d images", name, how.format(n=len(sub), seed=s), len(split))
        out.append(sub)
    return Splits(out[0], out[1])
