"""The model being trained: the module itself, what runs it (its DDP and torch.compile wrappers), and lp-ft's
phases (what trains, the frozen prefix run without autograd), rewrapped when the phase changes."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dtl import models
from dtl.config import BackboneConfig
from dtl.distributed import DistEnv, GradCompression, fsdp, unwrap, wrap
from dtl.train.optimisation.ema import Ema

log = logging.getLogger("dtl")


class TrainedModel:
    """`module`: the model (its own state-dict keys; a cached-features head stays a head); `wrapped`: what the
    training step calls. Both change only through `set_phase` (lp-ft's switch). `compression`: the DDP
    gradient compression hook (--grad-compress), kept across rewraps. A module sharded by FSDP
    (`fsdp.shard`, done before the optimizer is built) is `sharded`: its parameters are this rank's shards."""

    def __init__(self, module: nn.Module, env: DistEnv, device: torch.device, compile_model: bool,
                 compression: GradCompression | None = None) -> None:
        self.module = module
        self._env, self._device, self._compile = env, device, compile_model
        self.compression = compression
        self.sharded = fsdp.is_sharded(module)
        self.wrapped = wrap(module, env, device, compile_model=compile_model, compression=compression)
        self._probing: bool | None = None
        self._prefix_hooks: list[RemovableHandle] = []

    @property
    def probing(self) -> bool:
        """lp-ft's probe epochs are running (only the head trains)."""
        return bool(self._probing)

    def unwrapped(self) -> nn.Module:
        """The model without its DDP, torch.compile and cached-features wrappers: the architecture itself, with
        its own state-dict keys (what checkpoints and weight files hold)."""
        return unwrap(self.wrapped)

    def full_state(self, ema: Ema | None = None) -> dict[str, torch.Tensor]:
        """The weights (or, given `ema`, the averaged weights) as one state dict with the architecture's keys:
        what model.safetensors holds. Sharded: gathered, a collective every rank calls; rank 0 gets the dict
        ({} elsewhere)."""
        model = self.unwrapped()
        if not self.sharded:
            return ema.full_state(model) if ema is not None else model.state_dict()
        weights = fsdp.full_state_dict(model)
        if ema is None:
            return weights
        return {**weights, **fsdp.full_tensors(ema.state_dict(), keep=self._env.is_main)}

    def set_phase(self, net: BackboneConfig, epoch: int) -> None:
        """lp-ft: the head alone for the first --lp-epochs epochs (backbone frozen and run under no_grad, its
        BatchNorm statistics fixed), then the backbone (or its last --finetune-last-n blocks) too. DDP reduces
        only what required grad when it was built, so it is built again at the switch (every rank at the same
        epoch). Other modes: nothing to do."""
        probing = epoch < net.lp_epochs
        if net.mode != "lp-ft" or self._probing == probing:
            return
        model = self.module
        models.freeze(model, net.model, "transfer" if probing else "finetune",
                      None if probing else net.finetune_last_n)
        for handle in self._prefix_hooks:
            handle.remove()
        self._prefix_hooks = models.run_prefix_without_grad(model, models.head_name(model)) if probing else []
        self.wrapped = wrap(model, self._env, self._device, compile_model=self._compile,
                            compression=self.compression)
        self._probing = probing
        trains = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("lp-ft epoch %d: %s (%d parameters train%s)", epoch + 1,
                 "linear probe, the backbone frozen" if probing else "fine-tuning, the backbone unfrozen", trains,
                 "; BatchNorm statistics kept as loaded" if net.freeze_bn_stats and not probing else "")
