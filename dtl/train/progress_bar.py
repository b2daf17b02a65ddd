"""Progress of a loop over batches, in the form that suits where stderr goes.

A terminal gets a tqdm bar (redrawn in place). Anything else -- a SLURM output file, a pipe, `nohup` -- gets
no carriage returns: one plain log line every `LINE_EVERY_S` seconds (position, images/s, ETA and the stats
the caller shows: loss, accuracy), so a job log stays readable with `less` and `tail -f`. The stats are read
only when they are shown (`wants_stats`): reading a device-side loss is a host sync.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger("dtl")
#: default seconds between two plain progress lines when stderr is not a terminal (--progress-every)
LINE_EVERY_S = 30.0


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class Progress:
    """`update(n)` after each batch; `wants_stats(due)` says whether to read and `show(**stats)` the loop's
    numbers now (a bar: every `due` step, i.e. --log-every; plain lines: when a line is due); `close()`."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0,
                 stream: TextIO | None = None, every_s: float | None = None) -> None:
        stream = stream or sys.stderr
        self.enabled, self.total, self.desc, self.every_s = enabled, total, desc, every_s
        self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=stream) \
            if enabled and is_terminal(stream) else None
        self.n = self.start_n = initial
        self.t0 = self.last_line = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def wants_stats(self, due: bool = False) -> bool:
        if not self.enabled:
            return False
        if self.bar is not None:
            return due
        return time.perf_counter() - self.last_line >= (LINE_EVERY_S if self.every_s is None else self.every_s)

    def show(self, **stats: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix(stats)
            return
        if not self.enabled:
            return
        now = time.perf_counter()
        self.last_line = now
        rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)  # batches/s over this run of the loop
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        extra = "".join(f" {k} {v}" for k, v in stats.items())
        log.info("%s: %d/%d (%d%%) eta %s%s", self.desc, self.n, self.total, 100 * self.n // max(self.total, 1),
                 _duration(eta), extra)

    def tick(self, n: int = 1) -> None:
        """`update(n)`, and a plain line when one is due (loops without stats of their own: evaluation)."""
        self.update(n)
        if self.bar is None and self.wants_stats():
            self.show()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
