"""Testing hooks: what clusters do to jobs (a NaN, an exception, a SIGKILL; slow disks), on demand.

Driven by environment variables so that they stay out of the user-facing config and `--help`:

    DTL_FAULT_STEP=N        inject a fault at global step N ...
    DTL_FAULT_KIND=nan      ... nan (poison the loss) | raise (an exception) | kill (SIGKILL this process)
    DTL_FAULT_RANK=R        ... on rank R only (default: every rank)
    DTL_TEST_SLOW_WRITES=S  sleep S seconds after each checkpoint file (widens the window for a kill -9)

They are read once, when a run is built (`from_env`, in `dtl.train.build.prepare`), into a `Faults` that the
training step and the checkpointer are given: the hot paths compare numbers, they never read the environment.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from dtl.errors import UserError

KINDS = ("nan", "raise", "kill")


@dataclass(frozen=True)
class Faults:
    """The faults asked for; the default asks for none."""

    step: int | None = None
    """The global step whose loss gets the fault (None: no fault)."""
    kind: str = "nan"
    rank: int | None = None
    """Only this rank (None: every rank)."""
    slow_writes_s: float = 0.0
    """Seconds to sleep after each checkpoint file is written."""

    def due(self, global_step: int, rank: int) -> bool:
        return self.step == global_step and self.rank in (None, rank)


#: what a run gets when nothing is asked for
NO_FAULTS = Faults()


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "")
    try:
        return int(value) if value else None
    except ValueError:
        raise UserError(f"{name} must be an integer, got {value!r}") from None


def _seconds(env: Mapping[str, str], name: str) -> float:
    value = env.get(name, "")
    try:
        return float(value) if value else 0.0
    except ValueError:
        raise UserError(f"{name} must be a number of seconds, got {value!r}") from None


def from_env(environ: Mapping[str, str] | None = None) -> Faults:
    """The faults the environment (default: this process's) asks for."""
    env = os.environ if environ is None else environ
    kind = env.get("DTL_FAULT_KIND", "nan")
    if kind not in KINDS:
        raise UserError(f"DTL_FAULT_KIND must be one of {', '.join(KINDS)}, got {kind!r}")
    return Faults(_int(env, "DTL_FAULT_STEP"), kind, _int(env, "DTL_FAULT_RANK"), _seconds(env, "DTL_TEST_SLOW_WRITES"))


def inject(kind: str, loss: torch.Tensor) -> torch.Tensor:
    if kind == "raise":
        raise RuntimeError("injected fault (DTL_FAULT_KIND=raise)")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return loss * float("nan")
