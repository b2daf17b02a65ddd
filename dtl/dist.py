"""The distributed runtime: the only module that reads the launcher's environment.

Whatever started us (torchrun, `accelerate launch`, `srun`, plain `python`), `detect()` turns the environment
into a frozen `DistEnv`; `setup()` creates the process group from it. Everything else asks the `DistEnv`.

We use plain torch.distributed rather than accelerate's `Accelerator` as the runtime: on a machine without
CUDA, `Accelerator()` under a multi-process launch silently believes it is rank 0 of 1 (every process then
trains on all data, undistributed), and a `srun`-started job needs its own rank derivation anyway. With
torch.distributed there is one code path for every launcher, and we can check the world we got.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from dtl.errors import EXIT_FAILURE, EXIT_USAGE, NonFiniteLossError, UserError

log = logging.getLogger("dtl")
_CONTROL_GROUP = None  # a gloo group beside NCCL for CPU-side agreements; None: the default group is gloo


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
    """The mixed precision chosen in the user's accelerate config (exported by `accelerate launch`)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


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
            accelerate_mixed_precision=accel_mp,
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
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 15000 + job_id % 20000,
            accelerate_mixed_precision=accel_mp,
        )
    return DistEnv(launcher="accelerate" if accel_mp is not None else "python",
                   accelerate_mixed_precision=accel_mp)


def pick_device(env: DistEnv, preference: str) -> torch.device:
    """cuda:LOCAL_RANK when asked for (or available under auto), else CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise UserError(f"local rank {env.local_rank} has no GPU: this node has {count}; "
                        "start at most one process per GPU")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def setup(env: DistEnv, device: torch.device, timeout_s: float) -> None:
    """Create the process group (NCCL on GPUs, gloo on CPU) and check that the world is the one promised."""
    if not env.distributed:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.launcher == "srun":
        tdist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                 rank=env.rank, world_size=env.world_size, timeout=timeout)
    else:
        tdist.init_process_group(backend, timeout=timeout)
    global _CONTROL_GROUP
    # NCCL collectives run on the GPU stream; small per-step agreements (stop flag) go through gloo on the CPU
    _CONTROL_GROUP = tdist.new_group(backend="gloo") if backend == "nccl" else None
    got = tdist.get_world_size()
    if got != env.world_size or tdist.get_rank() != env.rank:
        raise RuntimeError(f"the launcher promised rank {env.rank} of {env.world_size} but the process group "
                           f"is rank {tdist.get_rank()} of {got}: refusing to train undistributed")


_PEER_FAILURE_HINTS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                       "remote worker crashing", "NCCL communicator was aborted", "Timed out", "timed out")


def peer_failure(err: BaseException) -> bool:
    """A collective that broke because another rank died (exception, OOM, kill)."""
    return isinstance(err, tdist.DistBackendError) or any(h in str(err) for h in _PEER_FAILURE_HINTS)


def run_guarded(env: DistEnv, device_preference: str, timeout_s: float,
                body: Callable[[torch.device], int]) -> int:
    """Pick the device, create the group, run `body(device)`, and turn errors into exit codes the same way
    for every command: a UserError or a non-finite loss is one line on rank 0 (exit 2 / 1); a rank whose
    collective broke because a peer died says so in one line (exit 1) instead of a second traceback;
    anything else propagates as a traceback from the rank where it happened."""
    try:
        device = pick_device(env, device_preference)
        setup(env, device, timeout_s)
        return body(device)
    except UserError as err:
        if env.is_main:
            log.error("error: %s", err)
        return EXIT_USAGE
    except NonFiniteLossError as err:
        if env.is_main:
            log.error("error: %s", err)
        return EXIT_FAILURE
    except RuntimeError as err:
        if not (env.distributed and peer_failure(err)):
            raise
        log.error("stopping: a collective failed because another rank died (%s)", str(err).splitlines()[0][:200])
        return EXIT_FAILURE


def teardown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # noqa: BLE001 - tearing down after a failure must not hide the first error
            pass


def exit_process(code: int, env: DistEnv) -> None:
    """Leave the interpreter. Multi-process gloo runs that imported safetensors/accelerate abort now and then
    in interpreter shutdown *after* all work is done (`terminate called without an active exception`), so
    they flush everything and leave with os._exit instead of running the finalisers."""
    teardown()
    if not env.distributed:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        tdist.barrier()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In-place sum over ranks (no-op in one process); sums and counts, never averages of averages."""
    if env.distributed:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True when the flag is set on any rank, so every rank takes the same branch (no one left waiting).
    Runs on the CPU control group: called every step, it must not make the host wait for the GPU."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return bool(t.item())


def broadcast_str(value: str, env: DistEnv, device: torch.device) -> str:
    """Rank 0's string on every rank (e.g. the timestamped run folder), without pickling."""
    if not env.distributed:
        return value
    data = torch.zeros(1024, dtype=torch.uint8, device=device)
    if env.is_main:
        raw = value.encode()[:1024]
        data[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    tdist.broadcast(data, src=0)
    return bytes(data.cpu().tolist()).rstrip(b"\0").decode()


def all_gather_tensor(tensor: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """Same-shaped tensors from every rank, in rank order."""
    if not env.distributed:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(env.world_size)]
    tdist.all_gather(out, tensor)
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip the DDP (`.module`), torch.compile (`._orig_mod`) and cached-feature wrappers so state-dict keys
    are the model's own torchvision names."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif hasattr(model, "wrapped_model"):  # dtl.features.FeatureHead: the head trains, the model saves
            model = model.wrapped_model  # type: ignore[assignment]
        else:
            return model


def setup_logging(env: DistEnv) -> None:
    """Rank 0 logs info; other ranks only warnings and errors, each line tagged with its rank."""
    level = logging.INFO if env.is_main else logging.WARNING
    prefix = "" if not env.distributed else f"[rank {env.rank}] "
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
