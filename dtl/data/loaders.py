"""Data for a run: which splits, how they are sharded across ranks, and how batches are produced.

Three pipelines (for an image folder, device and decode crop from each image's centre square at --cache-size,
workers from the whole image; otherwise the batches are identical in distribution):
- `device`: the whole split sits on the device as one uint8 tensor (CIFAR, synthetic, an image folder's
  decoded-image cache: `dtl.data.image_cache`); each step gathers its indices and runs the batched, exact
  transforms of `dtl.augment` (no per-image Python, no worker processes);
- `decode` (image folders): DataLoader workers read the files (on a CPU they also decode them and resize them
  to squares); on a GPU each batch is decoded there (nvJPEG, batched); then transformed as by `device`;
- `workers`: a DataLoader with worker processes and torchvision v2 per-image transforms (image folders,
  and a fallback). Its evaluation keeps the decoded images after the first pass when they fit
  `--eval-memory-mib` (`KeptEvalLoader`).
Training indices come from `dtl.samplers` (disjoint shards, reshuffled by `set_epoch`); evaluation
uses contiguous shards without padding, so every test image is counted exactly once at any world size.
Every loader (and `dtl.features.FeatureLoader`) is a `BatchLoader`: what the training loop may rely on.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dtl.config import Config
from dtl.data.augment.autoaugment import AutoAugment
from dtl.data.augment.chain import AugmentChain
from dtl.data.augment.transform import BatchTransform
from dtl.data.cifar import load_cifar, make_synthetic
from dtl.data.folder import FolderSplit, load_folder_splits
from dtl.data.image_cache import square
from dtl.data.images import decode_batch, read_bytes
from dtl.data.preprocessing import IMAGENET, Preprocessing, eval_transform, v2_interpolation
from dtl.data.samplers import EvalShardSampler, sampler_for
from dtl.data.splits import DatasetSplit, Split, Splits, apply_subsets, stream_seed
from dtl.distributed import DistEnv, ProcessGroups

log = logging.getLogger("dtl")

SYNTHETIC_TRAIN, SYNTHETIC_TEST = 2000, 500
_CHUNK_PIXELS = 512 * 32 * 32  # output pixels per batched-transform call (see DeviceLoader.chunk_batches)


@runtime_checkable
class BatchLoader(Protocol):
    """What the training and evaluation loops use of a loader: `set_epoch` before each pass (reshuffles the
    training shard; `start_batch` > 0 resumes in the middle of an epoch, skipping the batches already
    trained on), `len()` (batches per pass, the skipped ones included) and iteration, which yields this
    rank's (images, labels) batches as tensors on the device."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def load_splits(cfg: Config, allow_download: bool, split_file: Path | None = None,
                is_main: bool = True) -> Splits:
    """Read (or generate) both splits and apply the subsets. `allow_download` is rank 0's privilege.
    Image folders: `split_file` is a saved split to reuse (a resumed run's), `is_main` whether this process
    logs the warnings (see `dtl.folder.load_folder_splits`)."""
    if cfg.data.dataset == "synthetic":
        train = make_synthetic(cfg.data.train_subset or SYNTHETIC_TRAIN, seed=cfg.run.seed)
        test = make_synthetic(cfg.data.eval_subset or SYNTHETIC_TEST, seed=cfg.run.seed + 1_000_003)
    elif cfg.data.dataset in ("cifar10", "cifar100"):
        d = cfg.data
        train, test = load_cifar(d.data_dir, d.dataset, allow_download and d.download, d.coarse_labels)
    else:
        return load_folder_splits(cfg, split_file, is_main=is_main)  # decoded lazily by workers
    return apply_subsets(train, test, cfg.data.train_subset, cfg.data.eval_subset, cfg.data.subset_order,
                         cfg.run.seed)


def load_splits_once(cfg: Config, groups: ProcessGroups, split_file: Path | None = None) -> Splits:
    """Global rank 0 reads (and if needed downloads and extracts) first, then the first process of every
    other node (which finds the files when the folder is shared, else fetches its own copy), then the rest,
    which only read: a download happens once per folder and never concurrently into it. Global rank 0 logs
    the data set's warnings (unreadable files, ...) for the whole job."""
    return groups.main_first(lambda first: load_splits(cfg, allow_download=first, split_file=split_file,
                                                       is_main=groups.env.is_main))


class DeviceLoader:
    """Batches from a split held on the device, transformed in batches. Iterating yields (images, labels).

    Augmentation randomness comes from one generator per (seed, epoch, rank), so an epoch's crops are
    reproducible, and a resume in the middle of an epoch replays the skipped batches' draws (cheap: random
    numbers only, `skip()`) to land on the same random stream."""

    def __init__(self, split: Split, sampler: Sampler[int], batch_size: int, transform: BatchTransform | AugmentChain,
                 device: torch.device, seed: int, rank: int) -> None:
        self.images = _placed(split.images, device)
        self.labels = split.labels.to(device)
        self.sampler, self.batch_size, self.transform = sampler, batch_size, transform
        self.device, self.seed, self.rank = device, seed, rank
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        if hasattr(self.sampler, "set_epoch"):  # the training samplers reshuffle per epoch
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    @property
    def chunk_batches(self) -> int:
        """Batches transformed per call: the per-call cost of the batched transform (a few hundred small
        ops) dominates at 32 px, so small outputs are produced ~512 images at a time; large ones per batch."""
        pixels = self.transform.size ** 2
        return max(1, _CHUNK_PIXELS // pixels // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.int64).to(self.device, non_blocking=True)
        gen = torch.Generator(device=self.device).manual_seed(stream_seed(self.seed, self.epoch, self.rank))
        bs, per_chunk = self.batch_size, self.chunk_batches
        for first in range(0, len(self), per_chunk):
            last = min(first + per_chunk, len(self))
            idx = order[first * bs:last * bs]
            if last <= self.start_batch:  # before the resume point: same draws, no pixels
                self.transform.skip(len(idx), self.images.shape[-2:], gen)
                continue
            rows = (self.images[idx] if self.images.device == idx.device
                    else self.images[idx.cpu()].to(self.device, non_blocking=True))
            images, labels = self.transform(rows, gen), self.labels[idx]
            for b in range(max(first, self.start_batch), last):
                lo = (b - first) * bs
                yield images[lo:lo + bs], labels[lo:lo + bs]


def _placed(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The split on the device when it takes at most half of the device's free memory; else it stays in host
    memory (e.g. a large memory-mapped image cache) and each chunk of batches is gathered there and copied."""
    if device.type != "cuda" or images.device == device:
        return images.to(device)
    free, _ = torch.cuda.mem_get_info(device)
    if images.nbytes <= free // 2:
        return images.to(device)
    log.info("the %.1f GiB of images stay in host memory (the device has %.1f GiB free): batches are gathered "
             "there and copied", images.nbytes / 2**30, free / 2**30)
    return images


class _Files(Dataset):
    """The `decode` pipeline's worker side: image i's encoded bytes (decoded on the GPU by the main process), or
    on a CPU its decoded square (`image_cache.square`) -- the per-image work that parallelises over workers."""

    def __init__(self, split: FolderSplit, size: int, decode_here: bool) -> None:
        self.split, self.size, self.decode_here = split, size, decode_here

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.decode_here:  # LazyImages: --image-decoder, and a file that fails now is replaced, logged
            return square(self.split.images[i], self.size), int(self.split.labels[i])
        return read_bytes(self.split.root / self.split.files[i]), int(self.split.labels[i])


def _collate_bytes(items: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [b for b, _ in items], torch.tensor([lab for _, lab in items], dtype=torch.int64)


class DecodeLoader:
    """Batches decoded from an image folder's files every pass (`--data-pipeline decode`), augmented as by
    `DeviceLoader` (the same batched transforms, a generator per (seed, epoch, rank); a resume replays the
    skipped batches' draws). On a GPU the workers only read bytes and each batch's JPEGs are decoded in one
    nvJPEG call (`images.decode_batch`), then resized to squares on the GPU; on a CPU the workers decode and
    resize. `transform` None: the uint8 squares themselves (what `KeptEvalLoader` keeps)."""

    def __init__(self, split: FolderSplit, sampler: Sampler[int], batch_size: int,
                 transform: BatchTransform | AugmentChain | None, size: int, num_workers: int, device: torch.device,
                 seed: int, rank: int, decoder: str = "auto") -> None:
        self.split, self.sampler, self.batch_size, self.transform = split, sampler, batch_size, transform
        self.size, self.num_workers, self.device, self.seed, self.rank = size, num_workers, device, seed, rank
        self.decoder, self.on_device = decoder, device.type == "cuda"
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def _squares(self, batch: list[torch.Tensor] | torch.Tensor, idx: list[int]) -> torch.Tensor:
        if not self.on_device:
            return batch.to(self.device)  # type: ignore[union-attr] - decoded by the workers
        paths = [self.split.root / self.split.files[i] for i in idx]
        try:
            decoded = decode_batch(paths, self.device, self.decoder, encoded=batch)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - a file the CPU cannot decode either: LazyImages replaces and logs it
            decoded = [self.split.images[i].to(self.device) for i in idx]
        return torch.stack([square(img, self.size) for img in decoded])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator(device=self.device).manual_seed(stream_seed(self.seed, self.epoch, self.rank))
        order, bs = list(self.sampler), self.batch_size
        if self.transform is not None:
            for b in range(self.start_batch):  # before the resume point: same draws, no pixels
                self.transform.skip(len(order[b * bs:(b + 1) * bs]), (self.size, self.size), gen)
        indices = order[self.start_batch * bs:]
        dataset = _Files(self.split, self.size, decode_here=not self.on_device)
        loader = DataLoader(dataset, batch_size=bs, sampler=indices, num_workers=self.num_workers,
                            pin_memory=self.on_device, collate_fn=_collate_bytes if self.on_device else None,
                            worker_init_fn=_ignore_stop_signals if self.num_workers else None)
        for k, (batch, labels) in enumerate(loader):
            squares = self._squares(batch, indices[k * bs:(k + 1) * bs])
            images = squares if self.transform is None else self.transform(squares, gen)
            yield images, labels.to(self.device, non_blocking=True)


class KeptEvalLoader:
    """Evaluation that decodes once: the first complete pass takes `inner`'s uint8 batches (decoded and resized,
    not yet normalised) and keeps them where they are (the device); every pass yields `finish(batch)`. Later
    passes read the kept batches instead of the files (`--eval-memory-mib` decides whether they fit)."""

    def __init__(self, inner: BatchLoader, finish: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.inner, self.finish = inner, finish
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start_batch = start_batch
        self.inner.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.kept is not None:
            for images, labels in self.kept[self.start_batch:]:
                yield self.finish(images), labels
            return
        kept = []
        for images, labels in self.inner:
            kept.append((images, labels))
            yield self.finish(images), labels
        if not self.start_batch:
            self.kept = kept  # a whole pass: from now on the files are not read again


class _BatchOfOne:
    """The `workers` pipeline's per-image transform when `AugmentChain` is in use: the same batched code on a
    batch of one, drawing from torch's global generator (which `_PerImageDataset` seeds per image)."""

    def __init__(self, chain: AugmentChain) -> None:
        self.chain = chain

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.chain(image.unsqueeze(0))[0]


class _PerImageDataset(Dataset):
    """Per-image v2 transforms for the `workers` pipeline. Each image's randomness is seeded from
    (seed, epoch, index), so results do not depend on which worker handles it or on a resume point."""

    def __init__(self, split: DatasetSplit, transform, seed: int) -> None:  # noqa: ANN001 - any v2 transform
        self.split, self.transform, self.seed, self.epoch = split, transform, seed, 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        torch.manual_seed(stream_seed(self.seed, self.epoch, i))
        return self.transform(self.split.images[i]), int(self.split.labels[i])


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave stop signals to the trainer: a SIGUSR1/SIGTERM forwarded to the whole process
    group must not kill a spawn/forkserver-started worker mid-batch (the main process checkpoints first)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class WorkerLoader:
    """DataLoader-based pipeline with the same interface (`BatchLoader`) as DeviceLoader."""

    def __init__(self, split: DatasetSplit, sampler: Sampler[int], batch_size: int, transform, num_workers: int,
                 device: torch.device, seed: int, channels_last: bool = True) -> None:  # noqa: ANN001
        self.dataset = _PerImageDataset(split, transform, seed)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.sampler, self.batch_size, self.num_workers, self.device = sampler, batch_size, num_workers, device
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.dataset.epoch, self.start_batch = epoch, start_batch
        if hasattr(self.sampler, "set_epoch"):  # the training samplers reshuffle per epoch
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = list(self.sampler)[self.start_batch * self.batch_size:]
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=indices,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False,
                            worker_init_fn=_ignore_stop_signals if self.num_workers else None)
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format),
                   labels.to(self.device, non_blocking=True))


def v2_transform(train: bool, size: int, augment: bool, prep: Preprocessing = IMAGENET,
                 scale: tuple[float, float] = (0.5, 1.0)):  # noqa: ANN201 - a torchvision v2 Compose
    """The reference recipe's per-image transforms, on uint8 tensors, with the model's normalisation and
    resampling: RandomResizedCrop + flip for augmented training, else `eval_transform`."""
    if not (train and augment):
        return eval_transform(size, prep)
    from torchvision.transforms import v2

    mode = v2_interpolation(prep.interpolation)
    return v2.Compose([v2.RandomResizedCrop(size, scale=scale, interpolation=mode, antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(prep.mean, prep.std)])


def augment_chain(cfg: Config, prep: Preprocessing = IMAGENET, dtype: torch.dtype = torch.float32,
                  channels_last: bool = True) -> AugmentChain | None:
    """The uint8 training chain when --crop pad, --auto-augment or --random-erasing asks for it (normalised with
    `prep`; it resamples bilinearly); None when the fused `BatchTransform` (crop + flip + normalise) is all the
    run needs."""
    d = cfg.data
    if not d.augment or (d.crop == "resized" and d.auto_augment == "none" and d.random_erasing == 0):
        return None
    auto = (AutoAugment(d.auto_augment, num_ops=d.ra_num_ops, magnitude=d.ra_magnitude, severity=d.augmix_severity)
            if d.auto_augment != "none" else None)
    return AugmentChain(d.image_size, d.crop, d.crop_scale, padding=d.crop_padding, padding_mode=d.padding_mode,
                        auto_augment=auto, erasing=d.random_erasing, erasing_value=d.random_erasing_value,
                        mean=prep.mean, std=prep.std, dtype=dtype, channels_last=channels_last)


def resolve_pipeline(cfg: Config) -> str:
    """The pipeline `--data-pipeline` names; auto: device for in-memory data sets and cached image folders
    (--cache-images), decode for other folders (measured faster than workers on CPUs too: BENCHMARKS.md, "Image
    folders"; `--data-pipeline workers` keeps whole-image crops and the model's own resampling)."""
    d = cfg.data
    if d.data_pipeline != "auto":
        return d.data_pipeline
    return "device" if d.dataset != "folder" or d.cache_images is not None else "decode"


def _normalise(prep: Preprocessing, dtype: torch.dtype,
               memory_format: torch.memory_format) -> Callable[[torch.Tensor], torch.Tensor]:
    """v2's ToDtype(float32, scale=True) + Normalize on a batch (the same element-wise ops, so the same numbers
    as per image), then the compute dtype and memory format."""
    def finish(images: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        out = F.normalize(F.to_dtype(images, torch.float32, scale=True), list(prep.mean), list(prep.std))
        return out.to(dtype).contiguous(memory_format=memory_format)
    return finish


def eval_loader(cfg: Config, split: DatasetSplit, env: DistEnv, device: torch.device,
                compute_dtype: torch.dtype = torch.float32, channels_last: bool = True,
                prep: Preprocessing = IMAGENET) -> BatchLoader:
    """This rank's contiguous shard of a split with the eval transform (`prep`: the model's normalisation).
    Image folders decoded from files keep their decoded images after the first pass when this rank's share fits
    `--eval-memory-mib` (`KeptEvalLoader`): later evaluations do not decode again."""
    sampler = EvalShardSampler(len(split), env.rank, env.world_size)
    pipeline, size = resolve_pipeline(cfg), cfg.data.image_size
    batch = BatchTransform(train=False, size=size, mean=prep.mean, std=prep.std, dtype=compute_dtype,
                           channels_last=channels_last)
    if pipeline == "device" and isinstance(getattr(split, "images", None), torch.Tensor):
        return DeviceLoader(split, sampler, cfg.optim.batch_size, batch, device, cfg.run.seed, env.rank)
    square_size = cfg.data.cache_size or size
    keep = isinstance(split, FolderSplit) and (
        len(sampler) * 3 * max(size, square_size if pipeline == "decode" else size) ** 2
        <= cfg.data.eval_memory_mib * 2**20)
    if pipeline == "decode" and isinstance(split, FolderSplit):
        inner = DecodeLoader(split, sampler, cfg.optim.batch_size, None if keep else batch, square_size,
                             cfg.data.num_workers, device, cfg.run.seed, env.rank, cfg.data.image_decoder)
        return KeptEvalLoader(inner, batch) if keep else inner
    if keep:
        from torchvision.transforms import v2

        resize = v2.Compose([v2.Resize(size, interpolation=v2_interpolation(prep.interpolation), antialias=True),
                             v2.CenterCrop(size)])
        inner = WorkerLoader(split, sampler, cfg.optim.batch_size, resize, cfg.data.num_workers, device,
                             cfg.run.seed, channels_last=False)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return KeptEvalLoader(inner, _normalise(prep, torch.float32, memory_format))
    return WorkerLoader(split, sampler, cfg.optim.batch_size, v2_transform(False, size, False, prep),
                        cfg.data.num_workers, device, cfg.run.seed, channels_last)


def build_loaders(cfg: Config, splits: Splits, env: DistEnv, device: torch.device, compute_dtype: torch.dtype,
                  channels_last: bool = True, prep: Preprocessing = IMAGENET) -> tuple[BatchLoader, BatchLoader]:
    """Train and eval loaders for this rank (`prep`: the model's normalisation and resampling)."""
    tsampler = sampler_for(splits.train.labels, env, cfg.run.seed, cfg.data.class_balance, cfg.optim.batch_size)
    pipeline = resolve_pipeline(cfg)
    if cfg.data.dataset == "folder" and env.is_main:
        log.info("data pipeline: %s%s", pipeline, " (--data-pipeline auto)" if cfg.data.data_pipeline == "auto" else "")
    batched = augment_chain(cfg, prep, compute_dtype, channels_last) or BatchTransform(
        train=cfg.data.augment, size=cfg.data.image_size, scale=cfg.data.crop_scale, mean=prep.mean,
        std=prep.std, dtype=compute_dtype, channels_last=channels_last)
    if pipeline == "device" and isinstance(getattr(splits.train, "images", None), torch.Tensor):
        train = DeviceLoader(splits.train, tsampler, cfg.optim.batch_size, batched, device, cfg.run.seed, env.rank)
    elif pipeline == "decode" and isinstance(splits.train, FolderSplit):
        train = DecodeLoader(splits.train, tsampler, cfg.optim.batch_size, batched,
                             cfg.data.cache_size or cfg.data.image_size, cfg.data.num_workers, device, cfg.run.seed,
                             env.rank, cfg.data.image_decoder)
    else:
        chain = augment_chain(cfg, prep, channels_last=False)
        transform = (_BatchOfOne(chain) if chain else
                     v2_transform(True, cfg.data.image_size, cfg.data.augment, prep, cfg.data.crop_scale))
        train = WorkerLoader(splits.train, tsampler, cfg.optim.batch_size, transform, cfg.data.num_workers, device,
                             cfg.run.seed, channels_last)
    return train, eval_loader(cfg, splits.test, env, device, compute_dtype, channels_last, prep)
