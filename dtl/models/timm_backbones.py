"""timm backbones (the optional extra ``dtl[timm]``): ``--model timm/<name>`` for any `timm.list_models()`
name, e.g. ``timm/convnext_tiny`` or ``timm/vit_base_patch16_224``.

- weights: ``imagenet`` = the model's default pretrained tag; ``TAG`` = that tag (``--weights fb_in22k``, the
  part after the dot in `timm.list_pretrained()`); ``none``; a file is loaded by `dtl.models` as for
  torchvision models. Pretrained files come from the Hugging Face hub cache (``$HF_HOME/hub``).
- the head: `reset_classifier(num_classes)`; its name from `get_classifier()` (``head.fc`` for ConvNeXt,
  ``head`` for ViT).
- weight files go through the family's `checkpoint_filter_fn` (ViT position embeddings resampled).
- blocks (``--finetune-last-n``, ``--layer-decay``): timm's own fine-grained `group_matcher`, the head left out.
- ViT-like models (fixed input size) are built for ``--image-size`` (``img_size``; pretrained position
  embeddings are resampled by timm).
- preprocessing: mean/std/interpolation from `pretrained_cfg`.

timm is imported when first needed, so dtl works without it (and says how to install it).
"""

from __future__ import annotations

import difflib
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dtl.data.preprocessing import Preprocessing
from dtl.errors import UserError
from dtl.models.backbone import Backbone
from dtl.models.weights import is_weight_file

log = logging.getLogger("dtl")

PREFIX = "timm/"
#: dtl's "imagenet" weights name means timm's default pretrained tag
DEFAULT_WEIGHTS = "imagenet"


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def version() -> str:
    return _timm().__version__


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UserError("timm backbones need the timm package: pip install 'dtl[timm]' "
                        "(or pip install timm)") from None
    return timm


def arch_of(name: str) -> str:
    """`timm/convnext_tiny` -> `convnext_tiny` (a `.tag` suffix is refused by `check_name`: --weights TAG)."""
    return name[len(PREFIX):].split(".", 1)[0]


def check_name(name: str) -> None:
    timm = _timm()
    arch = arch_of(name)
    if "." in name[len(PREFIX):]:
        tag = name.split(".", 1)[1]
        raise UserError(f"--model {name}: give the pretrained tag as --weights {tag} (with --model {PREFIX}{arch})")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else \
            "; `dtl models --source timm --filter TEXT` lists them"
        raise UserError(f"unknown model {name!r}: not a timm model{hint}")


def tags(arch: str) -> list[str]:
    """The pretrained tags of an architecture, the default first (timm's order)."""
    return [n.split(".", 1)[1] for n in _timm().list_pretrained(f"{arch}.*") if "." in n]


def _tagged(name: str, weights: str) -> str:
    """The timm model name carrying the requested pretrained tag."""
    arch = arch_of(name)
    if weights == DEFAULT_WEIGHTS:
        if not tags(arch):
            raise UserError(f"{name} has no pretrained weights in timm; use --weights none (with --mode "
                            "scratch) or --weights FILE")
        return arch
    if weights not in tags(arch):
        options = ", ".join(tags(arch)) or "none"
        raise UserError(f"--weights {weights!r}: {name} has no such pretrained tag (tags: {options}; or "
                        "imagenet for the default, none, or a .safetensors/.pth file)")
    return f"{arch}.{weights}"


def _kwargs(arch: str, image_size: int, extra: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(extra)
    cfg = _timm().get_pretrained_cfg(arch)
    if cfg is not None and cfg.fixed_input_size:
        kwargs.setdefault("img_size", image_size)  # position embeddings sized for --image-size
    return kwargs


def create(name: str, weights: str, image_size: int, pretrained: bool, **extra: Any) -> nn.Module:
    """The timm model with its original head: pretrained (`weights`: imagenet or a tag) or random.
    `extra`: more `timm.create_model` keyword arguments (e.g. drop_path_rate)."""
    timm = _timm()
    check_name(name)
    arch = arch_of(name)
    target = _tagged(name, weights) if pretrained else arch
    try:
        return timm.create_model(target, pretrained=pretrained, **_kwargs(arch, image_size, extra))
    except TypeError as err:  # e.g. img_size for a model that does not take it
        raise UserError(f"{name} cannot be built with {extra or 'these settings'}: {err}") from None
    except Exception as err:  # noqa: BLE001 - offline: huggingface_hub / urllib errors, a corrupt cache file
        if not pretrained:
            raise
        raise UserError(_offline_message(name, target, err)) from None


def _offline_message(name: str, target: str, err: Exception) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    cfg = _timm().get_pretrained_cfg(target)
    repo = (cfg.hf_hub_id if cfg is not None else None) or f"timm/{target}"
    return (f"could not get the pretrained weights of {name} ({target}): {type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''}.\nOn a machine without internet, fetch them "
            f"elsewhere (`huggingface-cli download {repo}`) and copy that hub cache to {HF_HUB_CACHE} (the "
            "folder follows HF_HOME; set HF_HUB_OFFLINE=1 there), or pass --weights FILE (.safetensors/.pth).")


def check_image_size(name: str, image_size: int, extra: dict[str, Any] | None = None) -> None:
    """Refuse an image size the architecture cannot take, on the meta device (no memory, no weights)."""
    arch = arch_of(name)
    kwargs = _kwargs(arch, image_size, extra or {})
    try:
        with torch.device("meta"):
            model = _timm().create_model(arch, pretrained=False, **kwargs)
    except Exception:  # noqa: BLE001 - a builder that computes with real tensors: build it on the CPU
        model = _timm().create_model(arch, pretrained=False, **kwargs)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    except (RuntimeError, ValueError, AssertionError, TypeError) as err:
        raise UserError(f"--image-size {image_size} is too small or invalid for {name} "
                        f"({str(err).splitlines()[0][:200]}); try a larger --image-size") from None


def is_timm_model(model: nn.Module) -> bool:
    return callable(getattr(model, "reset_classifier", None)) and hasattr(model, "pretrained_cfg")


def head_name(model: nn.Module) -> str:
    """The qualified name of `get_classifier()`."""
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head and name:
            return name
    raise UserError(f"cannot find the classification layer of {type(model).__name__} (get_classifier() gives "
                    f"{type(head).__name__}); this timm model is not supported")


def reset_head(model: nn.Module, num_classes: int) -> str:
    device = next(model.parameters()).device
    model.reset_classifier(num_classes)
    model.get_classifier().to(device)
    return head_name(model)


def blocks(model: nn.Module, head: str) -> list[list[str]]:
    """Backbone blocks in forward order from timm's fine-grained group matcher, each a list of parameter
    names (the head's parameters left out; groups that only held the head dropped)."""
    # The public name of group_parameters, which lives in the private timm.models._manipulate (public in timm
    # 0.9.2, the oldest pyproject allows, and 1.0.31); timm's own layer decay groups the blocks with it too.
    from timm.models import group_parameters

    in_head: Callable[[str], bool] = lambda key: key == head or key.startswith(head + ".")  # noqa: E731
    groups = group_parameters(model, model.group_matcher(coarse=False))
    found = [[k for k in names if not in_head(k)] for _, names in sorted(groups.items())]
    every = [k for k, _ in model.named_parameters()]
    return [_as_module(g, every) for g in found if g]


def _as_module(names: list[str], every: list[str]) -> list[str]:
    """[`blocks.3`] for a group that is exactly a module's parameters (readable group tables), else the names."""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    prefix = ".".join(common)
    if prefix and prefix not in names and {k for k in every if k.startswith(prefix + ".")} == set(names):
        return [prefix]
    return names


def adapt_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A weight file through the model family's own `checkpoint_filter_fn`, as timm does for pretrained files:
    e.g. ViT position embeddings resampled for --image-size, original-repo key names converted."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(state, model)
    except Exception as err:  # noqa: BLE001 - a file the filter cannot read: the strict load names the problem
        log.debug("checkpoint_filter_fn of %s failed (%s); loading the file as it is", type(model).__name__, err)
        return state


def preprocessing(name: str, weights: str = DEFAULT_WEIGHTS) -> Preprocessing:
    """mean/std/interpolation of the pretrained config of `weights` when it is one of the architecture's tags
    (tags differ: miil_in21k_ft_in1k wants mean 0, std 1, bilinear), else of its default tag; ImageNet's when
    it has none. Read from timm's registry: no download."""
    arch = arch_of(name)
    cfg = _timm().get_pretrained_cfg(f"{arch}.{weights}" if weights in tags(arch) else arch)
    if cfg is None:
        return Preprocessing()
    return Preprocessing(tuple(cfg.mean), tuple(cfg.std), cfg.interpolation or "bilinear")


def list_models(text: str, max_counted: int = 60) -> list[tuple[str, int | None, list[str]]]:
    """(name with the timm/ prefix, parameter count or None, pretrained tags) of the timm models whose name
    contains `text`. Counts come from building each model on the meta device (no memory), only when at most
    `max_counted` models match (building all ~1,400 would take minutes)."""
    timm = _timm()
    names = [n for n in timm.list_models() if text in n]
    by_arch: dict[str, list[str]] = {}
    for full in timm.list_pretrained():
        arch, _, tag = full.partition(".")
        by_arch.setdefault(arch, []).append(tag)
    rows = []
    for arch in names:
        count = None
        if len(names) <= max_counted:
            try:
                with torch.device("meta"):
                    count = sum(p.numel() for p in timm.create_model(arch).parameters())
            except Exception:  # noqa: BLE001 - a model that cannot be built on meta: no count, still listed
                count = None
        rows.append((PREFIX + arch, count, by_arch.get(arch, [])))
    return rows


class TimmBackbone(Backbone):
    """`--model timm/NAME`: any `timm.list_models()` architecture."""

    @classmethod
    def serves(cls, name: str) -> bool:
        return is_timm(name)

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        return is_timm_model(model)

    def check(self, image_size: int, hub_weights: bool, drop_path: float | None) -> None:
        check_name(self.name)
        check_image_size(self.name, image_size, self._extra(drop_path))

    def create(self, weights: str, image_size: int, drop_path: float | None) -> nn.Module:
        hub = weights != "none" and not is_weight_file(weights)
        return create(self.name, weights, image_size, hub, **self._extra(drop_path))

    def fetch_weights(self, weights: str) -> None:
        create(self.name, weights, 224, True)  # timm keeps its files in the Hugging Face hub cache

    def preprocessing(self, weights: str) -> Preprocessing:
        return preprocessing(self.name, weights)

    def blocks(self, model: nn.Module) -> list[list[str]]:
        return blocks(model, head_name(model))

    @staticmethod
    def head_name(model: nn.Module) -> str:
        return head_name(model)

    @staticmethod
    def replace_head(model: nn.Module, num_classes: int) -> str:
        return reset_head(model, num_classes)

    def adapt_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return adapt_state(model, state)

    def versions(self) -> dict[str, str]:
        return {"timm": version()}

    @staticmethod
    def _extra(drop_path: float | None) -> dict[str, Any]:
        return {} if drop_path is None else {"drop_path_rate": drop_path}
