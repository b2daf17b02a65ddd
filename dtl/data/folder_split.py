"""One split of an image folder: its files, labels and classes (`FolderSplit`), with images decoded lazily, in
whichever process asks (`LazyImages`: a DataLoader worker), or served from the decoded-image cache.

Should a file fail to decode in a worker (changed on disk after the load-time check, or damaged in a way the
check cannot see), the worker logs its path and uses the next image of the same class instead of crashing the run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dtl.data.images import decode, read_bytes
from dtl.data.splits import subset_indices
from dtl.errors import UserError

log = logging.getLogger("dtl")


class LazyImages(Sequence):
    """`images[i]` decodes file i (uint8 RGB, 3 x H x W) when asked, in whichever process asks."""

    def __init__(self, root: Path, files: list[str], labels: list[int], decoder: str = "auto") -> None:
        self.root, self.files, self._labels = root, files, labels
        self.decoder = decoder  # --image-decoder
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("LazyImages supports integer indices only; use FolderSplit.subset")
        n = len(self.files)
        i = int(i) % n if i < 0 else int(i)
        label = self._labels[i]
        # Safety net: a file that passed the load-time check but fails now is replaced by the next image of
        # the same class (same label), with its path logged once per process. Never a crash in a worker.
        for step in range(n):
            j = (i + step) % n
            if self._labels[j] != label:
                continue
            try:
                return decode(self.path(j), self.decoder)
            except Exception as err:  # noqa: BLE001 - any decode failure is handled the same way
                if j not in self._warned:
                    self._warned.add(j)
                    log.warning("cannot decode %s (%s): using another image of class %s instead",
                                self.path(j), str(err).splitlines()[-1][-200:], label)
        raise RuntimeError(f"no image of class {label} under {self.root} can be decoded any more "
                           f"(first: {self.path(i)}); the data changed on disk during the run")


class FolderSplit:
    """One split of an image folder: lazy `.images`, int64 `.labels`, `.classes`, `.files` relative to
    `.root` (each `<class>/...`). A `dtl.data.splits.EncodedSplit` (hence a `DatasetSplit`, as an in-memory
    `dtl.data.splits.Split` is).
    Served from its decoded-image cache (`with_images`, see `dtl.data.image_cache`), `.images` is one
    (N, 3, S, S) uint8 tensor instead, which the device pipeline takes as it takes CIFAR's."""

    def __init__(self, root: Path, files: list[str], labels: list[int], classes: list[str],
                 source: dict[str, Any] | None = None, images: torch.Tensor | None = None,
                 decoder: str = "auto") -> None:
        self.root = Path(root)
        self.files = list(files)
        self.classes = list(classes)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        #: --image-decoder, for the files (LazyImages, the decode pipeline, the cache's first build)
        self.decoder = decoder
        self.images: LazyImages | torch.Tensor = (LazyImages(self.root, self.files, list(labels), decoder)
                                                  if images is None else images)
        #: how the split was made (data_dir, layout, seed, val_split, skipped files), for `split_file.save_split`
        self.source = source if source is not None else {}

    def __len__(self) -> int:
        return len(self.files)

    def paths(self) -> list[Path]:
        return [self.root / f for f in self.files]

    def encoded(self, i: int) -> torch.Tensor:
        """File i's bytes (`dtl.data.splits.EncodedSplit`)."""
        return read_bytes(self.root / self.files[i])

    def describe(self, i: int) -> str:
        return str(self.root / self.files[i])

    def cache_identity(self) -> tuple[str, list[list[Any]]]:
        """(the folder, [file, size, modification time] per file): a cache is rebuilt when any of them changes."""
        entries = []
        for name in self.files:
            st = os.stat(self.root / name)
            entries.append([name, st.st_size, st.st_mtime_ns])
        return str(self.root.resolve()), entries

    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def subset(self, n: int | None, order: str = "first", seed: int = 0) -> FolderSplit:
        """The first n images, a seeded random n or a stratified n (kept in file order); see
        `dtl.data.splits.subset_indices`."""
        idx = subset_indices(len(self), n, order, seed, self.labels.tolist(), self.classes)
        if idx is None:
            return self
        labels = self.labels.tolist()
        rows = self.images[torch.tensor(idx, dtype=torch.int64)] if isinstance(self.images, torch.Tensor) else None
        return FolderSplit(self.root, [self.files[i] for i in idx], [labels[i] for i in idx], self.classes,
                           self.source, rows, self.decoder)

    def with_decoder(self, decoder: str) -> FolderSplit:
        """The same split decoded by `decoder` (--image-decoder)."""
        images = self.images if isinstance(self.images, torch.Tensor) else None
        return FolderSplit(self.root, self.files, self.labels.tolist(), self.classes, self.source, images, decoder)

    def with_images(self, images: torch.Tensor) -> FolderSplit:
        """The same split served from decoded images (row i: file i), e.g. its cache."""
        if images.shape[0] != len(self):
            raise ValueError(f"{images.shape[0]} images for a split of {len(self)} files")
        return FolderSplit(self.root, self.files, self.labels.tolist(), self.classes, self.source, images,
                           self.decoder)

    def with_classes(self, classes: list[str]) -> FolderSplit:
        """The same images labelled by their index in `classes` (e.g. a checkpoint's class list)."""
        missing = [c for c in self.classes if c not in classes]
        if missing:
            raise UserError(f"{self.root} has class folder(s) the model does not know: "
                            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; "
                            f"it knows {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}")
        remap = [classes.index(c) for c in self.classes]
        return FolderSplit(self.root, self.files, [remap[lab] for lab in self.labels.tolist()], classes,
                           self.source, self.images if isinstance(self.images, torch.Tensor) else None, self.decoder)

    def __repr__(self) -> str:
        return f"FolderSplit({self.root}, {len(self)} images, {len(self.classes)} classes)"
