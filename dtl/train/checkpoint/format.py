"""Checkpoints: pickle-free (safetensors + JSON), all-or-nothing, self-verifying.

Layout of a run folder::

    OUTDIR/checkpoints/step-00000420/   model.safetensors  optim.safetensors  rng.safetensors  state.json
    OUTDIR/checkpoints/best.json        {"checkpoint": "step-00000400", "test_acc": ...}
    OUTDIR/model.safetensors            final weights, torchvision key names

A checkpoint is written into a hidden temporary folder, every file fsynced, then renamed into place: a
folder named `step-*` is therefore always complete. Each safetensors file carries the sha256 of its tensor
bytes in its metadata, so truncation and bit flips are caught on load instead of training on garbage.
Only rank 0 calls the writers here, except for per-rank parts: a run that keeps per-rank state (PowerSGD's error
feedback: `rank-NNNNN.safetensors`) or shards (--strategy fsdp: `sharded/`, torch.distributed.checkpoint's
safetensors shards, one file per rank; their sha256 are recorded in state.json) has every rank write into the
same temporary folder (`temp_folder`, made by rank 0 with `begin_checkpoint`) before rank 0 completes and
renames it. Such a run folder must be on a filesystem every node sees (a shared one across nodes).
FSDP checkpoints still hold the consolidated weights (model.safetensors, ema.safetensors) for every reader of
checkpoint folders (`dtl eval`, `predict`, `export`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from dtl.atomic_files import fsync, read_tensors, write_json, write_tensors
from dtl.errors import UserError

log = logging.getLogger("dtl")

FORMAT_VERSION = 1
CKPT_DIR = "checkpoints"
_PREFIX = "step-"
SHARDED_DIR = "sharded"


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


def temp_folder(outdir: Path, global_step: int) -> Path:
    """Where the checkpoint of `global_step` is assembled before it is renamed into place (every rank knows
    it without being told)."""
    return outdir / CKPT_DIR / f".tmp-{checkpoint_name(global_step)}"


def begin_checkpoint(tmp: Path) -> Path:
    """Rank 0: an empty temporary folder (a stale one of a killed run is removed first)."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.safetensors"


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder` (relative name -> hex), to verify files dtl did not write itself."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        out[str(path.relative_to(folder))] = digest.hexdigest()
    return out


def verify_digests(folder: Path, expected: dict[str, str]) -> None:
    found = file_digests(folder)
    bad = sorted(k for k in expected if found.get(k) != expected[k])
    if bad:
        raise UserError(f"{folder} is damaged ({', '.join(bad)} missing or altered): resume from an older "
                        "checkpoint (--resume PATH)")


def save_checkpoint(outdir: Path, *, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any] | None,
                    rng: dict[str, torch.Tensor], meta: dict[str, Any], keep_last: int,
                    is_best: bool = False, ema: dict[str, torch.Tensor] | None = None,
                    best_source: str = "raw", tmp: Path | None = None, pause_s: float = 0.0) -> Path:
    """Write one complete checkpoint folder atomically, then prune older ones (never the best). `ema`: the
    averaged weights (ema.safetensors); `best_source`: raw or ema, which weights made it the best. `tmp`: the
    temporary folder the ranks already wrote their parts into (`begin_checkpoint`); `optim_state` None: the
    optimizer state is in those parts (sharded). `pause_s`: seconds to sleep after each file, a testing hook
    (`dtl.faults`, DTL_TEST_SLOW_WRITES) that widens the window in which a kill -9 lands mid-checkpoint."""
    root = outdir / CKPT_DIR
    name = checkpoint_name(meta["global_step"])
    if tmp is None:
        tmp = begin_checkpoint(temp_folder(outdir, meta["global_step"]))
    optim_tensors, optim_extra = optimizer_to_tensors(optim_state) if optim_state is not None else ({}, {})
    parts = [("model", model_state), ("rng", rng)] + ([("optim", optim_tensors)] if optim_state is not None else [])
    parts += [("ema", ema)] if ema else []
    for part, tensors in parts:
        write_tensors(tmp / f"{part}.safetensors", tensors)
        if pause_s:
            time.sleep(pause_s)
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
    for stale in root.glob(".tmp-*"):  # left by a killed writer (the ranks wait while rank 0 prunes)
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
    """Read and verify a checkpoint folder: {"meta", "model", "optim", "rng"} (no "optim" in a sharded one:
    its optimizer state is in `sharded/`)."""
    meta = read_meta(path)
    out = {"meta": meta, "model": read_tensors(path / "model.safetensors")}
    if (path / "optim.safetensors").is_file():
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
