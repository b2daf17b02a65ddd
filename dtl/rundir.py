"""The run folder: where it is, whether we may use it, and the files that describe the run (config.json,
status.json). Only rank 0 writes here."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dtl import checkpoint as ckpt
from dtl.config import Config, save_json
from dtl.dist import DistEnv, barrier, broadcast_str
from dtl.errors import UserError
from dtl.metrics import METRICS_FILE, truncate_metrics

if TYPE_CHECKING:
    from dtl.engine import Run

log = logging.getLogger("dtl")
RUN_FILES = ("config.json", METRICS_FILE, "status.json", "model.safetensors", "curves.png", "split.json")


def resolve(cfg: Config, env: DistEnv, device: torch.device) -> Path:
    """--output-dir, or the run folder of a --resume PATH, or runs/<timestamp> chosen by rank 0."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if cfg.resume == "auto":
        raise UserError("--resume auto needs --output-dir: the run folder to continue")
    if cfg.resume:
        path = Path(cfg.resume)
        return path.parent.parent if path.parent.name == ckpt.CKPT_DIR else path
    stamp = time.strftime("runs/%Y%m%d-%H%M%S") if env.is_main else ""
    return Path(broadcast_str(stamp, env, device if device.type == "cuda" else torch.device("cpu")))


def holds_run(outdir: Path) -> bool:
    return outdir.is_dir() and (any((outdir / f).exists() for f in RUN_FILES) or (outdir / ckpt.CKPT_DIR).exists())


def check(outdir: Path, cfg: Config) -> Path | None:
    """The checkpoint to resume from (None: start fresh); refuses to clobber another run."""
    if cfg.resume == "auto":
        return ckpt.latest_checkpoint(outdir)
    if cfg.resume:
        path = Path(cfg.resume)
        if not path.exists():
            raise UserError(f"--resume {path}: no such checkpoint or run folder")
        if (path / "state.json").is_file():
            return path
        last = ckpt.latest_checkpoint(path)
        if last is None:
            raise UserError(f"--resume {path}: holds no complete checkpoint")
        return last
    if holds_run(outdir) and not cfg.overwrite:
        raise UserError(f"{outdir} already holds a run; continue it with --resume auto, replace it with "
                        "--overwrite, or choose another --output-dir")
    return None


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


def start(run: Run) -> None:
    """Create the folder and describe the run; after this, files exist."""
    cfg, env = run.cfg, run.env
    if env.is_main:
        n_bytes = sum(t.numel() * t.element_size() for t in run.model.state_dict().values())
        n_optim = sum(p.numel() * p.element_size() for p in run.model.parameters() if p.requires_grad)
        # keep_last + best + final weights, each model + optimizer state, with headroom
        _check_writable(run.outdir, int((cfg.keep_last + 2) * (n_bytes + 2 * n_optim) * 1.1))
        try:
            run.outdir.mkdir(parents=True, exist_ok=True)
            if cfg.overwrite and not cfg.resume:
                shutil.rmtree(run.outdir / ckpt.CKPT_DIR, ignore_errors=True)
                for name in RUN_FILES:
                    (run.outdir / name).unlink(missing_ok=True)
            truncate_metrics(run.outdir, run.progress.epoch)
            save_json(run.outdir / "config.json", {"config": cfg.to_dict(), "run": run.info,
                                                   "resolved_output_dir": str(run.outdir)})
            write_status(run, "running", None)
            if run.splits is not None and cfg.dataset == "folder":
                from dtl.folder import save_split

                save_split(run.outdir, run.splits)  # a resume and `dtl eval` reuse exactly this split
        except OSError as err:
            raise UserError(f"cannot write to {run.outdir}: {err}") from None
        if cfg.log_with == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--log-with tensorboard needs the tensorboard package: "
                                "pip install 'dtl[tensorboard]'") from None
            run.tb = SummaryWriter(str(run.outdir / "tensorboard"))
        info = run.info
        log.info("launcher %s, world size %d, device %s, precision %s (%s), global batch %d = %d x %d x %d",
                 info["launcher"], info["world_size"], info["device"], info["precision"],
                 info["precision_source"], info["global_batch"], cfg.batch_size, env.world_size, cfg.grad_accum)
        log.info("output: %s", run.outdir)
    barrier(env)


def write_status(run: Run, state: str, exit_code: int | None) -> None:
    """status.json tells scripts how the run ended, also when a launcher (torchrun) reports only 'failed':
    state is running | completed | preempted | failed."""
    if not run.env.is_main:
        return
    last = ckpt.latest_checkpoint(run.outdir)
    ckpt.write_json(run.outdir / "status.json", {
        "state": state, "exit_code": exit_code, "epoch": run.progress.epoch,
        "global_step": run.progress.global_step, "checkpoint": str(last) if last else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })


def read_status(outdir: Path) -> dict:
    try:
        return json.loads((outdir / "status.json").read_text())
    except (OSError, ValueError):
        return {}
