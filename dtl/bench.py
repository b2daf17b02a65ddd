"""`dtl bench`: the reference recipe's loop against dtl's loop, same device, model, mode, image size and batch.

    dtl bench --model vgg16 --mode transfer --weights vgg16.pth --image-size 224 --batch-size 8 --steps 3
    python -m dtl.bench ...   # the same

Two loops are built side by side and timed **interleaved** (reference, dtl, dtl, reference, ...) after a
warm-up, so load from other processes hits both alike; the median of ``--repeats`` measurements is reported:

* ``reference``: the reference recipe exactly -- CIFAR-format uint8 images made into PIL images, per-image
  torchvision transforms in a ``DataLoader`` (``num_workers=0``, ``shuffle=True``), fp32, plain SGD
  (lr 1e-3, momentum 0.9) over the parameters the mode trains, and ``loss.item()`` + ``torch.sum(preds ==
  labels)`` (host syncs) every step;
* ``dtl``: built by ``dtl.engine.prepare`` with the chosen settings (device-resident data with batched exact
  augmentation, channels_last, foreach/fused optimizer, precision), stepped with ``engine.forward_backward``
  + ``engine.optimizer_step`` and evaluated as ``engine.evaluate`` does, with no host sync inside the timed
  region except the one at its end.

Phases (images/s): ``input`` (training batches produced by the pipeline alone), ``train_step`` (pipeline +
training step, as a user sees it), ``eval_step`` (eval pipeline + forward). Peak memory is measured in a
fresh subprocess per side (so one side's tensors never count for the other; the two run concurrently):
phases run there in the order input -> eval_step -> train_step and the peak is reset before each
(``/proc/self/clear_refs``), so each phase's number is the peak RSS (and on a GPU
``torch.cuda.max_memory_allocated``) of a process holding only that side while it runs that phase.
On a GPU the achieved TFLOP/s (FLOPs counted by ``FlopCounterMode`` on one batch) and their fraction of a
bf16 matmul rate measured in the same run are reported too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dtl.config import Config, add_config_arguments, config_from_args, load_toml
from dtl.dist import DistEnv, pick_device
from dtl.errors import EXIT_USAGE, UserError

if TYPE_CHECKING:
    from dtl.cifar import Split
    from dtl.engine import Run

PHASES = ("input", "train_step", "eval_step")
SIDES = ("reference", "dtl")
#: The memory probe's phase order: lightest first, so memory a phase leaves behind never exceeds the next's.
PROBE_ORDER = ("input", "eval_step", "train_step")
REFERENCE_LR, REFERENCE_MOMENTUM = 1e-3, 0.9
#: Synthetic train/test images when --train-subset/--eval-subset are not given: small on a CPU, CIFAR-10's
#: size on a GPU.
SYNTHETIC_COUNTS = {"cpu": (2000, 500), "cuda": (50_000, 10_000)}
MATMUL_SIZE = 8192


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

    def steps_for(self, phase: str) -> int:
        return self.input_steps if phase == "input" else self.steps


# ---- command line ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    group.add_argument("--probe", help=argparse.SUPPRESS)  # internal: the memory subprocess's spec file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dtl.bench", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def options_from_args(args: argparse.Namespace, command: str) -> Options:
    input_steps = args.input_steps if args.input_steps is not None else 10 * args.steps
    opts = Options(args.steps, args.warmup, args.repeats, args.memory, args.flops, args.threads,
                   args.json_path, command, input_steps)
    for name in ("steps", "input_steps", "repeats"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
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
    if cfg.dataset not in ("synthetic", "cifar10", "cifar100"):
        raise UserError(f"dtl bench compares CIFAR-format data only (synthetic, cifar10, cifar100), got "
                        f"--dataset {cfg.dataset}")
    device = device or pick_device(DistEnv(), cfg.device)
    if cfg.dataset == "synthetic":
        n_train, n_test = SYNTHETIC_COUNTS["cuda" if device.type == "cuda" else "cpu"]
        cfg = dataclasses.replace(cfg, train_subset=cfg.train_subset or n_train,
                                  eval_subset=cfg.eval_subset or n_test)
    return cfg


# ---- helpers -----------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def endless(loader: Iterable) -> Iterator[Any]:
    """Batches forever, one pass (epoch) after another, like a multi-epoch run."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


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


# ---- the reference loop ------------------------------------------------------------------------

class CifarPIL(torch.utils.data.Dataset):
    """What `torchvision.datasets.CIFAR10.__getitem__` does: an HWC uint8 array -> PIL image -> transform."""

    def __init__(self, split: Split, transform: Callable[[Any], torch.Tensor]) -> None:
        self.data = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def reference_transform(train: bool, size: int) -> Callable[[Any], torch.Tensor]:
    """The reference recipe's per-image PIL transforms (torchvision.transforms, v1)."""
    from torchvision import transforms

    from dtl.augment import IMAGENET_MEAN, IMAGENET_STD

    head = ([transforms.RandomResizedCrop(size, scale=(0.5, 1.0)), transforms.RandomHorizontalFlip()]
            if train else [transforms.Resize(size)])
    return transforms.Compose([*head, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ReferenceLoop:
    """The reference recipe's data pipeline and train/test loops, one method per benchmarked phase."""

    name = "reference"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        from torch.utils.data import DataLoader

        from dtl import data as dtl_data
        from dtl import models

        splits = dtl_data.load_splits(cfg, allow_download=False)
        torch.manual_seed(cfg.seed)
        net = models.build_model(cfg.model, len(splits.classes), cfg.weights, cfg.image_size, cfg.dropout)
        models.freeze(net, cfg.model, cfg.mode, cfg.finetune_last_n)  # the same trainable set as dtl
        self.device, self.net = device, net.to(device)
        params = [p for p in net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params=params, lr=REFERENCE_LR, momentum=REFERENCE_MOMENTUM)
        self.criterion = nn.CrossEntropyLoss()
        size, bsz = cfg.image_size, cfg.batch_size
        self.train_batches = endless(DataLoader(CifarPIL(splits.train, reference_transform(True, size)),
                                                batch_size=bsz, shuffle=True))
        self.eval_batches = endless(DataLoader(CifarPIL(splits.test, reference_transform(False, size)),
                                               batch_size=bsz, shuffle=False))
        self.epoch_loss, self.epoch_corrects = 0.0, 0

    def context(self) -> contextlib.AbstractContextManager:
        """The recipe never turns on cuDNN autotuning (dtl's prepare does, process-wide)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.backends.cudnn.flags(enabled=True, benchmark=False)

    def input(self, steps: int) -> int:
        images = 0
        for _ in range(steps):
            inputs, labels = next(self.train_batches)
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            images += inputs.size(0)
        return images

    def train_batch(self, inputs: torch.Tensor, labels: torch.Tensor) -> int:
        inputs, labels = inputs.to(self.device), labels.to(self.device)
        self.optimizer.zero_grad()
        with torch.set_grad_enabled(True):
            outputs = self.net(inputs)
            loss = self.criterion(outputs, labels)
            _, preds = torch.max(outputs, 1)
            loss.backward()
            self.optimizer.step()
        self.epoch_loss += loss.item() * inputs.size(0)
        self.epoch_corrects += torch.sum(preds == labels.data)
        return inputs.size(0)

    def eval_batch(self, inputs: torch.Tensor, labels: torch.Tensor) -> int:
        inputs, labels = inputs.to(self.device), labels.to(self.device)
        with torch.set_grad_enabled(False):
            outputs = self.net(inputs)
            loss = self.criterion(outputs, labels)
            _, preds = torch.max(outputs, 1)
        self.epoch_loss += loss.item() * inputs.size(0)
        self.epoch_corrects += torch.sum(preds == labels.data)
        return inputs.size(0)

    def train_step(self, steps: int) -> int:
        self.net.train()
        return sum(self.train_batch(*next(self.train_batches)) for _ in range(steps))

    def eval_step(self, steps: int) -> int:
        self.net.eval()
        return sum(self.eval_batch(*next(self.eval_batches)) for _ in range(steps))


# ---- dtl's loop --------------------------------------------------------------------------------

class DtlLoop:
    """dtl's own pipeline and steps, built by `engine.prepare` and stepped as `train_one_epoch`/`evaluate` do."""

    name = "dtl"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        from dtl import engine
        from dtl.metrics import Meter

        self.run: Run = engine.prepare(cfg, DistEnv(), device)
        self.device = device
        self.train_batches = endless(self.run.train_loader)
        self.eval_batches = endless(self.run.eval_loader)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss(reduction="sum")
        self.meter, self.eval_meter = Meter(device), Meter(device)
        self.bad_step = torch.tensor(-1, device=device)
        self.loss_finite = torch.ones((), dtype=torch.bool, device=device)
        self.micro_steps = 0

    def context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def input(self, steps: int) -> int:
        return sum(int(next(self.train_batches)[1].shape[0]) for _ in range(steps))

    def train_batch(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        from dtl import engine

        run = self.run
        self.micro_steps += 1
        last_micro = self.micro_steps % run.accum == 0
        self.loss_finite &= engine.forward_backward(run, images, labels, self.criterion, self.meter,
                                                    sync=last_micro)
        if last_micro:
            engine.optimizer_step(run, self.bad_step, self.loss_finite)
            run.progress.global_step += 1
        return int(labels.shape[0])

    def eval_model(self) -> nn.Module:
        """The model `engine.evaluate` runs: without DDP/compile wrappers (a cached-features head stays a head)."""
        from dtl.dist import local_module

        return local_module(self.run.model)

    def eval_batch(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        model = self.eval_model()
        with torch.no_grad():
            with self.run.autocast():
                logits = model(images)
            self.eval_meter.update(self.eval_criterion(logits.float(), labels), (logits.argmax(1) == labels).sum(),
                                   labels.shape[0])
        return int(labels.shape[0])

    def train_step(self, steps: int) -> int:
        from dtl import models

        self.run.model.train()
        models.freeze_frozen_norms(self.run.model)
        return sum(self.train_batch(*next(self.train_batches)) for _ in range(steps))

    def eval_step(self, steps: int) -> int:
        self.eval_model().eval()
        return sum(self.eval_batch(*next(self.eval_batches)) for _ in range(steps))


Loop = ReferenceLoop | DtlLoop


def build_loop(side: str, cfg: Config, device: torch.device) -> Loop:
    return ReferenceLoop(cfg, device) if side == "reference" else DtlLoop(cfg, device)


# ---- timing ------------------------------------------------------------------------------------

def timed(loop: Loop, phase: str, steps: int) -> float:
    """Images per second of `steps` steps of one phase; the one host sync is at the end."""
    fn = getattr(loop, phase)
    with loop.context():
        synchronize(loop.device)
        start = time.perf_counter()
        images = fn(steps)
        synchronize(loop.device)
        seconds = time.perf_counter() - start
    return images / max(seconds, 1e-9)


def warm_up(loops: dict[str, Loop], steps: int) -> None:
    for phase in PHASES:
        for loop in loops.values():
            if steps:
                timed(loop, phase, steps)


def interleaved(loops: dict[str, Loop], opts: Options) -> dict[str, dict[str, list[float]]]:
    """`repeats` rounds; in each, every phase is measured on both sides back to back, the side that goes
    first alternating between rounds."""
    runs: dict[str, dict[str, list[float]]] = {side: {phase: [] for phase in PHASES} for side in loops}
    for r in range(opts.repeats):
        for phase in PHASES:
            for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                rate = timed(loops[side], phase, opts.steps_for(phase))
                runs[side][phase].append(rate)
                print(f"  round {r + 1}/{opts.repeats} {phase:<10} {side:<9} {rate:10.1f} img/s",
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
    device = pick_device(DistEnv(), cfg.device)
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
    """Peak memory per side and phase, each side in its own fresh `python -m dtl.bench --probe` process.
    On a CPU the two run at the same time (peaks are per process, and nothing is timed there); on a GPU one
    after the other, with this process's cached blocks released first, so each probe has the GPU to itself."""
    sequential = cfg.device != "cpu" and torch.cuda.is_available()
    if sequential:
        torch.cuda.empty_cache()
    procs = {}
    for side in SIDES:
        spec_path = tmp / f"probe-{side}.json"
        spec = {"config": cfg.to_dict(), "side": side, "steps": max(opts.warmup, 1) + 1,
                "threads": torch.get_num_threads(), "out": str(tmp / f"probe-{side}.out.json")}
        spec_path.write_text(json.dumps(spec))
        with open(tmp / f"probe-{side}.log", "w") as log_file:
            procs[side] = subprocess.Popen([sys.executable, "-m", "dtl.bench", "--probe", str(spec_path)],
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


# ---- the report --------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found.group(1).strip() if found else model
    return f"{model}, {os.cpu_count()} cores"


def meta(cfg: Config, opts: Options, device: torch.device, precision: str) -> dict[str, Any]:
    import torchvision

    return {"device": str(device), "device_name": device_name(device), "model": cfg.model, "mode": cfg.mode,
            "weights": cfg.weights, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
            "precision": {"reference": "fp32", "dtl": precision}, "dataset": cfg.dataset,
            "train_images": cfg.train_subset, "eval_images": cfg.eval_subset, "steps": opts.steps,
            "input_steps": opts.input_steps, "warmup": opts.warmup, "repeats": opts.repeats,
            "threads": torch.get_num_threads(), "memory": opts.memory, "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": opts.command}


def side_results(runs: dict[str, list[float]], memory: dict[str, dict[str, float]] | None,
                 flops: dict[str, float] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for phase in PHASES:
        rate = statistics.median(runs[phase])
        entry: dict[str, Any] = {"images_per_s": rate, "runs": runs[phase]}
        entry.update((memory or {}).get(phase, {}))
        if flops and phase in flops:
            entry["flops_per_image"] = flops[phase]
            entry["tflops"] = flops[phase] * rate / 1e12
        out[phase] = entry
    return out


def ratios(ref: dict[str, dict[str, Any]], ours: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """dtl / reference for every scalar both sides report (images/s, peak memory, TFLOP/s), plus
    `images_per_s_paired`: the median over rounds of each round's ratio (the two measurements of a round
    ran back to back, so a load change between rounds cancels out)."""
    keys = ("images_per_s", "peak_rss_mib", "peak_cuda_mib", "tflops")
    out = {}
    for phase in PHASES:
        out[phase] = {k: ours[phase][k] / ref[phase][k] for k in keys if k in ours[phase] and k in ref[phase]}
        pairs = zip(ours[phase]["runs"], ref[phase]["runs"])
        out[phase]["images_per_s_paired"] = statistics.median(d / r for d, r in pairs)
    return out


def assemble(cfg: Config, opts: Options, device: torch.device, precision: str,
             runs: dict[str, dict[str, list[float]]], memory: dict | None,
             flops: dict[str, dict[str, float]] | None, peak_tflops: float | None) -> dict[str, Any]:
    result: dict[str, Any] = {"meta": meta(cfg, opts, device, precision)}
    for side in SIDES:
        result[side] = side_results(runs[side], (memory or {}).get(side), (flops or {}).get(side))
    result["ratio"] = ratios(result["reference"], result["dtl"])
    if flops:
        result["meta"]["flops_per_image"] = flops
    if peak_tflops:
        result["meta"]["bf16_matmul_tflops"] = peak_tflops
        for phase in ("train_step", "eval_step"):
            result["dtl"][phase]["fraction_of_bf16_matmul"] = result["dtl"][phase]["tflops"] / peak_tflops
    return result


def format_table(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [f"dtl bench: {m['model']} {m['mode']}, {m['image_size']} px, batch {m['batch_size']}, dtl "
             f"{m['precision']['dtl']} vs reference fp32 on {m['device']} ({m['device_name']}, "
             f"{m['threads']} threads); median of {m['repeats']} rounds of {m['steps']} steps "
             f"({m['input_steps']} batches for input)",
             f"{'phase':<11}{'reference img/s':>16}{'dtl img/s':>12}{'dtl/ref':>9}{'paired':>8}"
             f"{'ref peak RSS':>14}{'dtl peak RSS':>14}{'dtl/ref':>9}"]
    for phase in PHASES:
        ref, ours, ratio = result["reference"][phase], result["dtl"][phase], result["ratio"][phase]
        mem = (f"{ref['peak_rss_mib']:>10.0f} MiB{ours['peak_rss_mib']:>10.0f} MiB"
               f"{ratio['peak_rss_mib']:>8.2f}x" if "peak_rss_mib" in ratio else "")
        lines.append(f"{phase:<11}{ref['images_per_s']:>16.1f}{ours['images_per_s']:>12.1f}"
                     f"{ratio['images_per_s']:>8.2f}x{ratio['images_per_s_paired']:>7.2f}x{mem}")
    for phase in ("train_step", "eval_step"):
        ours = result["dtl"][phase]
        if "peak_cuda_mib" in ours:
            lines.append(f"{phase}: peak CUDA memory reference {result['reference'][phase]['peak_cuda_mib']:.0f} "
                         f"MiB, dtl {ours['peak_cuda_mib']:.0f} MiB")
        if "tflops" in ours:
            frac = (f" = {ours['fraction_of_bf16_matmul']:.1%} of bf16 matmul "
                    f"({result['meta']['bf16_matmul_tflops']:.0f} TFLOP/s)" if "fraction_of_bf16_matmul" in ours
                    else "")
            ref = result["reference"][phase]
            lines.append(f"{phase}: dtl {ours['flops_per_image'] / 1e9:.2f} GFLOP/image, {ours['tflops']:.3f} "
                         f"TFLOP/s{frac}; reference {ref['flops_per_image'] / 1e9:.2f} GFLOP/image, "
                         f"{ref['tflops']:.3f} TFLOP/s")
    return "\n".join(lines)


# ---- entry points ------------------------------------------------------------------------------

def measure(cfg: Config, opts: Options, device: torch.device) -> tuple[dict, str, dict | None, float | None]:
    """Build both loops, warm up, time them interleaved; FLOPs and the matmul yardstick when asked."""
    loops = {side: build_loop(side, cfg, device) for side in SIDES}
    precision = loops["dtl"].run.precision
    print(f"  warm-up: {opts.warmup} step(s) per side and phase", file=sys.stderr, flush=True)
    warm_up(loops, opts.warmup)
    runs = interleaved(loops, opts)
    want_flops = opts.flops if opts.flops is not None else device.type == "cuda"
    flops = {side: count_flops(loop) for side, loop in loops.items()} if want_flops else None
    yardstick = want_flops and device.type == "cuda" and torch.cuda.is_bf16_supported()
    peak = matmul_tflops(device) if yardstick else None
    return runs, precision, flops, peak


def run_bench(cfg: Config, opts: Options) -> dict[str, Any]:
    """The whole benchmark; returns the result dictionary (also printed, and written to --json)."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = pick_device(DistEnv(), cfg.device)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dtl-bench-") as tmp:
        # prepare() validates the output folder but writes nothing to it: a path that never gets created.
        cfg = dataclasses.replace(cfg, output_dir=str(Path(tmp) / "run"))
        runs, precision, flops, peak = measure(cfg, opts, device)
        memory = measure_memory(cfg, opts, Path(tmp)) if opts.memory == "subprocess" else None
    result = assemble(cfg, opts, device, precision, runs, memory, flops, peak)
    # the 1-minute load average around the measurement: other processes on the machine (0 = idle)
    result["meta"]["loadavg_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
    result["meta"]["config"] = {k: v for k, v in cfg.to_dict().items() if k != "output_dir"}
    print(format_table(result))
    if opts.json_path:
        Path(opts.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _command(argv: list[str] | None) -> str:
    if argv is not None:
        return shlex.join(["python", "-m", "dtl.bench", *argv])
    prog = Path(sys.argv[0]).name
    head = ["python", "-m", "dtl.bench"] if prog in ("bench.py", "__main__.py") else [prog]
    return shlex.join([*head, *sys.argv[1:]])


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """Handler for `dtl bench` (and `python -m dtl.bench`): parsed flags in, exit code out."""
    if args.probe:
        spec = json.loads(Path(args.probe).read_text())
        Path(spec["out"]).write_text(json.dumps(probe(spec)))
        return 0
    opts = options_from_args(args, command or _command(None))
    run_bench(bench_config(args), opts)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args, _command(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
