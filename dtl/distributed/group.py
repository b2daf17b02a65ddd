"""The process group: creating it (NCCL on GPUs, gloo on CPUs, plus a gloo control group on the CPU),
leaving the process cleanly, and the collectives dtl uses (barriers, sums, per-step agreements, rank-0-first
I/O). Every rank calls them in the same order."""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from dtl.distributed.env import DistEnv
from dtl.errors import UserError

log = logging.getLogger("dtl")
T = TypeVar("T")
#: A gloo group on the CPU for small agreements (stop flag, rank-0 I/O waits): with NCCL they would run on
#: the GPU stream and make the host wait for the GPU; on CPU runs it keeps them apart from DDP's traffic.
_CONTROL_GROUP: dist.ProcessGroup | None = None
_CONTROL_TIMEOUT_S = 300.0
#: Longest a rank waits for rank 0's one-off I/O (a data set download, a multi-GB checkpoint write, an image
#: folder's first decode into its cache).
MAIN_IO_TIMEOUT_S = 3600.0
#: A gloo group for those waits alone: a gloo collective gives up after its group's timeout whatever timeout its
#: wait() is given, so on the control group (--dist-timeout, 300 s) a longer rank-0 I/O killed the waiting ranks
#: ("Timed out waiting 300000ms for send operation"). A crashed rank still ends the wait at once (the
#: connection closes).
_IO_GROUP: dist.ProcessGroup | None = None



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
    dist.init_process_group(backend, timeout=timeout, **kwargs)
    got = dist.get_world_size()
    if got != env.world_size or dist.get_rank() != env.rank:
        raise RuntimeError(f"the launcher promised rank {env.rank} of {env.world_size} but the process group "
                           f"is rank {dist.get_rank()} of {got}: refusing to train undistributed")
    global _CONTROL_GROUP, _CONTROL_TIMEOUT_S, _IO_GROUP
    _CONTROL_GROUP = dist.new_group(backend="gloo", timeout=timeout)
    _CONTROL_TIMEOUT_S = timeout_s
    _IO_GROUP = dist.new_group(backend="gloo",
                                timeout=datetime.timedelta(seconds=max(timeout_s, MAIN_IO_TIMEOUT_S)))


#: torch's message when --deterministic meets an op without a deterministic kernel (the cli names the op)
DETERMINISM_HINT = "does not have a deterministic implementation"
_PEER_FAILURE_HINTS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                       "remote worker crashing", "NCCL communicator was aborted", "Timed out", "timed out")


def peer_failure(err: BaseException) -> bool:
    """A collective that broke because another rank died (exception, OOM, kill)."""
    return isinstance(err, dist.DistBackendError) or any(h in str(err) for h in _PEER_FAILURE_HINTS)


def teardown() -> None:
    global _CONTROL_GROUP, _IO_GROUP
    _CONTROL_GROUP = _IO_GROUP = None
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
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


def monitored_barrier(env: DistEnv, timeout_s: float) -> None:
    """A barrier on the CPU control group that, on rank 0, names the ranks that did not reach it in time."""
    if env.distributed:
        dist.monitored_barrier(_CONTROL_GROUP, datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In-place sum over ranks (no-op in one process); sums and counts, never averages of averages."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
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
        if not self.env.distributed:  # no tensor to build in one process (a few microseconds per step)
            return [a or f for a, f in zip(agreed, flags)]
        local = torch.tensor([1.0 if f else 0.0 for f in flags])
        work = dist.all_reduce(local, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP, async_op=True)
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
    read what is there. The waits run on a gloo group of their own (`_IO_GROUP`) with `timeout_s` (a download
    may take longer than a collective should), and a failure of an earlier phase stops every rank: the rank
    where it happened raises its error; the others raise a quiet UserError."""
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
    work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_IO_GROUP, async_op=True)
    work.wait(datetime.timedelta(seconds=timeout_s))
    return bool(t.item())


def wait_for_main(env: DistEnv, timeout_s: float = MAIN_IO_TIMEOUT_S) -> None:
    """Everybody waits here (on the CPU I/O group, up to `timeout_s`) while rank 0 finishes its writes,
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
    dist.broadcast(data, src=0)
    return bytes(data.cpu().tolist()).rstrip(b"\0").decode()


def all_gather_tensor(tensor: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """Same-shaped tensors from every rank, in rank order."""
    if not env.distributed:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(env.world_size)]
    dist.all_gather(out, tensor)
    return out
