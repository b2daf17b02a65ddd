"""Weight files: `--weights FILE` (.safetensors, or a weights-only .pth/.pt: never an arbitrary pickle) read
into a state dict, and the strict load that names what does not fit."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dtl.errors import UserError


def is_weight_file(weights: str) -> bool:
    return weights not in ("imagenet", "none") and (
        Path(weights).suffix in (".safetensors", ".pth", ".pt", ".bin") or "/" in weights
    )


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a weights-only .pth/.pt (never an arbitrary pickle)."""
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means "this file is not usable weights"
        raise UserError(f"--weights {path} could not be read as weights ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:300]}); it is corrupt, truncated, or not a plain "
                        "state dict (pickled code is refused)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path} does not hold a state dict of tensors")
    return {_strip_prefixes(k): v for k, v in state.items()}


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, skip: str | None = None) -> None:
    """strict load that names every missing, unexpected or mis-shaped parameter. `skip`: a module (the head)
    whose entries are neither loaded from `state` nor required in it."""
    def skipped(key: str) -> bool:
        return skip is not None and key.startswith(skip + ".")

    state = {k: v for k, v in state.items() if not skipped(k)}
    own = {k: v for k, v in model.state_dict().items() if not skipped(k)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = ([f"missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"] if missing else [])
        lines += [f"unexpected: {', '.join(unexpected[:8])}"] if unexpected else []
        lines += [f"shape mismatch: {s}" for s in shapes[:8]]
        raise UserError(f"{source} does not fit {type(model).__name__}:\n  " + "\n  ".join(lines))
    model.load_state_dict(state, strict=skip is None)
