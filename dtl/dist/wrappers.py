"""The wrappers a training model may wear (DDP, torch.compile, the cached-features head) and the ways back
to the model itself."""

from __future__ import annotations

import torch


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
