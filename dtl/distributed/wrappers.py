"""The wrappers a training model may wear (DDP, torch.compile, the cached-features head) and the ways back
to the model itself."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import dtl.distributed.fsdp as fsdp
from dtl.distributed.compress import GradCompression
from dtl.distributed.env import DistEnv

log = logging.getLogger("dtl")


def wrap(model: torch.nn.Module, env: DistEnv, device: torch.device, compile_model: bool,
         compression: GradCompression | None = None) -> torch.nn.Module:
    """DDP when distributed (after freezing: DDP reduces only the parameters that require grad when it is
    built), with `compression`'s hook on it when given, then torch.compile when asked. A model already
    sharded by FSDP (`fsdp.shard`, before the optimizer was built) is its own wrapper: returned as is.

    Compiled with static shapes: a partial last batch compiles a second graph for its size once per run
    (recompiles stay at 1 per wrapper) instead of turning the batch dimension dynamic. The dynamic-shape
    recompile produced, on CUDA with channels_last, a contiguous weight gradient where inductor asserted
    channels_last strides in `convolution_backward` (the GPU check's compile_recompiles); static graphs are also
    the faster kernels. Evaluation runs the model without these wrappers (`local_module`)."""
    if fsdp.is_sharded(model):
        return model
    if env.distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
        log.info("model wrapped in %s (%s backend, %d ranks)", type(model).__name__,
                 torch.distributed.get_backend(), env.world_size)
        if compression is not None:
            compression.register(model)
            log.info("gradient all-reduce compressed: %s", compression.kind)
    if compile_model:
        model = torch.compile(model, dynamic=False)
    return model


def _strip_compile(model: torch.nn.Module) -> torch.nn.Module:
    # torch.compile's OptimizedModule keeps the module it compiled in the private `_orig_mod` (checked against
    # torch 2.14.1), and offers no public accessor for it
    return getattr(model, "_orig_mod", model)


def ddp_of(model: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper of a (possibly torch.compile'd) model, or None: `no_sync` must be called on it."""
    model = _strip_compile(model)
    return model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None


def no_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """A micro-step's context: without `sync`, gradients accumulate locally (DDP's no_sync, FSDP's
    set_requires_gradient_sync(False)); with it (the last micro-step), they are reduced."""
    ddp = ddp_of(model)  # also under torch.compile, whose wrapper is not a DDP instance
    if ddp is not None and not sync:
        return ddp.no_sync()
    return fsdp.gradient_sync(_strip_compile(model), sync)


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
