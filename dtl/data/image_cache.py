"""The decoded-image cache of an image folder or an HF data set (`--cache-images [DIR]`): decode once, then serve
the split as one uint8 tensor to the `device` pipeline, as CIFAR is served.

Each split (train, held-out) is one raw file ``<role>-<size>px-<key>.u8`` of N x 3 x S x S bytes (every image
resized so its shorter side is S = `--cache-size`, then centre-cropped to a square: the device pipeline batches
one tensor of equal-sized images), memory-mapped when read (the page cache is shared by the ranks of a node,
and a cache larger than memory still works), beside its manifest ``<same name>.json``: format and version, S,
the split's root and classes, every image (a folder's: each file with its size and modification time; an HF data
set's: each row with a stamp of its Arrow files, see `dtl.data.splits.EncodedSplit.cache_identity`), and a CRC-32
of the data. The
key names (root, role, S), so each split of a folder has one cache per size in a folder, overwritten when it
goes stale; the file list is in the manifest, not the name, so a subset or a changed folder rebuilds the one
cache instead of leaving old ones behind.

A cache is used only when its manifest matches the split as it is now (any file added, removed, resized or
touched: rebuilt, with a message naming what changed) and its data file has the recorded size and CRC
(truncated or damaged: rebuilt, with a message). The first process of each node (local rank 0; the others
wait on the CPU I/O group, see `dtl.distributed.ProcessGroups.main_first`) checks and if need be writes it, holding an
exclusive `fcntl` lock on ``<name>.lock`` so that two jobs sharing a cache folder do not write it at once; the
others take a shared lock to read. Writes are atomic: data to a temporary name, fsynced, renamed, then the
manifest (a crash in between leaves a manifest whose CRC does not match: rebuilt).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtl.atomic_files import fsync, write_json
from dtl.data.images import decode_batch, resolve_decoder
from dtl.data.preprocessing import eval_resize
from dtl.data.splits import EncodedSplit, Splits
from dtl.errors import UserError

log = logging.getLogger("dtl")

FORMAT = "dtl-image-cache"
VERSION = 1
#: --cache-images given without a folder: image-cache/ beside the run folder
AUTO = "auto"
FOLDER_NAME = "image-cache"
_CHUNK = 64  # images decoded per call (one batched nvJPEG call on a GPU)
_CRC_BLOCK = 64 << 20


def cache_folder(setting: str, outdir: Path) -> Path:
    """Where `--cache-images SETTING` keeps its files for the run folder `outdir`."""
    return Path(outdir).resolve().parent / FOLDER_NAME if setting == AUTO else Path(setting)


def manifest_of(split: EncodedSplit, size: int) -> dict[str, Any]:
    """What a cache of `split` at `size` must have been built from: every image with what changes when it does
    (a file's size and mtime)."""
    root, entries = split.cache_identity()
    return {"format": FORMAT, "version": VERSION, "size": size, "root": root, "classes": list(split.classes),
            "files": entries}


def _what_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    if {k: old.get(k) for k in ("format", "version", "size", "root", "classes")} != \
            {k: new[k] for k in ("format", "version", "size", "root", "classes")}:
        return "it was built for other settings (format, size, folder or classes)"
    before = {e[0]: tuple(e[1:]) for e in old.get("files", [])}
    after = {e[0]: tuple(e[1:]) for e in new["files"]}
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(f for f in set(after) & set(before) if after[f] != before[f])
    parts = [f"{len(v)} {what} (e.g. {v[0]})" for v, what in ((added, "added"), (removed, "removed"),
                                                             (changed, "changed")) if v]
    return "the folder changed since it was built: " + ", ".join(parts) if parts else "the file order changed"


class ImageCache:
    """The cache files of one split (`role`: train | val) at one size in one folder."""

    def __init__(self, folder: Path, role: str, split: EncodedSplit, size: int, root: str | None = None) -> None:
        root = split.cache_identity()[0] if root is None else root
        key = hashlib.sha256(json.dumps([root, role, size]).encode()).hexdigest()[:12]
        stem = f"{role}-{size}px-{key}"
        self.folder, self.size, self.n = Path(folder), size, len(split)
        self.data = self.folder / f"{stem}.u8"
        self.manifest = self.folder / f"{stem}.json"
        self.lock = self.folder / f"{stem}.lock"

    @property
    def nbytes(self) -> int:
        return self.n * 3 * self.size * self.size

    def problem(self, want: dict[str, Any], verify: bool) -> str | None:
        """Why the cache on disk cannot serve `want` (a `manifest_of`), or None when it can. `verify`: also
        check the data's CRC (a full read; the other ranks of a node trust the one that just did)."""
        if not self.manifest.is_file() or not self.data.is_file():
            return "no cache yet"
        try:
            have = json.loads(self.manifest.read_text())
        except (OSError, ValueError) as err:
            return f"its manifest {self.manifest} is unreadable ({err})"
        if not isinstance(have, dict) or {k: have.get(k) for k in want} != want:
            return _what_changed(have if isinstance(have, dict) else {}, want)
        size = self.data.stat().st_size
        if size != self.nbytes or have.get("bytes") != self.nbytes:
            return f"{self.data} has {size} bytes, not the {self.nbytes} of {self.n} images: truncated or damaged"
        if verify and _crc(self.data) != have.get("crc32"):
            return f"{self.data} is corrupt: its contents do not match the CRC written with it"
        return None

    def open(self) -> torch.Tensor:
        """The cached images as an (N, 3, S, S) uint8 tensor backed by the memory-mapped file (copy-on-write:
        nothing ever writes to it)."""
        if self.n == 0:
            return torch.empty((0, 3, self.size, self.size), dtype=torch.uint8)
        arr = np.memmap(self.data, dtype=np.uint8, mode="c", shape=(self.n, 3, self.size, self.size))
        return torch.from_numpy(arr)

    def build(self, split: EncodedSplit, want: dict[str, Any], decoder: str, device: torch.device) -> None:
        """Decode every image of `split` once into the data file, then write the manifest (both atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.data.with_name(f".{self.data.name}.tmp{os.getpid()}")
        started = time.perf_counter()
        try:
            if self.n:
                out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(self.n, 3, self.size, self.size))
                self._fill(out, split, decoder, device)
                out.flush()
                del out
            else:
                tmp.write_bytes(b"")
            fsync(tmp)
            crc = _crc(tmp)
            os.replace(tmp, self.data)
        finally:
            tmp.unlink(missing_ok=True)
        write_json(self.manifest, {**want, "bytes": self.nbytes, "crc32": crc})
        took = time.perf_counter() - started
        log.info("image cache %s: %d images decoded once in %.1f s (%.0f images/s, %s decoder on %s), %.1f MiB",
                 self.data, self.n, took, self.n / max(took, 1e-9), decoder, device.type, self.nbytes / 2**20)

    def _fill(self, out: np.ndarray, split: EncodedSplit, decoder: str, device: torch.device) -> None:
        chunks = [(lo, range(lo, min(lo + _CHUNK, len(split)))) for lo in range(0, len(split), _CHUNK)]

        def one(chunk: tuple[int, range]) -> None:
            lo, rows = chunk
            try:
                decoded = decode_batch(None, device, decoder, encoded=[split.encoded(i) for i in rows])
            except Exception as err:  # noqa: BLE001 - an image that passed the load-time check fails now
                raise UserError(f"cannot decode an image among {split.describe(rows[0])} ... "
                                f"{split.describe(rows[-1])} while caching ({str(err).splitlines()[-1][-200:]}): the "
                                "data changed during the run? run again (it is checked and re-cached)") from None
            for i, img in enumerate(decoded):
                out[lo + i] = eval_resize(img, self.size).cpu().numpy()

        if device.type == "cuda":  # one stream of batched nvJPEG calls
            for chunk in chunks:
                one(chunk)
            return
        # CPU: decoding and resizing release the GIL; a thread per core
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            list(pool.map(one, chunks))


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_split(split: EncodedSplit, role: str, folder: Path, size: int, first: bool, decoder: str = "auto",
                 device: torch.device | str = "cpu") -> EncodedSplit:
    """`split` served from its cache in `folder`, which `first` (the node's first process) checks and, when it
    is missing, stale or damaged, rebuilds (saying why); the others only open it."""
    device = torch.device(device)
    want = manifest_of(split, size)
    cache = ImageCache(folder, role, split, size, root=want["root"])
    with _locked(cache.lock, exclusive=first):
        problem = cache.problem(want, verify=first)
        if problem is not None and not first:
            raise UserError(f"the image cache {cache.data} that this node's first process checked is not usable "
                            f"now ({problem}): another job rewrote it? run again")
        if problem is not None:
            if problem != "no cache yet":
                log.warning("image cache %s: %s; decoding the %s split again", cache.data, problem, role)
            else:
                log.info("image cache %s: %s; decoding the %d images of the %s split once", cache.data, problem,
                         cache.n, role)
            cache.build(split, want, resolve_decoder(decoder), device)
        else:
            log.info("image cache %s: %d images at %d px, up to date", cache.data, cache.n, size)
        images = cache.open()
    return split.with_images(images)


def cache_splits(splits: Splits, folder: Path, size: int, first: bool, decoder: str = "auto",
                 device: torch.device | str = "cpu") -> Splits:
    """Both splits of an image folder or HF data set served from their caches (see `cached_split`)."""
    if not (isinstance(splits.train, EncodedSplit) and isinstance(splits.test, EncodedSplit)):
        raise UserError("--cache-images caches image folders (--dataset folder) and HF data sets (--dataset hf)")
    return Splits(cached_split(splits.train, "train", folder, size, first, decoder, device),
                  cached_split(splits.test, "val", folder, size, first, decoder, device))
