"""One training step: micro-steps (forward under autocast, scaled backward, gradient all-reduce on the last) and
one optimizer step (learning rate, unscale, finite check, clipping, update), with device-side counts only: no
host sync inside a step."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dtl import faults
from dtl.distributed import fsdp, no_sync
from dtl.errors import NonFiniteLossError
from dtl.train.metrics import Meter
from dtl.train.optimisation.lr import lr_at
from dtl.train.parts import RunParts
from dtl.train.train_state import TrainState

log = logging.getLogger("dtl")
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StepStats:
    images: int
    losses: list[torch.Tensor]
    """The step's micro-batch losses (detached device tensors)."""

    @property
    def loss_finite(self) -> torch.Tensor:
        """All the step's losses were finite (a device tensor: reading it is a host sync)."""
        return torch.stack(self.losses).isfinite().all()


def forward_backward(parts: RunParts, state: TrainState, images: torch.Tensor, labels: torch.Tensor,
                     criterion: nn.Module, meter: Meter, sync: bool = True,
                     targets: torch.Tensor | None = None) -> torch.Tensor:
    """One micro-step: forward under autocast, scaled backward (gradient all-reduce only when `sync`),
    device-side metric sums. The loss is taken against `targets` (MixUp/CutMix soft targets) when given, else
    `labels`; accuracy always against `labels`. Returns the loss (detached; `optimizer_step` checks it)."""
    if parts.model.sharded:
        fsdp.sync_buffers(parts.model.wrapped)  # what DDP's broadcast_buffers does before each forward
    with no_sync(parts.model.wrapped, sync):
        with parts.precision.autocast():
            logits = parts.model.wrapped(images)
            loss = criterion(logits, labels if targets is None else targets)
        if parts.faults.due(state.global_step, parts.env.rank):
            loss = faults.inject(parts.faults.kind, loss)
        # Dividing by 1 is exact, so without accumulation the division and its backward are left out (every
        # small op is a kernel launch and a few microseconds of host time, per step).
        parts.scaler.scale(loss if parts.accum == 1 else loss / parts.accum).backward()
    meter.add(loss, (logits.argmax(1) == labels).sum(), int(labels.shape[0]))  # a non-finite loss is left out
    return loss.detach()


def clip_gradients(grads: list[torch.Tensor], norms: list[torch.Tensor], max_norm: float,
                   stats: torch.Tensor) -> None:
    """Scale the gradients so their global norm is at most `max_norm` (from the per-tensor norms already
    computed for the finite check: no second pass), and add the pre-clip norm to `stats` (sum, max, count),
    all on the device."""
    total = torch.linalg.vector_norm(torch.stack(norms))
    stats[0] += total.double()
    stats[1] = torch.maximum(stats[1], total.double())
    stats[2] += 1
    # torch._foreach_*: the multi-tensor kernels torch.optim and clip_grad_norm_ run on (underscored, no public
    # alias; checked against torch 2.14.1): one launch for all gradients
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))


class NonFiniteSteps:
    """The abort policy's record of each optimizer step's checked values (per-tensor gradient norms and losses),
    kept on the device as they are: no op and no host sync per step. Every `COMPACT_AT` values they are reduced
    to one flag each (one op, still no host sync), so a long epoch holds flags, not tensors. `first` checks them
    where the host waits anyway (checkpoints, epoch ends) and names the first step with a non-finite value."""

    COMPACT_AT = 4096

    def __init__(self) -> None:
        self._pending: list[tuple[int, list[torch.Tensor]]] = []
        self._pending_values = 0
        self._flags: list[torch.Tensor] = []
        self._layout: list[tuple[int, int]] = []  # (step, how many of the flags are its values), in order

    def note(self, step: int, values: list[torch.Tensor]) -> None:
        self._pending.append((step, values))
        self._pending_values += len(values)
        if self._pending_values >= self.COMPACT_AT:
            self._compact()

    def _compact(self) -> None:
        if self._pending:
            values = [v.float() for _, step_values in self._pending for v in step_values]
            self._flags.append(torch.stack(values).isfinite())
            self._layout += [(step, len(values)) for step, values in self._pending]
        self._pending, self._pending_values = [], 0

    def first(self) -> int | None:
        """The first noted step with a non-finite value, or None; what was checked is forgotten."""
        self._compact()
        flags, layout = self._flags, self._layout
        self._flags, self._layout = [], []
        if not flags:
            return None
        bad = (~torch.cat(flags)).nonzero()
        if bad.numel() == 0:
            return None
        index = int(bad[0])
        for step, count in layout:
            if index < count:
                return step
            index -= count
        raise AssertionError("unreachable: the index lies within the noted values")


def optimizer_step(parts: RunParts, state: TrainState, nonfinite: NonFiniteSteps,
                   losses: list[torch.Tensor]) -> None:
    """lr -> unscale -> finite check (gradients and `losses`, the step's micro-batch losses) -> clip -> step
    -> zero_grad."""
    scaler, settings = parts.scaler, parts.cfg.optim
    base = lr_at(settings, state.global_step, parts.steps_per_epoch, parts.env.world_size)
    if parts.model.probing:
        base *= parts.cfg.backbone.lp_lr_mult
    for group in parts.optimizer.param_groups:
        group["lr"] = base * group.get("lr_mult", 1.0)
    scaler.unscale_(parts.optimizer)  # a no-op without fp16
    grads: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    if settings.clip_grad_norm is not None or not scaler.is_enabled():
        grads = [q.grad for g in parts.optimizer.param_groups for q in g["params"] if q.grad is not None]
        # One fused pass (per-tensor norms, then the small result checked): isfinite() on each gradient
        # allocated full-size temporaries, +700 MiB and 1-2 s per step for VGG16 on a CPU.
        if parts.model.sharded and grads:
            # sharded gradients (DTensors): their global norm (shard norms, one small all-reduce), and the
            # local shards to scale in place
            norms = [fsdp.total_norm(grads)]
            grads = fsdp.local_shards(grads)
        else:
            norms = torch._foreach_norm(grads) if grads else []
    if scaler.is_enabled():
        # fp16: gradients that overflow the loss scale are expected (at the start, after each scale growth);
        # GradScaler skips those steps itself and lowers the scale. Only a non-finite *loss* is an error.
        # Both are decided on the device: no host sync. GradScaler has no public way to read the overflow flags
        # that `unscale_` left on the device, hence its private `_found_inf_per_device` (checked against torch
        # 2.14.1: {device: found_inf tensor} of this optimizer, set by unscale_ above).
        found_inf = sum(v for v in scaler._found_inf_per_device(parts.optimizer).values())
        finite = torch.stack(losses).isfinite().all()
        state.overflows += (finite & (found_inf > 0)).to(torch.int64)
        checked = losses
    else:
        # DDP already averaged the gradients, so a NaN on any rank is a NaN on every rank: all agree for free.
        checked = [*norms, *losses]
    if settings.clip_grad_norm is not None and grads:
        clip_gradients(grads, norms, settings.clip_grad_norm, state.grad_norms)
    if parts.cfg.run.nan_policy == "skip":
        if not bool(torch.stack(checked).isfinite().all()):  # the skip policy pays one host sync per step
            state.nan_skips += 1
            state.nan_skips_total += 1
            if state.nan_skips > parts.cfg.run.max_nan_skips:
                raise NonFiniteLossError(f"{state.nan_skips} non-finite steps in a row up to step "
                                         f"{state.global_step}")
            log.warning("non-finite loss at step %d: update skipped (%d in a row)", state.global_step,
                        state.nan_skips)
            parts.optimizer.zero_grad(set_to_none=True)
            scaler.update()
            return
        state.nan_skips = 0
    else:
        nonfinite.note(state.global_step, checked)  # checked at sync points, never here
    scaler.step(parts.optimizer)
    scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)


def train_step(parts: RunParts, state: TrainState, batches: Sequence[Batch], criterion: nn.Module,
               meter: Meter, nonfinite: NonFiniteSteps, first_batch: int = 0) -> StepStats:
    """One optimizer step over `batches` (grad_accum micro-batches; the last synchronises the gradients);
    `first_batch`: the epoch's index of the first of them (it seeds MixUp/CutMix)."""
    losses = []
    for j, (images, labels) in enumerate(batches):
        targets = None
        if parts.mixer is not None:  # here, not in a loader: one code path for both pipelines
            mixed = parts.mixer(images, labels, state.epoch, first_batch + j)
            images, labels, targets = mixed.images, mixed.labels, mixed.targets
        last = j == len(batches) - 1  # the last micro-batch synchronises the gradients
        losses.append(forward_backward(parts, state, images, labels, criterion, meter, sync=last, targets=targets))
    optimizer_step(parts, state, nonfinite, losses)
    if parts.ema is not None:
        parts.ema.update(state.global_step)
    state.global_step += 1
    return StepStats(sum(int(labels.shape[0]) for _, labels in batches), losses)
