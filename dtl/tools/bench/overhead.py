"""Per-step overhead of dtl's training loop, measurable on a CPU: `python -m dtl.tools.bench.overhead`.

The model is one small Linear on 32 px images, so its compute is negligible and what is timed is everything a
step does around it. Two sides, same batches (made beforehand, on the device), same initial weights, same SGD
settings (momentum 0.9, foreach, the settings' learning rate):

* ``dtl``: ``dtl.train.loop.train_one_epoch`` on real ``RunParts`` built by ``dtl.train.build.prepare`` whose
  model, optimizer and training loader are replaced by the Linear, its optimizer and the pre-made batches: every
  step goes through ``dtl.train.step.train_step`` (autocast, scaled backward, the finite checks, device-side
  meters, the schedule's learning rate, the non-finite bookkeeping) and what the epoch loop does per step
  (stop/checkpoint agreement, progress, checkpoint decision);
* ``bare``: ``zero_grad(set_to_none=True)``, forward, cross-entropy, backward, ``step()``.

Rounds are interleaved (the side that goes first alternates); reported: the median time per step of each side
(CPU time of the process on a CPU, see `seconds_per_step`) and ``dtl / bare``, the ratio of the medians and the
median of each round's ratio (``paired``). The goal is a ratio <= 1.3 (dtl adds at most 30 % to a step whose
model costs nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtl.config.loading import config_from_flags
from dtl.distributed import DistEnv, ProcessGroups, pick_device
from dtl.train import loop
from dtl.train.build import prepare
from dtl.train.parts import RunParts
from dtl.train.train_state import TrainState
from dtl.train.trained_model import TrainedModel

IMAGE_SIZE = 32
NUM_CLASSES = 10
#: the run the Linear is put into (prepare() needs a real backbone and data set to build the rest)
BASE_FLAGS = ("--dataset", "synthetic", "--model", "squeezenet1_1", "--mode", "scratch", "--weights", "none",
              "--image-size", str(IMAGE_SIZE), "--train-subset", "64", "--eval-subset", "32", "--epochs", "1000")


class PremadeBatches:
    """A training loader (`dtl.data.loaders.BatchLoader`) over batches made beforehand: no input cost on either side."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches
        self.start = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start = start_batch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches[self.start:])


def linear_model(device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * IMAGE_SIZE * IMAGE_SIZE, NUM_CLASSES)).to(device)


def sgd(model: nn.Module, parts: RunParts) -> torch.optim.Optimizer:
    """What `dtl.train.optimisation.optimizer.build_optimizer` makes with default settings: one group, foreach
    (fused on CUDA)."""
    o = parts.cfg.optim
    fast = {"fused": True} if parts.device.type == "cuda" else {"foreach": True}
    group = {"params": list(model.parameters()), "lr_mult": 1.0, "weight_decay": o.weight_decay}
    return torch.optim.SGD([group], lr=o.lr, momentum=o.momentum, **fast)


def make_batches(steps: int, batch_size: int, device: torch.device, seed: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(device),
             torch.randint(0, NUM_CLASSES, (batch_size,), generator=g).to(device)) for _ in range(steps)]


def build_dtl(flags: list[str], batches: list, device: torch.device,
              outdir: Path) -> tuple[RunParts, TrainState]:
    """dtl's run with the Linear, its optimizer and the pre-made batches in place of the built ones."""
    cfg = config_from_flags([*BASE_FLAGS, "--output-dir", str(outdir), *flags])
    parts, state = prepare(cfg, ProcessGroups(), device)
    model = TrainedModel(linear_model(device, parts.cfg.run.seed), parts.env, device, compile_model=False)
    parts = dataclasses.replace(parts, model=model, optimizer=sgd(model.module, parts),
                                train_loader=PremadeBatches(batches))
    return parts, state


class Bare:
    """The loop anyone writes: no checks, no meters, no agreement."""

    def __init__(self, parts: RunParts, batches: list) -> None:
        self.model = linear_model(parts.device, parts.cfg.run.seed)
        self.optimizer = sgd(self.model, parts)
        self.criterion = nn.CrossEntropyLoss()
        self.batches = batches

    def epoch(self) -> None:
        self.model.train()
        for images, labels in self.batches:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.criterion(self.model(images), labels)
            loss.backward()
            self.optimizer.step()


def dtl_epoch(parts: RunParts, state: TrainState) -> None:
    epoch = state.epoch
    result = loop.train_one_epoch(parts, state, epoch)
    assert not result.stopped, "nothing asks the overhead bench to stop"
    state.end_epoch(epoch)


def seconds_per_step(fn: Any, steps: int, device: torch.device) -> float:
    """On a CPU the process's CPU time: on a shared machine the time a process spends descheduled is not its
    steps' cost (wall-clock rounds here swung 1.4-1.9x between runs under other engineers' load). On a GPU the
    wall clock between two synchronisations."""
    if device.type != "cuda":
        start = time.process_time()
        fn()
        return (time.process_time() - start) / steps
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def measure(steps: int = 200, repeats: int = 7, warmup: int = 1, batch_size: int = 32, device: str = "cpu",
            threads: int | None = None, flags: list[str] | None = None) -> dict[str, Any]:
    """Both sides, `repeats` interleaved rounds of one `steps`-step epoch each; the result dictionary."""
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(DistEnv(), device)
    batches = make_batches(steps, batch_size, dev, seed=0)
    with tempfile.TemporaryDirectory(prefix="dtl-overhead-") as tmp:
        parts, state = build_dtl([*(flags or []), "--device", device, "--batch-size", str(batch_size)], batches,
                                 dev, Path(tmp) / "run")
        bare = Bare(parts, batches)
        sides = {"dtl": lambda: dtl_epoch(parts, state), "bare": bare.epoch}
        for _ in range(warmup):
            for fn in sides.values():
                fn()
        runs: dict[str, list[float]] = {side: [] for side in sides}
        for r in range(repeats):
            for side in (("dtl", "bare") if r % 2 == 0 else ("bare", "dtl")):
                runs[side].append(seconds_per_step(sides[side], steps, dev))
    med = {side: statistics.median(values) for side, values in runs.items()}
    return {"meta": {"device": str(dev), "threads": torch.get_num_threads(), "steps": steps, "repeats": repeats,
                     "batch_size": batch_size, "model": f"Linear({3 * IMAGE_SIZE * IMAGE_SIZE}, {NUM_CLASSES})",
                     "precision": parts.precision.name, "torch": torch.__version__},
            "us_per_step": {side: value * 1e6 for side, value in med.items()},
            "runs_us": {side: [v * 1e6 for v in values] for side, values in runs.items()},
            "ratio": med["dtl"] / med["bare"],
            "ratio_paired": statistics.median(d / b for d, b in zip(runs["dtl"], runs["bare"]))}


def format_result(result: dict[str, Any]) -> str:
    m, us = result["meta"], result["us_per_step"]
    return (f"dtl overhead: {m['model']}, batch {m['batch_size']}, {m['precision']} on {m['device']} "
            f"({m['threads']} threads); median of {m['repeats']} rounds of {m['steps']} steps\n"
            f"  bare loop {us['bare']:8.1f} us/step\n  dtl loop  {us['dtl']:8.1f} us/step\n"
            f"  dtl / bare {result['ratio']:.2f}x (paired {result['ratio_paired']:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtl.tools.bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per timed epoch (default 200)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds; medians reported (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per side first (default 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="also write the result as JSON")
    parser.add_argument("train_flags", nargs="*", help="after --: train.py flags for dtl's side (e.g. "
                        "--nan-policy skip, --log-every 1)")
    args = parser.parse_args(argv)
    if min(args.steps, args.repeats, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats and --batch-size must be >= 1, --warmup >= 0")
    result = measure(args.steps, args.repeats, args.warmup, args.batch_size, args.device, args.threads,
                     args.train_flags)
    print(format_result(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
