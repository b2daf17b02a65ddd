"""Testing hooks: what clusters do to jobs (a NaN, an exception, a SIGKILL; slow disks), on demand.

Driven by environment variables so that they stay out of the user-facing config and `--help`:

    DTL_FAULT_STEP=N        inject a fault at global step N ...
    DTL_FAULT_KIND=nan      ... nan (poison the loss) | raise (an exception) | kill (SIGKILL this process)
    DTL_FAULT_RANK=R        ... on rank R only (default: every rank)
    DTL_TEST_SLOW_WRITES=S  sleep S seconds after each checkpoint file (widens the window for a kill -9)
"""

from __future__ import annotations

import functools
import os
import signal
from dataclasses import dataclass

import torch

from dtl.errors import UserError

KINDS = ("nan", "raise", "kill")


@dataclass(frozen=True)
class Faults:
    step: int | None = None
    kind: str = "nan"
    rank: int | None = None

    def due(self, global_step: int, rank: int) -> bool:
        return self.step == global_step and self.rank in (None, rank)


def _int_or_none(name: str) -> int | None:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else None
    except ValueError:
        raise UserError(f"{name} must be an integer, got {value!r}") from None


@functools.cache
def from_env() -> Faults:
    kind = os.environ.get("DTL_FAULT_KIND", "nan")
    if kind not in KINDS:
        raise UserError(f"DTL_FAULT_KIND must be one of {', '.join(KINDS)}, got {kind!r}")
    return Faults(_int_or_none("DTL_FAULT_STEP"), kind, _int_or_none("DTL_FAULT_RANK"))


def inject(kind: str, loss: torch.Tensor) -> torch.Tensor:
    if kind == "raise":
        raise RuntimeError("injected fault (DTL_FAULT_KIND=raise)")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return loss * float("nan")


def slow_writes() -> float:
    return float(os.environ.get("DTL_TEST_SLOW_WRITES", "0") or 0)
