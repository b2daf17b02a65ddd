"""Numeric precision: which one a run uses (and why) as one `Precision` object -- its autocast, dtype and
GradScaler -- and the process-wide kernel settings that follow from it (TF32, cuDNN autotuning, determinism)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from dtl.distributed import DistEnv

log = logging.getLogger("dtl")


def bf16_in_hardware() -> bool:
    """bf16 without emulation: `is_bf16_supported()` alone also says yes on V100/T4, where bf16 is emulated
    (and slow)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no such argument and counted no emulation
        return torch.cuda.is_bf16_supported()


@dataclass(frozen=True)
class Precision:
    """The run's numeric precision, resolved once (`resolve`) and asked by everything that computes: the
    autocast context, the compute dtype, whether an fp16 GradScaler scales the loss, and the process-wide kernel
    settings that follow. `name` is fp32 | bf16 | fp16; `source` says who chose it (logged, saved)."""

    name: str
    device: torch.device
    source: str = "given"
    fp16_init_scale: float = 65536.0

    def __post_init__(self) -> None:
        if self.name not in _DTYPES:
            raise ValueError(f"precision must be one of {', '.join(_DTYPES)}, got {self.name!r}")

    def __str__(self) -> str:
        return self.name

    @property
    def dtype(self) -> torch.dtype:
        """What autocast computes in (float32 for fp32)."""
        return _DTYPES[self.name]

    @property
    def scales_loss(self) -> bool:
        """fp16: the loss is scaled (GradScaler), and steps whose gradients overflow are skipped."""
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Nothing for fp32, else bf16/fp16 autocast on the device."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The run's GradScaler: enabled for fp16 only (a disabled one passes steps straight through)."""
        return torch.amp.GradScaler(self.device.type, init_scale=self.fp16_init_scale, enabled=self.scales_loss)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(requested: str, env: DistEnv, device: torch.device, fp16_init_scale: float = 65536.0) -> Precision:
    """Flag > accelerate's explicit choice > bf16 on GPUs that have bf16 in hardware (Ampere and newer) / fp16 +
    GradScaler on older ones / fp32 on CPU. `accelerate launch` exports ACCELERATE_MIXED_PRECISION=no whenever
    neither its config nor its flag chose, so "no" is not taken as a choice on a GPU: pass --precision fp32 for
    fp32 there."""
    name, source = _choose(requested, env, device)
    return Precision(name, device, source, fp16_init_scale)


def _choose(requested: str, env: DistEnv, device: torch.device) -> tuple[str, str]:
    if requested != "auto":
        return requested, "--precision flag"
    mp = env.accelerate_mixed_precision
    if mp in ("bf16", "fp16"):
        return mp, f"accelerate config ({mp})"
    if device.type == "cuda":
        note = (" (accelerate exports mixed_precision=no whenever nothing chose: not a choice; "
                "--precision fp32 forces fp32)") if mp == "no" else ""
        return ("bf16" if bf16_in_hardware() else "fp16"), "GPU default" + note
    if mp == "no":
        return "fp32", "accelerate config (no)"
    return "fp32", "CPU default (bf16 autocast is slower on CPUs)"


def configure_backends(deterministic: bool, precision: Precision) -> None:
    """Kernel choices that follow from the run's settings (process-wide, so set once here)."""
    if deterministic:
        # warn_only=False: an op without a deterministic kernel stops the run naming the op (the cli turns it
        # into one message), instead of a warning nobody reads and a run that is not reproducible.
        torch.use_deterministic_algorithms(True, warn_only=False)
    if precision.device.type != "cuda":
        return
    # benchmark picks the fastest kernels by timing them, which differs between runs (and after a resume)
    torch.backends.cudnn.benchmark = not deterministic
    if precision.name == "fp32" and not deterministic:
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls (~10 bits of mantissa)
        log.info("fp32 on CUDA: matmuls and convolutions use TF32 (torch.set_float32_matmul_precision('high'))")
