"""`dtl data shards`: a data set dtl reads (CIFAR-10/100, an image folder, an HF data set) written as WebDataset tar
shards, with the manifest `dtl.data.webdataset` reads.

``OUT/train-000000.tar ...`` and ``OUT/val-000000.tar ...``, `shard_size` samples each (the last fewer), written by
the `webdataset` library's `TarWriter`; a sample is ``<key>.<ext>`` (the image) and ``<key>.cls`` (its class index
as text), keys numbered in written order. Encoded images (a folder's files, an HF data set's rows) are copied as they
are, their extension from their format; CIFAR's pixels are encoded once (PNG: lossless; or JPEG). The samples are
shuffled before writing (seeded): shards of an image folder written in file order would each hold one class, which
no shuffle buffer mixes back. Every image is checked before it is written (`dtl.data.images.check_bytes`): an
unreadable one stops with a message (nothing written), or is skipped and counted with ``skip_bad``.

``OUT/manifest.json``: format and version, the classes, the image and label keys, how the samples were ordered,
and per split the shards (file name, samples, bytes, every sample's label, counts per class), the total samples and
bytes, counts per class and the images' sizes (smallest, largest and median width and height). Everything goes to a
temporary folder beside OUT that is renamed to OUT at the end: a failure leaves no OUT.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from dtl.atomic_files import write_json
from dtl.config import Config
from dtl.data.datasets import load_splits
from dtl.data.images import check_bytes
from dtl.data.splits import EncodedSplit, Split, Splits
from dtl.data.webdataset import LABEL_KEY, MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION
from dtl.errors import UserError

__all__ = ["ENCODINGS", "extension_of", "write_shards"]

log = logging.getLogger("dtl")

#: how in-memory pixels (CIFAR, synthetic) are encoded
ENCODINGS = ("png", "jpg")
_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "PPM": "ppm"}
_LISTED = 10


def extension_of(data: bytes) -> tuple[str, tuple[int, int]]:
    """The key (extension) an encoded image is stored under, from its format, and its (width, height)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return _FORMATS.get(im.format or "", (im.format or "img").lower()), im.size


def _encode(image: torch.Tensor, encoding: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    if encoding == "jpg":
        pil.save(buf, "JPEG", quality=quality)
    else:
        pil.save(buf, "PNG")
    return buf.getvalue()


def _sample(split: Any, i: int, encoding: str, quality: int) -> tuple[bytes, str]:
    """Image i's encoded bytes and where it comes from (for messages)."""
    if isinstance(split, EncodedSplit) and not isinstance(split.images, torch.Tensor):
        return split.encoded(i).numpy().tobytes(), split.describe(i)
    if isinstance(split, Split) or isinstance(split.images, torch.Tensor):
        return _encode(split.images[i], encoding, quality), f"image {i}"
    raise UserError(f"cannot write shards of a {type(split).__name__}")


def _write_split(out: Path, role: str, split: Any, shard_size: int, order: list[int], encoding: str, quality: int,
                 skip_bad: bool) -> dict[str, Any]:
    import webdataset as wds

    shards: list[dict[str, Any]] = []
    bad: list[str] = []
    widths, heights = [], []
    written = 0
    writer, entry = None, None
    try:
        for i in order:
            data, where = _sample(split, i, encoding, quality)
            reason = check_bytes(data)
            if reason is not None:
                bad.append(f"{where} ({reason})")
                continue
            ext, (w, h) = extension_of(data)
            widths.append(w)
            heights.append(h)
            if writer is None or len(entry["labels"]) == shard_size:
                if writer is not None:
                    writer.close()
                    entry["filesize"] = (out / entry["url"]).stat().st_size
                entry = {"url": f"{role}-{len(shards):06d}.tar", "labels": []}
                shards.append(entry)
                writer = wds.TarWriter(str(out / entry["url"]))
            label = int(split.labels[i])
            writer.write({"__key__": f"{written:08d}", ext: data, LABEL_KEY: str(label).encode()})
            entry["labels"].append(label)
            written += 1
    finally:
        if writer is not None:
            writer.close()
            entry["filesize"] = (out / entry["url"]).stat().st_size
    if bad and not skip_bad:
        listing = "\n  ".join(bad[:_LISTED]) + (f"\n  ... and {len(bad) - _LISTED} more" if len(bad) > _LISTED else "")
        raise UserError(f"{len(bad)} image(s) of the {role} split cannot be decoded:\n  {listing}\nfix them, or pass "
                        "--skip-bad-images to leave them out (counted); nothing was written")
    if bad:
        log.warning("--skip-bad-images: left out %d unreadable image(s) of the %s split (e.g. %s)", len(bad), role,
                    bad[0])
    if not written:
        raise UserError(f"the {role} split has no readable images: nothing was written")
    n_classes = len(split.classes)
    for s in shards:
        s["nsamples"] = len(s["labels"])
        s["counts"] = torch.bincount(torch.tensor(s["labels"]), minlength=n_classes).tolist()
    return {"shards": shards, "nsamples": written, "bytes": sum(s["filesize"] for s in shards),
            "counts": [sum(s["counts"][c] for s in shards) for c in range(n_classes)], "skipped": len(bad),
            "sizes": {"width": [min(widths), statistics.median(widths), max(widths)],
                      "height": [min(heights), statistics.median(heights), max(heights)]}}


def write_shards(splits: Splits, out: str | Path, shard_size: int, source: dict[str, Any], seed: int = 0,
                 shuffle: bool = True, encoding: str = "png", quality: int = 95, skip_bad: bool = False) -> Path:
    """Write both splits as shards into `out` (which must not hold anything yet) with their manifest; returns the
    manifest's path. `source`: how the data set was named (recorded in the manifest)."""
    out = Path(out)
    if shard_size <= 0:
        raise UserError(f"--shard-size must be > 0, got {shard_size}")
    if encoding not in ENCODINGS:
        raise UserError(f"--encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder: shards go into a new folder")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                                    "classes": list(splits.classes), "label_key": LABEL_KEY, "source": source,
                                    "order": {"shuffled": shuffle, "seed": seed}, "splits": {}}
        for role, split in (("train", splits.train), ("val", splits.test)):
            n = len(split)
            order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle
                     else list(range(n)))
            manifest["splits"][role] = _write_split(tmp, role, split, shard_size, order, encoding, quality, skip_bad)
        write_json(tmp / MANIFEST, manifest)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / MANIFEST


def shards_of(cfg: Config, out: str | Path, shard_size: int, seed: int = 0, shuffle: bool = True,
              encoding: str = "png", quality: int = 95) -> Path:
    """`dtl data shards`: the data set `cfg` names (its train and held-out splits, as a run would read them, the
    subsets applied) written as shards into `out`; returns the manifest's path."""
    d = cfg.data
    splits = load_splits(cfg, allow_download=False)
    source = {"dataset": d.dataset, "data_dir": d.data_dir, "hf_name": d.hf_name, "hf_config": d.hf_config,
              "hf_revision": d.hf_revision, "val_split": d.val_split}
    path = write_shards(splits, out, shard_size, {k: v for k, v in source.items() if v not in (None, 0.0)}, seed,
                        shuffle, encoding, quality, d.skip_bad_images)
    return path


def summary(manifest: Path) -> str:
    """One line: samples and shards per split, and the classes."""
    data = json.loads(Path(manifest).read_text())
    parts = [f"{role} {s['nsamples']} samples in {len(s['shards'])} shard(s)"
             + (f" ({s['skipped']} unreadable left out)" if s.get("skipped") else "")
             for role, s in data["splits"].items()]
    return ", ".join(parts) + f", {len(data['classes'])} classes"
