"""Cached features for linear probes (`--cache-features`, transfer mode without augmentation).

The frozen backbone's output (the head's input) is computed once per split, sharded across ranks and
gathered, kept on the device, optionally reused from OUTDIR/features/*.safetensors; then only the head
trains, for as many epochs as asked, at the cost of a matrix product per batch. The backbone runs in eval
mode while caching (dropout off, BatchNorm frozen), which is what the uncached path computes when the
model has no dropout in front of the head (or `--dropout 0`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Sampler

from dtl import atomic_files
from dtl.config import Config
from dtl.data.loaders.base import SampledLoader
from dtl.distributed import ProcessGroups

log = logging.getLogger("dtl")


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
            autocast: Callable[[], AbstractContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """Head inputs and labels of the whole split, in data-set order, on every rank. `loader` (a
    `dtl.data.loaders.BatchLoader`) must yield this rank's contiguous shard (EvalShardSampler) with the eval
    transform; `autocast()` gives the precision context the model runs in."""
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple) -> None:
        captured.append(args[0].float())
        raise _Captured

    handle = model.get_submodule(head).register_forward_pre_hook(grab)
    was_training = model.training
    model.eval()
    labels = []
    try:
        for images, y in loader:
            with autocast():
                try:
                    model(images)
                except _Captured:
                    pass
            labels.append(y)
    finally:
        handle.remove()
        model.train(was_training)
    feats, labs = torch.cat(captured), torch.cat(labels)
    return _gather_rows(feats, groups), _gather_rows(labs, groups)


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


def cached(outdir: Path, cfg: Config, split: str, n: int, device: torch.device) -> tuple | None:
    path = outdir / "features" / f"{split}.safetensors"
    if not path.is_file():
        return None
    tensors = atomic_files.read_tensors(path)
    if tensors.get("fingerprint") is None or bytes(tensors["fingerprint"].tolist()).decode() != fingerprint(
            cfg, split, n):
        return None
    return tensors["features"].to(device), tensors["labels"].to(device)


def store(outdir: Path, cfg: Config, split: str, feats: torch.Tensor, labels: torch.Tensor) -> None:
    folder = outdir / "features"
    folder.mkdir(parents=True, exist_ok=True)
    tag = torch.tensor(list(fingerprint(cfg, split, labels.shape[0]).encode()), dtype=torch.uint8)
    atomic_files.write_tensors(folder / f"{split}.safetensors",
                               {"features": feats, "labels": labels, "fingerprint": tag})


class FeatureLoader(SampledLoader):
    """Batches of cached features, with the same sampler (hence the same batches) as the image loader: a
    `dtl.data.loaders.BatchLoader`, whose (features, labels) batches stand in for (images, labels)."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, sampler: Sampler[int], batch_size: int) -> None:
        super().__init__(sampler, batch_size)
        self.feats, self.labels = feats, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(self.remaining(), dtype=torch.int64, device=self.feats.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.feats[idx], self.labels[idx]
