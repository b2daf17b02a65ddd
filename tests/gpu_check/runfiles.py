"""What the check reads from a dtl run folder: config.json (the settings, `run`: how the run was launched --
precision, process-group backend --, and how this start began: ``resumed_from``, ``cached_features``),
status.json (how it ended), metrics.jsonl (one row per epoch), the final model.safetensors, the sharded
checkpoints and the stored features. Missing files read as empty, so a step can say what is missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; {} when the file is missing or not JSON."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def config(run: Path) -> dict[str, Any]:
    return read_json(run / "config.json")


def run_info(run: Path) -> dict[str, Any]:
    """config.json's `run`: launcher, world size, device, precision, backend, ..."""
    return config(run).get("run") or {}


def status(run: Path) -> dict[str, Any]:
    return read_json(run / "status.json")


def metrics(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows, one per epoch."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def last_epoch_figures(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    last = rows[-1] if rows else {}
    return {k: last[k] for k in keys if k in last}


def shard_files(run: Path) -> list[str]:
    """The file names of the sharded (FSDP) checkpoints, over all checkpoints."""
    return sorted({p.name for p in (run / "checkpoints").glob("step-*/sharded/*.safetensors")})


def stored_features(run: Path) -> dict[str, list[int]]:
    """--cache-features: each stored features file (OUTDIR/features/<split>.safetensors) and the shape of its
    ``features`` tensor (read from the header alone)."""
    out = {}
    for path in sorted((run / "features").glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out[path.name] = list(f.get_slice("features").get_shape()) if "features" in f.keys() else []
    return out


def compare_weights(a: Path, b: Path) -> dict[str, Any]:
    """Tensor-by-tensor torch.equal of two model.safetensors: the counts, the largest absolute difference of
    the floating-point tensors that differ, the first unequal names. ValueError when the names differ."""
    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        raise ValueError(f"{a} and {b} hold different tensor names: {sorted(set(ta) ^ set(tb))[:5]}")
    unequal = [k for k in ta if not torch.equal(ta[k], tb[k])]
    max_diff = max((float((ta[k].double() - tb[k].double()).abs().max()) for k in unequal
                    if ta[k].is_floating_point() and ta[k].numel()), default=0.0)
    return {"tensors": len(ta), "unequal_tensors": len(unequal), "max_abs_diff": max_diff,
            "first_unequal": unequal[:3]}
