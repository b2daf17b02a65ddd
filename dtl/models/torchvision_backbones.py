"""torchvision backbones: any classification model of `torchvision.models`, its published weights (the hub
cache, offline-friendly messages), its head (the last Linear; SqueezeNet's final 1x1 conv) and its blocks.

What a "block" is for `--finetune-last-n` (counted from the end; the new head always trains):

| family | blocks, in forward order |
|---|---|
| vgg, alexnet | each conv layer of `features`, then each hidden Linear of `classifier` (fc6, fc7) |
| resnet, resnext, wide_resnet | the stem (conv1 + bn1), then each residual block of layer1..layer4 |
| regnet | the stem, then each residual block of trunk_output.block1..4 |
| efficientnet, mobilenet, convnext, densenet, squeezenet, mnasnet, swin | each stage of `features` |
|   | (`layers` for mnasnet), then the classifier's hidden layers |
| vit | the stem (patch projection, class token, position embedding), each encoder layer, the final norm |
| shufflenet, googlenet, inception, others | each top-level child with parameters |
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
import torchvision
from torch import nn

from dtl.data.preprocessing import IMAGENET, Preprocessing
from dtl.errors import UserError
from dtl.models.backbone import Backbone
from dtl.models.weights import is_weight_file, load_into

# family prefix -> (stem children grouped as one block, containers whose children are blocks)
_FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vgg": ((), ("features", "classifier")),
    "alexnet": ((), ("features", "classifier")),
    "resnet": (("conv1", "bn1"), ("layer1", "layer2", "layer3", "layer4")),
    "resnext": (("conv1", "bn1"), ("layer1", "layer2", "layer3", "layer4")),
    "wide_resnet": (("conv1", "bn1"), ("layer1", "layer2", "layer3", "layer4")),
    "regnet": ((), ("trunk_output.block1", "trunk_output.block2", "trunk_output.block3",
                    "trunk_output.block4")),
    "efficientnet": ((), ("features", "classifier")),
    "mobilenet": ((), ("features", "classifier")),
    "convnext": ((), ("features", "classifier")),
    "densenet": ((), ("features",)),
    "squeezenet": ((), ("features",)),
    "mnasnet": ((), ("layers", "classifier")),
    "swin": ((), ("features",)),
    "maxvit": ((), ("blocks", "classifier")),
    "vit": (("conv_proj", "class_token", "encoder.pos_embedding"), ("encoder.layers",)),
}
#: --drop-path: family -> its builder's stochastic depth keyword, or RESCALE (see `_build`). None in ViT, ResNet, VGG
RESCALE, _SDP = "rescale", "stochastic_depth_prob"
_DROP_PATH = {"convnext": _SDP, "efficientnet": _SDP, "swin": RESCALE, "maxvit": RESCALE}
#: Aux classifiers only matter for the original papers' training; they break a plain `logits = model(x)`.
_AUX_MODELS = ("googlenet", "inception_v3")


def classification_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str) -> None:
    names = classification_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `dtl models` lists them"
        raise UserError(f"unknown model {name!r}: not a torchvision classification model{hint}")


def family(name: str) -> str | None:
    for prefix in sorted(_FAMILIES, key=len, reverse=True):
        if name.startswith(prefix):
            return prefix
    return None


def _builder_kwargs(name: str, image_size: int, pretrained: bool) -> dict:
    kwargs: dict = {}
    if name in _AUX_MODELS:
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = not pretrained
    if name.startswith("vit") and not pretrained:
        kwargs["image_size"] = image_size
    return kwargs


def skeleton(name: str, image_size: int = 224) -> nn.Module:
    """The architecture without real weights: on the meta device (no memory) where the builder allows it,
    else on the CPU (RegNet's builder computes its widths with tensors)."""
    kwargs = _builder_kwargs(name, image_size, False)
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name, weights=None, **kwargs)
    except NotImplementedError:
        return torchvision.models.get_model(name, weights=None, **kwargs)


def check_image_size(name: str, image_size: int, pretrained: bool) -> None:
    """Refuse an image size the architecture cannot take, before anything big is built or written."""
    if name.startswith(("vit", "swin", "maxvit")) and pretrained and image_size != 224:
        raise UserError(f"--image-size {image_size} does not fit pretrained {name}: its position embeddings "
                        "expect 224 px; use --image-size 224")
    try:
        model = skeleton(name, image_size).eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    except (RuntimeError, ValueError, AssertionError) as err:
        raise UserError(f"--image-size {image_size} is too small or invalid for {name} ({err}); "
                        "try --image-size 32 or larger (224 for the reference recipe)") from None


def _resolve_enum(name: str, weights: str):  # noqa: ANN202 - a torchvision WeightsEnum member
    enum = torchvision.models.get_model_weights(name)
    if weights == "imagenet":
        return enum.DEFAULT
    try:
        return enum[weights]
    except KeyError:
        options = ", ".join(w.name for w in enum)
        raise UserError(f"--weights {weights!r}: {name} has no such weights (choose from imagenet, none, "
                        f"{options}, or a .safetensors/.pth file)") from None


def _pretrained_state(name: str, weights: str) -> dict[str, torch.Tensor]:
    enum = _resolve_enum(name, weights)
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    filename = enum.url.rsplit("/", 1)[-1]
    try:
        state = enum.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # noqa: BLE001 - offline: URLError / socket errors, or a corrupt cached file
        raise UserError(
            f"could not get the pretrained weights {name} {enum.name}: {type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}.\nOn a machine without internet, download {enum.url} elsewhere "
            f"and place it as {hub_dir / filename} (the folder follows TORCH_HOME), or pass --weights FILE."
        ) from None
    if name in _AUX_MODELS:
        state = {k: v for k, v in state.items() if not k.startswith(("aux", "AuxLogits"))}
    return state


def _build(name: str, kwargs: dict, drop_path: float | None) -> nn.Module:
    """The architecture with stochastic depth rate `drop_path` (None: its own). RESCALE (the builder fixes the
    rate): every StochasticDepth rate is scaled so the deepest gets `drop_path` (schedules: linspace(0, rate))."""
    how = _DROP_PATH.get(family(name) or "")
    if how is None and drop_path:
        raise UserError(f"--drop-path {drop_path}: {name} has no stochastic depth; the families that do are "
                        f"{', '.join(sorted(_DROP_PATH))} (omit --drop-path for {name})")
    if drop_path is not None and how not in (None, RESCALE):
        kwargs = {**kwargs, how: drop_path}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if drop_path is not None and how == RESCALE:
        layers = [m for m in model.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
        deepest = max((m.p for m in layers), default=0.0)
        for m in layers:
            m.p = m.p * drop_path / deepest if deepest > 0 else drop_path
    return model


class TorchvisionBackbone(Backbone):
    """`--model NAME` for every `torchvision.models` classification model (the source for any name without a
    prefix of another source)."""

    @classmethod
    def serves(cls, name: str) -> bool:
        return True

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        return True

    def check(self, image_size: int, hub_weights: bool, drop_path: float | None) -> None:
        check_model_name(self.name)
        check_image_size(self.name, image_size, hub_weights)

    def create(self, weights: str, image_size: int, drop_path: float | None) -> nn.Module:
        hub = weights != "none" and not is_weight_file(weights)
        model = _build(self.name, _builder_kwargs(self.name, image_size, weights != "none"), drop_path)
        if hub:
            load_into(model, _pretrained_state(self.name, weights), f"{self.name} {weights} weights")
        return model

    def fetch_weights(self, weights: str) -> None:
        check_model_name(self.name)
        _pretrained_state(self.name, weights)

    def preprocessing(self, weights: str) -> Preprocessing:
        return IMAGENET

    def blocks(self, model: nn.Module) -> list[list[str]]:
        head = self.head_name(model)
        name = self.name
        stem, containers = _FAMILIES.get(family(name) or "", ((), ()))
        blocks: list[list[str]] = [list(stem)] if stem else []

        def has_params(module: nn.Module) -> bool:
            return any(True for _ in module.parameters())

        def walk(module: nn.Module, prefix: str) -> None:
            for child_name, child in module.named_children():
                full = prefix + child_name
                if full == head or full in stem or not has_params(child):
                    continue
                if full in containers:
                    blocks.extend([f"{full}.{n}"] for n, c in child.named_children()
                                  if f"{full}.{n}" != head and has_params(c))
                elif head.startswith(full + ".") or any(c.startswith(full + ".") for c in containers):
                    walk(child, full + ".")
                else:
                    blocks.append([full])

        walk(model, "")
        return blocks

    @staticmethod
    def head_name(model: nn.Module) -> str:
        """The last Linear (SqueezeNet: the 1x1 conv inside `classifier`); auxiliary classifiers left out."""
        last = None
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith(("aux", "AuxLogits")):
                last = name
        if last is None:  # SqueezeNet classifies with a 1x1 conv inside `classifier`
            for name, module in model.named_modules():
                if isinstance(module, nn.Conv2d) and name.startswith("classifier."):
                    last = name
        if last is None:
            raise UserError(f"cannot find the classification layer of {type(model).__name__}")
        return last

    @staticmethod
    def replace_head(model: nn.Module, num_classes: int) -> str:
        name = TorchvisionBackbone.head_name(model)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if isinstance(old, nn.Linear):
            new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        else:
            new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
        setattr(parent, attr, new.to(old.weight.device))
        return name
