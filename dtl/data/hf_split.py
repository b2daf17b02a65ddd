"""One split of a Hugging Face data set (`HFSplit`): rows of a `datasets.Dataset` whose image column holds encoded
images (JPEG, PNG, ... bytes, as the `Image` feature stores them), with int64 labels and class names, decoded when
read by dtl's own decoders (`HFImages`: in whichever process asks, a DataLoader worker) or served from the
decoded-image cache.

An `dtl.data.splits.EncodedSplit`, as an image folder's `FolderSplit` is, so every pipeline serves it the same way.
The image column is read with ``Image(decode=False)``: `datasets` hands over the stored bytes (or, for an image
kept as a path, the path) and never decodes with PIL itself. The data set object is memory-mapped Arrow: pickling
it to a worker sends its file names, not its rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from dtl.data.images import BadImage, as_byte_tensor, decode_bytes, read_bytes
from dtl.data.splits import subset_indices
from dtl.errors import UserError


def row_bytes(value: Any) -> torch.Tensor:
    """The encoded image of one row's undecoded `Image` value (``{"bytes": ..., "path": ...}``): its bytes, or
    the file its path names when the data set keeps only paths."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            return read_bytes(value["path"])
        value = data
    if value is None:
        return torch.empty(0, dtype=torch.uint8)
    return as_byte_tensor(value)


class HFImages(Sequence):
    """`images[i]` decodes row `rows[i]`'s image when asked, in whichever process asks. An image that cannot be
    decoded now (the load-time check passed it: the Arrow file changed during the run) stops the run with a
    message naming the row, as a user error."""

    def __init__(self, split: HFSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("HFImages supports integer indices only; use HFSplit.subset")
        try:
            return decode_bytes(self.split.encoded(int(i)), self.split.decoder)
        except BadImage as err:
            raise UserError(f"cannot decode {self.split.describe(int(i))} ({err}): the data set changed since it was "
                            "checked at start? run again (it is checked again)") from None


class HFSplit:
    """Rows `rows` of the data set `dataset` (its image column `column` read undecoded): `.images` (lazy, or an
    (N, 3, S, S) uint8 tensor once cached), int64 `.labels`, `.classes`. `name` says where the split comes from
    (the folder or Hub name, and the split), for messages and the cache; `stamp`: what changes when the data set's
    files do (see `files_stamp`)."""

    def __init__(self, dataset: Any, column: str, rows: list[int], labels: list[int], classes: list[str], name: str,
                 stamp: str, images: torch.Tensor | None = None, decoder: str = "auto") -> None:
        self.dataset, self.column, self.rows = dataset, column, list(rows)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.classes = list(classes)
        self.name, self.stamp, self.decoder = name, stamp, decoder
        self.images: HFImages | torch.Tensor = HFImages(self) if images is None else images
        if len(self.rows) != len(self.labels):
            raise ValueError(f"{len(self.rows)} rows for {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.rows)

    def encoded(self, i: int) -> torch.Tensor:
        return row_bytes(self.dataset[self.rows[i]][self.column])

    def describe(self, i: int) -> str:
        return f"{self.name} row {self.rows[i]}"

    def cache_identity(self) -> tuple[str, list[list[Any]]]:
        """(the data set and split, [row, stamp] per image): a cache is rebuilt when the rows or the files change."""
        return f"hf:{self.name}", [[str(r), self.stamp] for r in self.rows]

    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def _with(self, rows: list[int], labels: list[int], images: torch.Tensor | None) -> HFSplit:
        return HFSplit(self.dataset, self.column, rows, labels, self.classes, self.name, self.stamp, images,
                       self.decoder)

    def subset(self, n: int | None, order: str = "first", seed: int = 0) -> HFSplit:
        """The first n images, a seeded random n or a stratified n (kept in row order); see
        `dtl.data.splits.subset_indices`."""
        idx = subset_indices(len(self), n, order, seed, self.labels.tolist(), self.classes)
        if idx is None:
            return self
        labels = self.labels.tolist()
        cached = self.images[torch.tensor(idx, dtype=torch.int64)] if isinstance(self.images, torch.Tensor) else None
        return self._with([self.rows[i] for i in idx], [labels[i] for i in idx], cached)

    def select(self, idx: list[int]) -> HFSplit:
        """The images at positions `idx` (a held-out part, the readable rows)."""
        labels = self.labels.tolist()
        return self._with([self.rows[i] for i in idx], [labels[i] for i in idx], None)

    def with_decoder(self, decoder: str) -> HFSplit:
        images = self.images if isinstance(self.images, torch.Tensor) else None
        split = self._with(self.rows, self.labels.tolist(), images)
        split.decoder = decoder
        return split

    def with_images(self, images: torch.Tensor) -> HFSplit:
        if images.shape[0] != len(self):
            raise ValueError(f"{images.shape[0]} images for a split of {len(self)} rows")
        return self._with(self.rows, self.labels.tolist(), images)

    def with_classes(self, classes: list[str]) -> HFSplit:
        """The same images labelled by their index in `classes` (e.g. a checkpoint's class list)."""
        missing = [c for c in self.classes if c not in classes]
        if missing:
            raise UserError(f"{self.name} has class(es) the model does not know: {', '.join(missing[:10])}")
        remap = [classes.index(c) for c in self.classes]
        split = HFSplit(self.dataset, self.column, self.rows, [remap[lab] for lab in self.labels.tolist()], classes,
                        self.name, self.stamp, self.images if isinstance(self.images, torch.Tensor) else None,
                        self.decoder)
        return split

    def __repr__(self) -> str:
        return f"HFSplit({self.name}, {len(self)} images, {len(self.classes)} classes)"


def files_stamp(dataset: Any) -> str:
    """A short hash of the data set's Arrow files (name, size, modification time): what an image cache of its rows
    is checked against. A data set held only in memory has no files: "memory" (its cache is rebuilt each run)."""
    files = [f["filename"] for f in getattr(dataset, "cache_files", None) or []]
    if not files:
        return f"memory-{os.getpid()}"
    stats = [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in sorted(files)]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]
