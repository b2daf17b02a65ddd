"""The run folder: where it is, whether we may use it, what `--resume` means (resolved once, here), and the
files that describe the run (config.json, status.json). Only rank 0 writes here."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dtl.atomic_files import read_tensors, write_json, write_tensors
from dtl.config import Config, recipe_line
from dtl.data.split_file import SPLIT_FILE, save_split
from dtl.data.splits import Splits
from dtl.distributed import ProcessGroups
from dtl.errors import EXIT_OK, UserError
from dtl.train.checkpoint import format as ckpt
from dtl.train.metrics import METRICS_FILE, MetricsLog, plot_runs, truncate_metrics
from dtl.train.trackers import TRACKERS_FILE, Tracker, flat_params, open_trackers
from dtl.train.train_state import TrainState

log = logging.getLogger("dtl")
RUN_FILES = ("config.json", METRICS_FILE, "status.json", "model.safetensors", "model_ema.safetensors", "curves.png",
             SPLIT_FILE, TRACKERS_FILE)


@dataclass(frozen=True)
class RunPlan:
    """`--output-dir`/`--resume`/`--overwrite` resolved once at the start of a run."""

    outdir: Path
    resume_from: Path | None
    """The checkpoint to continue from (None: start fresh)."""
    split_file: Path | None
    """The resumed run's saved image split (OUTDIR/split.json), to reuse instead of splitting again."""
    replace: bool
    """Start over in a folder that holds another run (--overwrite without --resume)."""


def plan(cfg: Config, groups: ProcessGroups, device: torch.device) -> RunPlan:
    """Where the run goes and where it continues from; refuses to clobber another run."""
    outdir = _outdir(cfg, groups, device)
    resume_from = _resume_point(outdir, cfg)
    if resume_from is None and not cfg.checkpoint.resume and holds_run(outdir) and not cfg.checkpoint.overwrite:
        raise UserError(f"{outdir} already holds a run; continue it with --resume auto, replace it with "
                        "--overwrite, or choose another --output-dir")
    split = outdir / SPLIT_FILE if cfg.checkpoint.resume and (outdir / SPLIT_FILE).is_file() else None
    return RunPlan(outdir, resume_from, split, replace=cfg.checkpoint.overwrite and not cfg.checkpoint.resume)


def _outdir(cfg: Config, groups: ProcessGroups, device: torch.device) -> Path:
    """--output-dir, or the run folder of a --resume PATH, or runs/<timestamp> chosen by rank 0."""
    if cfg.checkpoint.output_dir:
        return Path(cfg.checkpoint.output_dir)
    if cfg.checkpoint.resume == "auto":
        raise UserError("--resume auto needs --output-dir: the run folder to continue")
    if cfg.checkpoint.resume:
        path = Path(cfg.checkpoint.resume)
        return ckpt.run_folder_of(path) or path
    stamp = time.strftime("runs/%Y%m%d-%H%M%S") if groups.env.is_main else ""
    return Path(groups.broadcast_str(stamp, device if device.type == "cuda" else torch.device("cpu")))


def _resume_point(outdir: Path, cfg: Config) -> Path | None:
    if cfg.checkpoint.resume == "auto":
        return ckpt.latest_checkpoint(outdir)
    if not cfg.checkpoint.resume:
        return None
    path = Path(cfg.checkpoint.resume)
    if not path.exists():
        raise UserError(f"--resume {path}: no such checkpoint or run folder")
    if (path / "state.json").is_file():
        return path
    last = ckpt.latest_checkpoint(path)
    if last is None:
        raise UserError(f"--resume {path}: holds no complete checkpoint")
    return last


def holds_run(outdir: Path) -> bool:
    return outdir.is_dir() and (any((outdir / f).exists() for f in RUN_FILES) or (outdir / ckpt.CKPT_DIR).exists())


def _check_writable(outdir: Path, need_bytes: int) -> None:
    """Fail before training, not at the first checkpoint: probe with a real file (permission bits say
    nothing for root, and nothing about a read-only mount) and compare free space with what we will write."""
    existing = outdir
    while not existing.exists():
        existing = existing.parent
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".dtl-probe-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to {existing} ({err.strerror}): choose another --output-dir") from None
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise UserError(f"{existing} has {free / 2**20:.0f} MiB free but checkpoints of this run need about "
                        f"{need_bytes / 2**20:.0f} MiB: free space or choose another --output-dir")


class RunFolder:
    """The folder of one run. Rank 0 alone writes here -- config.json, status.json, metrics.jsonl (and the
    trackers), curves.png and the final weights -- and only through this object; the other ranks know where it
    is."""

    def __init__(self, plan: RunPlan, groups: ProcessGroups) -> None:
        self.plan, self.groups, self.env = plan, groups, groups.env
        self._metrics: MetricsLog | None = None

    @property
    def outdir(self) -> Path:
        return self.plan.outdir

    def start(self, cfg: Config, info: dict[str, Any], state: TrainState, splits: Splits,
              model: torch.nn.Module, cached_features: str | None = None) -> None:
        """Create the folder and describe the run (rank 0); after this, files exist. `state`: where the run
        starts (the resumed checkpoint's position, or the beginning). config.json also says how this start
        began: ``resumed_from`` (the checkpoint, or null) and ``cached_features`` (--cache-features: "computed"
        when this start extracted features, "reused" when all came from OUTDIR/features; null without it)."""
        if self.env.is_main:
            outdir = self.plan.outdir
            n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            n_optim = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            # keep_last + best + final weights, each model + optimizer state, with headroom
            _check_writable(outdir, int((cfg.checkpoint.keep_last + 2) * (n_bytes + 2 * n_optim) * 1.1))
            try:
                outdir.mkdir(parents=True, exist_ok=True)
                if self.plan.replace:
                    shutil.rmtree(outdir / ckpt.CKPT_DIR, ignore_errors=True)
                    for name in RUN_FILES:
                        (outdir / name).unlink(missing_ok=True)
                truncate_metrics(outdir, state.epoch)
                resumed_from = str(self.plan.resume_from) if self.plan.resume_from is not None else None
                write_json(outdir / "config.json", {"config": cfg.to_dict(), "run": info,
                                                    "resolved_output_dir": str(outdir),
                                                    "resumed_from": resumed_from,
                                                    "cached_features": cached_features})
                self.status("running", None, state, self.plan.resume_from)
                save_split(outdir, splits)  # image folders: a resume and `dtl eval` reuse exactly this split
            except OSError as err:
                raise UserError(f"cannot write to {outdir}: {err}") from None
            self._metrics = MetricsLog(outdir, _trackers(self.plan, cfg, info))
            log.info("launcher %s, world size %d, device %s, precision %s (%s), global batch %d = %d x %d x %d",
                     info["launcher"], info["world_size"], info["device"], info["precision"],
                     info["precision_source"], info["global_batch"], cfg.optim.batch_size, self.env.world_size,
                     cfg.optim.grad_accum)
            if (recipe := recipe_line(cfg)) is not None:
                log.info("%s", recipe)  # flags and TOML win over the recipe: say which did
            log.info("output: %s", outdir)
        self.groups.barrier()

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One epoch's metrics row (metrics.jsonl and the trackers; rank 0)."""
        if self._metrics is not None:
            self._metrics.append(row)

    def status(self, state_name: str, exit_code: int | None, state: TrainState, checkpoint: Path | None) -> None:
        """status.json tells scripts how the run ended, also when a launcher (torchrun) reports only 'failed':
        running | completed | early-stopped | preempted | failed, with the position (epoch, global step)."""
        if not self.env.is_main:
            return
        extra = {"best_epoch": state.early_stop_best_epoch} if state.early_stopped else {}
        write_json(self.outdir / "status.json", {
            "state": state_name, "exit_code": exit_code, "epoch": state.epoch, "global_step": state.global_step,
            "checkpoint": str(checkpoint) if checkpoint else None, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra,
        })

    def finish(self, weights: dict[str, torch.Tensor], ema_weights: dict[str, torch.Tensor] | None,
               state: TrainState, early_stop_metric: str, checkpoint: Path | None) -> None:
        """The end of a run that trained to its last epoch or stopped early (rank 0): model.safetensors (after
        an early stop: the best epoch's weights), model_ema.safetensors, curves.png, the artifacts for the
        trackers, status.json."""
        if not self.env.is_main:
            return
        outdir = self.outdir
        write_tensors(outdir / "model.safetensors", weights)
        if ema_weights is not None:
            write_tensors(outdir / "model_ema.safetensors", ema_weights)
        plot_runs([outdir], outdir / "curves.png")
        if state.early_stopped:
            best = ckpt.best_or_last(outdir)
            write_tensors(outdir / "model.safetensors", read_tensors(best / "model.safetensors"))
            log.info("early stop: no %s improvement for %d epochs; model.safetensors holds the best epoch's "
                     "weights (epoch %d, %s)", early_stop_metric, state.early_stop_bad_epochs,
                     state.early_stop_best_epoch, best)
        if self._metrics is not None:
            self._metrics.log_artifacts([outdir / n for n in ("model.safetensors", "curves.png")])
        self.status("early-stopped" if state.early_stopped else "completed", EXIT_OK, state, checkpoint)
        log.info("done: %s", outdir)

    def close(self, ending: str) -> None:
        """Close the metrics writer and the trackers' run (`ending`: completed | preempted | failed)."""
        if self._metrics is not None:
            self._metrics.close(ending)


def _trackers(run_plan: RunPlan, cfg: Config, info: dict[str, Any]) -> list[Tracker]:
    """--log-with: the trackers, continued when the run is (one tracker run per dtl run, across requeues),
    given the resolved config and how the run was launched as hyperparameters."""
    r = cfg.run
    trackers = open_trackers(run_plan.outdir, r.log_with, resuming=bool(cfg.checkpoint.resume),
                             wandb_project=r.wandb_project, mlflow_experiment=r.mlflow_experiment)
    launch = {k: v for k, v in info.items() if k not in ("classes", "param_groups", "class_weights")}
    params = flat_params({**cfg.to_dict(), "run": launch})
    for tracker in trackers:
        tracker.log_params(params)
    return trackers


