"""`TrainState`: where a run is -- the one mutable object of a run, and the one thing a checkpoint saves and
restores (`saved`, `from_saved`; stored as the checkpoint's "progress"). Everything else a run holds is built
once (`dtl.train.parts.RunParts`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

#: metadata of the fields that live on the device between sync points and are not saved
_LIVE = {"saved": False}
#: (compare=False on them too: two states are equal when their saved counters are)


@dataclass
class TrainState:
    """The counters of a run (saved with every checkpoint), and the device-side counts a step adds to without a
    host sync (read at sync points)."""

    epoch: int = 0
    """Completed epochs."""
    step_in_epoch: int = 0
    """Optimizer steps already done in the current (incomplete) epoch."""
    global_step: int = 0
    best_acc: float = -1.0
    nan_skips: int = 0
    """Non-finite steps skipped in a row (--nan-policy skip)."""
    nan_skips_total: int = 0
    overflow_skips: int = 0
    """fp16: optimizer steps the GradScaler skipped because the scaled gradients overflowed (not errors)."""
    partial_meter: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """Train loss/correct/count sums of the incomplete epoch, over all ranks."""
    partial_seconds: float = 0.0
    early_stop_best: float | None = None
    """--early-stop-patience: the best value of the watched metric so far, its epoch, epochs since."""
    early_stop_best_epoch: int = 0
    early_stop_bad_epochs: int = 0
    early_stopped: bool = False
    partial_grad_norms: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """Pre-clip gradient norm sum, max and count of the incomplete epoch (--clip-grad-norm)."""
    samples_in_epoch: int = 0
    """Training images of the current epoch already trained on, over all ranks: the position a resume continues
    from at another world size, --batch-size or --grad-accum (`at_global_batch`). Every step but an epoch's last
    trains a whole global batch, so it is `step_in_epoch` x the global batch."""
    overflows: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64), compare=False,
                                  metadata=_LIVE)
    """fp16: overflow-skipped steps since the last sync point, counted on the device (no host sync per step)."""
    grad_norms: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64), compare=False,
                                   metadata=_LIVE)
    """--clip-grad-norm: pre-clip global norm sum, max and count of this epoch, on the device."""

    def on(self, device: torch.device) -> TrainState:
        """The device-side counts moved to the run's device (self, for chaining)."""
        self.overflows = self.overflows.to(device)
        self.grad_norms = self.grad_norms.to(device)
        return self

    def saved(self) -> dict[str, Any]:
        """What a checkpoint stores (the same keys as every checkpoint dtl has written)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("saved", True)}

    @classmethod
    def from_saved(cls, saved: dict[str, Any], device: torch.device) -> TrainState:
        return cls(**saved).on(device)

    def at_global_batch(self, global_batch: int) -> int:
        """Continue from the sample position in steps of `global_batch` (this run's): the position is rounded down
        to a whole number of them (a step never starts in the middle of one); returns the images that are
        trained again because of the rounding."""
        again = self.samples_in_epoch % global_batch
        self.step_in_epoch = self.samples_in_epoch // global_batch
        self.samples_in_epoch -= again
        return again

    def end_epoch(self, epoch: int) -> None:
        self.samples_in_epoch = 0
        self.epoch, self.step_in_epoch, self.partial_meter, self.partial_seconds = epoch + 1, 0, [0.0] * 3, 0.0
        self.partial_grad_norms = [0.0, 0.0, 0.0]
