"""The two flavours of the check -- the real one on a GPU (`GPU`) and the CPU smoke run (`CPU_SMOKE`) -- as the
models and sizes each step runs, and the speed goals the GPU's speed table must meet (`speed_goals_missed`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Profile:
    """Models and sizes of one flavour of the check. Each step's flags are added to the data flags."""

    name: str
    backend: str
    """The process-group backend the torchrun steps must report (config.json: run.backend)."""
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
    """FAIL the speed step when a speed goal is missed (GPU only: tiny CPU runs say nothing)."""
    threads: int | None = None
    """OMP_NUM_THREADS for every process the check starts, unless the caller's environment sets it."""

    def step_flags(self, step: str) -> list[tuple[str, ...]]:
        """The flag sets a step runs with (one per run or case); none for a step that trains no model."""
        single = {"bf16_nccl_transfer": self.bf16, "fp16_overflow": self.fp16, "preempt_resume": self.resume,
                  "compile_recompiles": self.compile, "cache_features": self.cache, "fsdp_resume": self.fsdp}
        if step in single:
            return [single[step]] if single[step] is not None else []
        if step == "speed":
            return [*(flags for _, flags in self.speed), self.speed_cached]
        if step == "bench":
            return [flags for _, flags in self.bench]
        return []

    def models(self, steps: Iterable[str]) -> list[str]:
        """The models `steps` train (the inputs step writes weights for these only)."""
        return sorted({flags[flags.index("--model") + 1] for step in steps for flags in self.step_flags(step)
                       if "--model" in flags})


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
    # one round: each measurement is >= 2 s of timed work on a GPU (dtl.tools.bench.timing.MIN_SECONDS_GPU),
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
    # 2 epochs of about 2 s each at the goals' rates (the 2nd is reported: the 1st pays cuDNN autotuning)
    speed_dtl=("--epochs", "2", "--eval-subset", "512"),
    speed_strong=("--train-subset", "10000", "--eval-subset", "512", "--warmup", "8", "--steps", "30"),
    speed_cached=("--model", "vgg16", "--mode", "transfer", "--image-size", "32", "--batch-size", "256",
                  "--train-subset", "25600"),
    budget_s=450.0,
    speed_goals=True,
)
#: images per epoch of each GPU speed case (about 2 s at the goals' rates)
SPEED_TRAIN_IMAGES = {"transfer_32px_b256": 25_600, "transfer_224px_b256": 10_240, "finetune_224px_b64": 6_400,
                      "finetune_224px_b256": 7_680}
#: the speed goals: dtl's epoch rate / the strong loop's train-step rate, per case
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
    threads=1,
)


def speed_goals_missed(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The speed goals that the speed table misses, one line each."""
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
