"""The process groups and the collectives dtl uses (barriers, sums, gathers, per-step agreements, rank-0-first
I/O). `setup` creates them once (NCCL on GPUs, gloo on CPUs, plus two gloo groups on the CPU) and returns them as
one `ProcessGroups`, which is handed to everything that communicates; every rank calls its collectives in the
same order. Also here: leaving the process cleanly."""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

from dtl.distributed.env import DistEnv
from dtl.errors import UserError

log = logging.getLogger("dtl")
T = TypeVar("T")
#: Longest a rank waits for rank 0's one-off I/O (a data set download, a multi-GB checkpoint write, an image
#: folder's first decode into its cache).
MAIN_IO_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class ProcessGroups:
    """The job's process groups, created once (`setup`) and passed to whatever communicates: who we are (`env`),
    the two CPU groups beside torch's default one, and their timeouts. Its methods are the collectives dtl uses.
    For one process (`ProcessGroups()`, or what `setup` returns for a one-process `env`) every collective
    returns at once without touching torch.distributed."""

    env: DistEnv = field(default_factory=DistEnv)
    control: dist.ProcessGroup | None = None
    """A gloo group on the CPU for small agreements (stop flag, checkpoint time): with NCCL they would run on the
    GPU stream and make the host wait for the GPU; on CPU runs it keeps them apart from DDP's traffic."""
    control_timeout_s: float = 300.0
    """--dist-timeout: how long a collective of the default or the control group may wait before the job is
    declared dead."""
    io: dist.ProcessGroup | None = None
    """A gloo group for the waits on rank 0's one-off I/O alone (`main_first`, `wait_for_main`): a gloo
    collective gives up after its group's timeout whatever timeout its wait() is given, so on the control group
    (--dist-timeout, 300 s) a longer rank-0 I/O would kill the waiting ranks ("Timed out waiting 300000ms for
    send operation"). A crashed rank still ends the wait at once (the connection closes)."""
    io_timeout_s: float = MAIN_IO_TIMEOUT_S
    """How long the I/O waits last unless told otherwise."""

    @property
    def distributed(self) -> bool:
        return self.env.distributed

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def monitored_barrier(self, timeout_s: float) -> None:
        """A barrier on the CPU control group that, on rank 0, names the ranks that did not reach it in time."""
        if self.distributed:
            dist.monitored_barrier(self.control, datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (no-op in one process); sums and counts, never averages of averages."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Same-shaped tensors from every rank, in rank order."""
        if not self.distributed:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.env.world_size)]
        dist.all_gather(out, tensor)
        return out

    def broadcast_str(self, value: str, device: torch.device) -> str:
        """Rank 0's string on every rank (e.g. the timestamped run folder), without pickling."""
        if not self.distributed:
            return value
        data = torch.zeros(1024, dtype=torch.uint8, device=device)
        if self.env.is_main:
            raw = value.encode()[:1024]
            data[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        dist.broadcast(data, src=0)
        return bytes(data.cpu().tolist()).rstrip(b"\0").decode()

    def main_first(self, fn: Callable[[bool], T], timeout_s: float | None = None) -> T:
        """`fn(first)` once per process, global rank 0 first, then the first process of every other node, then
        the rest; `first` is True for those that may fetch (download, extract) and False for the rest, which only
        read what is there. The waits run on the I/O group with `timeout_s` (default `io_timeout_s`: a download
        may take longer than a collective should), and a failure of an earlier phase stops every rank: the rank
        where it happened raises its error; the others raise a quiet UserError."""
        env = self.env
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
            if self._any_failed(error is not None, timeout_s):
                if error is not None:
                    raise error
                raise UserError("stopping: another rank failed to prepare the data or weights (see rank 0's "
                                "error)")
        return result  # type: ignore[return-value]

    def wait_for_main(self, timeout_s: float | None = None) -> None:
        """Everybody waits here (on the CPU I/O group, up to `timeout_s`, default `io_timeout_s`) while rank 0
        finishes its writes, instead of in an NCCL collective whose timeout is meant for a dead peer, not a slow
        disk."""
        if self.distributed:
            self._any_failed(False, timeout_s)

    def _any_failed(self, failed: bool, timeout_s: float | None) -> bool:
        t = torch.tensor([1.0 if failed else 0.0])
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.io, async_op=True)
        work.wait(datetime.timedelta(seconds=self.io_timeout_s if timeout_s is None else timeout_s))
        return bool(t.item())


class Agreement:
    """Per-step flags (stop requested, checkpoint due) agreed by all ranks without a per-step round trip:
    each step starts an asynchronous MAX all-reduce of this step's local flags on the CPU control group and
    reads the one started a step earlier, which has long arrived. Every rank starts and reads the same
    sequence of reductions, so every rank sees the same answer at the same step (one step after a flag was
    raised); `drain()` reads the last one at the end of an epoch."""

    def __init__(self, groups: ProcessGroups, size: int = 2) -> None:
        self.groups, self.size = groups, size
        self._pending: tuple[object, torch.Tensor] | None = None

    def step(self, *flags: bool) -> list[bool]:
        """Offer this step's flags; returns the flags agreed for the previous step (all False at first)."""
        agreed = self.drain()
        if not self.groups.distributed:  # no tensor to build in one process (a few microseconds per step)
            return [a or f for a, f in zip(agreed, flags)]
        local = torch.tensor([1.0 if f else 0.0 for f in flags])
        work = dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.groups.control, async_op=True)
        self._pending = (work, local)
        return agreed

    def drain(self) -> list[bool]:
        """Wait for the reduction in flight (if any) and return what it agreed."""
        if self._pending is None:
            return [False] * self.size
        work, tensor = self._pending
        self._pending = None
        work.wait(datetime.timedelta(seconds=self.groups.control_timeout_s))  # type: ignore[attr-defined]
        return [bool(v) for v in tensor.tolist()]


def setup(env: DistEnv, device: torch.device, timeout_s: float) -> ProcessGroups:
    """Create the process group (NCCL on GPUs, gloo on CPU) and its two CPU groups, check that the world is the
    one promised, and return them; for one process, the `ProcessGroups` whose collectives do nothing."""
    if not env.distributed:
        return ProcessGroups(env, control_timeout_s=timeout_s)
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
    control = dist.new_group(backend="gloo", timeout=timeout)
    io = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=max(timeout_s, MAIN_IO_TIMEOUT_S)))
    return ProcessGroups(env, control, timeout_s, io, MAIN_IO_TIMEOUT_S)


#: torch's message when --deterministic meets an op without a deterministic kernel (the cli names the op)
DETERMINISM_HINT = "does not have a deterministic implementation"
_PEER_FAILURE_HINTS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                       "remote worker crashing", "NCCL communicator was aborted", "Timed out", "timed out")


def peer_failure(err: BaseException) -> bool:
    """A collective that broke because another rank died (exception, OOM, kill)."""
    return isinstance(err, dist.DistBackendError) or any(h in str(err) for h in _PEER_FAILURE_HINTS)


def teardown() -> None:
    """Destroy the process groups (all of them: torch keeps them), if any were created."""
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
