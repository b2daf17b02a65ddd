"""The strong hand-written loop's training rate alone (`make gpu-check`'s speed table puts dtl's epoch rate beside
it): ``python -m dtl.tools.bench.strong_rate [dtl bench flags]``, or ``--cases FILE.json`` for several
configurations in one process."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from dtl.config import Config
from dtl.distributed import DistEnv, pick_device
from dtl.tools.bench import timing
from dtl.tools.bench.settings import add_bench_arguments, bench_config
from dtl.tools.bench.strong_loop import StrongLoop


def train_rate(cfg: Config, device: torch.device, warmup: int = 8, min_steps: int = 30,
               min_seconds: float = 2.0) -> dict[str, Any]:
    """The strong loop's training step alone: images/s over at least `min_steps` steps and `min_seconds` of
    timed work after `warmup` steps; on a GPU also its FLOPs per image and TFLOP/s against the bf16 matmul
    rate measured here."""
    loop = StrongLoop(cfg, device)
    with loop.context():
        loop.train_step(warmup)
    steps = timing.calibrated_steps(loop, loop.train_step, min_steps, min_seconds)
    images, seconds = timing.timed_run(loop, loop.train_step, steps)
    out: dict[str, Any] = {"images_per_s": images / seconds, "steps": steps, "seconds": seconds,
                           "batch_size": cfg.optim.batch_size, "precision": loop.precision.name, "device": str(device)}
    if device.type == "cuda":
        flops = timing.count_flops(loop)["train_step"]
        out |= {"flops_per_image": flops, "tflops": flops * out["images_per_s"] / 1e12}
        if torch.cuda.is_bf16_supported():
            out["bf16_matmul_tflops"] = timing.matmul_tflops(device)
            out["fraction_of_bf16_matmul"] = out["tflops"] / out["bf16_matmul_tflops"]
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m dtl.tools.bench.strong_rate [dtl bench flags]``: `train_rate` of one configuration, given with
    `dtl bench`'s flags (--warmup; --steps: the fewest timed steps; --json); or ``python -m
    dtl.tools.bench.strong_rate --cases FILE.json [common flags]`` with {"label": [flags, ...], ...}: several
    configurations in one process (`make gpu-check`), the JSON keyed by label."""
    args = list(sys.argv[1:] if argv is None else argv)
    cases: dict[str, list[str]] = {"result": []}
    if args[:1] == ["--cases"]:
        cases, args = json.loads(Path(args[1]).read_text()), args[2:]
    parser = argparse.ArgumentParser(prog="python -m dtl.tools.bench.strong_rate")
    add_bench_arguments(parser)
    results, json_path = {}, None
    for label, flags in cases.items():
        parsed = parser.parse_args([*args, *flags])
        json_path = parsed.json_path
        if parsed.threads:
            torch.set_num_threads(parsed.threads)
        cfg = bench_config(parsed)
        device = pick_device(DistEnv(), cfg.dist.device)
        results[label] = train_rate(cfg, device, parsed.warmup, parsed.steps, timing.min_seconds(device, "train_step"))
        print(f"strong loop {label}: {results[label]['images_per_s']:.1f} img/s "
              f"({results[label]['steps']} steps)", flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
