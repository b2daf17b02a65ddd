"""`dtl bench`: dtl's loop against two references, same device, model, mode, image size and batch.

    dtl bench --model vgg16 --mode transfer --weights vgg16.pth --image-size 224 --batch-size 8 --steps 3
    python -m dtl.cli bench ...   # the same

Three loops are built side by side and timed **interleaved** (the order rotating between rounds) after a
warm-up, so load from other processes hits all alike; the median of ``--repeats`` measurements is reported:

* ``reference``: the seed article's recipe exactly (`dtl.tools.bench.article_loop`: PIL per image, fp32, a host sync
  per step);
* ``strong``: the loop a competent user writes by hand (`dtl.tools.bench.strong_loop`: uint8 data on the device,
  resize and normalise there, dtl's precision and memory format, fused SGD, no host sync);
* ``dtl``: built by ``dtl.train.build.prepare`` with the chosen settings (device-resident data with batched exact
  augmentation, channels_last, foreach/fused optimizer, precision), stepped with ``dtl.train.step.train_step`` and
  evaluated with ``dtl.evaluate.evaluate`` -- the training run's own code -- with no host sync inside the
  timed region except the one at its end.

Both ratios are reported: ``dtl/ref`` (``ratio`` in the JSON) and ``dtl/strong`` (``ratio_strong``).

How long a measurement runs: ``--steps`` (``--input-steps`` for input phases) at least; on a GPU as many more
as make at least `MIN_SECONDS_GPU` of timed work per phase and side (timed with CUDA events; a few steps are
microseconds of noise there), and on a CPU `MIN_SECONDS_CPU_INPUT` for the input phases (whose batches take
microseconds), the count decided per side and phase from one timed measurement after the warm-up.

Phases (images/s): ``input`` (training batches produced by the pipeline alone), ``train_step`` (pipeline +
training step, as a user sees it), ``eval_step`` (eval pipeline + forward). Peak memory is measured in a
fresh subprocess per side (so one side's tensors never count for the other; on a CPU the two run
concurrently, on a GPU one after the other): phases run there in the order input -> eval_step -> train_step
and the peak is reset before each (``/proc/self/clear_refs``), so each phase's number is the peak RSS (and on
a GPU ``torch.cuda.max_memory_allocated``) of a process holding only that side while it runs that phase.
On a GPU the achieved TFLOP/s of each loop (FLOPs counted by ``FlopCounterMode`` on one batch) and their
fraction of a bf16 matmul rate measured in the same run are reported too.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dtl import models
from dtl.config import Config
from dtl.config.loading import add_config_arguments, config_from_args, load_toml
from dtl.data.augment import mix
from dtl.distributed import DistEnv, ProcessGroups, pick_device
from dtl.errors import UserError
from dtl.tools.bench.article_loop import ReferenceLoop, endless
from dtl.tools.bench.folder_input import run_folder_bench
from dtl.tools.bench.input_phases import extra_phases, reference_runner
from dtl.tools.bench.report import PHASES, SIDES, Options, assemble, format_table
from dtl.tools.bench.strong_loop import StrongLoop
from dtl.train.build import prepare
from dtl.train.evaluate import evaluate
from dtl.train.metrics import Meter
from dtl.train.step import NonFiniteSteps, train_step

#: The memory probe's phase order: lightest first, so memory a phase leaves behind never exceeds the next's.
PROBE_ORDER = ("input", "eval_step", "train_step")
#: Synthetic train/test images when --train-subset/--eval-subset are not given: small on a CPU, CIFAR-10's
#: size on a GPU.
SYNTHETIC_COUNTS = {"cpu": (2000, 500), "cuda": (50_000, 10_000)}
MATMUL_SIZE = 8192
#: seconds of timed work per measurement of every phase on a GPU, and of the input phases on a CPU
MIN_SECONDS_GPU = 2.0
MIN_SECONDS_CPU_INPUT = 1.0
#: the most steps a measurement is stretched to (a phase that takes no time must not run forever)
MAX_STEPS = 100_000


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """`train`'s flags (same names, same meaning) plus the bench's own."""
    add_config_arguments(parser)
    group = parser.add_argument_group("bench")
    group.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default: 5)")
    group.add_argument("--input-steps", type=int, default=None, help="timed batches per measurement of the "
                       "input phase, which is cheap (default: 10 x --steps)")
    group.add_argument("--warmup", type=int, default=2, help="untimed steps per side and phase first (default: 2)")
    group.add_argument("--repeats", type=int, default=3, help="interleaved measurements per side and phase; the "
                       "median is reported (default: 3)")
    group.add_argument("--memory", choices=("subprocess", "off"), default="subprocess",
                       help="peak memory per side and phase, each side in a fresh subprocess (default), or off")
    group.add_argument("--flops", action=argparse.BooleanOptionalAction, default=None,
                       help="count FLOPs of one batch and report TFLOP/s (default: on for CUDA only)")
    group.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both sides "
                       "(default: torch's choice)")
    group.add_argument("--json", dest="json_path", metavar="PATH", help="also write the results as JSON")
    group.add_argument("--min-seconds", type=float, default=None, metavar="S",
                       help=f"timed seconds each measurement is stretched to (default: {MIN_SECONDS_GPU:g} on GPUs, "
                            f"{MIN_SECONDS_CPU_INPUT:g} for the input phases on CPUs, else --steps as given)")
    group.add_argument("--probe", help=argparse.SUPPRESS)  # internal: the memory subprocess's spec file


def options_from_args(args: argparse.Namespace, command: str) -> Options:
    input_steps = args.input_steps if args.input_steps is not None else 10 * args.steps
    opts = Options(args.steps, args.warmup, args.repeats, args.memory, args.flops, args.threads,
                   args.json_path, command, input_steps, args.min_seconds)
    for name in ("steps", "input_steps", "repeats"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    if opts.min_seconds is not None and opts.min_seconds < 0:
        raise UserError(f"--min-seconds must be >= 0, got {opts.min_seconds}")
    if opts.warmup < 0 or (opts.threads is not None and opts.threads < 1):
        raise UserError(f"--warmup must be >= 0 and --threads >= 1, got {opts.warmup} and {opts.threads}")
    return opts


def bench_config(args: argparse.Namespace, device: torch.device | None = None) -> Config:
    """`train`'s config, with the bench's data defaults: synthetic data unless --dataset/--data-dir say
    otherwise, and CIFAR-sized on a GPU / small on a CPU unless --train-subset/--eval-subset are given."""
    args = argparse.Namespace(**vars(args))  # the caller's namespace stays as parsed
    toml = load_toml(Path(args.config)) if getattr(args, "config", None) else {}
    if args.dataset is None and "dataset" not in toml:
        args.dataset = "cifar10" if (args.data_dir or "data_dir" in toml) else "synthetic"
    cfg = config_from_args(args)
    if cfg.data.dataset == "folder":  # the folder input phase (`dtl.tools.bench.folder_input`)
        return cfg
    device = device or pick_device(DistEnv(), cfg.dist.device)
    if cfg.data.dataset == "synthetic":
        n_train, n_test = SYNTHETIC_COUNTS["cuda" if device.type == "cuda" else "cpu"]
        cfg = cfg.replace(train_subset=cfg.data.train_subset or n_train, eval_subset=cfg.data.eval_subset or n_test)
    return cfg


# ---- helpers -----------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> bool:
    """Reset the process's peak RSS (Linux: write 5 to /proc/self/clear_refs) and the CUDA peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak RSS (MiB) since the last reset; on a GPU also the peak of allocated device memory (MiB)."""
    out: dict[str, float] = {}
    try:
        status = Path("/proc/self/status").read_text()
        out["peak_rss_mib"] = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        import resource

        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


# ---- dtl's loop --------------------------------------------------------------------------------

class DtlLoop:
    """dtl's own pipeline and steps: built by `dtl.train.build.prepare`, stepped by `dtl.train.step.train_step`
    (grad_accum micro-batches per step), evaluated by `dtl.train.evaluate.evaluate`."""

    name = "dtl"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.parts, self.state = prepare(cfg, ProcessGroups(), device)
        self.device = device
        self.train_batches = endless(self.parts.train_loader)
        self.eval_batches = endless(self.parts.eval_loader)
        self.criterion = mix.criterion_for(cfg.optim, self.parts.class_weights)
        self.meter = Meter(device)
        self.nonfinite = NonFiniteSteps()
        self.mixed = 0  # batches mixed by `input` (the mixer's batch index)

    def context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def input(self, steps: int) -> int:
        """The training input as the loop gets it: the loader's batches, mixed when --mixup/--cutmix is on."""
        count = 0
        for _ in range(steps):
            images, labels = next(self.train_batches)
            if self.parts.mixer is not None:
                self.parts.mixer(images, labels, 0, self.mixed)
                self.mixed += 1
            count += int(labels.shape[0])
        return count

    def train_batch(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        """One step on one micro-batch (FLOP counting)."""
        return train_step(self.parts, self.state, [(images, labels)], self.criterion, self.meter, self.nonfinite).images

    def eval_batch(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        return self._evaluate([(images, labels)])

    def _evaluate(self, batches: Any) -> int:
        parts = self.parts
        return evaluate(parts.model.wrapped, batches, self.device, parts.groups, parts.precision,
                        len(parts.splits.classes), desc=None).count

    def train_step(self, steps: int) -> int:
        parts = self.parts
        # the meter and the non-finite record keep each step's tensors until read; the bench never reads them
        self.meter, self.nonfinite = Meter(self.device), NonFiniteSteps()
        parts.model.wrapped.train()
        models.freeze_frozen_norms(parts.model.wrapped, all_stats=parts.cfg.backbone.freeze_bn_stats)
        return sum(train_step(parts, self.state, [next(self.train_batches) for _ in range(parts.accum)],
                              self.criterion, self.meter, self.nonfinite).images for _ in range(steps))

    def eval_step(self, steps: int) -> int:
        return self._evaluate(itertools.islice(self.eval_batches, steps))


Loop = ReferenceLoop | StrongLoop | DtlLoop
LOOPS = {"reference": ReferenceLoop, "strong": StrongLoop, "dtl": DtlLoop}


def build_loop(side: str, cfg: Config, device: torch.device) -> Loop:
    return LOOPS[side](cfg, device)


# ---- timing ------------------------------------------------------------------------------------

#: side -> phase -> the function that runs `steps` steps of it and returns the images it made
Runners = dict[str, dict[str, Callable[[int], int]]]


def runners(loops: dict[str, Loop], cfg: Config, device: torch.device) -> Runners:
    """Every phase of every side: the loops' own, then the extra input phases that apply (`dtl.bench_input`),
    where dtl's side is its training loader and the reference side a torchvision v2 pipeline (the strong loop
    has no augmentation to compare)."""
    out: Runners = {side: {phase: getattr(loop, phase) for phase in PHASES} for side, loop in loops.items()}
    dtl_loop = loops["dtl"]
    for phase in extra_phases(cfg):
        out["dtl"][phase] = dtl_loop.input
        out["reference"][phase] = reference_runner(phase, cfg, dtl_loop.parts.splits.train, device)  # type: ignore[union-attr]
    return out


def min_seconds(device: torch.device, phase: str, override: float | None = None) -> float:
    """Seconds of timed work a measurement of `phase` must reach on `device` (`override`: --min-seconds)."""
    if override is not None:
        return override
    if device.type == "cuda":
        return MIN_SECONDS_GPU
    return MIN_SECONDS_CPU_INPUT if phase.startswith("input") else 0.0


def timed_run(loop: Loop, fn: Callable[[int], int], steps: int) -> tuple[int, float]:
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


def timed(loop: Loop, phase: str, steps: int, fn: Callable[[int], int] | None = None) -> float:
    """Images per second of `steps` steps of one phase."""
    images, seconds = timed_run(loop, fn or getattr(loop, phase), steps)
    return images / max(seconds, 1e-9)


def calibrated_steps(loop: Loop, fn: Callable[[int], int], steps: int, seconds: float) -> int:
    """`steps`, or as many more as make `seconds` of timed work, judged from one timed run of `steps`."""
    if seconds <= 0:
        return steps
    _, took = timed_run(loop, fn, steps)
    return min(max(steps, math.ceil(steps * seconds / max(took, 1e-9))), MAX_STEPS)


def warm_up(loops: dict[str, Loop], run: Runners, steps: int) -> None:
    for phase in run["dtl"]:
        for side, loop in loops.items():
            if steps and phase in run[side]:
                timed(loop, phase, steps, run[side][phase])


def plan_steps(loops: dict[str, Loop], run: Runners, opts: Options) -> dict[str, dict[str, int]]:
    """Steps per measurement for each side and phase (`calibrated_steps` where a minimum time applies)."""
    return {side: {phase: calibrated_steps(loops[side], fn, opts.steps_for(phase),
                                           min_seconds(loops[side].device, phase, opts.min_seconds))
                   for phase, fn in run[side].items()} for side in loops}


def interleaved(loops: dict[str, Loop], run: Runners, opts: Options,
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


def count_flops(loop: Loop) -> dict[str, float]:
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


# ---- memory: one subprocess per side -----------------------------------------------------------

def probe(spec: dict[str, Any]) -> dict[str, dict[str, float]]:
    """In a fresh process: build one side, run each phase after resetting the peaks, read the peaks."""
    torch.set_num_threads(spec["threads"])
    cfg = Config.from_dict(spec["config"])
    device = pick_device(DistEnv(), cfg.dist.device)
    loop = build_loop(spec["side"], cfg, device)
    out = {}
    for phase in PROBE_ORDER:
        if not reset_peak_memory(device):
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): use --memory off")
        with loop.context():
            getattr(loop, phase)(spec["steps"])
        synchronize(device)
        out[phase] = peak_memory(device)
    return out


def measure_memory(cfg: Config, opts: Options, tmp: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Peak memory per side and phase, each side in its own fresh `python -m dtl.cli bench --probe` process.
    On a CPU the two run at the same time (peaks are per process, and nothing is timed there); on a GPU one
    after the other, with this process's cached blocks released first, so each probe has the GPU to itself."""
    sequential = cfg.dist.device != "cpu" and torch.cuda.is_available()
    if sequential:
        torch.cuda.empty_cache()
    procs = {}
    for side in SIDES:
        spec_path = tmp / f"probe-{side}.json"
        spec = {"config": cfg.to_dict(), "side": side, "steps": max(opts.warmup, 1) + 1,
                "threads": torch.get_num_threads(), "out": str(tmp / f"probe-{side}.out.json")}
        spec_path.write_text(json.dumps(spec))
        with open(tmp / f"probe-{side}.log", "w") as log_file:
            procs[side] = subprocess.Popen([sys.executable, "-m", "dtl.cli", "bench", "--probe", str(spec_path)],
                                           stdout=log_file, stderr=subprocess.STDOUT)
        if sequential:
            procs[side].wait()
    print(f"  memory: {' and '.join(SIDES)}, each in a subprocess", file=sys.stderr, flush=True)
    result = {}
    for side, proc in procs.items():
        code, out_path = proc.wait(), tmp / f"probe-{side}.out.json"
        if code != 0 or not out_path.is_file():
            log_tail = (tmp / f"probe-{side}.log").read_text()[-3000:]
            raise RuntimeError(f"memory probe for {side} failed (exit {code}):\n{log_tail}")
        result[side] = json.loads(out_path.read_text())
    return result


# ---- entry points ------------------------------------------------------------------------------

def measure(cfg: Config, opts: Options, device: torch.device
            ) -> tuple[dict, dict[str, str], dict | None, float | None, dict[str, dict[str, int]]]:
    """Build both loops, warm up, time them interleaved; FLOPs and the matmul yardstick when asked."""
    loops = {side: build_loop(side, cfg, device) for side in SIDES}
    precision = {"reference": "fp32", "strong": loops["strong"].precision.name,
                 "dtl": loops["dtl"].parts.precision.name}
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
        Path(spec["out"]).write_text(json.dumps(probe(spec)))
        return 0
    cfg = bench_config(args)
    if cfg.data.dataset == "folder":
        run_folder_bench(cfg, options_from_args(args, command))
    else:
        run_bench(cfg, options_from_args(args, command))
    return 0

