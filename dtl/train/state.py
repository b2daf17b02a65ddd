"""What one training run holds while it runs (`Run`) and the description of it saved with every checkpoint
and in config.json (`RunInfo`). Pure data: built by `dtl.setup`, used by `dtl.loop`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dtl.config import Config
from dtl.data.augment.mix import Mixer
from dtl.data.loaders import BatchLoader
from dtl.data.splits import Splits
from dtl.dist import DistEnv
from dtl.train.checkpointer import Checkpointer, Progress
from dtl.train.ema import Ema
from dtl.train.metrics import MetricsLog
from dtl.train.precision import Precision
from dtl.train.run_folder import RunPlan


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
    """The input normalisation and resampling the run trained with (`dtl.preprocessing.Preprocessing`), which
    `dtl eval`/`predict`/`export` apply."""


@dataclass
class Run:
    """Everything one training run holds, so functions take one argument instead of eighteen."""

    cfg: Config
    env: DistEnv
    device: torch.device
    plan: RunPlan
    """The run folder and what it continues from."""
    model: nn.Module
    """What trains: possibly DDP- and compile-wrapped (`dist.unwrap` gives the model itself)."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    train_loader: BatchLoader
    eval_loader: BatchLoader
    splits: Splits
    progress: Progress
    info: RunInfo
    checkpointer: Checkpointer
    new_features: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Features computed by this run (--cache-features), written to OUTDIR/features once the folder exists."""
    class_weights: torch.Tensor | None = None
    """--class-balance loss: the cross-entropy's per-class weights, on the device."""
    ema: Ema | None = None
    """--ema-decay: the moving average of the weights."""
    mixer: Mixer | None = None
    """--mixup/--cutmix: mixes each training micro-batch (seeded per epoch, rank and batch index)."""
    probing: bool | None = None
    """lp-ft: whether the backbone is frozen now (None: not yet decided; other modes stay None)."""
    prefix_hooks: list[RemovableHandle] = field(default_factory=list)
    """lp-ft: the hooks that run the frozen backbone under no_grad during the probe."""
    metrics_log: MetricsLog | None = None
    """Rank 0's metrics.jsonl (+ TensorBoard) writer, opened once the run folder exists."""
    overflows: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    """fp16: overflow-skipped steps since the last sync point, counted on the device (no host sync per step)."""

    grad_norms: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    """--clip-grad-norm: pre-clip global norm sum, max and count of this epoch, on the device."""

    def __post_init__(self) -> None:
        self.overflows = self.overflows.to(self.device)
        self.grad_norms = self.grad_norms.to(self.device)

    @property
    def outdir(self) -> Path:
        return self.plan.outdir

    @property
    def accum(self) -> int:
        return self.cfg.optim.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_loader) / self.accum)
