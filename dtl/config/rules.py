"""The per-field checks of the config sections (`dtl.config`): a table of rules, applied by each section's
``__post_init__``, raising a ValueError that names the field and the value."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

#: field -> (rule, message) checked by every section's __post_init__ (besides Literal choices)
_RULES: dict[str, tuple[Any, str]] = {
    **{name: (lambda v: v > 0, "must be > 0") for name in (
        "epochs", "batch_size", "grad_accum", "image_size", "log_every", "keep_last", "max_nan_skips", "lr",
        "dist_timeout", "fp16_init_scale")},
    **{name: (lambda v: v is None or v > 0, "must be > 0 when given") for name in (
        "train_subset", "eval_subset", "finetune_last_n")},
    **{name: (lambda v: v >= 0, "must be >= 0") for name in (
        "num_workers", "checkpoint_every_steps", "seed", "warmup_epochs", "weight_decay",
        "checkpoint_every_minutes", "progress_every")},
    **{name: (lambda v: 0 <= v < 1, "must be in [0, 1)") for name in ("momentum", "label_smoothing", "val_split")},
    "dropout": (lambda v: v is None or 0 <= v < 1, "must be in [0, 1)"),
    "head_lr_mult": (lambda v: v > 0, "must be > 0"),
    "layer_decay": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "lp_epochs": (lambda v: v >= 0, "must be >= 0"),
    "ema_decay": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "ema_every": (lambda v: v > 0, "must be > 0"),
    "early_stop_patience": (lambda v: v is None or v > 0, "must be > 0 when given"),
    "early_stop_min_delta": (lambda v: v >= 0, "must be >= 0"),
    "clip_grad_norm": (lambda v: v is None or v > 0, "must be > 0 when given"),
    "model": (lambda v: bool(v.strip()), "must name a torchvision model"),
    # augmentation (issue #13 part A)
    **{name: (lambda v: v >= 0, "must be >= 0") for name in ("crop_padding", "ra_num_ops")},
    "crop_scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "must be MIN MAX with 0 < MIN <= MAX <= 1"),
    "ra_magnitude": (lambda v: 0 <= v <= 30, "must be in [0, 30] (31 magnitude bins)"),
    "augmix_severity": (lambda v: 1 <= v <= 10, "must be in [1, 10]"),
    "random_erasing": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    # MixUp/CutMix, stochastic depth
    **{name: (lambda v: v >= 0, "must be >= 0") for name in ("mixup", "cutmix")},
    **{name: (lambda v: 0 <= v <= 1, "must be in [0, 1]") for name in ("mix_prob", "mix_switch_prob")},
    "drop_path": (lambda v: v is None or 0 <= v < 1, "must be in [0, 1)"),
    # trackers
    "log_with": (lambda v: {n.strip() for n in v.split(",")} <= {"none", "tensorboard", "wandb", "mlflow"},
                 "must be none or a comma-separated list of tensorboard, wandb, mlflow"),
}


def validate_section(section: Any) -> None:
    """Every field of a config section: tuples from lists, Literal choices, the rules of `_RULES`."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if typing.get_origin(hints[f.name]) is tuple:  # flags (nargs), TOML and config.json give lists
            kind = typing.get_args(hints[f.name])[0]
            value = tuple(kind(v) for v in value) if isinstance(value, (list, tuple)) else (value,)
            setattr(section, f.name, value)
        choices = choices_of(hints[f.name])
        if choices:
            _check(f.name, value, value in choices, f"must be one of {', '.join(choices)}")
        if f.name in _RULES:
            rule, message = _RULES[f.name]
            _check(f.name, value, rule(value), message)


def _check(name: str, value: Any, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")


def choices_of(hint: Any) -> tuple[str, ...]:
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return ()
