"""An exponential moving average of the weights (`--ema-decay`), kept on the device beside the model.

Only what changes is averaged: the parameters that train and the floating-point buffers (BatchNorm running
statistics); frozen parameters are the same in both and are not copied. The update is one fused
`_foreach_lerp_` after the optimizer step, with the decay warmed up as timm does (min(D, (1 + t) / (10 + t)))
and computed from the step number on the host: no host sync. Every rank holds the same average (the same
weights go in), so no communication is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call

from dtl.distributed import fsdp


class Ema:
    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup: bool = True) -> None:
        self.decay, self.every, self.warmup = decay, every, warmup
        live = {n: p for n, p in model.named_parameters() if p.requires_grad}
        live.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
        self.names = list(live)
        self.sources = [t.detach() for t in live.values()]
        self.shadow = [t.detach().clone() for t in self.sources]
        # Sharded (FSDP) weights average shard by shard: the fused ops run on each rank's own part, in place
        # (the shadows stay DTensors: what sharded checkpoints save and resume re-shards).
        self._sources_local = fsdp.local_shards(self.sources)
        self._shadow_local = fsdp.local_shards(self.shadow)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def update(self, step: int) -> None:
        """After optimizer step `step` (0-based): shadow <- d * shadow + (1 - d) * weights, every N steps."""
        if (step + 1) % self.every == 0:
            # torch._foreach_*: the multi-tensor kernels torch.optim runs on (underscored, no public alias; checked
            # against torch 2.14.1)
            torch._foreach_lerp_(self._shadow_local, self._sources_local, 1.0 - self.decay_at(step))

    def reset(self) -> None:
        """Start the average from the current weights (a resume from a checkpoint without one)."""
        torch._foreach_copy_(self._shadow_local, self._sources_local)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        if sorted(tensors) != sorted(self.names):
            raise ValueError(f"{source}: the EMA holds other tensors than this run averages (a different --mode "
                             "or model?)")
        for shadow, name in zip(self.shadow, self.names):
            shadow.copy_(tensors[name])

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The averaged values in the model's own tensors for the duration (then the trained ones back): how a
        sharded model is evaluated with its EMA (`EmaView` swaps whole tensors, which FSDP does not see)."""
        trained = [t.clone() for t in self._sources_local]
        torch._foreach_copy_(self._sources_local, self._shadow_local)
        try:
            yield
        finally:
            torch._foreach_copy_(self._sources_local, trained)

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged tensors in place: loads into the torchvision model."""
        return {**model.state_dict(), **self.state_dict()}


class EmaView(nn.Module):
    """The model computing with the EMA weights (torch.func.functional_call), for evaluation: nothing is
    swapped in or out of the model. `prefix`: where the averaged model sits inside `model` (a cached-features
    head wraps it as `wrapped_model`)."""

    def __init__(self, model: nn.Module, ema: Ema, prefix: str = "") -> None:
        super().__init__()
        self.model, self.ema, self.prefix = model, ema, prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = {self.prefix + n: t for n, t in zip(self.ema.names, self.ema.shadow)}
        return functional_call(self.model, tensors, (x,), strict=False)
