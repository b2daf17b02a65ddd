"""What a training run is made of (`RunParts`, built once by `dtl.train.build`) and the description of it saved
with every checkpoint and in config.json (`RunInfo`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dtl.config import Config
from dtl.data.augment.mix import Mixer
from dtl.data.loaders import BatchLoader
from dtl.data.splits import Splits
from dtl.distributed import DistEnv, ProcessGroups
from dtl.faults import NO_FAULTS, Faults
from dtl.train.checkpoint.checkpointer import Checkpointer
from dtl.train.optimisation.ema import Ema
from dtl.train.optimisation.precision import Precision
from dtl.train.run_folder import RunFolder
from dtl.train.trained_model import TrainedModel


@dataclass(frozen=True)
class RunInfo:
    """How the run was launched and what it decided (saved in config.json and every checkpoint as "run")."""

    launcher: str
    world_size: int
    device: str
    precision: str
    precision_source: str
    global_batch: int
    num_classes: int
    classes: list[str]
    versions: dict[str, str]
    param_groups: list[dict[str, float | int | str]] = field(default_factory=list)
    """The optimizer's parameter groups per block: parameters, lr multiplier, weight decay."""
    class_weights: list[float] | None = None
    """--class-balance loss: the cross-entropy's weight per class (inverse training-set frequency)."""
    preprocessing: dict[str, object] = field(default_factory=dict)
    """The input normalisation and resampling the run trained with (`dtl.data.preprocessing.Preprocessing`), which
    `dtl eval`/`predict`/`export` apply."""
    backend: str | None = None
    """The process group's backend (nccl, gloo); None in a single process without one."""


@dataclass(frozen=True)
class RunParts:
    """Everything a training run is made of, built once (`dtl.train.build.prepare`) and never reassigned; where
    the run stands is the `TrainState`, the one mutable object."""

    cfg: Config
    groups: ProcessGroups
    """The process groups and their collectives (`groups.env`: who this process is)."""
    device: torch.device
    folder: RunFolder
    """The run folder: it alone writes config.json, status.json, metrics and the final weights."""
    model: TrainedModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    train_loader: BatchLoader
    eval_loader: BatchLoader
    splits: Splits
    info: RunInfo
    checkpointer: Checkpointer
    new_features: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Features computed by this run (--cache-features), stored in OUTDIR/features once the folder exists."""
    class_weights: torch.Tensor | None = None
    """--class-balance loss: the cross-entropy's per-class weights, on the device."""
    ema: Ema | None = None
    """--ema-decay: the moving average of the weights."""
    mixer: Mixer | None = None
    """--mixup/--cutmix: mixes each training micro-batch (seeded per epoch, rank and batch index)."""
    hooks: tuple[Callable[..., None], ...] = ()
    """What the loop calls at each epoch's end, in order (`dtl.train.hooks.hooks_for`)."""
    faults: Faults = NO_FAULTS
    """Testing hooks (`dtl.faults`), read once at start-up: the step checks whether one is due."""

    @property
    def env(self) -> DistEnv:
        return self.groups.env

    @property
    def accum(self) -> int:
        return self.cfg.optim.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_loader) / self.accum)
