"""Checkpoints: pickle-free (safetensors + JSON), all-or-nothing, self-verifying.

Layout of a run folder::

    OUTDIR/checkpoints/step-00000420/   model.safetensors  optim.safetensors  rng.safetensors  state.json
    OUTDIR/checkpoints/best.json        {"checkpoint": "step-00000400", "test_acc": ...}
    OUTDIR/model.safetensors            final weights, torchvision key names

A checkpoint is written into a hidden temporary folder, every file fsynced, then renamed into place: a
folder named `step-*` is therefore always complete. Each safetensors file carries the sha256 of its tensor
bytes in its metadata, so truncation and bit flips are caught on load instead of training on garbage.
Only rank 0 calls the writers here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from dtl import faults
from dtl.errors import UserError
from dtl.files import fsync, read_tensors, write_json, write_tensors

log = logging.getLogger("dtl")

FORMAT_VERSION = 1
CKPT_DIR = "checkpoints"
_PREFIX = "step-"


# ---- optimizer state <-> tensors + JSON --------------------------------------------------------

def optimizer_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in extra["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": extra["param_groups"]}


# ---- checkpoints -------------------------------------------------------------------------------

def checkpoint_name(global_step: int) -> str:
    return f"{_PREFIX}{global_step:08d}"


def save_checkpoint(outdir: Path, *, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any],
                    rng: dict[str, torch.Tensor], meta: dict[str, Any], keep_last: int,
                    is_best: bool = False, ema: dict[str, torch.Tensor] | None = None,
                    best_source: str = "raw") -> Path:
    """Write one complete checkpoint folder atomically, then prune older ones (never the best). `ema`: the
    averaged weights (ema.safetensors); `best_source`: raw or ema, which weights made it the best."""
    root = outdir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(meta["global_step"])
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    optim_tensors, optim_extra = optimizer_to_tensors(optim_state)
    parts = [("model", model_state), ("optim", optim_tensors), ("rng", rng)] + ([("ema", ema)] if ema else [])
    for part, tensors in parts:
        write_tensors(tmp / f"{part}.safetensors", tensors)
        if faults.slow_writes():  # testing hook: widen the window in which a kill -9 lands mid-checkpoint
            time.sleep(faults.slow_writes())
    # state.json last: it names the format version that readers check first.
    write_json(tmp / "state.json", {**meta, "optimizer": optim_extra, "format_version": FORMAT_VERSION,
                                    "saved_at": time.time()})
    fsync(tmp)
    final = root / name
    if final.exists():  # the same step saved twice (e.g. a signal right at an epoch end): keep the new one
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync(root)
    if is_best:
        write_json(root / "best.json", {"checkpoint": name, "test_acc": meta.get("best_acc"), "source": best_source})
    _prune(root, keep_last)
    return final


def _best_name(root: Path) -> str | None:
    try:
        return json.loads((root / "best.json").read_text())["checkpoint"]
    except (OSError, ValueError, KeyError):
        return None


def complete_checkpoints(outdir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders are never listed)."""
    root = outdir / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def _prune(root: Path, keep_last: int) -> None:
    best = _best_name(root)
    ckpts = complete_checkpoints(root.parent)
    for old in ckpts[:-keep_last]:
        if old.name != best:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # left by a killed writer
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(outdir: Path) -> Path | None:
    ckpts = complete_checkpoints(outdir)
    return ckpts[-1] if ckpts else None


def best_or_last(path: Path) -> Path:
    """A run folder -> its best checkpoint, else its newest; a checkpoint folder -> itself."""
    if (path / "state.json").is_file():
        return path
    best = _best_name(path / CKPT_DIR)
    if best and (path / CKPT_DIR / best / "state.json").is_file():
        return path / CKPT_DIR / best
    last = latest_checkpoint(path)
    if last is None:
        raise UserError(f"{path} holds no complete checkpoint (expected a run folder or a checkpoint folder)")
    return last


def run_folder_of(checkpoint: Path) -> Path | None:
    """The run folder holding a checkpoint folder (RUN/checkpoints/step-*), or None when it sits elsewhere."""
    return checkpoint.parent.parent if checkpoint.parent.name == CKPT_DIR else None


def read_meta(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint folder, checked: readable, this format version, written by `dtl train`."""
    state_file = path / "state.json"
    if not state_file.is_file():
        raise UserError(f"{path} is not a dtl checkpoint folder (no state.json)")
    try:
        meta = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{state_file} is corrupt ({err})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format version {version!r}; this dtl reads version "
                        f"{FORMAT_VERSION}")
    for key in ("config", "num_classes"):
        if key not in meta:
            raise UserError(f"{state_file} lacks {key!r}: not a checkpoint written by `dtl train`")
    return meta


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and verify a checkpoint folder: {"meta", "model", "optim", "rng"}."""
    meta = read_meta(path)
    out = {"meta": meta, "model": read_tensors(path / "model.safetensors")}
    out["optim"] = optimizer_from_tensors(read_tensors(path / "optim.safetensors"), meta["optimizer"])
    out["rng"] = read_tensors(path / "rng.safetensors")
    if (path / "ema.safetensors").is_file():
        out["ema"] = read_tensors(path / "ema.safetensors")
    return out


def check_compatible(meta: dict[str, Any], model: str, num_classes: int, source: Path) -> None:
    """Refuse a checkpoint of another model or class count before touching any weights."""
    cfg = meta.get("config", {})
    if cfg.get("model") != model or meta.get("num_classes") != num_classes:
        raise UserError(
            f"{source} was trained as {cfg.get('model')!r} with {meta.get('num_classes')} classes; this run is "
            f"{model!r} with {num_classes} classes. Resume with the same --model and data set, or choose "
            "another --output-dir"
        )
