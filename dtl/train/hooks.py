"""End-of-epoch hooks: after the epoch's training sums and the evaluation of the raw weights are in the row,
the loop calls these in order -- evaluate the EMA weights, choose the best epoch, early stopping, log the row --
each reading and adding to one `EpochEnd`. A new end-of-epoch behaviour is a hook added in `hooks_for`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dtl.config import Config
from dtl.distributed import local_module
from dtl.train.evaluate import evaluate
from dtl.train.optimisation.ema import EmaView
from dtl.train.parts import RunParts
from dtl.train.train_state import TrainState

log = logging.getLogger("dtl")


@dataclass
class EpochEnd:
    """What is known at the end of an epoch: its metrics row, the candidate scores for the best model, and the
    choice of the checkpoint to mark best."""

    epoch: int
    row: dict[str, Any]
    scores: dict[str, float] = field(default_factory=dict)
    """Test accuracy per candidate weights: "raw", and "ema" with --ema-decay."""
    is_best: bool = False
    best_source: str = "raw"


Hook = Callable[[RunParts, TrainState, EpochEnd], None]


def evaluate_ema(parts: RunParts, state: TrainState, end: EpochEnd) -> None:
    """--ema-decay: evaluate the averaged weights too (test_loss_ema, test_acc_ema; a best-model candidate)."""
    if parts.ema is None:
        return
    local = local_module(parts.model.wrapped)
    if parts.model.sharded:  # FSDP gathers its own (sharded) tensors: the averages go into them for the pass
        with parts.ema.swapped():
            result = evaluate(local, parts.eval_loader, parts.device, parts.groups, parts.precision,
                              len(parts.splits.classes), desc="eval (EMA)", tta=parts.cfg.run.tta)
    else:
        view = EmaView(local, parts.ema, "wrapped_model." if hasattr(local, "wrapped_model") else "")
        result = evaluate(view, parts.eval_loader, parts.device, parts.groups, parts.precision,
                          len(parts.splits.classes), desc="eval (EMA)", tta=parts.cfg.run.tta)
    end.row["test_loss_ema"], end.row["test_acc_ema"] = result.loss, result.top1
    end.scores["ema"] = result.top1


def choose_best(parts: RunParts, state: TrainState, end: EpochEnd) -> None:
    """The best checkpoint so far by test accuracy, among the weights --best-of names (raw, ema or both)."""
    best_of = parts.cfg.checkpoint.best_of
    candidates = {k: v for k, v in end.scores.items() if best_of == "both" or k == best_of} or end.scores
    end.best_source, score = max(candidates.items(), key=lambda kv: kv[1])
    end.is_best = score > state.best_acc
    state.best_acc = max(state.best_acc, score)


def early_stopping(parts: RunParts, state: TrainState, end: EpochEnd) -> None:
    """--early-stop-patience: track --early-stop-metric (the all-reduced test metric: the same on every rank, so
    every rank stops at the same epoch); the best epoch by that metric is the one marked best."""
    settings = parts.cfg.run
    value = end.row[settings.early_stop_metric]
    if state.early_stop_best is None:
        improved = True
    else:  # how much better than the best so far (lower loss, higher accuracy)
        best = state.early_stop_best
        gain = best - value if settings.early_stop_metric == "test_loss" else value - best
        improved = gain > settings.early_stop_min_delta
    if improved:
        state.early_stop_best, state.early_stop_best_epoch, state.early_stop_bad_epochs = value, end.epoch + 1, 0
    else:
        state.early_stop_bad_epochs += 1
    state.early_stopped = state.early_stop_bad_epochs >= (settings.early_stop_patience or 0)
    end.is_best, end.best_source = improved, "raw"


def log_row(parts: RunParts, state: TrainState, end: EpochEnd) -> None:
    """The row to metrics.jsonl and the trackers, and one line to the log (rank 0)."""
    row = end.row
    parts.folder.log_epoch(row)
    if parts.env.is_main:
        log.info("epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f (%d images) | %.1f img/s",
                 end.epoch + 1, parts.cfg.optim.epochs, row["train_loss"], row["train_acc"], row["test_loss"],
                 row["test_acc"], row["test_count"], row["images_per_sec"])


def hooks_for(cfg: Config) -> tuple[Hook, ...]:
    """The hooks a run's settings call for, in the order they run."""
    return (*((evaluate_ema,) if cfg.optim.ema_decay else ()), choose_best,
            *((early_stopping,) if cfg.run.early_stop_patience else ()), log_row)
