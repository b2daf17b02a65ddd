"""How the bench times a loop: one measurement of `steps` steps of a phase (`timed_run`, with CUDA events on a
GPU), the step count that makes a measurement long enough (`calibrated_steps`, `min_seconds`), FLOPs per image
(`count_flops`) and the bf16 matmul rate the TFLOP/s are compared with (`matmul_tflops`).

Every side of `dtl bench` (`dtl.tools.bench.reference_loop.ReferenceLoop`, `dtl.tools.bench.strong_loop.StrongLoop`,
`dtl.tools.bench.dtl_loop.DtlLoop`) implements `BenchLoop`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

MATMUL_SIZE = 8192
#: seconds of timed work per measurement of every phase on a GPU, and of the input phases on a CPU
MIN_SECONDS_GPU = 2.0
MIN_SECONDS_CPU_INPUT = 1.0
#: the most steps a measurement is stretched to (a phase that takes no time must not run forever)
MAX_STEPS = 100_000


class BenchLoop(Protocol):
    """One side of the bench: a phase method per benchmarked phase (`steps` steps in, images made out), and one
    training/eval step on a given batch (for counting FLOPs)."""

    name: str
    device: torch.device
    train_batches: Iterator[Any]
    eval_batches: Iterator[Any]

    def context(self) -> contextlib.AbstractContextManager: ...
    def input(self, steps: int) -> int: ...
    def train_step(self, steps: int) -> int: ...
    def eval_step(self, steps: int) -> int: ...
    def train_batch(self, images: torch.Tensor, labels: torch.Tensor) -> int: ...
    def eval_batch(self, images: torch.Tensor, labels: torch.Tensor) -> int: ...


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def min_seconds(device: torch.device, phase: str, override: float | None = None) -> float:
    """Seconds of timed work a measurement of `phase` must reach on `device` (`override`: --min-seconds)."""
    if override is not None:
        return override
    if device.type == "cuda":
        return MIN_SECONDS_GPU
    return MIN_SECONDS_CPU_INPUT if phase.startswith("input") else 0.0


def timed_run(loop: BenchLoop, fn: Callable[[int], int], steps: int) -> tuple[int, float]:
    """(images, seconds) of `steps` steps of one phase; the one host sync is at the end. On a GPU the time
    between two CUDA events around the steps (recorded on an idle device, so it spans the host's work too)."""
    with loop.context():
        synchronize(loop.device)
        if loop.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            images = fn(steps)
            end.record()
            end.synchronize()
            return images, start.elapsed_time(end) / 1000
        begin = time.perf_counter()
        images = fn(steps)
        return images, time.perf_counter() - begin


def timed(loop: BenchLoop, phase: str, steps: int, fn: Callable[[int], int] | None = None) -> float:
    """Images per second of `steps` steps of one phase."""
    images, seconds = timed_run(loop, fn or getattr(loop, phase), steps)
    return images / max(seconds, 1e-9)


def calibrated_steps(loop: BenchLoop, fn: Callable[[int], int], steps: int, seconds: float) -> int:
    """`steps`, or as many more as make `seconds` of timed work, judged from one timed run of `steps`."""
    if seconds <= 0:
        return steps
    _, took = timed_run(loop, fn, steps)
    return min(max(steps, math.ceil(steps * seconds / max(took, 1e-9))), MAX_STEPS)


def count_flops(loop: BenchLoop) -> dict[str, float]:
    """FLOPs per image of one training step and one eval step (model only: the batch is made outside).
    Counted per side: they differ where dtl does less work (e.g. --cache-features runs only the head)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for phase, batches, step in (("train_step", loop.train_batches, loop.train_batch),
                                 ("eval_step", loop.eval_batches, loop.eval_batch)):
        images, labels = next(batches)
        with loop.context():
            getattr(loop, phase)(0)  # sets train/eval mode
            with FlopCounterMode(display=False) as counter:
                n = step(images, labels)
        out[phase] = counter.get_total_flops() / n
    return out


def matmul_tflops(device: torch.device, size: int = MATMUL_SIZE, iters: int = 30) -> float:
    """Achieved TFLOP/s of bf16 `size`^3 matrix products on this device (the yardstick for the steps)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    for _ in range(3):
        torch.mm(a, b, out=c)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b, out=c)
    synchronize(device)
    return 2 * size**3 * iters / (time.perf_counter() - start) / 1e12
