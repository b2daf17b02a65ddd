"""The checkpoint policy of a run: when to save (every N steps, every M minutes, epoch ends, a stop signal),
what goes in (weights, optimizer and scaler state, every rank's RNG streams, the `TrainState`), and
restoring all of it. The file format itself is `dtl.train.checkpoint.format`'s."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtl import models
from dtl.atomic_files import read_tensors, write_tensors
from dtl.distributed import GradCompression, ProcessGroups, fsdp, unwrap
from dtl.errors import UserError
from dtl.faults import NO_FAULTS, Faults
from dtl.train.checkpoint import format as ckpt
from dtl.train.optimisation.ema import Ema
from dtl.train.optimisation.optimizer import load_optimizer_state
from dtl.train.train_state import TrainState

log = logging.getLogger("dtl")


def optimized(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the parameters the optimizer updates (what its state refers to), in the model's order. The
    same as those that require grad, except during lp-ft's probe epochs, when the backbone waits frozen."""
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return [k for k, p in model.named_parameters() if id(p) in ids]


class Checkpointer:
    """Owns when and what to save. `save` is a collective (every rank's RNG state is gathered); rank 0
    writes, and the others wait for it on the CPU group."""

    def __init__(self, outdir: Path, groups: ProcessGroups, device: torch.device, *, every_steps: int,
                 every_minutes: float, keep_last: int, static_meta: dict[str, Any],
                 last: Path | None = None, sharded: bool = False,
                 compression: GradCompression | None = None, faults: Faults = NO_FAULTS) -> None:
        self.outdir, self.groups, self.env, self.device = outdir, groups, groups.env, device
        self.sharded = sharded
        """--strategy fsdp: model, optimizer and EMA state as this rank's shards (DCP), plus consolidated
        weights."""
        self.compression = compression
        """--grad-compress powersgd: its state (error feedback is each rank's own) goes in per-rank files."""
        self.every_steps, self.every_minutes, self.keep_last = every_steps, every_minutes, keep_last
        self.static_meta = static_meta
        """config, num_classes, world_size, run info: the same in every checkpoint of the run."""
        self.last = last
        """The newest complete checkpoint (the one resumed from, then each one written)."""
        self.last_time = time.monotonic()
        self.faults = faults
        """Testing hooks, read once at start-up (DTL_TEST_SLOW_WRITES: a pause after each file rank 0 writes)."""

    # ---- when ---------------------------------------------------------------------------------------
    def time_due(self) -> bool:
        """Rank 0's clock alone decides; the others follow through `dtl.distributed.Agreement`."""
        return (bool(self.every_minutes) and self.env.is_main
                and time.monotonic() - self.last_time >= 60 * self.every_minutes)

    def due(self, global_step: int, agreed_time_due: bool, last_step: bool) -> bool:
        """A mid-epoch checkpoint at this step: every N steps (the same on every rank by construction), or
        when rank 0's clock said the minutes had passed. Not at an epoch's last step: its end saves anyway."""
        if last_step:
            return False
        return bool(self.every_steps and global_step % self.every_steps == 0) or agreed_time_due

    # ---- what ---------------------------------------------------------------------------------------
    def gather_rng(self) -> dict[str, torch.Tensor]:
        """Every rank's RNG state (a collective: all ranks call it), keyed by rank for rank 0 to save."""
        out: dict[str, torch.Tensor] = {}
        states = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        where = self.device if self.env.distributed else torch.device("cpu")
        for name, state in states.items():
            for r, s in enumerate(self.groups.all_gather(state.to(where))):
                out[f"{name}.rank{r}"] = s.cpu()
        return out

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             state: TrainState, is_best: bool = False, ema: Ema | None = None,
             best_source: str = "raw") -> Path | None:
        """Checkpoint the current position; returns the folder on rank 0 (None elsewhere)."""
        rng = self.gather_rng()
        unwrapped = unwrap(model)
        path = None
        extra: dict[str, Any] = {}
        tmp = None
        keeps_comm = self.compression is not None and self.compression.psgd is not None
        if self.sharded or keeps_comm:  # every rank writes its part into the folder rank 0 prepares
            tmp = ckpt.temp_folder(self.outdir, state.global_step)
            if self.env.is_main:
                ckpt.begin_checkpoint(tmp)
            self.groups.wait_for_main()
            if keeps_comm:
                assert self.compression is not None
                tensors, extra["comm"] = self.compression.state_tensors()
                write_tensors(ckpt.rank_file(tmp, self.env.rank), tensors)
            if self.sharded:
                ema_part = {f"ema.{k}": v for k, v in ema.state_dict().items()} if ema is not None else {}
                flat, param_groups = fsdp.sharded_state(unwrapped, optimizer, ema_part)
                fsdp.save(flat, tmp / ckpt.SHARDED_DIR)
                extra["sharded"] = {"param_groups": param_groups, "world_size": self.env.world_size,
                                    "ema": ema is not None}
            self.groups.wait_for_main()
        if self.sharded:  # consolidated weights too, for every reader of checkpoint folders (a collective)
            weights = fsdp.full_state_dict(unwrapped)
            ema_weights = fsdp.full_tensors(ema.state_dict(), keep=self.env.is_main) if ema is not None else None
        else:
            weights, ema_weights = unwrapped.state_dict(), ema.state_dict() if ema is not None else None
        if self.env.is_main:
            if self.sharded:
                assert tmp is not None
                extra["sharded"]["files"] = ckpt.file_digests(tmp / ckpt.SHARDED_DIR)
            meta = {"progress": state.saved(), **self.static_meta, "scaler": scaler.state_dict(),
                    "trainable": optimized(unwrapped, optimizer),
                    "global_step": state.global_step, "best_acc": state.best_acc, **extra}
            path = ckpt.save_checkpoint(self.outdir, model_state=weights,
                                        optim_state=None if self.sharded else optimizer.state_dict(), rng=rng,
                                        meta=meta, keep_last=self.keep_last, is_best=is_best, ema=ema_weights,
                                        best_source=best_source, tmp=tmp, pause_s=self.faults.slow_writes_s)
            self.last = path
        self.last_time = time.monotonic()
        # nobody leaves (or gets killed by the launcher) while rank 0 is still writing; the others wait on the
        # CPU group, not in an NCCL collective whose timeout a 1.6 GB VGG16 + AdamW checkpoint could outlast
        self.groups.wait_for_main()
        return path

    def _restore_shards(self, path: Path, meta: dict[str, Any], model: nn.Module,
                        optimizer: torch.optim.Optimizer, ema: Ema | None) -> None:
        """Model, optimizer and EMA from the DCP shards, re-sharded to this world size (a collective)."""
        info = meta["sharded"]
        ckpt.verify_digests(path / ckpt.SHARDED_DIR, info["files"])
        has_ema = ema is not None and info.get("ema", False)
        ema_part = {f"ema.{k}": v for k, v in ema.state_dict().items()} if has_ema and ema is not None else {}
        flat, _ = fsdp.sharded_state(model, optimizer, ema_part)
        fsdp.load(flat, path / ckpt.SHARDED_DIR)  # the EMA's shadows are filled in place
        fsdp.load_sharded_state(model, optimizer, flat, info["param_groups"])
        if info["world_size"] != self.env.world_size:
            log.info("re-sharded %s from %d to %d ranks", path, info["world_size"], self.env.world_size)
        if ema is not None and not has_ema:
            log.warning("%s holds no EMA of the weights: the average starts from its weights", path)
            ema.reset()

    def _restore_comm(self, path: Path, meta: dict[str, Any]) -> None:
        """PowerSGD's state: this rank's own error feedback at the same world size; at another, rank 0's Q
        matrices and iteration with the error feedback starting from zero (it is per rank)."""
        if self.compression is None or self.compression.psgd is None:
            return
        comm = meta.get("comm")
        if comm is None or comm.get("kind") != "powersgd":
            log.info("%s holds no PowerSGD state: compression starts afresh", path)
            return
        same_world = meta.get("world_size") == self.env.world_size
        if not same_world:
            log.warning("resuming PowerSGD at another world size (%s -> %d): its error feedback is per rank "
                        "and starts from zero", meta.get("world_size"), self.env.world_size)
        source = ckpt.rank_file(path, self.env.rank if same_world else 0)
        self.compression.load_state(read_tensors(source), comm, error_feedback=same_world)

    def restore(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, ema: Ema | None = None) -> TrainState:
        """Load a checkpoint into the (not yet wrapped) model, optimizer and scaler; the progress to go on
        from. The RNG streams are restored only where they continue the same run (mid-epoch, same world)."""
        state = ckpt.load_checkpoint(path)
        meta = state["meta"]
        cfg = self.static_meta["config"]
        ckpt.check_compatible(meta, cfg["model"], self.static_meta["num_classes"], path)
        if ("sharded" in meta) != self.sharded:
            raise UserError(f"{path} was written by --strategy {'fsdp' if 'sharded' in meta else 'ddp'}; resume "
                            f"it with that strategy (this run is {'fsdp' if self.sharded else 'ddp'})")
        if meta.get("trainable") != optimized(model, optimizer):
            raise UserError(f"{path} was trained with other trainable parameters (mode "
                            f"{meta['config']['mode']!r}); resume with the same --mode/--finetune-last-n or "
                            "start a new --output-dir")
        if self.sharded:
            self._restore_shards(path, meta, model, optimizer, ema)
        else:
            models.load_into(model, state["model"], f"checkpoint {path}")
            load_optimizer_state(optimizer, state["optim"])
        if ema is not None and not self.sharded:
            if "ema" in state:
                ema.load(state["ema"], str(path))
            else:
                log.warning("%s holds no EMA of the weights: the average starts from its weights", path)
                ema.reset()
        self._restore_comm(path, meta)
        if meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        progress = TrainState.from_saved(meta["progress"], self.device)
        key = f"cpu.rank{self.env.rank}"
        if progress.step_in_epoch and meta.get("world_size") == self.env.world_size and key in state["rng"]:
            torch.set_rng_state(state["rng"][key])
            if torch.cuda.is_available() and f"cuda.rank{self.env.rank}" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"][f"cuda.rank{self.env.rank}"])
        elif progress.step_in_epoch and meta.get("world_size") != self.env.world_size:
            log.warning("resuming mid-epoch with a different world size (%s -> %d): the data order of the rest "
                        "of this epoch differs from the interrupted run", meta.get("world_size"),
                        self.env.world_size)
        self.last = path
        log.info("resumed from %s (epoch %d, step %d of the epoch)", path, progress.epoch,
                 progress.step_in_epoch)
        return progress
