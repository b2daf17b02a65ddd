"""Files written so that a crash leaves either the old file or the new one: safetensors carrying a digest of
their tensors (truncation and bit flips are caught on load) and JSON, each written to a temporary name,
fsynced and renamed. Never pickle."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dtl.errors import UserError


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """save_file with a content digest in the metadata, written to a temp name, fsynced, renamed."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"dtl_sha256": _digest(tensors), "format": "pt"})
    fsync(tmp)
    os.replace(tmp, path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """load_file + digest check; any damage becomes one UserError naming the file."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get("dtl_sha256")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path} is damaged or not a safetensors file ({err}); use another checkpoint "
                        "(`--resume PATH`) or delete this one") from None
    if expected is not None and _digest(tensors) != expected:
        raise UserError(f"{path} is corrupt: its contents do not match the checksum written with it "
                        "(a bit flip or a partial copy); use another checkpoint or delete this one")
    return tensors


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    fsync(tmp)
    os.replace(tmp, path)
