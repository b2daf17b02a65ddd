"""Gradient compression for DDP (`--grad-compress`): torch's communication hooks (`bf16_compress_hook`,
`PowerSGDState` + `powerSGD_hook`) behind one counting wrapper, which measures the bytes each step hands to the
all-reduce and keeps PowerSGD's state checkpointable.

PowerSGD keeps its state per DDP *bucket* (error feedback over the bucket's flat buffer, the warm-start Q
matrices of its compressed tensors). DDP's buckets are not stable across a resume: a new DDP puts every gradient
in one bucket for its first step and rebuilds the buckets in backward order after it. So the state is saved and
restored *per parameter* (`state_tensors`/`load_state`), and the wrapper re-keys it to whatever buckets DDP hands
it: every PowerSGD operation (error feedback, P = MQ, orthogonalisation, Q = M^T P) works tensor by tensor and
all-reduces are element-wise sums, so regrouping the tensors into other buckets computes the same numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

log = logging.getLogger("dtl")

#: torch's PowerSGD default: a tensor is compressed only when that saves at least half its bytes
MIN_COMPRESSION_RATE = 2.0


@dataclass(frozen=True)
class Slot:
    """One gradient inside a bucket: its parameter's name, offset in the flat buffer, its shape, and where its
    Q matrix sits in the bucket's Q memory (None: all-reduced uncompressed)."""

    name: str
    offset: int
    shape: tuple[int, ...]
    q_offset: int | None
    q_shape: tuple[int, int] | None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def plan_bucket(names: list[str], shapes: list[tuple[int, ...]], rank: int,
                min_compression_rate: float = MIN_COMPRESSION_RATE) -> tuple[list[Slot], int, int]:
    """How `powerSGD_hook` lays out a bucket holding these gradients (in this order): each tensor viewed as
    (shape[0], rest), compressed when `_should_compress` says so, its P and Q placed in the order the hook
    uses (grouped by matrix shape, first appearance first). Returns (slots, P elements, Q elements)."""
    offsets, compress, matrices = [], [], []
    offset = 0
    for shape in shapes:
        numel = int(np.prod(shape)) if shape else 1
        n = shape[0] if shape else 1
        m = numel // n
        r = min(n, m, rank)
        matrices.append((n, m, r))
        # torch's own per-tensor choice (private; checked against torch 2.14.1): the same rule as the hook, so
        # the layout planned here is the one powerSGD_hook builds
        compress.append(bool(psgd._should_compress(n, m, r, min_compression_rate)[0]))
        offsets.append(offset)
        offset += numel
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (n, m, _) in enumerate(matrices):
        if compress[i]:
            by_shape.setdefault((n, m), []).append(i)
    q_at: dict[int, int] = {}
    p_total = q_total = 0
    for members in by_shape.values():
        for i in members:
            n, m, r = matrices[i]
            q_at[i] = q_total
            p_total += n * r
            q_total += m * r
    slots = [Slot(name, offsets[i], tuple(shapes[i]), q_at.get(i),
                  (matrices[i][1], matrices[i][2]) if i in q_at else None) for i, name in enumerate(names)]
    return slots, p_total, q_total


def step_bytes(shapes: list[tuple[int, ...]], kind: str, rank: int = 4, element_size: int = 4) -> int:
    """Bytes one rank hands to the all-reduce per optimizer step for gradients of these shapes, all in one
    bucket (`kind`: none | bf16 | powersgd once compressing). PowerSGD's per-tensor choice does not depend on
    the bucketing, so this is also the total over any bucketing."""
    numel = sum(int(np.prod(s)) if s else 1 for s in shapes)
    if kind == "none":
        return numel * element_size
    if kind == "bf16":
        return numel * 2
    slots, p_total, q_total = plan_bucket([str(i) for i in range(len(shapes))], shapes, rank)
    uncompressed = sum(s.numel for s in slots if s.q_offset is None)
    return (uncompressed + p_total + q_total) * element_size


class GradCompression:
    """The hook DDP calls per bucket: torch's hook for `kind`, counting the payload bytes it all-reduces (on
    the host, from shapes: no device sync). Holds PowerSGD's state across DDP rebuilds (lp-ft) and resumes.

    `names`: parameter id -> name (the model's own keys: what checkpoints store)."""

    def __init__(self, kind: str, rank: int = 4, start_iter: int = 2, warm_start: bool = True) -> None:
        self.kind = kind
        self.psgd: psgd.PowerSGDState | None = None
        if kind == "powersgd":
            self.psgd = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                           start_powerSGD_iter=start_iter, min_compression_rate=MIN_COMPRESSION_RATE,
                                           use_error_feedback=True, warm_start=warm_start, random_seed=0)
        self.names: dict[int, str] = {}
        self._layout: dict[int, list[Slot]] = {}
        """bucket index -> its slots, for the buckets PowerSGD's live state is keyed by."""
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        """name -> {"error": ..., "q": ...}: per-parameter state not yet placed into a live bucket."""
        self.bytes_sent = 0
        self.steps = 0
        self._serial = False

    def register(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        """Install on a (new) DDP wrapper; PowerSGD state held so far is kept and re-keyed to its buckets."""
        self._flush()
        self.names = {id(p): n for n, p in ddp.module.named_parameters()}
        self._serial = dist.get_backend(ddp.process_group) == "gloo"
        ddp.register_comm_hook(self, GradCompression._hook)

    def take_counts(self) -> tuple[int, int]:
        """(bytes all-reduced, synchronised steps) since the last call."""
        out = (self.bytes_sent, self.steps)
        self.bytes_sent = self.steps = 0
        return out

    # ---- the hook ---------------------------------------------------------------------------------
    @staticmethod
    def _hook(self, bucket):  # type: ignore[no-untyped-def]  # DDP rejects string annotations (future import)
        buffer = bucket.buffer()
        if bucket.is_last():
            self.steps += 1
        if self.kind == "bf16":
            self.bytes_sent += buffer.numel() * 2
            return default_hooks.bf16_compress_hook(None, bucket)
        state = self.psgd
        assert state is not None
        if state.iter < state.start_powerSGD_iter:
            self.bytes_sent += buffer.numel() * buffer.element_size()
            return psgd.powerSGD_hook(state, bucket)
        slots = self._slots(bucket)
        index = bucket.index()
        if self._layout.get(index) != slots:
            if index in self._layout:  # DDP rebuilt its buckets: the live state belongs to the old ones
                self._flush()
            self._install(index, slots, buffer)
        _, p_total, q_total = plan_bucket([s.name for s in slots], [s.shape for s in slots],
                                          state.matrix_approximation_rank, state.min_compression_rate)
        uncompressed = sum(s.numel for s in slots if s.q_offset is None)
        self.bytes_sent += (uncompressed + p_total + q_total) * buffer.element_size()
        future = psgd.powerSGD_hook(state, bucket)
        if self._serial:
            # gloo: the hook chains three all-reduces through future callbacks; with two buckets in flight the
            # ranks issued them in different orders (gloo::EnforceNotMet "Received data size doesn't match
            # expected size"). Finishing each bucket's chain before the next bucket starts keeps one order.
            future.wait()
        return future

    def _slots(self, bucket: dist.GradBucket) -> list[Slot]:
        state = self.psgd
        assert state is not None
        names = [self.names[id(p)] for p in bucket.parameters()]
        shapes = [tuple(g.shape) for g in bucket.gradients()]
        slots, _, _ = plan_bucket(names, shapes, state.matrix_approximation_rank, state.min_compression_rate)
        return slots

    def _install(self, index: int, slots: list[Slot], buffer: torch.Tensor) -> None:
        """Build bucket `index`'s error and Q memory from the per-parameter state (when there is any)."""
        state = self.psgd
        assert state is not None
        self._layout[index] = slots
        if not any(s.name in self._pending for s in slots):
            return
        error = torch.zeros_like(buffer)
        _, p_total, q_total = plan_bucket([s.name for s in slots], [s.shape for s in slots],
                                          state.matrix_approximation_rank, state.min_compression_rate)
        q = torch.zeros(q_total, dtype=buffer.dtype, device=buffer.device)
        have_q = True
        for s in slots:
            saved = self._pending.pop(s.name, {})
            if "error" in saved:
                error[s.offset:s.offset + s.numel] = saved["error"].to(buffer.device).flatten()
            if s.q_offset is not None and s.q_shape is not None:
                if "q" in saved:
                    q[s.q_offset:s.q_offset + s.q_shape[0] * s.q_shape[1]] = saved["q"].to(buffer.device).flatten()
                else:
                    have_q = False
        state.error_dict[index] = error
        if have_q and state.warm_start:
            state.q_memory_dict[index] = q
            state.p_memory_dict[index] = torch.empty(p_total, dtype=buffer.dtype, device=buffer.device)

    def _flush(self) -> None:
        """Move PowerSGD's live per-bucket state into per-parameter tensors (`_pending`)."""
        state = self.psgd
        if state is None:
            return
        for index, slots in self._layout.items():
            error = state.error_dict.get(index)
            q = state.q_memory_dict.get(index)
            for s in slots:
                entry = self._pending.setdefault(s.name, {})
                if error is not None:
                    entry["error"] = error[s.offset:s.offset + s.numel].view(s.shape).clone()
                if q is not None and s.q_offset is not None and s.q_shape is not None:
                    entry["q"] = q[s.q_offset:s.q_offset + s.q_shape[0] * s.q_shape[1]].view(s.q_shape).clone()
        state.error_dict.clear()
        state.q_memory_dict.clear()
        state.p_memory_dict.clear()
        self._layout = {}

    # ---- checkpoints ----------------------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """PowerSGD's state as (tensors, JSON): per-parameter error feedback (this rank's own) and warm-start
        Q, the iteration and the Q-initialisation RNG. Empty for bf16 (stateless)."""
        state = self.psgd
        if state is None:
            return {}, {"kind": self.kind}
        self._flush()  # re-installed from `_pending` at the next step, unchanged
        tensors: dict[str, torch.Tensor] = {}
        for name, entry in self._pending.items():
            for part, value in entry.items():
                tensors[f"{part}.{name}"] = value.detach().cpu()
        algo, keys, pos, has_gauss, cached = state.rng.get_state()
        tensors["rng_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
        meta = {"kind": self.kind, "iter": state.iter, "rank": state.matrix_approximation_rank,
                "start_iter": state.start_powerSGD_iter, "warm_start": state.warm_start,
                "rng": {"algorithm": algo, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], error_feedback: bool) -> None:
        """Continue from `state_tensors`' output. `error_feedback`: False when this rank's saved error is not
        its own (another world size): the error then starts from zero, the rest continues."""
        state = self.psgd
        if state is None or meta.get("kind") != "powersgd":
            return
        state.iter = int(meta["iter"])
        rng = meta["rng"]
        state.rng.set_state((rng["algorithm"], tensors["rng_keys"].numpy().astype(np.uint32), rng["pos"],
                             rng["has_gauss"], rng["cached"]))
        self._pending = {}
        for key, value in tensors.items():
            if key == "rng_keys":
                continue
            part, name = key.split(".", 1)
            if part == "error" and not error_feedback:
                continue
            if part == "q" and meta.get("rank") != state.matrix_approximation_rank:
                continue  # another --powersgd-rank: Q has other columns; the power iteration starts afresh
            self._pending.setdefault(name, {})[part] = value
        self._layout = {}
