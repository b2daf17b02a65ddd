"""Which `Backbone` serves a model name, and which one built a model: the only place that tells torchvision and
timm apart. A new source of backbones is a `Backbone` subclass added to `SOURCES`."""

from __future__ import annotations

from torch import nn

from dtl.data.preprocessing import Preprocessing
from dtl.models.backbone import Backbone
from dtl.models.timm_backbones import TimmBackbone
from dtl.models.torchvision_backbones import TorchvisionBackbone
from dtl.models.weights import is_weight_file

#: asked in order; the last serves every name (and owns every model) the others do not
SOURCES: tuple[type[Backbone], ...] = (TimmBackbone, TorchvisionBackbone)


def backbone(name: str) -> Backbone:
    """The backbone `--model name` asks for."""
    return next(source for source in SOURCES if source.serves(name))(name)


def source_of(model: nn.Module) -> type[Backbone]:
    return next(source for source in SOURCES if source.owns(model))


def head_name(model: nn.Module) -> str:
    """Qualified name of the model's classification layer (`classifier.6` for VGG16, `fc` for ResNet,
    `head.fc` for timm's ConvNeXt)."""
    return source_of(model).head_name(model)


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Swap the classification layer for a fresh one with `num_classes` outputs; returns its name."""
    return source_of(model).replace_head(model, num_classes)


def backbone_blocks(model: nn.Module, name: str) -> list[list[str]]:
    """Blocks of `model` (built as `--model name`) in forward order, the head left out."""
    return backbone(name).blocks(model)


def preprocessing(name: str, weights: str) -> Preprocessing:
    """The input normalisation/resampling the backbone's `weights` were pretrained with (ImageNet's for
    torchvision)."""
    return backbone(name).preprocessing(weights)


def fetch_weights(name: str, weights: str) -> None:
    """Bring published pretrained weights into the local cache; nothing to do for `none` and weight files."""
    if weights != "none" and not is_weight_file(weights):
        backbone(name).fetch_weights(weights)
