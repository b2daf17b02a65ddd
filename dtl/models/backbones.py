"""Backbones: build any torchvision classification model, load weights, replace the head, freeze per mode.

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
| `timm/...` | timm's own fine-grained `group_matcher` groups (dtl/timm_backbones.py) |
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from dtl.data.preprocessing import IMAGENET, Preprocessing
from dtl.errors import UserError
from dtl.models import timm_backbones

log = logging.getLogger("dtl")

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


def head_name(model: nn.Module) -> str:
    """Qualified name of the classification layer: the last Linear (or SqueezeNet's final 1x1 conv); timm's
    `get_classifier()`."""
    if timm_backbones.is_timm_model(model):
        return timm_backbones.head_name(model)
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


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Swap the classification layer for a fresh one with `num_classes` outputs; returns its name."""
    if timm_backbones.is_timm_model(model):
        return timm_backbones.reset_head(model, num_classes)
    name = head_name(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    setattr(parent, attr, new.to(old.weight.device))
    return name


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


def fetch_weights(name: str, weights: str) -> None:
    """Bring torchvision's pretrained file into the hub cache (a download when it is missing), so that the
    processes that build the model afterwards only read it. Nothing to do for `none` and weight files."""
    if weights != "none" and not is_weight_file(weights):
        if timm_backbones.is_timm(name):  # timm keeps its files in the Hugging Face hub cache
            timm_backbones.create(name, weights, 224, True)
            return
        check_model_name(name)
        _pretrained_state(name, weights)


def preprocessing(name: str) -> Preprocessing:
    """The input normalisation/resampling the backbone was pretrained with (ImageNet's for torchvision)."""
    return timm_backbones.preprocessing(name) if timm_backbones.is_timm(name) else IMAGENET


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


def build_model(name: str, num_classes: int, weights: str, image_size: int, dropout: float | None = None,
                drop_path: float | None = None, keep_head: bool = False, head_seed: int | None = None) -> nn.Module:
    """A torchvision (or `timm/...`) model with the requested init and a `num_classes` head (not yet frozen).
    `drop_path`: the stochastic depth rate (timm: `drop_path_rate`; None: the model's own).

    The head is newly initialised (from `head_seed`, see `new_head`) after the weights load, whatever their
    head's shape: a file trained on another task with as many classes would otherwise start every run from
    that task's classifier, confidently wrong. `keep_head`: keep the loaded head instead (continuing on the
    same label set), refused when it does not have `num_classes` outputs."""
    pretrained = weights != "none"
    if timm_backbones.is_timm(name):
        extra = {} if drop_path is None else {"drop_path_rate": drop_path}
        timm_backbones.check_name(name)
        timm_backbones.check_image_size(name, image_size, extra)
        hub = pretrained and not is_weight_file(weights)
        model = timm_backbones.create(name, weights, image_size, hub, **extra)
    else:
        check_model_name(name)
        check_image_size(name, image_size, pretrained and not is_weight_file(weights))
        model = _build(name, _builder_kwargs(name, image_size, pretrained), drop_path)
    if is_weight_file(weights):
        _load_file(model, name, Path(weights), keep_head)
    elif pretrained and not timm_backbones.is_timm(name):
        load_into(model, _pretrained_state(name, weights), f"{name} {weights} weights")
    if keep_head:
        _check_kept_head(model, num_classes, weights)
    else:
        new_head(model, num_classes, head_seed)
    return _set_dropout(model, dropout)


def _load_file(model: nn.Module, name: str, path: Path, keep_head: bool) -> None:
    """--weights FILE into `model`: everything strictly, the head only with `keep_head` (sized to the file's)."""
    state = load_state_file(path)
    if timm_backbones.is_timm(name):
        state = timm_backbones.adapt_state(model, state)
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


def backbone_blocks(model: nn.Module, name: str) -> list[list[str]]:
    """Blocks (each a list of parameter-name prefixes) of the backbone in forward order, head excluded."""
    head = head_name(model)
    if timm_backbones.is_timm_model(model):
        return timm_backbones.blocks(model, head)
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


def freeze(model: nn.Module, name: str, mode: str, finetune_last_n: int | None) -> list[str]:
    """Set requires_grad per mode; returns the names of the trainable parameters. Call before DDP wraps the
    model: DDP decides at construction which parameters it reduces."""
    head = head_name(model)
    if mode == "scratch" or (mode == "finetune" and finetune_last_n is None):
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        prefixes = [head]
        if mode == "finetune":
            blocks = backbone_blocks(model, name)
            if finetune_last_n > len(blocks):
                raise UserError(f"--finetune-last-n {finetune_last_n} is more than the {len(blocks)} blocks "
                                f"{name} has; omit it to train everything")
            prefixes += [p for block in blocks[len(blocks) - finetune_last_n:] for p in block]
        for key, p in model.named_parameters():
            p.requires_grad_(any(key == pre or key.startswith(pre + ".") for pre in prefixes))
    return [k for k, p in model.named_parameters() if p.requires_grad]


def freeze_frozen_norms(model: nn.Module) -> None:
    """Put normalisation layers whose parameters are all frozen in eval mode, so a frozen backbone stays
    frozen (its BatchNorm running statistics do not drift). Dropout keeps the train-mode semantics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def memory_format(device_type: str, mode: str) -> torch.memory_format:
    """channels_last on GPUs (NHWC is what their convolution kernels want); on CPUs only when no convolution
    trains: oneDNN's channels_last convolution *backward* measured 1.7x slower than NCHW here (VGG16, 224 px),
    while its forward is faster (transfer mode runs forward only through the convolutions)."""
    if device_type == "cuda" or mode == "transfer":
        return torch.channels_last
    return torch.contiguous_format


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_prefix_without_grad(model: nn.Module, head: str) -> list[torch.utils.hooks.RemovableHandle]:
    """Run everything before the head under no_grad (transfer mode): the frozen backbone stores no
    activations and builds no graph; the head runs in whatever grad mode the caller had.

    Done with hooks (which live as long as the model) rather than a `with torch.no_grad()` around the backbone
    so it works for every family's own forward() and leaves the grad mode unchanged outside the model (DDP
    decides whether to prepare its gradient all-reduce from the grad mode after forward). Returns the hooks'
    handles (lp-ft removes them when the backbone is unfrozen)."""
    saved: list[bool] = []

    def enter(module: nn.Module, args: tuple) -> None:
        saved.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def at_head(module: nn.Module, args: tuple) -> None:
        if saved:  # the head called on its own (cached features) never went through enter
            torch.set_grad_enabled(saved[-1])

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        torch.set_grad_enabled(saved.pop())

    return [model.register_forward_pre_hook(enter), model.get_submodule(head).register_forward_pre_hook(at_head),
            model.register_forward_hook(leave, always_call=True)]
