"""Who this process is in the job: the only module that reads the launcher's environment.

Whatever started us (torchrun, `accelerate launch`, `srun`, plain `python`), `detect()` turns the environment
into a frozen `DistEnv` (`dtl.distributed.group.setup` creates the process groups from it). Everything else
asks the `DistEnv`.

We use plain torch.distributed rather than accelerate's `Accelerator` as the runtime: on a machine without
CUDA, `Accelerator()` under a multi-process launch silently believes it is rank 0 of 1 (every process then
trains on all data, undistributed), and a `srun`-started job needs its own rank derivation anyway. With
torch.distributed there is one code path for every launcher, and we can check the world we got.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from dtl.errors import UserError

log = logging.getLogger("dtl")


@dataclass(frozen=True)
class DistEnv:
    """Who we are in the job. Pure data: building one starts nothing."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launcher: str = "python"
    """python | debug | torchrun | accelerate | srun"""
    master_addr: str | None = None
    master_port: int | None = None
    accelerate_mixed_precision: str | None = None
    """The mixed precision exported by `accelerate launch` (ACCELERATE_MIXED_PRECISION)."""
    accelerate_fsdp: bool = False
    """`accelerate launch` with an FSDP config (ACCELERATE_USE_FSDP=true): --strategy auto picks fsdp."""
    force_group: bool = False
    """DTL_FORCE_DISTRIBUTED=1: create the process group and wrap in DDP even at world size 1 (to exercise the
    NCCL/DDP path on one GPU)."""
    gpus_per_task: int | None = None
    """SLURM_GPUS_PER_TASK: each task was given its own GPUs (per-task binding)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.force_group


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name} must be an integer, got {value!r}") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list ("gpu[003-005,007],cpu1" -> "gpu003"): `scontrol show hostnames`
    when available, else our own parser for the common bracket syntax."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UserError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect(debug: bool = False, environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank/world/launcher from the environment. `debug` forces one process whatever the launcher."""
    env = os.environ if environ is None else environ
    accel_mp = env.get("ACCELERATE_MIXED_PRECISION")
    if debug:
        return DistEnv(launcher="debug", accelerate_mixed_precision=accel_mp)
    common = {"accelerate_mixed_precision": accel_mp,
              "accelerate_fsdp": env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"),
              "gpus_per_task": _int(env, "SLURM_GPUS_PER_TASK") if env.get("SLURM_GPUS_PER_TASK") else None}
    if "RANK" in env and "WORLD_SIZE" in env:
        # torchrun, and `accelerate launch` with several processes (it runs torchrun's machinery).
        launcher = "accelerate" if accel_mp is not None else "torchrun"
        return DistEnv(
            rank=_int(env, "RANK"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            world_size=_int(env, "WORLD_SIZE"),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1,
            launcher=launcher,
            master_addr=env.get("MASTER_ADDR"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else None,
            force_group=env.get("DTL_FORCE_DISTRIBUTED", "") not in ("", "0"),
            **common,
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        # `srun python train.py`: one task per GPU. SLURM_STEP_NUM_TASKS is set by srun for the step (the
        # batch script itself does not have it), so `python train.py` inside an sbatch script with
        # --ntasks=4 stays one process instead of waiting forever for three peers that never start.
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
        job_id = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        local_world = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE") or "1"
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            world_size=world,
            local_world_size=int(re.match(r"\d+", local_world).group()),  # "2(x3)" -> 2
            launcher="srun",
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            # A port derived from the job id: two jobs sharing a node do not collide.
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_port(job_id),
            force_group=env.get("DTL_FORCE_DISTRIBUTED", "") not in ("", "0"),
            **common,
        )
    return DistEnv(launcher="accelerate" if accel_mp is not None else "python", **common)


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job (slurm/_common.sh uses the same rule): two jobs on a node differ."""
    return 20000 + job_id % 20000


def gpu_index(env: DistEnv, visible: int) -> int:
    """Which of the `visible` GPUs this process uses. One visible GPU (the scheduler bound one to each task:
    --gpus-per-task=1, --gpu-bind, CUDA_VISIBLE_DEVICES per rank) -> 0, whatever the local rank; at least as
    many visible as local processes -> the local rank; each task bound to its own set of GPUs
    (SLURM_GPUS_PER_TASK equal to what it sees) -> local rank modulo that; anything else would put two
    processes on one GPU, which NCCL refuses: say so."""
    if visible == 1:
        return 0
    if env.local_rank < visible:
        return env.local_rank
    if env.gpus_per_task == visible:
        return env.local_rank % visible
    raise UserError(f"local rank {env.local_rank} has no GPU of its own: this process sees {visible} GPU(s) for "
                    f"{env.local_world_size} local process(es); start at most one process per GPU, or bind one "
                    "GPU per task (srun --gpus-per-task=1)")


def pick_device(env: DistEnv, preference: str) -> torch.device:
    """The GPU of this process (see `gpu_index`) when asked for (or available under auto), else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    index = gpu_index(env, torch.cuda.device_count())
    torch.cuda.set_device(index)
    if env.distributed:
        log.info("rank %d (local %d of %d) -> cuda:%d of %d visible (%s)", env.rank, env.local_rank,
                 env.local_world_size, index, torch.cuda.device_count(), torch.cuda.get_device_name(index))
    return torch.device("cuda", index)


def prepare_determinism() -> None:
    """cuBLAS needs a fixed workspace configuration for reproducible results; it is read when CUDA creates its
    first cuBLAS handle, so it is set before anything touches the GPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


#: the variables that decide how ranks reach each other (shown by `dtl doctor`)
NETWORK_VARS = re.compile(r"^(MASTER_ADDR|MASTER_PORT|GLOO_SOCKET_IFNAME|NCCL_SOCKET_IFNAME|NCCL_IB_\w+|NCCL_NET\w*|"
                          r"NCCL_DEBUG|NCCL_P2P_DISABLE|NCCL_SHM_DISABLE|TORCH_NCCL_\w+)$")


def network_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {k: v for k, v in sorted(env.items()) if NETWORK_VARS.match(k)}


def setup_logging(env: DistEnv) -> None:
    """Rank 0 logs info; other ranks only warnings and errors, each line tagged with its rank."""
    level = logging.INFO if env.is_main else logging.WARNING
    prefix = "" if not env.distributed else f"[rank {env.rank}] "
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
