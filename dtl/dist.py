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
from typing import TypeVar

import torch
import torch.distributed as tdist

from dtl.errors import UserError

log = logging.getLogger("dtl")
T = TypeVar("T")
#: A gloo group on the CPU for small agreements (stop flag, rank-0 I/O waits): with NCCL they would run on
#: the GPU stream and make the host wait for the GPU; on CPU runs it keeps them apart from DDP's traffic.
_CONTROL_GROUP: tdist.ProcessGroup | None = None
_CONTROL_TIMEOUT_S = 300.0
#: Longest a rank waits for rank 0's one-off I/O (a data set download, a multi-GB checkpoint write).
MAIN_IO_TIMEOUT_S = 3600.0


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


def setup(env: DistEnv, device: torch.device, timeout_s: float) -> None:
    """Create the process group (NCCL on GPUs, gloo on CPU) and its CPU control group, and check that the
    world is the one promised."""
    if not env.distributed:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    # device_id binds the NCCL communicator to our GPU at once (no guessing from the current device)
    kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
    if env.launcher == "srun":
        kwargs.update(init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
                      world_size=env.world_size)
    tdist.init_process_group(backend, timeout=timeout, **kwargs)
    got = tdist.get_world_size()
    if got != env.world_size or tdist.get_rank() != env.rank:
        raise RuntimeError(f"the launcher promised rank {env.rank} of {env.world_size} but the process group "
                           f"is rank {tdist.get_rank()} of {got}: refusing to train undistributed")
    global _CONTROL_GROUP, _CONTROL_TIMEOUT_S
    _CONTROL_GROUP = tdist.new_group(backend="gloo", timeout=timeout)
    _CONTROL_TIMEOUT_S = timeout_s


#: torch's message when --deterministic meets an op without a deterministic kernel (the cli names the op)
DETERMINISM_HINT = "does not have a deterministic implementation"
_PEER_FAILURE_HINTS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                       "remote worker crashing", "NCCL communicator was aborted", "Timed out", "timed out")


def peer_failure(err: BaseException) -> bool:
    """A collective that broke because another rank died (exception, OOM, kill)."""
    return isinstance(err, tdist.DistBackendError) or any(h in str(err) for h in _PEER_FAILURE_HINTS)


def teardown() -> None:
    global _CONTROL_GROUP
    _CONTROL_GROUP = None
    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # noqa: BLE001 - tearing down after a failure must not hide the first error
            pass


def exit_process(code: int, env: DistEnv) -> None:
    """Leave the interpreter. Multi-process gloo runs that imported safetensors/accelerate abort now and then
    in interpreter shutdown *after* all work is done (`terminate called without an active exception`), so
    they flush everything and leave with os._exit instead of running the finalisers. After a failure the
    group is left alone: destroying it waits on peers that may be dead (NCCL can hang there)."""
    if code == 0:
        teardown()
    if not env.distributed:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


#: the variables that decide how ranks reach each other (shown by `dtl doctor`)
NETWORK_VARS = re.compile(r"^(MASTER_ADDR|MASTER_PORT|GLOO_SOCKET_IFNAME|NCCL_SOCKET_IFNAME|NCCL_IB_\w+|NCCL_NET\w*|"
                          r"NCCL_DEBUG|NCCL_P2P_DISABLE|NCCL_SHM_DISABLE|TORCH_NCCL_\w+)$")


def network_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {k: v for k, v in sorted(env.items()) if NETWORK_VARS.match(k)}


def monitored_barrier(env: DistEnv, timeout_s: float) -> None:
    """A barrier on the CPU control group that, on rank 0, names the ranks that did not reach it in time."""
    if env.distributed:
        tdist.monitored_barrier(_CONTROL_GROUP, datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        tdist.barrier()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In-place sum over ranks (no-op in one process); sums and counts, never averages of averages."""
    if env.distributed:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


class Agreement:
    """Per-step flags (stop requested, checkpoint due) agreed by all ranks without a per-step round trip:
    each step starts an asynchronous MAX all-reduce of this step's local flags on the CPU control group and
    reads the one started a step earlier, which has long arrived. Every rank starts and reads the same
    sequence of reductions, so every rank sees the same answer at the same step (one step after a flag was
    raised); `drain()` reads the last one at the end of an epoch."""

    def __init__(self, env: DistEnv, size: int = 2) -> None:
        self.env, self.size = env, size
        self._pending: tuple[object, torch.Tensor] | None = None

    def step(self, *flags: bool) -> list[bool]:
        """Offer this step's flags; returns the flags agreed for the previous step (all False at first)."""
        agreed = self.drain()
        local = torch.tensor([1.0 if f else 0.0 for f in flags])
        if not self.env.distributed:
            return [a or f for a, f in zip(agreed, flags)]
        work = tdist.all_reduce(local, op=tdist.ReduceOp.MAX, group=_CONTROL_GROUP, async_op=True)
        self._pending = (work, local)
        return agreed

    def drain(self) -> list[bool]:
        """Wait for the reduction in flight (if any) and return what it agreed."""
        if self._pending is None:
            return [False] * self.size
        work, tensor = self._pending
        self._pending = None
        work.wait(datetime.timedelta(seconds=_CONTROL_TIMEOUT_S))  # type: ignore[attr-defined]
        return [bool(v) for v in tensor.tolist()]


def main_first(env: DistEnv, fn: Callable[[bool], T], timeout_s: float = MAIN_IO_TIMEOUT_S) -> T:
    """`fn(first)` once per process, global rank 0 first, then the first process of every other node, then
    the rest; `first` is True for those that may fetch (download, extract) and False for the rest, which only
    read what is there. The waits run on the CPU control group with `timeout_s` (a download may take longer
    than a collective should), and a failure of an earlier phase stops every rank: the rank where it happened
    raises its error; the others raise a quiet UserError."""
    if not env.distributed:
        return fn(True)
    phases = (env.rank == 0, env.local_rank == 0 and env.rank != 0, env.local_rank != 0)
    result: T | None = None
    for mine in phases:
        error: BaseException | None = None
        if mine:
            try:
                result = fn(env.local_rank == 0)
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the others were told
                error = err
        if _any_failed(error is not None, timeout_s):
            if error is not None:
                raise error
            raise UserError("stopping: another rank failed to prepare the data or weights (see rank 0's error)")
    return result  # type: ignore[return-value]


def _any_failed(failed: bool, timeout_s: float) -> bool:
    t = torch.tensor([1.0 if failed else 0.0])
    work = tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=_CONTROL_GROUP, async_op=True)
    work.wait(datetime.timedelta(seconds=timeout_s))
    return bool(t.item())


def wait_for_main(env: DistEnv, timeout_s: float = MAIN_IO_TIMEOUT_S) -> None:
    """Everybody waits here (on the CPU control group, up to `timeout_s`) while rank 0 finishes its writes,
    instead of in an NCCL collective whose timeout is meant for a dead peer, not a slow disk."""
    if env.distributed:
        _any_failed(False, timeout_s)


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


def _strip_compile(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)


def ddp_of(model: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper of a (possibly torch.compile'd) model, or None: `no_sync` must be called on it."""
    model = _strip_compile(model)
    return model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None


def local_module(model: torch.nn.Module) -> torch.nn.Module:
    """What evaluation runs: the model without its DDP and torch.compile wrappers (a DDP forward would start
    buffer broadcasts that a rank without an eval batch never joins). A cached-features head stays a head."""
    model = _strip_compile(model)
    ddp = ddp_of(model)
    return _strip_compile(ddp.module) if ddp is not None else model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, with torchvision's state-dict keys: `local_module` without the cached-features
    wrapper either."""
    model = local_module(model)
    return getattr(model, "wrapped_model", model)


def setup_logging(env: DistEnv) -> None:
    """Rank 0 logs info; other ranks only warnings and errors, each line tagged with its rank."""
    level = logging.INFO if env.is_main else logging.WARNING
    prefix = "" if not env.distributed else f"[rank {env.rank}] "
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
