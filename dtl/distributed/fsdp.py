"""FSDP2 (`--strategy fsdp`): sharding a model with torch's `fully_shard` per block and at the root, the
sharded model's ways of working (gradient sync on/off, full parameters for evaluation, buffers kept as DDP
keeps them), and its state to and from sharded checkpoints (`torch.distributed.checkpoint` in its safetensors
format: each rank writes its own shard file, no pickle; loads re-shard to any world size) and the consolidated
state dict with the architecture's own keys."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

log = logging.getLogger("dtl")


def _block_modules(model: nn.Module, prefixes: list[str]) -> list[nn.Module]:
    """The submodules a block's prefixes name: a module name as is, a parameter name by its owning module;
    the root and modules nested in another of the list are left out (the root shards what is left)."""
    names: list[str] = []
    for prefix in prefixes:
        try:
            model.get_submodule(prefix)
            names.append(prefix)
        except AttributeError:
            owner = prefix.rsplit(".", 1)[0] if "." in prefix else ""
            if owner and owner not in names:
                names.append(owner)
    kept = [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]
    return [model.get_submodule(n) for n in kept]


def shard(model: nn.Module, blocks: list[list[str]], param_dtype: torch.dtype | None,
          reduce_dtype: torch.dtype | None, cpu_offload: bool) -> nn.Module:
    """`fully_shard` each backbone block (`blocks`: `models.backbone_blocks`' table), then the root (the head
    and whatever no block holds), in place: the parameters become DTensors sharded over the world (dim 0), so
    the optimizer must be built after this. `param_dtype`: FSDP2's compute dtype (bf16 runs), `reduce_dtype`:
    the gradients' reduce-scatter dtype."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs: dict[str, Any] = {"mp_policy": policy}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    done: set[int] = set()
    for prefixes in blocks:
        modules = [m for m in _block_modules(model, prefixes) if id(m) not in done]
        if not modules or not any(True for m in modules for _ in m.parameters()):
            continue
        fully_shard(modules if len(modules) > 1 else modules[0], **kwargs)
        done.update(id(m) for m in modules)
    fully_shard(model, **kwargs)
    log.info("model sharded with FSDP2 (fully_shard: %d modules in blocks + the root, %s backend, %d ranks%s%s)",
             len(done),
             dist.get_backend(), dist.get_world_size(),
             f", params {param_dtype}, reduce {reduce_dtype}" if param_dtype is not None else "",
             ", CPU offload" if cpu_offload else "")
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """FSDP's no_sync: gradients of micro-steps with sync off accumulate unreduced (FSDP2's
    `set_requires_gradient_sync`); the micro-step with sync on reduce-scatters their sum."""
    if enabled or not is_sharded(model):
        yield
        return
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def _fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """The full parameters on every rank for the duration (evaluation): a sharded forward is a collective per
    block, and ranks evaluate different numbers of batches. Costs one full copy of the parameters (no
    gradients, no optimizer state) while it lasts."""
    if not is_sharded(model):
        yield
        return
    modules = _fsdp_modules(model)
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            # back to what `shard` and torch's lazy initialisation left: the blocks reshard after forward, the
            # root does not (its parameters are used again at once by backward; torch 2.14.1's FSDP2 sets that
            # at the root's first forward, so a root left resharding would all-gather again every step)
            m.set_reshard_after_forward(m is not model, recurse=False)


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP's broadcast_buffers does before each
    forward: FSDP shards parameters only, so without this each rank's statistics would follow its own data.
    One broadcast per dtype and device (running statistics, batch counts), not one per buffer."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for buffer in model.buffers():
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    for buffers in groups.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(part.view_as(b))


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of (sharded) gradients, as a plain tensor on every rank. A collective."""
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def local_shards(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's part of each (DTensor) tensor, as views: in-place ops on them change the DTensors."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


# ---- state ------------------------------------------------------------------------------------------

def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated state dict with the architecture's keys, on the CPU of rank 0 ({} on the others).
    A collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_tensors(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """DTensors gathered one at a time (a collective); `keep`: this rank keeps the result (CPU copies)."""
    out = {}
    for name, t in tensors.items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[name] = full.detach().cpu()
    return out


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                  extra: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """(flat tensors for DCP: model.*, optim.<param>.<state>, and `extra` under their own keys; the optimizer's
    param_groups, which are JSON). The tensors are this rank's shards."""
    flat = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    osd = get_optimizer_state_dict(model, optimizer)
    for fqn, pstate in osd["state"].items():
        for name, value in pstate.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            flat[f"optim.{fqn}.{name}"] = value
    flat.update(extra or {})
    return flat, osd["param_groups"]


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor],
                       param_groups: list[dict[str, Any]]) -> None:
    """Put `sharded_state`'s tensors (filled by `load`) back into the model and optimizer."""
    set_model_state_dict(model, {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")})
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key.startswith("optim."):
            fqn, name = key[len("optim."):].rsplit(".", 1)
            state.setdefault(fqn, {})[name] = value
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": param_groups})


def save(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Every rank writes its shards of `tensors` into `folder` (one safetensors file per rank, with the
    shard layout in its JSON header). A collective."""
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))


def load(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Fill `tensors` (this rank's shards, any world size) from `save`'s folder, in place. A collective."""
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)))
