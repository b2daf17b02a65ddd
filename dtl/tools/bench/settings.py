"""`dtl bench`'s settings: its flags (`train`'s, same names and meaning, plus the bench's own), the bench's own
settings as `Options`, and the training `Config` it benchmarks (`bench_config`: synthetic data unless told
otherwise)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from dtl.config import Config
from dtl.config.loading import add_config_arguments, config_from_args, load_toml
from dtl.distributed import DistEnv, pick_device
from dtl.errors import UserError
from dtl.tools.bench.timing import MIN_SECONDS_CPU_INPUT, MIN_SECONDS_GPU

#: Synthetic train/test images when --train-subset/--eval-subset are not given: small on a CPU, CIFAR-10's
#: size on a GPU.
SYNTHETIC_COUNTS = {"cpu": (2000, 500), "cuda": (50_000, 10_000)}


@dataclasses.dataclass
class Options:
    """The bench's own settings (the model/data/device ones are a `Config`)."""

    steps: int = 5
    warmup: int = 2
    repeats: int = 3
    memory: str = "subprocess"
    flops: bool | None = None
    threads: int | None = None
    json_path: str | None = None
    command: str = ""
    input_steps: int = 50
    min_seconds: float | None = None
    """Timed seconds a measurement must reach (None: `dtl.tools.bench.timing.min_seconds`'s defaults per device
    and phase)."""

    def steps_for(self, phase: str) -> int:
        return self.input_steps if phase.startswith("input") else self.steps


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
