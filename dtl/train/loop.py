"""The training loop, top to bottom: `train_one_epoch` (steps from the saved position, stop agreement, mid-epoch
checkpoints), `end_epoch` (evaluate, the end-of-epoch hooks, checkpoint) and `fit` (epochs to the end, then the
run folder's `finish`). One step is `dtl.train.step.train_step`. No host sync inside a step."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dtl import models
from dtl.data.splits import stream_seed
from dtl.distributed import Agreement, signals
from dtl.errors import EXIT_OK, EXIT_PREEMPTED, NonFiniteLossError
from dtl.train.evaluate import evaluate
from dtl.train.hooks import EpochEnd
from dtl.train.loss import criterion_for
from dtl.train.metrics import Meter
from dtl.train.parts import RunParts
from dtl.train.progress_bar import Progress
from dtl.train.step import Batch, NonFiniteSteps, train_step
from dtl.train.train_state import TrainState

log = logging.getLogger("dtl")


@dataclass(frozen=True)
class EpochResult:
    """How an epoch ended: stopped by a signal (checkpoint written), or done with its training sums."""

    stopped: bool
    loss: float = 0.0
    acc: float = 0.0
    count: int = 0
    seconds: float = 0.0
    grad_norm_mean: float = 0.0
    """Pre-clip global gradient norm over the epoch's optimizer steps (with --clip-grad-norm)."""
    grad_norm_max: float = 0.0


def step_groups(parts: RunParts, start_batch: int) -> Iterator[tuple[int, list[Batch]]]:
    """(index of the group's last batch, the micro-batches of one optimizer step) from the train loader."""
    n_batches, group = len(parts.train_loader), []
    for i, batch in enumerate(parts.train_loader, start=start_batch):
        group.append(batch)
        if (i + 1) % parts.accum == 0 or i + 1 == n_batches:
            yield i, group
            group = []


# ---- sync points -------------------------------------------------------------------------------

def sync_point(parts: RunParts, state: TrainState, nonfinite: NonFiniteSteps) -> None:
    """Read the device-side counters (only where the host waits anyway: checkpoints, epoch ends). Abort
    policy: stop before anything is saved when a step had a non-finite loss."""
    state.overflow_skips += int(state.overflows.item())
    state.overflows.zero_()
    step = nonfinite.first()
    if step is not None:
        last = parts.checkpointer.last
        where = f"--resume {last}" if last else "a fresh run (no checkpoint was written yet)"
        raise NonFiniteLossError(f"non-finite loss at global step {step}; nothing was saved after it. "
                                 f"Lower --lr, check the data, or use --nan-policy skip; resume from {where}")


def save(parts: RunParts, state: TrainState, is_best: bool = False, best_source: str = "raw") -> None:
    parts.checkpointer.save(parts.model.wrapped, parts.optimizer, parts.scaler, state, is_best, parts.ema,
                            best_source)


def check_replicas(parts: RunParts) -> None:
    """DDP keeps replicas identical by construction; verify it (one checksum per rank) rather than assume.
    Summed parameter by parameter: one float64 copy of VGG16 at once would be ~4 GB of temporaries."""
    if not parts.env.distributed:
        return
    if parts.model.sharded:  # each rank holds other shards: nothing to compare (DCP checkpoints carry them all)
        return
    params = list(parts.model.unwrapped().parameters())
    checksum = torch.zeros(2, dtype=torch.float64, device=params[0].device)
    offset = 0
    for p in params:
        flat = p.detach().flatten().double()
        weights = (torch.arange(offset + 1, offset + flat.numel() + 1, dtype=torch.float64, device=flat.device)
                   % 9973)
        checksum[0] += flat.sum()
        checksum[1] += (flat * weights).sum()
        offset += flat.numel()
    sums = parts.groups.all_gather(checksum)
    if any(not torch.equal(sums[0], s) for s in sums[1:]):
        raise RuntimeError(f"replicas diverged: parameter checksums per rank {[s.tolist() for s in sums]}")
    log.info("replicas in sync: identical parameter checksums on all %d ranks", parts.env.world_size)


# ---- epochs ------------------------------------------------------------------------------------

def train_one_epoch(parts: RunParts, state: TrainState, epoch: int) -> EpochResult:
    """One epoch from the saved position."""
    cfg, env = parts.cfg, parts.env
    start_batch = state.step_in_epoch * parts.accum
    if start_batch == 0:
        torch.manual_seed(stream_seed(cfg.run.seed, epoch, env.rank, 1))  # dropout stream per epoch/rank
    parts.train_loader.set_epoch(epoch, start_batch)
    meter = Meter(parts.device)
    if env.is_main:
        meter.load(state.partial_meter)
    parts.model.wrapped.train()
    models.freeze_frozen_norms(parts.model.wrapped, all_stats=cfg.backbone.freeze_bn_stats)
    criterion = criterion_for(cfg.optim, parts.class_weights)
    nonfinite = NonFiniteSteps()
    agreement = Agreement(parts.groups)  # stop flag + rank 0's "checkpoint time", without a per-step round trip
    n_batches = len(parts.train_loader)
    bar = Progress(n_batches, f"epoch {epoch + 1}/{cfg.optim.epochs} train", env.is_main, initial=start_batch,
                   every_s=cfg.run.progress_every)
    t0 = time.perf_counter() - state.partial_seconds
    state.grad_norms.copy_(torch.tensor(state.partial_grad_norms, dtype=torch.float64))
    for i, batches in step_groups(parts, start_batch):
        train_step(parts, state, batches, criterion, meter, nonfinite, first_batch=i + 1 - len(batches))
        state.step_in_epoch += 1
        bar.update(len(batches))
        if bar.wants_stats(state.step_in_epoch % cfg.run.log_every == 0):
            loss_sum, correct, count = meter.local()  # the one host sync of a log interval
            bar.show(loss=f"{loss_sum / max(count, 1):.3f}", acc=f"{correct / max(count, 1):.3f}",
                     img_s=f"{count / max(time.perf_counter() - t0, 1e-9):.0f}")
        last = i + 1 == n_batches
        flags = agreement.drain() if last else agreement.step(signals.requested(), parts.checkpointer.time_due())
        stop, time_due = flags
        if stop or parts.checkpointer.due(state.global_step, time_due, last):
            sync_point(parts, state, nonfinite)
            state.partial_meter = meter.reduced_totals(parts.groups)
            state.partial_seconds = time.perf_counter() - t0
            state.partial_grad_norms = state.grad_norms.tolist()
            save(parts, state)
            if stop:
                bar.close()
                return EpochResult(stopped=True)
    agreement.drain()
    bar.close()
    sync_point(parts, state, nonfinite)
    train = meter.reduced(parts.groups)
    norm_sum, norm_max, norm_count = state.grad_norms.tolist()
    return EpochResult(False, train["loss"], train["acc"], int(train["count"]), time.perf_counter() - t0,
                       norm_sum / max(norm_count, 1), norm_max)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's rate at the last step (each group runs at its multiple of it)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_mult", 1.0)


def end_epoch(parts: RunParts, state: TrainState, epoch: int, train: EpochResult) -> None:
    """Evaluate the raw weights into the epoch's row, run the end-of-epoch hooks (`parts.hooks`: EMA evaluation,
    best-model choice, early stopping, logging), checkpoint."""
    test = evaluate(parts.model.wrapped, parts.eval_loader, parts.device, parts.groups, parts.precision,
                    len(parts.splits.classes), confusion=parts.cfg.data.class_balance != "none",
                    tta=parts.cfg.run.tta)
    row = {"epoch": epoch + 1, "train_loss": train.loss, "train_acc": train.acc, "train_count": train.count,
           "test_loss": test.loss, "test_acc": test.top1, "test_count": test.count,
           "lr": base_lr(parts.optimizer), "epoch_seconds": train.seconds,
           "images_per_sec": train.count / max(train.seconds, 1e-9), "global_step": state.global_step,
           "nan_skips": state.nan_skips_total}
    if test.plain is not None:
        row["test_loss_plain"], row["test_acc_plain"] = test.plain.loss, test.plain.top1
    if test.confusion is not None:
        counts = test.confusion.sum(1).clamp(min=1)
        row["test_acc_per_class"] = (test.confusion.diagonal() / counts).tolist()
    if parts.model.compression is not None:
        sent, steps = parts.model.compression.take_counts()
        row["comm_bytes_per_step"] = sent / max(steps, 1)
    if parts.cfg.optim.clip_grad_norm is not None:
        row["grad_norm_mean"], row["grad_norm_max"] = train.grad_norm_mean, train.grad_norm_max
    if parts.scaler.is_enabled():
        row["overflow_skips"] = state.overflow_skips
        row["loss_scale"] = parts.scaler.get_scale()
    end = EpochEnd(epoch, row, {"raw": test.top1})
    for hook in parts.hooks:
        hook(parts, state, end)
    state.end_epoch(epoch)
    save(parts, state, is_best=end.is_best, best_source=end.best_source)


def fit(parts: RunParts, state: TrainState) -> int:
    """Epochs from the saved position to the end (or an early stop), then the run folder's final files; the
    exit code."""
    for epoch in range(state.epoch, parts.cfg.optim.epochs):
        if state.early_stopped:
            break
        parts.model.set_phase(parts.cfg.backbone, epoch)
        result = train_one_epoch(parts, state, epoch)
        if result.stopped:
            parts.folder.status("preempted", EXIT_PREEMPTED, state, parts.checkpointer.last)
            log.warning("stopped by %s at global step %d (epoch %d); checkpoint written; exit code %d, "
                        "continue with --resume auto", "/".join(signals.received()) or "a peer's signal",
                        state.global_step, epoch + 1, EXIT_PREEMPTED)
            return EXIT_PREEMPTED
        end_epoch(parts, state, epoch, result)
    check_replicas(parts)
    weights = parts.model.full_state()  # sharded: gathered to rank 0, a collective
    ema = parts.model.full_state(parts.ema) if parts.ema is not None else None
    if parts.env.is_main:
        parts.folder.finish(weights, ema, state, parts.cfg.run.early_stop_metric, parts.checkpointer.last)
    parts.groups.barrier()
    return EXIT_OK
