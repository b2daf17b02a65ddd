"""GPU acceptance check: `make gpu-check` (= `bash launch/gpu_check.sh` = `python3 launch/gpu_check.py`).

For any machine with one NVIDIA GPU, offline and without a venv: it runs the repository through PYTHONPATH
with the Python that runs it (`PYTHON`, default python3, which needs torch, torchvision, accelerate,
safetensors, tqdm, matplotlib and pytest). About 7 minutes on one H200 (an estimate: not run there since the
speed step was added). Every step has its own timeout and all steps share a time budget (GPU_CHECK_BUDGET_S,
default 450 s), so a hanging step cannot stretch the check past 8 minutes.

It writes its own inputs (random torchvision weights, a synthetic CIFAR-10-format data set of CIFAR-10's size)
into a scratch folder and then runs these steps, one row each in the table printed at the end:

  inputs              weight files (torch.manual_seed(0), random init) + `dtl data synth` 50000/10000 images
  bf16_nccl_transfer  VGG16 transfer in bf16 under torchrun at world size 1 with DTL_FORCE_DISTRIBUTED=1
                      (process group + DDP on NCCL): the log names nccl and bf16, metrics.jsonl has the epoch
  fp16_overflow       VGG16 finetune in fp16 with --fp16-init-scale 1e30: the first steps overflow; they must be
                      skipped (log line / metrics key `overflow_skips`), not end the run as a non-finite loss
  preempt_resume      ResNet-18 --deterministic finetune, twice under torchrun + NCCL: SIGUSR1 to the second
                      run's worker mid-epoch -> exit 75, status "preempted" -> `--resume auto`; its final
                      model.safetensors must equal the uninterrupted run's tensor by tensor (torch.equal)
  compile_recompiles  ResNet-18 --compile finetune, 2 epochs, TORCH_LOGS=recompiles: at most 2 recompiles
  fsdp_resume         ResNet-18 --strategy fsdp (FSDP2, bf16 MixedPrecisionPolicy) --deterministic under torchrun
                      at world size 1 with DTL_FORCE_DISTRIBUTED=1 (NCCL): A trains 2 epochs; B trains 1, writing
                      a sharded checkpoint (DCP safetensors shards), then `--resume auto --epochs 2`; B's final
                      model.safetensors must equal A's tensor by tensor
  cache_features      VGG16 --cache-features: computed by a first run, reused by a `--resume auto` second one
  speed               issue #18's table: dtl's `train.py` epoch rate (metrics.jsonl images_per_sec of the 2nd
                      epoch; VGG16 transfer 32 px b256, transfer 224 px b256, finetune 224 px b64 and b256,
                      --cache-features) beside the strong hand-written loop's train-step rate
                      (`python -m dtl.tools.bench.strong_rate`, one process for all cases), as ratios, with dtl's
                      TFLOP/s against the measured bf16 matmul rate; FAIL when a goal of the issue is missed
  bench               `dtl bench` VGG16 transfer at 32 px and finetune at 224 px: images/s of dtl, of the
                      reference loop and of the strong loop, both ratios, TFLOP/s
  pytest_cuda         the suite's CUDA-only tests: pytest -m cuda (none collected -> SKIP)

Exit code: 0 when no step FAILed, 1 when one did, 2 when no CUDA device is visible (one line, nothing run).
Runs and logs stay in the scratch folder; a failed step prints the last lines of its log. The JSON report
(every figure, the GPU, the torch/CUDA/cuDNN/NCCL versions) goes to GPU_CHECK_JSON, and to $OUT/gpu_check.json
too when OUT is set.

Environment:
  PYTHON                 the interpreter (read by launch/gpu_check.sh; default python3)
  GPU_CHECK_DIR          scratch folder (default: a new temporary folder)
  GPU_CHECK_JSON         the JSON report (default: GPU_CHECK_DIR/gpu_check.json)
  GPU_CHECK_BUDGET_S     seconds all steps may take together (default 450; 480 for the CPU smoke run)
  GPU_CHECK_STEPS        comma-separated step names to run (default: all; the others show SKIP)
  GPU_CHECK_CPU_SMOKE=1  the same flow on the CPU with tiny settings (gloo instead of NCCL, SqueezeNet and
                         ResNet-18, a few hundred images), to test the check itself (tests/test_gpu_check.py)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import torch
except ImportError as missing:  # the machine's python3 without torch: say which interpreter, in one line
    print(f"gpu-check: {sys.executable} cannot import torch ({missing}); set PYTHON to an interpreter that has "
          "torch, torchvision and pytest", file=sys.stderr)
    sys.exit(2)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
EXIT_USAGE = 2
"""No CUDA device (and no GPU_CHECK_CPU_SMOKE=1), or an unknown step in GPU_CHECK_STEPS."""
EXIT_PREEMPTED = 75
TAIL_LINES = 30
MAX_RECOMPILES = 2
MIN_STEP_SECONDS = 15.0
"""A step is not started with less than this left of the budget (it is SKIPped instead)."""


# ---- the two flavours: the real check on a GPU, and the CPU smoke run ---------------------------

@dataclasses.dataclass(frozen=True)
class Profile:
    """Models and sizes of one flavour of the check. Each step's flags are added to the data flags."""

    name: str
    backend: str
    """The process-group backend the torchrun steps must report."""
    device: tuple[str, ...]
    synth: tuple[int, int]
    """Train and test images written by `dtl data synth`."""
    bf16: tuple[str, ...]
    fp16: tuple[str, ...]
    resume: tuple[str, ...]
    compile: tuple[str, ...] | None
    """None: the step is SKIPped (with `compile_skip` as the reason)."""
    cache: tuple[str, ...]
    fsdp: tuple[str, ...]
    bench: tuple[tuple[str, tuple[str, ...]], ...]
    bench_common: tuple[str, ...]
    speed: tuple[tuple[str, tuple[str, ...]], ...]
    """`speed` cases: label and the flags of both loops (model, mode, image size, batch size)."""
    speed_dtl: tuple[str, ...]
    """Flags only dtl's `train.py` runs get (its data subsets, epochs)."""
    speed_strong: tuple[str, ...]
    """Flags only the strong loop gets (its data, warm-up, fewest timed steps)."""
    speed_cached: tuple[str, ...]
    """The --cache-features case: dtl only (the strong loop has no cached features)."""
    budget_s: float
    compile_skip: str = ""
    speed_goals: bool = False
    """FAIL the speed step when a goal of issue #18 is missed (GPU only: tiny CPU runs say nothing)."""


GPU = Profile(
    name="gpu", backend="nccl", device=(), synth=(50_000, 10_000),
    bf16=("--model", "vgg16", "--batch-size", "256"),
    # 128 steps: from 1e30 the halving loss scale needs roughly 75 overflowing steps to reach a finite range,
    # so the run shows both the skipped steps and the updates after them
    fp16=("--model", "vgg16", "--batch-size", "32", "--train-subset", "4096", "--eval-subset", "1024"),
    # 782 short steps per epoch: the signal (sent a quarter into epoch 1) lands inside it however fast the GPU
    resume=("--model", "resnet18", "--batch-size", "64", "--eval-subset", "2000"),
    # partial last batches in both splits, as with the real CIFAR-10 sizes (50000 % 256, 10000 % 256 != 0)
    compile=("--model", "resnet18", "--batch-size", "256", "--train-subset", "5000", "--eval-subset", "1000"),
    cache=("--model", "vgg16", "--batch-size", "256", "--train-subset", "20000", "--eval-subset", "5000"),
    fsdp=("--model", "resnet18", "--batch-size", "128", "--train-subset", "2560", "--eval-subset", "512",
          "--precision", "bf16"),
    bench=(("vgg16_transfer_32px", ("--model", "vgg16", "--mode", "transfer", "--image-size", "32",
                                    "--batch-size", "256")),
           ("vgg16_finetune_224px", ("--model", "vgg16", "--mode", "finetune", "--image-size", "224",
                                     "--batch-size", "64"))),
    # one round: each measurement is >= 2 s of timed work on a GPU (dtl.tools.bench.compare.MIN_SECONDS_GPU),
    # 3 loops x 3 phases
    bench_common=("--flops", "--steps", "5", "--warmup", "2", "--repeats", "1", "--input-steps", "10",
                  "--memory", "off", "--train-subset", "10000", "--eval-subset", "2000"),
    speed=(("transfer_32px_b256", ("--model", "vgg16", "--mode", "transfer", "--image-size", "32",
                                   "--batch-size", "256")),
           ("transfer_224px_b256", ("--model", "vgg16", "--mode", "transfer", "--image-size", "224",
                                    "--batch-size", "256")),
           ("finetune_224px_b64", ("--model", "vgg16", "--mode", "finetune", "--image-size", "224",
                                   "--batch-size", "64")),
           ("finetune_224px_b256", ("--model", "vgg16", "--mode", "finetune", "--image-size", "224",
                                    "--batch-size", "256"))),
    # 2 epochs of about 2 s each at the rates (the 2nd is reported: the 1st pays cuDNN autotuning)
    speed_dtl=("--epochs", "2", "--eval-subset", "512"),
    speed_strong=("--train-subset", "10000", "--eval-subset", "512", "--warmup", "8", "--steps", "30"),
    speed_cached=("--model", "vgg16", "--mode", "transfer", "--image-size", "32", "--batch-size", "256",
                  "--train-subset", "25600"),
    budget_s=450.0,
    speed_goals=True,
)
#: images per epoch of each GPU speed case (about 2 s at the issue's rates)
SPEED_TRAIN_IMAGES = {"transfer_32px_b256": 25_600, "transfer_224px_b256": 10_240, "finetune_224px_b64": 6_400,
                      "finetune_224px_b256": 7_680}
#: issue #18's goals: dtl's epoch rate / the strong loop's train-step rate, per case
SPEED_GOALS = {"transfer_32px_b256": 1.0, "transfer_224px_b256": 1.2, "finetune_224px_b64": 1.0,
               "finetune_224px_b256": 1.0}
CACHED_GOAL_IMG_S = 1_000_000
#: finetune 224 px batch 256: dtl's TFLOP/s at least this fraction of the measured bf16 matmul rate
PEAK_GOAL = ("finetune_224px_b256", 0.45)

_TINY = ("--model", "squeezenet1_1", "--batch-size", "16")
CPU_SMOKE = Profile(
    name="cpu-smoke", backend="gloo", device=("--device", "cpu"), synth=(512, 128),
    bf16=(*_TINY, "--train-subset", "128", "--eval-subset", "64"),
    # fp16 is emulated on a CPU (about 1 s a step here): 2 steps
    fp16=(*_TINY, "--train-subset", "32", "--eval-subset", "16"),
    resume=(*_TINY, "--train-subset", "480", "--eval-subset", "32"),
    compile=None,
    compile_skip="CPU smoke: torch.compile (inductor) takes minutes on a small CPU; this step needs the GPU run",
    # not SqueezeNet: --cache-features fails on it (FeatureHead runs the 1x1 head conv without the pooling after it)
    cache=("--model", "resnet18", "--batch-size", "32", "--train-subset", "128", "--eval-subset", "64"),
    fsdp=(*_TINY, "--train-subset", "64", "--eval-subset", "32"),
    bench=(("squeezenet_transfer_32px", ("--model", "squeezenet1_1", "--mode", "transfer", "--image-size", "32",
                                         "--batch-size", "16")),
           ("squeezenet_finetune_32px", ("--model", "squeezenet1_1", "--mode", "finetune", "--image-size", "32",
                                         "--batch-size", "16"))),
    bench_common=("--flops", "--steps", "1", "--warmup", "0", "--repeats", "1", "--input-steps", "1",
                  "--memory", "off", "--threads", "1", "--train-subset", "64", "--eval-subset", "32"),
    speed=(("transfer_32px_b16", ("--model", "squeezenet1_1", "--mode", "transfer", "--image-size", "32",
                                  "--batch-size", "16")),
           ("finetune_32px_b16", ("--model", "squeezenet1_1", "--mode", "finetune", "--image-size", "32",
                                  "--batch-size", "16"))),
    speed_dtl=("--epochs", "2", "--train-subset", "64", "--eval-subset", "32"),
    speed_strong=("--train-subset", "64", "--eval-subset", "32", "--warmup", "1", "--steps", "2", "--threads",
                  "1"),
    speed_cached=("--model", "resnet18", "--mode", "transfer", "--image-size", "32", "--batch-size", "32",
                  "--train-subset", "128"),
    budget_s=480.0,
)


# ---- running things ------------------------------------------------------------------------------

class StepFailed(Exception):
    """A check did not hold: the step is FAIL with this reason."""


class StepSkipped(Exception):
    """The step cannot run here: SKIP with this reason."""


class StepTimeout(StepFailed):
    pass


@dataclasses.dataclass
class Outcome:
    name: str
    result: str = "PASS"
    seconds: float = 0.0
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    reason: str = ""
    summary: str = ""
    """What the table shows instead of every figure (when they are many)."""
    log: str | None = None
    log_tail: list[str] | None = None


class Context:
    """The scratch folder, the subprocesses a step started, and the clock."""

    def __init__(self, profile: Profile, scratch: Path, budget_s: float) -> None:
        self.profile = profile
        self.scratch = scratch
        self.logs = scratch / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + budget_s
        self.step_deadline = self.deadline
        self.procs: dict[subprocess.Popen, str] = {}
        self.last_log: Path | None = None
        self.data = scratch / "data"
        self.weights: dict[str, Path] = {}
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.env["PYTHONUNBUFFERED"] = "1"
        if profile.name == "cpu-smoke":
            self.env.setdefault("OMP_NUM_THREADS", "1")

    # -- processes --
    def start(self, label: str, cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        """Start `cmd` in its own process group (so a timeout can stop it with all its children), output to
        logs/<label>.log, whose first line is the command to rerun it by hand."""
        log = self.logs / f"{label}.log"
        extra = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        with open(log, "w") as f:
            f.write(f"$ cd {shlex.quote(str(ROOT))} && {extra + ' ' if extra else ''}{shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **(env or {})}, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[proc] = label
        self.last_log = log
        return proc, log

    def wait(self, proc: subprocess.Popen) -> int:
        try:
            return proc.wait(timeout=max(self.step_deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            label = self.procs.get(proc, proc.args[0])
            self.stop_all()
            raise StepTimeout(f"timed out waiting for {label}") from None

    def run(self, label: str, cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run to the end (or the step's timeout); the exit code and the log's text."""
        proc, log = self.start(label, cmd, env)
        code = self.wait(proc)
        return code, read(log)

    def stop_all(self) -> None:
        """SIGTERM to every process this step started that still runs, and to their descendants (torchrun
        starts its workers in sessions of their own, so they are not in our process group); SIGKILL after 10 s."""
        running = [p for p in self.procs if p.poll() is None]
        pids = [pid for p in running for pid in process_tree(p.pid)]
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            end = time.monotonic() + grace
            while time.monotonic() < end and (any(p.poll() is None for p in running) or any(map(alive, pids))):
                time.sleep(0.1)
            pids = [pid for pid in pids if alive(pid)]
        self.procs = {p: label for p, label in self.procs.items() if p.poll() is None}

    # -- commands --
    def train(self, *flags: str, torchrun: bool = False) -> list[str]:
        """A `train.py` command line on the check's data (32 px unless flags say otherwise)."""
        head = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else [PY]
        return [*head, str(ROOT / "train.py"), "--dataset", "cifar10", "--data-dir", str(self.data),
                "--no-download", "--image-size", "32", *self.profile.device, *flags]

    def weights_flags(self, flags: tuple[str, ...]) -> list[str]:
        """flags + `--weights FILE` for the model they name."""
        model = flags[flags.index("--model") + 1]
        return [*flags, "--weights", str(self.weights[model])]

    def run_dir(self, name: str) -> Path:
        """A fresh run folder (a reused GPU_CHECK_DIR must not turn 'computed' into 'reused')."""
        path = self.scratch / "runs" / name
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


FORCE_DIST = {"DTL_FORCE_DISTRIBUTED": "1"}


def parents() -> dict[int, int]:
    """pid -> parent pid of every process (from /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                table[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return table


def process_tree(root: int) -> list[int]:
    """root and all its descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def alive(pid: int) -> bool:
    """Still running (a zombie waiting for its parent does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    text = read(run_dir / "metrics.jsonl")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def error_line(log: str) -> str:
    """The most telling line of a failed run's log: its last `error` line or exception."""
    lines = [ln.strip() for ln in log.replace("\r", "\n").splitlines() if ln.strip()]
    for pattern in (r"^error:|\berror:", r"^\w+(Error|Exception)\b", r"exitcode\s*:"):
        hits = [ln for ln in lines if re.search(pattern, ln)]
        if hits:
            return hits[-1][:300]
    return lines[-1][:300] if lines else "(empty log)"


def require_ok(code: int, log: str, what: str) -> None:
    if code != 0:
        raise StepFailed(f"{what} exited {code}: {error_line(log)}")


def backend_of(log: str) -> str | None:
    """The process-group backend the run logged ('model wrapped in ... (nccl backend, 1 ranks)')."""
    for line in log.splitlines():
        if "backend" in line.lower():
            found = re.search(r"\b(nccl|gloo|mpi|ucc|xccl)\b", line)
            if found:
                return found.group(1)
    return None


def check_backend(ctx: Context, log: str, figures: dict[str, Any]) -> None:
    figures["backend"] = backend_of(log) or "none"
    if figures["backend"] != ctx.profile.backend:
        raise StepFailed(f"expected a {ctx.profile.backend} process group at world size 1 with "
                         f"DTL_FORCE_DISTRIBUTED=1, the log names {figures['backend']} (dtl/distributed/env.py not "
                         "honouring DTL_FORCE_DISTRIBUTED?)")


def last_epoch_figures(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    last = rows[-1] if rows else {}
    return {k: last[k] for k in keys if k in last}


# ---- safetensors without the safetensors package (the format is a JSON header + raw bytes) ------

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    body = memoryview(data)[8 + size:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info["shape"])
    return out


def compare_weights(a: Path, b: Path) -> dict[str, Any]:
    """Tensor-by-tensor torch.equal of two model.safetensors; the largest absolute difference if any differ."""
    ta, tb = read_safetensors(a), read_safetensors(b)
    if set(ta) != set(tb):
        raise StepFailed(f"{a} and {b} hold different tensor names: {sorted(set(ta) ^ set(tb))[:5]}")
    unequal = [k for k in ta if not torch.equal(ta[k], tb[k])]
    max_diff = max((float((ta[k].double() - tb[k].double()).abs().max()) for k in unequal
                    if ta[k].is_floating_point() and ta[k].numel()), default=0.0)
    return {"tensors": len(ta), "unequal_tensors": len(unequal), "max_abs_diff": max_diff,
            "first_unequal": unequal[:3]}


# ---- the steps -------------------------------------------------------------------------------------

def step_inputs(ctx: Context, out: Outcome) -> None:
    """Random weights for every model the steps use, and the synthetic CIFAR-10-format data set."""
    n_train, n_test = ctx.profile.synth
    shutil.rmtree(ctx.data, ignore_errors=True)
    synth, _ = ctx.start("inputs-synth", [PY, "-m", "dtl.cli", "data", "synth", "--out", str(ctx.data),
                                          "--train", str(n_train), "--test", str(n_test)])
    t0 = time.monotonic()
    import torchvision  # the weights are made here while the data set is written

    p = ctx.profile
    models = sorted({flags[flags.index("--model") + 1]
                     for flags in (p.bf16, p.fp16, p.resume, p.cache, p.fsdp, *(f for _, f in (*p.bench, *p.speed)),
                                   p.speed_cached, p.compile or ())
                     if "--model" in flags})
    folder = ctx.scratch / "weights"
    folder.mkdir(exist_ok=True)
    for model in models:
        torch.manual_seed(0)
        path = folder / f"{model}-random-seed0.pth"
        torch.save(torchvision.models.get_model(model).state_dict(), path)
        ctx.weights[model] = path
    out.figures["weights"] = ", ".join(f"{m} {ctx.weights[m].stat().st_size / 2**20:.0f} MiB" for m in models)
    out.figures["weights_s"] = time.monotonic() - t0
    code = ctx.wait(synth)
    require_ok(code, read(ctx.logs / "inputs-synth.log"), "dtl data synth")
    out.figures["synth_images"] = f"{n_train}+{n_test}"
    out.figures["synth_s"] = time.monotonic() - t0


def step_bf16(ctx: Context, out: Outcome) -> None:
    run = ctx.run_dir("bf16_nccl_transfer")
    code, log = ctx.run("bf16_nccl_transfer", ctx.train(
        *ctx.weights_flags(ctx.profile.bf16), "--mode", "transfer", "--precision", "bf16", "--epochs", "1",
        "--output-dir", str(run), torchrun=True), env=FORCE_DIST)
    require_ok(code, log, "torchrun train.py")
    check_backend(ctx, log, out.figures)
    precision = read_json(run / "config.json").get("run", {}).get("precision")
    out.figures["precision"] = precision
    if precision != "bf16" or not re.search(r"precision bf16\b", log):
        raise StepFailed(f"expected precision bf16 in config.json and the log, got {precision!r}")
    rows = metrics(run)
    out.figures["epochs"] = len(rows)
    if len(rows) != 1:
        raise StepFailed(f"metrics.jsonl has {len(rows)} epochs, expected 1")
    out.figures |= last_epoch_figures(rows, ("images_per_sec", "epoch_seconds", "test_acc"))


def step_fp16(ctx: Context, out: Outcome) -> None:
    run = ctx.run_dir("fp16_overflow")
    code, log = ctx.run("fp16_overflow", ctx.train(
        *ctx.weights_flags(ctx.profile.fp16), "--mode", "finetune", "--precision", "fp16",
        "--fp16-init-scale", "1e30", "--epochs", "1", "--output-dir", str(run)))
    if code != 0 and "--fp16-init-scale" in log and "unrecognized arguments" in log:
        raise StepFailed("dtl has no --fp16-init-scale flag yet (dtl/config.py)")
    if code != 0 and re.search(r"non-finite loss", log, re.IGNORECASE):
        raise StepFailed(f"fp16 overflow ended the run as a non-finite loss (exit {code}) instead of skipping the "
                         f"step: {error_line(log)}")
    require_ok(code, log, "train.py --precision fp16")
    out.figures["precision"] = read_json(run / "config.json").get("run", {}).get("precision")
    if out.figures["precision"] != "fp16":
        raise StepFailed(f"expected precision fp16 in config.json, got {out.figures['precision']!r}")
    rows = metrics(run)
    out.figures["overflow_log_lines"] = sum("overflow" in ln.lower() for ln in log.replace("\r", "\n").splitlines())
    out.figures["overflow_skips"] = rows[-1].get("overflow_skips", "absent from metrics.jsonl") if rows else "no epoch"
    out.figures["global_step"] = rows[-1].get("global_step") if rows else None
    if isinstance(out.figures["overflow_skips"], int) and isinstance(out.figures["global_step"], int):
        out.figures["updates_after_overflows"] = out.figures["global_step"] - out.figures["overflow_skips"]
    out.figures |= last_epoch_figures(rows, ("train_loss", "nan_skips"))
    if not rows:
        raise StepFailed("metrics.jsonl has no epoch")
    if not out.figures["overflow_log_lines"] and not isinstance(out.figures["overflow_skips"], int):
        out.reason = "dtl reported no skipped overflow steps (no log line with 'overflow', no overflow_skips key)"


#: epoch 1's position: a plain progress line ("epoch 1/2 train: 3/10 (30%) ...", stderr not a terminal) or a
#: tqdm bar ("epoch 1/2 train:  30%|###   | 3/10")
PROGRESS = re.compile(r"epoch 1/\d+ train(?::|[^\r\n|]*\|[^|\r\n]*\|)\s*(\d+)/(\d+)")


def wait_for_progress(ctx: Context, proc: subprocess.Popen, log: Path, fraction: float) -> tuple[int, int]:
    """Poll the progress lines of epoch 1 until `fraction` of its steps are done; (done, total)."""
    while time.monotonic() < ctx.step_deadline:
        found = PROGRESS.findall(read(log))
        if found:
            done, total = map(int, found[-1])
            if done >= max(2, int(total * fraction)):
                return done, total
        if proc.poll() is not None:
            raise StepFailed(f"the run to interrupt ended (exit {proc.returncode}) before it was signalled: "
                             f"{error_line(read(log))}")
        time.sleep(0.05)
    raise StepTimeout("timed out waiting for epoch 1 of the run to interrupt")


def worker_pids(agent: int) -> list[int]:
    """The torchrun agent's children that run train.py (the workers: signalling the agent would kill them)."""
    pids = []
    for pid, ppid in parents().items():
        with contextlib.suppress(OSError):
            if ppid == agent and b"train.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


def step_resume(ctx: Context, out: Outcome) -> None:
    """A (uninterrupted) and B (SIGUSR1 mid-epoch 1, then --resume auto) run side by side; same final weights."""
    env = dict(FORCE_DIST)  # CUBLAS_WORKSPACE_CONFIG is dtl's job under --deterministic (dist.prepare_determinism)
    flags = (*ctx.weights_flags(ctx.profile.resume), "--mode", "finetune", "--deterministic", "--epochs", "2",
             "--checkpoint-every-steps", "0", "--progress-every", "0.2")  # lines to time the signal by
    run_a, run_b = ctx.run_dir("resume_A"), ctx.run_dir("resume_B")
    proc_a, log_a = ctx.start("preempt_resume-A", ctx.train(*flags, "--output-dir", str(run_a), torchrun=True), env)
    proc_b, log_b = ctx.start("preempt_resume-B", ctx.train(*flags, "--output-dir", str(run_b), torchrun=True), env)
    out.log = str(log_b)
    done, total = wait_for_progress(ctx, proc_b, log_b, 0.25)
    workers = worker_pids(proc_b.pid)
    if not workers:
        raise StepFailed(f"found no train.py worker under the torchrun agent (pid {proc_b.pid})")
    for pid in workers:
        os.kill(pid, signal.SIGUSR1)
    out.figures["signalled_at"] = f"step {done}/{total} of epoch 1"
    agent_code = ctx.wait(proc_b)
    text_b = read(log_b)
    status = read_json(run_b / "status.json")
    exitcodes = re.findall(r"exitcode\s*:\s*(-?\d+)", text_b)
    out.figures["worker_exit"] = int(exitcodes[-1]) if exitcodes else agent_code
    out.figures["status"] = status.get("state")
    out.figures["stopped_at"] = f"global step {status.get('global_step')}, {status.get('epoch')} epoch(s) done"
    if status.get("state") != "preempted" or status.get("exit_code") != EXIT_PREEMPTED:
        raise StepFailed(f"after SIGUSR1 expected status.json state preempted / exit code {EXIT_PREEMPTED}, got "
                         f"{status or 'no status.json'} (launcher exit {agent_code}): {error_line(text_b)}")
    check_backend(ctx, text_b, out.figures)
    out.log = str(ctx.logs / "preempt_resume-B-resume.log")
    code, log = ctx.run("preempt_resume-B-resume", ctx.train(*flags, "--output-dir", str(run_b), "--resume", "auto",
                                                              torchrun=True), env)
    require_ok(code, log, "the --resume auto run")
    resumed = re.search(r"resumed from \S+ \((.*?)\)", log)
    out.figures["resumed_at"] = resumed.group(1) if resumed else "no 'resumed from' line in the log"
    out.log = str(log_a)
    code_a = ctx.wait(proc_a)
    require_ok(code_a, read(log_a), "the uninterrupted run")
    rows_a, rows_b = metrics(run_a), metrics(run_b)
    out.figures["epochs"] = f"A {len(rows_a)}, B {len(rows_b)}"
    out.figures |= compare_weights(run_a / "model.safetensors", run_b / "model.safetensors")
    if out.figures["unequal_tensors"]:
        raise StepFailed(f"resumed weights differ from the uninterrupted run's in {out.figures['unequal_tensors']} "
                         f"of {out.figures['tensors']} tensors (max abs diff {out.figures['max_abs_diff']:.3g})")
    if not out.figures["first_unequal"]:
        del out.figures["first_unequal"]
    if len(rows_a) != 2 or len(rows_b) != 2:
        raise StepFailed(f"expected 2 epochs in both metrics.jsonl, got {out.figures['epochs']}")


def step_compile(ctx: Context, out: Outcome) -> None:
    if ctx.profile.compile is None:
        raise StepSkipped(ctx.profile.compile_skip)
    run = ctx.run_dir("compile")
    code, log = ctx.run("compile_recompiles", ctx.train(
        *ctx.weights_flags(ctx.profile.compile), "--mode", "finetune", "--compile", "--epochs", "2",
        "--output-dir", str(run)), env={"TORCH_LOGS": "recompiles"})
    require_ok(code, log, "train.py --compile")
    count = len(re.findall(r"Recompiling function", log))
    reasons = []
    for line in log.splitlines():
        found = re.search(r"\[__recompiles\]\s+- \d+/\d+: (.*)", line)
        if found and found.group(1)[:100] not in reasons:
            reasons.append(found.group(1)[:100])
    out.figures["recompiles"] = count
    out.figures["limit"] = MAX_RECOMPILES
    out.figures["guard_failures"] = reasons[:6]
    rows = metrics(run)
    out.figures["epoch_seconds"] = [round(r["epoch_seconds"], 2) for r in rows if "epoch_seconds" in r]
    out.figures |= last_epoch_figures(rows, ("images_per_sec",))
    if len(rows) != 2:
        raise StepFailed(f"metrics.jsonl has {len(rows)} epochs, expected 2")
    if count > MAX_RECOMPILES:
        raise StepFailed(f"{count} recompiles (limit {MAX_RECOMPILES}): {'; '.join(reasons[:4])}")


def step_cache(ctx: Context, out: Outcome) -> None:
    run = ctx.run_dir("cache_features")
    flags = (*ctx.weights_flags(ctx.profile.cache), "--mode", "transfer", "--no-augment", "--cache-features",
             "--dropout", "0", "--output-dir", str(run))
    t0 = time.monotonic()
    code, log = ctx.run("cache_features-1", ctx.train(*flags, "--epochs", "1"))
    require_ok(code, log, "the first --cache-features run")
    out.figures["first_run_s"] = time.monotonic() - t0
    first = [ln for ln in log.splitlines() if "cached features" in ln]
    if not first or "computed" not in first[-1]:
        raise StepFailed(f"the first run should log 'cached features ... computed', got {first[-1:] or 'no such line'}")
    shapes = re.search(r"cached features:\s*(.*?)\s*\((?:computed|reused)", first[-1])
    out.figures["features"] = shapes.group(1) if shapes else first[-1]
    out.figures["stored"] = sorted(p.name for p in (run / "features").glob("*.safetensors"))
    t0 = time.monotonic()
    code, log = ctx.run("cache_features-2", ctx.train(*flags, "--epochs", "2", "--resume", "auto"))
    require_ok(code, log, "the second (--resume auto --epochs 2) run")
    out.figures["second_run_s"] = time.monotonic() - t0
    second = [ln for ln in log.splitlines() if "cached features" in ln]
    if not second or "reused" not in second[-1]:
        raise StepFailed(f"the second run should log 'cached features ... reused', got {second[-1:] or 'no such line'}")
    rows = metrics(run)
    out.figures["epochs"] = len(rows)
    out.figures |= last_epoch_figures(rows, ("images_per_sec", "test_acc"))
    if len(rows) != 2:
        raise StepFailed(f"metrics.jsonl has {len(rows)} epochs after the second run, expected 2")


def step_fsdp(ctx: Context, out: Outcome) -> None:
    """FSDP at world size 1: A (2 epochs) and B (1 epoch, then --resume auto --epochs 2 from its sharded
    checkpoint) end with the same weights."""
    flags = (*ctx.weights_flags(ctx.profile.fsdp), "--mode", "finetune", "--strategy", "fsdp", "--deterministic",
             "--checkpoint-every-steps", "0")
    run_a, run_b = ctx.run_dir("fsdp_A"), ctx.run_dir("fsdp_B")
    code, log = ctx.run("fsdp_resume-A", ctx.train(*flags, "--epochs", "2", "--output-dir", str(run_a),
                                                    torchrun=True), env=FORCE_DIST)
    out.log = str(ctx.logs / "fsdp_resume-A.log")
    require_ok(code, log, "the uninterrupted FSDP run")
    check_backend(ctx, log, out.figures)
    sharded = re.search(r"model sharded with FSDP2 \((.*?)\)", log)
    if not sharded:
        raise StepFailed("the log has no 'model sharded with FSDP2' line: --strategy fsdp did not shard")
    out.figures["sharding"] = sharded.group(1)
    out.log = str(ctx.logs / "fsdp_resume-B1.log")
    code, log = ctx.run("fsdp_resume-B1", ctx.train(*flags, "--epochs", "1", "--output-dir", str(run_b),
                                                     torchrun=True), env=FORCE_DIST)
    require_ok(code, log, "the 1-epoch FSDP run")
    shards = sorted(p.name for p in (run_b / "checkpoints").glob("step-*/sharded/*.safetensors"))
    out.figures["shard_files"] = shards
    if not shards:
        raise StepFailed(f"no sharded checkpoint files under {run_b / 'checkpoints'}/step-*/sharded/")
    out.log = str(ctx.logs / "fsdp_resume-B2.log")
    code, log = ctx.run("fsdp_resume-B2", ctx.train(*flags, "--epochs", "2", "--output-dir", str(run_b),
                                                     "--resume", "auto", torchrun=True), env=FORCE_DIST)
    require_ok(code, log, "the --resume auto FSDP run")
    resumed = re.search(r"resumed from \S+ \((.*?)\)", log)
    out.figures["resumed_at"] = resumed.group(1) if resumed else "no 'resumed from' line in the log"
    out.figures |= compare_weights(run_a / "model.safetensors", run_b / "model.safetensors")
    if out.figures["unequal_tensors"]:
        raise StepFailed(f"resumed FSDP weights differ from the uninterrupted run's in "
                         f"{out.figures['unequal_tensors']} of {out.figures['tensors']} tensors (max abs diff "
                         f"{out.figures['max_abs_diff']:.3g})")
    if not out.figures["first_unequal"]:
        del out.figures["first_unequal"]


def speed_flags(ctx: Context, label: str, flags: tuple[str, ...]) -> list[str]:
    """dtl's flags for a speed case: on the GPU profile each case's own train subset (about 2 s an epoch)."""
    subset = SPEED_TRAIN_IMAGES.get(label)
    return [*ctx.weights_flags(flags), *ctx.profile.speed_dtl, *(("--train-subset", str(subset)) if subset else ())]


def step_speed(ctx: Context, out: Outcome) -> None:
    """issue #18's table: dtl's epoch rate (train.py, metrics.jsonl) beside the strong loop's train-step rate."""
    p = ctx.profile
    folder = ctx.scratch / "speed"
    folder.mkdir(exist_ok=True)
    cases_file, strong_json = folder / "strong_cases.json", folder / "strong.json"
    cases_file.write_text(json.dumps({label: list(ctx.weights_flags(flags)) for label, flags in p.speed}))
    strong_json.unlink(missing_ok=True)
    code, log = ctx.run("speed-strong", [PY, "-m", "dtl.tools.bench.strong_rate", "--cases", str(cases_file),
                                         "--dataset", "cifar10", "--data-dir", str(ctx.data), "--no-download",
                                         *p.device, *p.speed_strong, "--json", str(strong_json)])
    require_ok(code, log, "python -m dtl.tools.bench.strong_rate")
    strong = read_json(strong_json)
    rows: dict[str, dict[str, Any]] = {}
    for label, flags in (*p.speed, ("cached_features", ())):
        run = ctx.run_dir(f"speed_{label}")
        train_flags = (speed_flags(ctx, label, flags) if flags else
                       [*ctx.weights_flags(p.speed_cached), *p.speed_dtl, "--cache-features", "--no-augment",
                        "--dropout", "0"])
        code, log = ctx.run(f"speed-{label}", ctx.train(*train_flags, "--output-dir", str(run)))
        require_ok(code, log, f"train.py ({label})")
        epochs = metrics(run)
        if not epochs:
            raise StepFailed(f"train.py ({label}) wrote no epoch to metrics.jsonl")
        row: dict[str, Any] = {"dtl_img_s": epochs[-1]["images_per_sec"], "epoch": epochs[-1]["epoch"]}
        if label in strong:
            s = strong[label]
            row |= {"strong_img_s": s["images_per_s"], "ratio": row["dtl_img_s"] / s["images_per_s"]}
            if "flops_per_image" in s:  # the same model, mode and batch: the same FLOPs per image
                row["dtl_tflops"] = s["flops_per_image"] * row["dtl_img_s"] / 1e12
                row["strong_tflops"] = s["tflops"]
            if "bf16_matmul_tflops" in s:
                row["dtl_fraction_of_bf16_matmul"] = row["dtl_tflops"] / s["bf16_matmul_tflops"]
                out.figures["bf16_matmul_tflops"] = s["bf16_matmul_tflops"]
        rows[label] = row
    out.figures["cases"] = rows
    out.summary = "; ".join(
        f"{label} dtl {fmt(r['dtl_img_s'])}" + (f" / strong {fmt(r['strong_img_s'])} = {r['ratio']:.2f}x"
                                                if "ratio" in r else " img/s")
        + (f" ({r['dtl_fraction_of_bf16_matmul']:.0%} of bf16 peak)" if "dtl_fraction_of_bf16_matmul" in r else "")
        for label, r in rows.items())
    if p.speed_goals:
        missed = speed_goals_missed(rows)
        out.figures["goals_missed"] = missed
        if missed:
            raise StepFailed(f"issue #18 goals missed: {'; '.join(missed)} | {out.summary}")


def speed_goals_missed(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The goals of issue #18 that the speed table misses, one line each."""
    missed = [f"{label} {rows[label]['ratio']:.2f}x < {goal:.1f}x" for label, goal in SPEED_GOALS.items()
              if label in rows and rows[label]["ratio"] < goal]
    cached = rows.get("cached_features", {}).get("dtl_img_s")
    if cached is not None and cached < CACHED_GOAL_IMG_S:
        missed.append(f"cached_features {cached:.0f} img/s < {CACHED_GOAL_IMG_S}")
    label, fraction = PEAK_GOAL
    achieved = rows.get(label, {}).get("dtl_fraction_of_bf16_matmul")
    if achieved is not None and achieved < fraction:
        missed.append(f"{label} {achieved:.0%} of the bf16 matmul rate < {fraction:.0%}")
    return missed


def step_bench(ctx: Context, out: Outcome) -> None:
    folder = ctx.scratch / "bench"
    folder.mkdir(exist_ok=True)
    for label, flags in ctx.profile.bench:
        path = folder / f"{label}.json"
        path.unlink(missing_ok=True)
        cmd = [PY, "-m", "dtl.cli", "bench", *ctx.weights_flags(flags), "--dataset", "cifar10", "--data-dir",
               str(ctx.data), "--no-download", *ctx.profile.device, *ctx.profile.bench_common, "--json", str(path)]
        code, log = ctx.run(f"bench-{label}", cmd)
        require_ok(code, log, f"dtl bench ({label})")
        result = read_json(path)
        if not result:
            raise StepFailed(f"dtl bench ({label}) wrote no JSON at {path}")
        figures: dict[str, Any] = {"precision": result["meta"]["precision"]["dtl"]}
        for phase in ("train_step", "eval_step"):
            ref, ours, ratio = result["reference"][phase], result["dtl"][phase], result["ratio"][phase]
            strong = result["strong"][phase]
            figures[phase] = {"reference_img_s": ref["images_per_s"], "strong_img_s": strong["images_per_s"],
                              "dtl_img_s": ours["images_per_s"], "ratio": ratio["images_per_s"],
                              "ratio_strong": result["ratio_strong"][phase]["images_per_s"]}
            for side, entry in (("dtl", ours), ("strong", strong)):
                for key in ("tflops", "fraction_of_bf16_matmul"):
                    if key in entry:
                        figures[phase][f"{side}_{key}"] = entry[key]
            if "tflops" in ref:
                figures[phase]["reference_tflops"] = ref["tflops"]
        if "bf16_matmul_tflops" in result["meta"]:
            figures["bf16_matmul_tflops"] = result["meta"]["bf16_matmul_tflops"]
        out.figures[label] = figures
        train, evals = figures["train_step"], figures["eval_step"]
        tflops = (f", dtl {train['dtl_tflops']:.3g} TFLOP/s" if "dtl_tflops" in train else "") + (
            f" = {train['dtl_fraction_of_bf16_matmul']:.1%} of bf16 matmul" if "dtl_fraction_of_bf16_matmul" in train
            else "")
        out.summary += (f"{'; ' if out.summary else ''}{label} ({figures['precision']}): train img/s dtl "
                        f"{fmt(train['dtl_img_s'])} vs ref {fmt(train['reference_img_s'])} = {train['ratio']:.2f}x, "
                        f"vs strong {fmt(train['strong_img_s'])} = {train['ratio_strong']:.2f}x{tflops}; eval "
                        f"{fmt(evals['dtl_img_s'])} vs {fmt(evals['reference_img_s'])} = {evals['ratio']:.2f}x")


def step_pytest(ctx: Context, out: Outcome) -> None:
    code, log = ctx.run("pytest_cuda", [PY, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"])
    counts = {word: int(n) for n, word in re.findall(
        r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", log.splitlines()[-1] if log else "")}
    out.figures |= counts
    if code == 5:
        raise StepSkipped("no test carries the cuda marker (pytest -m cuda collected nothing)")
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.MULTILINE)
    if code != 0 and failed:
        raise StepFailed(f"pytest -m cuda exited {code}: {len(failed)} failed: {', '.join(failed[:5])}")
    require_ok(code, log, "pytest -m cuda")
    if not counts.get("passed"):
        raise StepSkipped(f"all {counts.get('skipped', 0)} cuda tests skipped (no CUDA in this run)")


STEPS: tuple[tuple[str, Callable[[Context, Outcome], None], float], ...] = (
    ("inputs", step_inputs, 120),
    ("bf16_nccl_transfer", step_bf16, 150),
    ("fp16_overflow", step_fp16, 120),
    ("preempt_resume", step_resume, 240),
    ("compile_recompiles", step_compile, 240),
    ("cache_features", step_cache, 150),
    ("fsdp_resume", step_fsdp, 150),
    ("speed", step_speed, 240),
    ("bench", step_bench, 200),
    ("pytest_cuda", step_pytest, 240),
)
"""(name, function, timeout in seconds), in the order they run."""


# ---- the driver ------------------------------------------------------------------------------------

def run_step(ctx: Context, name: str, fn: Callable[[Context, Outcome], None], timeout: float,
             blocked: str | None) -> Outcome:
    out = Outcome(name)
    left = ctx.deadline - time.monotonic()
    if blocked:
        out.result, out.reason = "SKIP", blocked
        return out
    if left < MIN_STEP_SECONDS:
        out.result = "SKIP"
        out.reason = f"the check's time budget (GPU_CHECK_BUDGET_S) is used up ({max(left, 0):.0f} s left)"
        return out
    ctx.step_deadline = time.monotonic() + min(timeout, left)
    ctx.last_log = None
    start = time.monotonic()
    try:
        fn(ctx, out)
    except StepSkipped as why:
        out.result, out.reason = "SKIP", str(why)
    except StepFailed as why:
        out.result, out.reason = "FAIL", str(why)
        if isinstance(why, StepTimeout):
            out.reason = f"{why} after {time.monotonic() - start:.0f} s (limit {min(timeout, left):.0f} s)"
    except Exception:  # a bug in a step, or output it could not read: FAIL with the traceback in its log
        out.result = "FAIL"
        out.reason = traceback.format_exc().strip().splitlines()[-1]
        crash = ctx.logs / f"{name}-driver-traceback.log"
        crash.write_text(traceback.format_exc())
        out.log = out.log or str(ctx.last_log or crash)
        out.figures["driver_traceback"] = str(crash)
    finally:
        ctx.stop_all()
    out.seconds = time.monotonic() - start
    out.log = out.log or (str(ctx.last_log) if ctx.last_log else None)
    if out.result == "FAIL" and out.log:
        out.log_tail = tail(Path(out.log))
    return out


def tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    lines = []
    for line in read(path).splitlines():  # a tqdm line holds every state of the bar: keep the last one shown
        shown = [part for part in line.split("\r") if part.strip()]
        lines += shown[-1:]
    return lines[-n:]


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def figures_text(out: Outcome) -> str:
    text = out.summary or ", ".join(f"{k}={fmt(v)}" for k, v in out.figures.items())
    if out.reason:
        text = f"{out.reason}" + (f" | {text}" if text else "")
    return text


def print_table(outcomes: list[Outcome]) -> None:
    """step | result | seconds | figures, the figures wrapped at 120 columns under their own column."""
    indent = " " * 38
    print(f"\n{'step':<20} {'result':<6} {'seconds':>8}  figures", flush=True)
    print("-" * 120)
    for out in outcomes:
        lines = textwrap.wrap(figures_text(out), 120 - len(indent), break_on_hyphens=False) or [""]
        print(f"{out.name:<20} {out.result:<6} {out.seconds:>8.1f}  {lines[0]}")
        for line in lines[1:]:
            print(indent + line)
    print(flush=True)


def environment() -> dict[str, Any]:
    import torchvision

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
                            "host": platform.node(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        nccl = torch.cuda.nccl.version()
        info |= {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                 "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                 "cudnn": torch.backends.cudnn.version(),
                 "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)}
    return info


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    smoke = os.environ.get("GPU_CHECK_CPU_SMOKE", "") not in ("", "0")
    if not smoke and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False); run it on a GPU machine "
              "(or GPU_CHECK_CPU_SMOKE=1 for the CPU smoke run)", file=sys.stderr)
        return EXIT_USAGE
    profile = CPU_SMOKE if smoke else GPU
    scratch = Path(os.environ.get("GPU_CHECK_DIR") or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S") or profile.budget_s)
    wanted = {s.strip() for s in os.environ.get("GPU_CHECK_STEPS", "").split(",") if s.strip()}
    unknown = wanted - {name for name, _, _ in STEPS}
    if unknown:
        print(f"gpu-check: unknown step(s) in GPU_CHECK_STEPS: {', '.join(sorted(unknown))}; steps: "
              f"{', '.join(name for name, _, _ in STEPS)}", file=sys.stderr)
        return EXIT_USAGE
    env = environment()
    ctx = Context(profile, scratch, budget)
    print(f"gpu-check ({profile.name}): {env.get('gpu', 'CPU only')}, torch {env['torch']}, CUDA {env['cuda']}, "
          f"NCCL {env.get('nccl')}; scratch folder {scratch}; budget {budget:.0f} s", flush=True)
    started = time.monotonic()
    outcomes: list[Outcome] = []
    interrupted = False
    signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl-C: stop this step's processes, report what ran
    for i, (name, fn, timeout) in enumerate(STEPS, start=1):
        blocked = None
        if interrupted:
            blocked = "the check was interrupted"
        elif name == "inputs" and wanted and not wanted - {"pytest_cuda"}:
            blocked = "no step in GPU_CHECK_STEPS needs it"
        elif wanted and name not in wanted and name != "inputs":
            blocked = "not in GPU_CHECK_STEPS"
        elif name not in ("inputs", "pytest_cuda") and outcomes[0].result != "PASS":
            blocked = "the inputs step failed"
        print(f"gpu-check: [{i}/{len(STEPS)}] {name} ...", end="", flush=True)
        step_start = time.monotonic()
        try:
            out = run_step(ctx, name, fn, timeout, blocked)
        except KeyboardInterrupt:
            interrupted = True
            out = Outcome(name, "FAIL", time.monotonic() - step_start,
                          reason="interrupted (SIGINT/SIGTERM); its processes were stopped")
        outcomes.append(out)
        print(f" {out.result} ({out.seconds:.1f} s){': ' + out.reason if out.reason else ''}", flush=True)
        if out.log_tail:
            print(f"  --- last {len(out.log_tail)} lines of {out.log} ---")
            print("\n".join(f"  | {ln}" for ln in out.log_tail), flush=True)
    total = time.monotonic() - started
    failed = [o.name for o in outcomes if o.result == "FAIL"]
    report = {"result": "FAIL" if failed else "PASS", "failed": failed, "profile": profile.name,
              "seconds": total, "budget_s": budget, "scratch_dir": str(scratch), "environment": env,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": [dataclasses.asdict(o) for o in outcomes]}
    json_path = Path(os.environ.get("GPU_CHECK_JSON") or scratch / "gpu_check.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(json_path, Path(os.environ["OUT"]) / "gpu_check.json")
    print_table(outcomes)
    verdict = f"FAIL ({', '.join(failed)})" if failed else "PASS"
    print(f"gpu-check: {verdict} in {total:.0f} s on {env.get('gpu', 'CPU (smoke run)')}; "
          f"report {json_path}; runs and logs in {scratch}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
