"""Which indices each rank sees: the training samplers (shuffled, or class-balanced; disjoint positions per
rank, reshuffled by `set_epoch`, a pure function of (seed, epoch) so a resume lands on the same order) and the
evaluation shards (contiguous, no padding: every test image counted exactly once at any world size)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler, Sampler

from dtl.data.splits import stream_seed
from dtl.distributed import DistEnv


class EvalShardSampler(Sampler[int]):
    """Rank r of W gets the contiguous indices [r*N//W, (r+1)*N//W): no padding, no dropped tail."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.start, self.stop = rank * n // world_size, (rank + 1) * n // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so that a balanced set gets weight 1 everywhere: N / (C * n_c)
    (0 for a class without training images)."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    return torch.where(counts > 0, labels.numel() / (num_classes * counts.clamp(min=1)), 0.0)


class ClassBalancedSampler(Sampler[int]):
    """Each epoch draws N indices (with replacement) with probability proportional to 1 / (its class's size),
    so every class is drawn about equally often; the draw depends only on (seed, epoch) and position i of it
    goes to rank i mod W (disjoint positions, like DistributedSampler's interleaving)."""

    def __init__(self, labels: torch.Tensor, env: DistEnv, seed: int) -> None:
        counts = torch.bincount(labels).double()
        self.weights = (1.0 / counts)[labels]
        self.rank, self.world, self.seed, self.epoch = env.rank, env.world_size, seed, 0
        self.per_rank = math.ceil(len(labels) / self.world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, "class-balanced"))
        draw = torch.multinomial(self.weights, self.per_rank * self.world, replacement=True, generator=gen)
        return iter(draw[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return self.per_rank


def train_sampler(n: int, env: DistEnv, seed: int) -> DistributedSampler:
    # DistributedSampler only needs len(); a range stands in for the data set.
    return DistributedSampler(range(n), num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed,
                              drop_last=False)


class NoLoneLastBatch(Sampler[int]):
    """A training sampler whose epoch never ends in a batch of one image: BatchNorm cannot normalise a single
    sample (a ResNet stops with "Expected more than 1 value per channel"). That image is left out of this
    epoch only; the shuffle puts another one last in the next."""

    def __init__(self, sampler: Sampler[int], batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n - 1 if n > 1 and n % self.batch_size == 1 else n

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), len(self))


def sampler_for(labels: torch.Tensor, env: DistEnv, seed: int, balance: str = "none",
                batch_size: int = 1) -> Sampler[int]:
    """The training sampler of this rank: DistributedSampler's shuffle, or class-balanced draws
    (--class-balance sampler); never a last batch of one image."""
    sampler = ClassBalancedSampler(labels, env, seed) if balance == "sampler" else train_sampler(len(labels), env, seed)
    return NoLoneLastBatch(sampler, batch_size)
