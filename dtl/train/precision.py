"""Numeric precision: which one a run uses (and why), the one autocast helper, and the process-wide kernel
settings that follow from it (TF32, cuDNN autotuning, determinism)."""

from __future__ import annotations

import contextlib
import logging

import torch

from dtl.dist import DistEnv

log = logging.getLogger("dtl")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for a precision: nothing for fp32, else bf16/fp16 autocast on the device."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def bf16_in_hardware() -> bool:
    """bf16 without emulation: `is_bf16_supported()` alone also says yes on V100/T4, where bf16 is emulated
    (and slow)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no such argument and counted no emulation
        return torch.cuda.is_bf16_supported()


def resolve(requested: str, env: DistEnv, device: torch.device) -> tuple[str, str]:
    """(precision, why). Flag > accelerate's explicit choice > bf16 on GPUs that have bf16 in hardware
    (Ampere and newer) / fp16 + GradScaler on older ones / fp32 on CPU. `accelerate launch` exports
    ACCELERATE_MIXED_PRECISION=no whenever neither its config nor its flag chose, so "no" is not taken as a
    choice on a GPU: pass --precision fp32 for fp32 there."""
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


def configure_backends(deterministic: bool, device: torch.device, precision: str) -> None:
    """Kernel choices that follow from the run's settings (process-wide, so set once here)."""
    if deterministic:
        # warn_only=False: an op without a deterministic kernel stops the run naming the op (the cli turns it
        # into one message), instead of a warning nobody reads and a run that is not reproducible.
        torch.use_deterministic_algorithms(True, warn_only=False)
    if device.type != "cuda":
        return
    # benchmark picks the fastest kernels by timing them, which differs between runs (and after a resume)
    torch.backends.cudnn.benchmark = not deterministic
    if precision == "fp32" and not deterministic:
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls (~10 bits of mantissa)
        log.info("fp32 on CUDA: matmuls and convolutions use TF32 (torch.set_float32_matmul_precision('high'))")
