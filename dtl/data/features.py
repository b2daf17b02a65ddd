"""Cached features for linear probes (`--cache-features`, transfer mode without augmentation).

The frozen backbone's output (the head's input) is computed once per split, sharded across ranks and
gathered, kept on the device, optionally reused from OUTDIR/features/*.safetensors; then only the head
trains, for as many epochs as asked, at the cost of a matrix product per batch. The backbone runs in eval
mode while caching (dropout off, BatchNorm frozen), which is what the uncached path computes when the
model has no dropout in front of the head (or `--dropout 0`).

Under `--tta flip` the test split also keeps the features of its mirrored images, computed in the same pass:
flip TTA mirrors images, and a feature vector has no left and right to mirror.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Sampler

from dtl import atomic_files
from dtl.config import Config
from dtl.data.loaders.base import SampledLoader
from dtl.distributed import ProcessGroups

log = logging.getLogger("dtl")


@dataclass(frozen=True)
class CachedSplit:
    """One split's cached features, in data-set order, on the device."""

    features: torch.Tensor
    """(N, D) float32: the head's inputs."""
    labels: torch.Tensor
    mirrored: torch.Tensor | None = None
    """(N, D): the head's inputs for the horizontally mirrored images (the test split under --tta flip)."""


class FeatureHead(nn.Module):
    """What trains on cached features: the head alone. Holds the whole model so that checkpoints keep
    torchvision's key names (`distributed.unwrap` returns `wrapped_model`)."""

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.wrapped_model = model
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.wrapped_model.get_submodule(self.head)(features)


class _Captured(Exception):
    """Raised by the head's pre-hook: the features are in hand, the head itself need not run."""


@torch.no_grad()
def extract(model: nn.Module, head: str, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], groups: ProcessGroups,
            autocast: Callable[[], AbstractContextManager], mirrored: bool = False) -> CachedSplit:
    """Head inputs and labels of the whole split, in data-set order, on every rank. `loader` (a
    `dtl.data.loaders.BatchLoader`) must yield this rank's contiguous shard (EvalShardSampler) with the eval
    transform; `autocast()` gives the precision context the model runs in; `mirrored`: also the head inputs of
    the mirrored images (flip TTA)."""
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple) -> None:
        captured.append(args[0].float())
        raise _Captured

    def run(images: torch.Tensor) -> None:
        with autocast():
            try:
                model(images)
            except _Captured:
                pass

    handle = model.get_submodule(head).register_forward_pre_hook(grab)
    was_training = model.training
    model.eval()
    labels = []
    try:
        for images, y in loader:
            run(images)
            if mirrored:
                # the eval transform normalises per channel, so mirroring its output is mirroring the image,
                # which is what `dtl.train.evaluate.tta_logits` does to an image batch
                run(images.flip(-1))
            labels.append(y)
    finally:
        handle.remove()
        model.train(was_training)
    step = 2 if mirrored else 1
    feats, labs = torch.cat(captured[::step]), torch.cat(labels)
    flipped = _gather_rows(torch.cat(captured[1::2]), groups) if mirrored else None
    return CachedSplit(_gather_rows(feats, groups), _gather_rows(labs, groups), flipped)


def _gather_rows(local: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (shards differ in length by at most one row)."""
    if not groups.distributed:
        return local
    counts = groups.all_gather(torch.tensor([local.shape[0]], device=local.device))
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = groups.all_gather(padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])


def fingerprint(cfg: Config, split: str, n: int) -> str:
    keys = ("model", "weights", "image_size", "dataset", "data_dir", "train_subset", "eval_subset",
            "subset_order", "seed", "precision")
    settings = cfg.to_dict()
    payload = json.dumps({k: settings[k] for k in keys} | {"split": split, "n": n}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached(outdir: Path, cfg: Config, split: str, n: int, device: torch.device,
           mirrored: bool = False) -> CachedSplit | None:
    """The split's stored features if they were computed for these settings (and hold the mirrored images'
    features where `mirrored` asks for them), else None."""
    path = outdir / "features" / f"{split}.safetensors"
    if not path.is_file():
        return None
    tensors = atomic_files.read_tensors(path)
    if tensors.get("fingerprint") is None or bytes(tensors["fingerprint"].tolist()).decode() != fingerprint(
            cfg, split, n):
        return None
    if mirrored and "mirrored" not in tensors:
        return None
    flipped = tensors["mirrored"].to(device) if mirrored else None
    return CachedSplit(tensors["features"].to(device), tensors["labels"].to(device), flipped)


def store(outdir: Path, cfg: Config, split: str, found: CachedSplit) -> None:
    folder = outdir / "features"
    folder.mkdir(parents=True, exist_ok=True)
    tag = torch.tensor(list(fingerprint(cfg, split, found.labels.shape[0]).encode()), dtype=torch.uint8)
    tensors = {"features": found.features, "labels": found.labels, "fingerprint": tag}
    if found.mirrored is not None:
        tensors["mirrored"] = found.mirrored
    atomic_files.write_tensors(folder / f"{split}.safetensors", tensors)


class FeatureLoader(SampledLoader):
    """Batches of cached features, with the same sampler (hence the same batches) as the image loader: a
    `dtl.data.loaders.BatchLoader`, whose (features, labels) batches stand in for (images, labels). With the
    mirrored images' features (flip TTA), batches are (features, labels, mirrored features)."""

    def __init__(self, found: CachedSplit, sampler: Sampler[int], batch_size: int) -> None:
        super().__init__(sampler, batch_size)
        self.found = found

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        found = self.found
        order = torch.tensor(self.remaining(), dtype=torch.int64, device=found.features.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            if found.mirrored is None:
                yield found.features[idx], found.labels[idx]
            else:
                yield found.features[idx], found.labels[idx], found.mirrored[idx]
