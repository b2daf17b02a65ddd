"""Stop requests: SIGTERM, SIGUSR1 (SLURM's warning before the end) and SIGINT only set a flag.

The training loop polls `requested()` at each optimizer step and agrees on it across ranks; the checkpoint
is written there, never inside the handler (file I/O in a signal handler can deadlock or half-write).
"""

from __future__ import annotations

import signal
import threading

_STOP = threading.Event()
_RECEIVED: list[int] = []
HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _handler(signum: int, frame: object) -> None:  # noqa: ARG001 - signature fixed by the signal module
    if _STOP.is_set() and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C means "now"
    _RECEIVED.append(signum)
    _STOP.set()


def install() -> None:
    for sig in HANDLED:
        signal.signal(sig, _handler)


def requested() -> bool:
    return _STOP.is_set()


def received() -> list[str]:
    return [signal.Signals(s).name for s in _RECEIVED]


def reset() -> None:
    _STOP.clear()
    _RECEIVED.clear()
