"""`dtl bench --dataset folder --data-dir DIR`: the folder input phase -- an image folder's training split from
the files to batches on the device ready for the model (cropped, flipped, normalised) -- for each of dtl's
pipelines, against torchvision's ``ImageFolder`` + v2 transforms + ``DataLoader`` with the same workers.

Sides, each timed over whole epochs of the training split (an epoch repeated until a measurement lasts
``--min-seconds``, default 1 s), **interleaved**: every round times every side once, the order rotating, so
load from other processes hits all alike; the median of ``--repeats`` rounds is reported, after one untimed
epoch per side (which also warms the page cache for all):

* ``imagefolder``: ``torchvision.datasets.ImageFolder(root, v2.Compose([ToImage(), RandomResizedCrop(size,
  scale=--crop-scale), RandomHorizontalFlip(), ToDtype(float32, scale=True), Normalize(ImageNet)]))`` in a
  ``DataLoader(batch_size, shuffle=True, num_workers=--num-workers, pin_memory on a GPU)``, batches moved to
  the device (channels_last, as dtl's): what a torchvision user writes;
* ``workers``: dtl's ``--data-pipeline workers`` (decode + v2 per image in DataLoader workers);
* ``decode``: ``--data-pipeline decode`` (batched nvJPEG on a GPU; on a CPU the workers decode and resize);
* ``hf``: the same training images (their files' bytes) as a Hugging Face data set written by ``save_to_disk``,
  read as ``--dataset hf`` through the decode pipeline (needs ``dtl[hf]``; left out without it);
* ``shards``: the same images as WebDataset shards written by `dtl.data.shards.write_shards` (1,000 per shard),
  read as ``--dataset webdataset`` (needs ``dtl[webdataset]``; left out without it);
* ``cache``: ``--cache-images`` after its first epoch (the device pipeline over the memory-mapped cache). The
  first epoch, which decodes every image once into the cache, is timed once and reported as ``cache_build``.

Besides, ``decode_<library>``: files to uint8 tensors only, one after the other in this process, with each
decoding library (`dtl.data.images.decode`), to compare TorchCodec with torchvision.io.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from dtl.atomic_files import json_text
from dtl.config import Config
from dtl.data import image_cache, images, loaders
from dtl.data.constants import IMAGENET_MEAN, IMAGENET_STD
from dtl.data.folder import load_folder_splits
from dtl.data.folder_split import FolderSplit
from dtl.data.hf import load_hf_splits
from dtl.data.shards import write_shards
from dtl.data.splits import Splits
from dtl.data.webdataset import load_shard_splits
from dtl.distributed import DistEnv, pick_device
from dtl.errors import UserError
from dtl.tools.bench.report import device_name
from dtl.tools.bench.settings import Options

SIDES = ("imagefolder", "workers", "decode", "hf", "shards", "cache")
#: files decoded per library by the decode-only rows
DECODE_FILES = 300


def _consume(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> int:
    count = 0
    last = None
    for images_, labels in batches:
        count += int(labels.shape[0])
        last = images_
    if device.type == "cuda" and last is not None:
        torch.cuda.synchronize(device)
    return count


class ImageFolderEpochs:
    """The torchvision side: ImageFolder + v2 + DataLoader, one epoch per call."""

    def __init__(self, root: Path, cfg: Config, device: torch.device) -> None:
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder
        from torchvision.transforms import v2

        d = cfg.data
        transform = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(d.image_size, scale=d.crop_scale, antialias=True),
                                v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.loader = DataLoader(ImageFolder(str(root), transform=transform), batch_size=cfg.optim.batch_size,
                                 shuffle=True, num_workers=d.num_workers, pin_memory=device.type == "cuda")
        self.device = device

    def __call__(self, epoch: int) -> int:
        def moved() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            for x, y in self.loader:
                yield (x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                       y.to(self.device, non_blocking=True))
        return _consume(moved(), self.device)


class DtlEpochs:
    """One of dtl's training loaders, one epoch per call."""

    def __init__(self, loader: loaders.BatchLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __call__(self, epoch: int) -> int:
        self.loader.set_epoch(epoch)
        return _consume(self.loader, self.device)


def _timed(fn: Callable[[int], int], epoch: int, min_seconds: float) -> float:
    """Images/s of as many epochs of `fn` as last `min_seconds`."""
    count, begin = 0, time.perf_counter()
    while True:
        count += fn(epoch)
        epoch += 1
        took = time.perf_counter() - begin
        if took >= min_seconds:
            return count / took


def _decode_rate(split: FolderSplit, decoder: str) -> float:
    paths = split.paths()[:DECODE_FILES]
    begin = time.perf_counter()
    for p in paths:
        images.decode(p, decoder)
    return len(paths) / (time.perf_counter() - begin)


def _source_sides(cfg: Config, splits: Splits, tmp: Path, device: torch.device) -> dict[str, Callable[[int], int]]:
    """The folder's training images as an HF data set and as WebDataset shards, each read by its own source (the
    sides whose library is installed)."""
    import importlib.util

    env, sides = DistEnv(), {}
    source = cfg.replace(data_pipeline="decode", cache_images=None, val_split=0.0, train_subset=None,
                         eval_subset=None, subset_order="first", strict_images=False)
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        def rows(split: FolderSplit) -> Any:
            return datasets.Dataset.from_dict(
                {"image": [{"bytes": p.read_bytes(), "path": None} for p in split.paths()],
                 "label": split.labels.tolist()},
                features=datasets.Features({"image": datasets.Image(),
                                            "label": datasets.ClassLabel(names=list(split.classes))}))

        datasets.DatasetDict({"train": rows(splits.train), "test": rows(splits.test)}).save_to_disk(str(tmp / "hf"))
        hf_cfg = source.replace(dataset="hf", data_dir=str(tmp / "hf"))
        train, _ = loaders.build_loaders(hf_cfg, load_hf_splits(hf_cfg), env, device, torch.float32)
        sides["hf"] = DtlEpochs(train, device)
    if importlib.util.find_spec("webdataset") is not None:
        write_shards(splits, tmp / "shards", 1000, {"dataset": "folder"})
        wds_cfg = source.replace(dataset="webdataset", data_dir=str(tmp / "shards"))
        train, _ = loaders.build_loaders(wds_cfg, load_shard_splits(wds_cfg), env, device, torch.float32)
        sides["shards"] = DtlEpochs(train, device)
    return sides


def run_folder_bench(cfg: Config, opts: Options) -> dict[str, Any]:
    """The folder input phase (see the module docstring); returns the result (also printed, and written to
    --json)."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = pick_device(DistEnv(), cfg.dist.device)
    min_seconds = 1.0 if opts.min_seconds is None else opts.min_seconds
    load_start = os.getloadavg()[0]
    base = cfg.replace(data_pipeline="workers", cache_images=None)
    splits = load_folder_splits(base)
    if not isinstance(splits.train, FolderSplit):
        raise UserError("dtl bench --dataset folder needs an image folder")
    env = DistEnv()
    sides: dict[str, Callable[[int], int]] = {
        # the training split's root (DATA/train, or DATA: with --val-split ImageFolder reads all of it, dtl its
        # training part; the rates are per image)
        "imagefolder": ImageFolderEpochs(splits.train.root, cfg, device)}
    for pipeline in ("workers", "decode"):
        side_cfg = base.replace(data_pipeline=pipeline)
        train, _ = loaders.build_loaders(side_cfg, splits, env, device, torch.float32)
        sides[pipeline] = DtlEpochs(train, device)
    extra: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="dtl-bench-cache-") as tmp:
        size = cfg.data.cache_size or cfg.data.image_size
        begin = time.perf_counter()
        cached = image_cache.cached_split(splits.train, "train", Path(tmp), size, True, cfg.data.image_decoder,
                                          device)
        extra["cache_build"] = len(cached) / (time.perf_counter() - begin)
        cache_cfg = base.replace(data_pipeline="device", cache_images=tmp)
        train, _ = loaders.build_loaders(cache_cfg, Splits(cached, cached), env, device, torch.float32)
        sides["cache"] = DtlEpochs(train, device)
        sides.update(_source_sides(cfg, splits, Path(tmp), device))
        for fn in sides.values():  # warm-up: one untimed epoch each
            fn(0)
        runs: dict[str, list[float]] = {side: [] for side in SIDES if side in sides}
        for r in range(opts.repeats):
            present = [side for side in SIDES if side in sides]
            order = present[r % len(present):] + present[:r % len(present)]
            for side in (order if r % 2 == 0 else order[::-1]):
                rate = _timed(sides[side], 1 + r, min_seconds)
                runs[side].append(rate)
                print(f"  round {r + 1}/{opts.repeats} {side:<12} {rate:10.1f} img/s", file=sys.stderr, flush=True)
    for decoder in ("torchvision", "torchcodec"):
        if decoder == "torchcodec" and not images.torchcodec_available():
            continue
        extra[f"decode_{decoder}"] = statistics.median(_decode_rate(splits.train, decoder)
                                                       for _ in range(opts.repeats))
    medians = {side: statistics.median(rates) for side, rates in runs.items()}
    result = {
        "meta": {"command": opts.command, "device": device_name(device), "data_dir": cfg.data.data_dir,
                 "train_images": len(splits.train), "image_size": cfg.data.image_size, "cache_size": size,
                 "batch_size": cfg.optim.batch_size, "num_workers": cfg.data.num_workers,
                 "threads": torch.get_num_threads(), "decoder": images.resolve_decoder(cfg.data.image_decoder),
                 "repeats": opts.repeats, "loadavg_1min": {"start": load_start, "end": os.getloadavg()[0]}},
        "input_folder": {side: {"img_s": medians[side], "runs": runs[side],
                                "vs_imagefolder": medians[side] / medians["imagefolder"],
                                "vs_workers": medians[side] / medians["workers"],
                                "vs_decode": medians[side] / medians["decode"]} for side in runs},
        "once": extra,
    }
    print(format_folder_table(result))
    if opts.json_path:
        Path(opts.json_path).write_text(json_text(result, indent=2) + "\n")
    return result


def format_folder_table(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [f"folder input, {m['train_images']} training images at {m['image_size']} px (cache {m['cache_size']} "
             f"px), batch {m['batch_size']}, {m['num_workers']} workers, {m['threads']} threads, {m['device']}, "
             f"load {m['loadavg_1min']['start']:.1f}-{m['loadavg_1min']['end']:.1f}",
             "| side | img/s (median) | vs imagefolder | vs workers | vs decode |", "|---|---|---|---|---|"]
    for side, row in result["input_folder"].items():
        lines.append(f"| {side} | {row['img_s']:,.0f} | {row['vs_imagefolder']:.2f}x | {row['vs_workers']:.2f}x "
                     f"| {row['vs_decode']:.2f}x |")
    for name, rate in result["once"].items():
        lines.append(f"| {name} (once) | {rate:,.0f} | | | |")
    return "\n".join(lines)

