"""A backbone built for a task: its architecture and weights (published, a file, or random), then a new
`num_classes` head after the weights load (or, with `--keep-head`, the loaded one), and the dropout asked for."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from dtl.errors import UserError
from dtl.models.backbone import Backbone
from dtl.models.registry import backbone, head_name, replace_head
from dtl.models.weights import is_weight_file, load_into, load_state_file

log = logging.getLogger("dtl")


def new_head(model: nn.Module, num_classes: int, seed: int | None) -> str:
    """A freshly initialised head, drawn from its own random stream seeded with `seed` (None: the global one):
    the same head on every rank and for every backbone whatever the building consumed, and the global stream
    left as it was. Logs what was made."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        name = replace_head(model, num_classes)
    layer = model.get_submodule(name)
    log.info("new head: %s (%s), initialised %s", _describe(layer), name,
             f"with seed {seed}" if seed is not None else "with the rest of the model")
    return name


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return f"Linear({layer.in_features}, {layer.out_features})"
    if isinstance(layer, nn.Conv2d):
        return f"Conv2d({layer.in_channels}, {layer.out_channels}, 1x1)"
    return type(layer).__name__


def head_classes(model: nn.Module) -> int:
    """Outputs of the classification layer (rows of its weight: Linear and SqueezeNet's 1x1 conv alike)."""
    return model.get_submodule(head_name(model)).weight.shape[0]


def build_model(name: str, num_classes: int, weights: str, image_size: int, dropout: float | None = None,
                drop_path: float | None = None, keep_head: bool = False, head_seed: int | None = None) -> nn.Module:
    """A torchvision (or `timm/...`) model with the requested init and a `num_classes` head (not yet frozen).
    `drop_path`: the stochastic depth rate (timm: `drop_path_rate`; None: the model's own).

    The head is newly initialised (from `head_seed`, see `new_head`) after the weights load, whatever their
    head's shape: a file trained on another task with as many classes would otherwise start every run from
    that task's classifier, confidently wrong. `keep_head`: keep the loaded head instead (continuing on the
    same label set), refused when it does not have `num_classes` outputs."""
    source = backbone(name)
    source.check(image_size, weights != "none" and not is_weight_file(weights), drop_path)
    model = source.create(weights, image_size, drop_path)
    if is_weight_file(weights):
        _load_file(model, source, Path(weights), keep_head)
    if keep_head:
        _check_kept_head(model, num_classes, weights)
    else:
        new_head(model, num_classes, head_seed)
    return _set_dropout(model, dropout)


def _load_file(model: nn.Module, source: Backbone, path: Path, keep_head: bool) -> None:
    """--weights FILE into `model`: everything strictly, the head only with `keep_head` (sized to the file's)."""
    state = source.adapt_state(model, load_state_file(path))
    head = head_name(model)
    if not keep_head:
        load_into(model, state, f"--weights {path}", skip=head)
        return
    rows = state.get(f"{head}.weight")
    if rows is None:
        raise UserError(f"--keep-head: --weights {path} has no head ({head}.weight) to keep; drop --keep-head "
                        "to start from a new one")
    replace_head(model, rows.shape[0])  # shaped like the file's, so the strict load fills it (checked after)
    load_into(model, state, f"--weights {path}")


def _check_kept_head(model: nn.Module, num_classes: int, weights: str) -> None:
    outputs = head_classes(model)
    if outputs != num_classes:
        raise UserError(f"--keep-head: the head of --weights {weights} has {outputs} outputs but the data set has "
                        f"{num_classes} classes; drop --keep-head to start from a new head")
    log.info("kept the head of --weights %s: %s (%s, --keep-head)", weights,
             _describe(model.get_submodule(head_name(model))), head_name(model))


def _set_dropout(model: nn.Module, p: float | None) -> nn.Module:
    if p is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
    return model
