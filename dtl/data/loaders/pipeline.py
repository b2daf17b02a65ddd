"""How a run's batches are produced: the pipeline `--data-pipeline` picks, and this rank's train and eval loaders.

Three pipelines (for an image folder, device and decode crop from each image's centre square at --cache-size,
workers from the whole image; otherwise the batches are identical in distribution):
- `device` (`dtl.data.loaders.device`): the whole split sits on the device as one uint8 tensor (CIFAR,
  synthetic, an image folder's decoded-image cache: `dtl.data.image_cache`); each step gathers its indices and
  runs the batched, exact transforms of `dtl.data.augment` (no per-image Python, no worker processes);
- `decode` (`dtl.data.loaders.decode`, image folders and HF data sets): DataLoader workers read the encoded
  images (on a CPU they also decode them and resize them to squares); on a GPU each batch is decoded there (nvJPEG,
  batched); then transformed as by `device`. WebDataset shards take the same path through a loader of their own
  (`dtl.data.loaders.webdataset`: streamed in order, an equal number of batches on every rank);
- `workers` (`dtl.data.loaders.workers`): a DataLoader with worker processes and torchvision v2 per-image
  transforms (image folders, and a fallback). Its evaluation keeps the decoded images after the first pass when
  they fit `--eval-memory-mib` (`dtl.data.loaders.kept`).
The transforms come from `dtl.data.loaders.transforms`. Training indices come from `dtl.data.samplers` (disjoint
shards, reshuffled by `set_epoch`); evaluation uses contiguous shards without padding, so every test image is
counted exactly once at any world size. Every loader (and `dtl.data.features.FeatureLoader`) is a
`dtl.data.loaders.base.BatchLoader`: what the training loop may rely on.
"""

from __future__ import annotations

import logging
import math

import torch

from dtl.config import Config
from dtl.data.loaders.base import BatchLoader
from dtl.data.loaders.decode import DecodeLoader
from dtl.data.loaders.device import DeviceLoader
from dtl.data.loaders.kept import KeptEvalLoader
from dtl.data.loaders.transforms import batch_transform, eval_finish, per_image_transform, v2_transform
from dtl.data.loaders.webdataset import ShardLoader
from dtl.data.loaders.workers import WorkerLoader
from dtl.data.preprocessing import IMAGENET, EvalResize, Preprocessing
from dtl.data.samplers import EvalShardSampler, sampler_for
from dtl.data.splits import DatasetSplit, EncodedSplit, Splits
from dtl.data.webdataset import ShardSplit
from dtl.distributed import DistEnv

__all__ = ["build_loaders", "eval_loader", "resolve_pipeline"]

log = logging.getLogger("dtl")


def resolve_pipeline(cfg: Config) -> str:
    """The pipeline `--data-pipeline` names; auto: device for in-memory data sets and cached image folders
    (--cache-images), decode for other folders (measured faster than workers on CPUs too: BENCHMARKS.md, "Image
    folders"; `--data-pipeline workers` keeps whole-image crops and the model's own resampling)."""
    d = cfg.data
    if d.data_pipeline != "auto":
        return d.data_pipeline
    return "device" if d.dataset not in ("folder", "hf", "webdataset") or d.cache_images is not None else "decode"


def eval_loader(cfg: Config, split: DatasetSplit, env: DistEnv, device: torch.device,
                compute_dtype: torch.dtype = torch.float32, channels_last: bool = True,
                prep: Preprocessing = IMAGENET) -> BatchLoader:
    """This rank's contiguous shard of a split with the eval transform (`prep`: the model's normalisation).
    Image folders decoded from files keep their decoded images after the first pass when this rank's share fits
    `--eval-memory-mib` (`KeptEvalLoader`): later evaluations do not decode again."""
    pipeline, size = resolve_pipeline(cfg), cfg.data.image_size
    batch = batch_transform(cfg, False, prep, compute_dtype, channels_last)
    square_size = cfg.data.cache_size or size
    if isinstance(split, ShardSplit):
        keep = math.ceil(len(split) / env.world_size) * 3 * square_size ** 2 <= cfg.data.eval_memory_mib * 2**20
        inner = ShardLoader(split, cfg.optim.batch_size, None if keep else batch, square_size, cfg.data.num_workers,
                            device, cfg.run.seed, env.rank, env.world_size, train=False)
        return KeptEvalLoader(inner, batch) if keep else inner
    sampler = EvalShardSampler(len(split), env.rank, env.world_size)
    if pipeline == "device" and isinstance(getattr(split, "images", None), torch.Tensor):
        return DeviceLoader(split, sampler, cfg.optim.batch_size, batch, device, cfg.run.seed, env.rank)
    keep = isinstance(split, EncodedSplit) and (
        len(sampler) * 3 * max(size, square_size if pipeline == "decode" else size) ** 2
        <= cfg.data.eval_memory_mib * 2**20)
    if pipeline == "decode" and isinstance(split, EncodedSplit):
        inner = DecodeLoader(split, sampler, cfg.optim.batch_size, None if keep else batch, square_size,
                             cfg.data.num_workers, device, cfg.run.seed, env.rank, cfg.data.image_decoder)
        return KeptEvalLoader(inner, batch) if keep else inner
    if keep:
        inner = WorkerLoader(split, sampler, cfg.optim.batch_size, EvalResize(size, prep.interpolation),
                             cfg.data.num_workers, device, cfg.run.seed, channels_last=False)
        return KeptEvalLoader(inner, eval_finish(prep, channels_last))
    return WorkerLoader(split, sampler, cfg.optim.batch_size, v2_transform(False, size, False, prep),
                        cfg.data.num_workers, device, cfg.run.seed, channels_last)


def build_loaders(cfg: Config, splits: Splits, env: DistEnv, device: torch.device, compute_dtype: torch.dtype,
                  channels_last: bool = True, prep: Preprocessing = IMAGENET) -> tuple[BatchLoader, BatchLoader]:
    """Train and eval loaders for this rank (`prep`: the model's normalisation and resampling)."""
    if isinstance(splits.train, ShardSplit):  # streamed in order: no sampler
        train = ShardLoader(splits.train, cfg.optim.batch_size, batch_transform(cfg, True, prep, compute_dtype,
                                                                                channels_last),
                            cfg.data.cache_size or cfg.data.image_size, cfg.data.num_workers, device, cfg.run.seed,
                            env.rank, env.world_size, train=True, shuffle_buffer=cfg.data.shuffle_buffer)
        return train, eval_loader(cfg, splits.test, env, device, compute_dtype, channels_last, prep)
    tsampler = sampler_for(splits.train.labels, env, cfg.run.seed, cfg.data.class_balance, cfg.optim.batch_size)
    pipeline = resolve_pipeline(cfg)
    if cfg.data.dataset in ("folder", "hf") and env.is_main:
        log.info("data pipeline: %s%s", pipeline, " (--data-pipeline auto)" if cfg.data.data_pipeline == "auto" else "")
    batched = batch_transform(cfg, True, prep, compute_dtype, channels_last)
    if pipeline == "device" and isinstance(getattr(splits.train, "images", None), torch.Tensor):
        train = DeviceLoader(splits.train, tsampler, cfg.optim.batch_size, batched, device, cfg.run.seed, env.rank)
    elif pipeline == "decode" and isinstance(splits.train, EncodedSplit):
        train = DecodeLoader(splits.train, tsampler, cfg.optim.batch_size, batched,
                             cfg.data.cache_size or cfg.data.image_size, cfg.data.num_workers, device, cfg.run.seed,
                             env.rank, cfg.data.image_decoder)
    else:
        train = WorkerLoader(splits.train, tsampler, cfg.optim.batch_size, per_image_transform(cfg, prep),
                             cfg.data.num_workers, device, cfg.run.seed, channels_last)
    return train, eval_loader(cfg, splits.test, env, device, compute_dtype, channels_last, prep)
