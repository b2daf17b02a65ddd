"""`dtl bench`: dtl's loop against two references, same device, model, mode, image size and batch.

    dtl bench --model vgg16 --mode transfer --weights vgg16.pth --image-size 224 --batch-size 8 --steps 3
    python -m dtl.cli bench ...   # the same

Three loops are built side by side and timed **interleaved** (the order rotating between rounds) after a
warm-up, so load from other processes hits all alike; the median of ``--repeats`` measurements is reported:

* ``reference``: the reference loop, the single-GPU notebook script dtl grew from, exactly
  (`dtl.tools.bench.reference_loop`: PIL per image, fp32, a host sync per step);
* ``strong``: the loop a competent user writes by hand (`dtl.tools.bench.strong_loop`: uint8 data on the device,
  resize and normalise there, dtl's precision and memory format, fused SGD, no host sync);
* ``dtl``: built by ``dtl.train.build.prepare`` with the chosen settings (device-resident data with batched exact
  augmentation, channels_last, foreach/fused optimizer, precision), stepped with ``dtl.train.step.train_step`` and
  evaluated with ``dtl.train.evaluate.evaluate`` -- the training run's own code (`dtl.tools.bench.dtl_loop`) --
  with no host sync inside the timed region except the one at its end.

Both ratios are reported: ``dtl/ref`` (``ratio`` in the JSON) and ``dtl/strong`` (``ratio_strong``).

How long a measurement runs: ``--steps`` (``--input-steps`` for input phases) at least; on a GPU as many more
as make at least `dtl.tools.bench.timing.MIN_SECONDS_GPU` of timed work per phase and side (timed with CUDA
events; a few steps are microseconds of noise there), and on a CPU `~dtl.tools.bench.timing.MIN_SECONDS_CPU_INPUT`
for the input phases (whose batches take microseconds), the count decided per side and phase from one timed
measurement after the warm-up.

Phases (images/s): ``input`` (training batches produced by the pipeline alone), ``train_step`` (pipeline +
training step, as a user sees it), ``eval_step`` (eval pipeline + forward). Peak memory is measured in a
fresh subprocess per side (`dtl.tools.bench.memory`; on a CPU the sides run concurrently, on a GPU one after
the other).
On a GPU the achieved TFLOP/s of each loop (FLOPs counted by ``FlopCounterMode`` on one batch) and their
fraction of a bf16 matmul rate measured in the same run are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dtl.config import Config
from dtl.distributed import DistEnv, pick_device
from dtl.tools.bench.dtl_loop import DtlLoop
from dtl.tools.bench.folder_input import run_folder_bench
from dtl.tools.bench.input_phases import extra_phases, reference_runner
from dtl.tools.bench.memory import measure_memory, probe
from dtl.tools.bench.reference_loop import ReferenceLoop
from dtl.tools.bench.report import PHASES, SIDES, assemble, format_table
from dtl.tools.bench.settings import Options, bench_config, options_from_args
from dtl.tools.bench.strong_loop import StrongLoop
from dtl.tools.bench.timing import BenchLoop, calibrated_steps, count_flops, matmul_tflops, min_seconds, timed

LOOPS: dict[str, Callable[[Config, torch.device], BenchLoop]] = {
    "reference": ReferenceLoop, "strong": StrongLoop, "dtl": DtlLoop}


def build_loop(side: str, cfg: Config, device: torch.device) -> BenchLoop:
    return LOOPS[side](cfg, device)


# ---- the measurement schedule ------------------------------------------------------------------

#: side -> phase -> the function that runs `steps` steps of it and returns the images it made
Runners = dict[str, dict[str, Callable[[int], int]]]


def runners(loops: dict[str, BenchLoop], cfg: Config, device: torch.device) -> Runners:
    """Every phase of every side: the loops' own, then the extra input phases that apply
    (`dtl.tools.bench.input_phases`), where dtl's side is its training loader and the reference side a
    torchvision v2 pipeline (the strong loop has no augmentation to compare)."""
    out: Runners = {side: {phase: getattr(loop, phase) for phase in PHASES} for side, loop in loops.items()}
    dtl_loop = loops["dtl"]
    for phase in extra_phases(cfg):
        out["dtl"][phase] = dtl_loop.input
        out["reference"][phase] = reference_runner(phase, cfg, dtl_loop.parts.splits.train, device)  # type: ignore[attr-defined]
    return out


def warm_up(loops: dict[str, BenchLoop], run: Runners, steps: int) -> None:
    for phase in run["dtl"]:
        for side, loop in loops.items():
            if steps and phase in run[side]:
                timed(loop, phase, steps, run[side][phase])


def plan_steps(loops: dict[str, BenchLoop], run: Runners, opts: Options) -> dict[str, dict[str, int]]:
    """Steps per measurement for each side and phase (`calibrated_steps` where a minimum time applies)."""
    return {side: {phase: calibrated_steps(loops[side], fn, opts.steps_for(phase),
                                           min_seconds(loops[side].device, phase, opts.min_seconds))
                   for phase, fn in run[side].items()} for side in loops}


def interleaved(loops: dict[str, BenchLoop], run: Runners, opts: Options,
                steps: dict[str, dict[str, int]]) -> dict[str, dict[str, list[float]]]:
    """`repeats` rounds; in each, every phase is measured on every side back to back, the order of the sides
    rotating between rounds (and reversed every other round)."""
    runs: dict[str, dict[str, list[float]]] = {side: {phase: [] for phase in run[side]} for side in loops}
    for r in range(opts.repeats):
        order = SIDES[r % len(SIDES):] + SIDES[:r % len(SIDES)]
        for phase in run["dtl"]:
            for side in (order if r % 2 == 0 else order[::-1]):
                if phase not in run[side]:
                    continue
                rate = timed(loops[side], phase, steps[side][phase], run[side][phase])
                runs[side][phase].append(rate)
                print(f"  round {r + 1}/{opts.repeats} {phase:<13} {side:<9} {rate:10.1f} img/s",
                      file=sys.stderr, flush=True)
    return runs


# ---- entry points ------------------------------------------------------------------------------

def measure(cfg: Config, opts: Options, device: torch.device
            ) -> tuple[dict, dict[str, str], dict | None, float | None, dict[str, dict[str, int]]]:
    """Build both loops, warm up, time them interleaved; FLOPs and the matmul yardstick when asked."""
    loops = {side: build_loop(side, cfg, device) for side in SIDES}
    precision = {"reference": "fp32", "strong": loops["strong"].precision.name,  # type: ignore[attr-defined]
                 "dtl": loops["dtl"].parts.precision.name}  # type: ignore[attr-defined]
    print(f"  warm-up: {opts.warmup} step(s) per side and phase", file=sys.stderr, flush=True)
    run = runners(loops, cfg, device)
    warm_up(loops, run, opts.warmup)
    steps = plan_steps(loops, run, opts)
    runs = interleaved(loops, run, opts, steps)
    want_flops = opts.flops if opts.flops is not None else device.type == "cuda"
    flops = {side: count_flops(loop) for side, loop in loops.items()} if want_flops else None
    yardstick = want_flops and device.type == "cuda" and torch.cuda.is_bf16_supported()
    peak = matmul_tflops(device) if yardstick else None
    return runs, precision, flops, peak, steps


def run_bench(cfg: Config, opts: Options) -> dict[str, Any]:
    """The whole benchmark; returns the result dictionary (also printed, and written to --json)."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = pick_device(DistEnv(), cfg.dist.device)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dtl-bench-") as tmp:
        # prepare() validates the output folder but writes nothing to it: a path that never gets created.
        cfg = cfg.replace(output_dir=str(Path(tmp) / "run"))
        runs, precision, flops, peak, steps = measure(cfg, opts, device)
        memory = measure_memory(cfg, opts, Path(tmp)) if opts.memory == "subprocess" else None
    result = assemble(cfg, opts, device, precision, runs, memory, flops, peak)
    result["meta"]["timed_steps"] = steps
    # the 1-minute load average around the measurement: other processes on the machine (0 = idle)
    result["meta"]["loadavg_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
    result["meta"]["config"] = {k: v for k, v in cfg.to_dict().items() if k != "output_dir"}
    print(format_table(result))
    if opts.json_path:
        Path(opts.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def command_line(argv: list[str] | None) -> str:
    """The command as a user would retype it (recorded in the JSON): the bench's own flags `argv` when given
    (`python -m dtl.cli bench ARGV`), else this process's command line."""
    if argv is not None:
        return shlex.join(["python", "-m", "dtl.cli", "bench", *argv])
    prog = Path(sys.argv[0]).name
    head = ["python", "-m", "dtl.cli"] if prog == "cli.py" else [prog]  # `python -m dtl.cli bench` or `dtl bench`
    return shlex.join([*head, *sys.argv[1:]])


def run(args: argparse.Namespace, command: str) -> int:
    """Handler for `dtl bench` (and `python -m dtl.cli bench`): parsed flags in, exit code out."""
    if args.probe:
        spec = json.loads(Path(args.probe).read_text())
        Path(spec["out"]).write_text(json.dumps(probe(spec, build_loop)))
        return 0
    cfg = bench_config(args)
    if cfg.data.dataset == "folder":
        run_folder_bench(cfg, options_from_args(args, command))
    else:
        run_bench(cfg, options_from_args(args, command))
    return 0

