"""The training configuration: one typed dataclass, filled from defaults < TOML file < command-line flags.

Every field carries a docstring; it doubles as the flag's ``--help`` text, so the two never drift apart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dtl.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

@dataclass
class Config:
    """Everything that decides what a training run does. Resolved once, saved with the run."""

    # ---- model -------------------------------------------------------------------------------
    model: str = "vgg16"
    """torchvision classification model name (see `dtl models`)."""
    mode: Literal["transfer", "finetune", "scratch"] = "transfer"
    """transfer: frozen pretrained backbone, only the new head trains; finetune: pretrained init, everything
    (or the last --finetune-last-n blocks) trains; scratch: random init, everything trains."""
    weights: str | None = None
    """imagenet | none | a torchvision weight enum name (IMAGENET1K_V1) | a .safetensors/.pth file.
    Default: imagenet for transfer/finetune, none for scratch."""
    finetune_last_n: int | None = None
    """finetune mode: number of backbone blocks (counted from the end) to unfreeze with the head; default all."""

    # ---- data --------------------------------------------------------------------------------
    dataset: Literal["cifar10", "cifar100", "synthetic", "folder"] = "cifar10"
    """cifar10 | cifar100 | synthetic (a small learnable CIFAR-format set generated in memory) | folder."""
    data_dir: str = "./data"
    """Where the data set lives (CIFAR: the folder holding cifar-10-batches-py/ or -bin/ or the .tar.gz)."""
    download: bool = True
    """Download the official archive when it is missing (rank 0 only)."""
    image_size: int = 224
    """Side of the square images fed to the network (the reference recipe resizes 32 px CIFAR to 224)."""
    augment: bool = True
    """Training augmentation: RandomResizedCrop(scale 0.5-1) + horizontal flip. --no-augment: eval transform."""
    data_pipeline: Literal["auto", "device", "workers"] = "auto"
    """device: the split lives on the device as one uint8 tensor and is augmented in batches; workers: a
    DataLoader with worker processes and per-image transforms. auto: device for in-memory data sets."""
    num_workers: int = 2
    """DataLoader worker processes per rank (workers pipeline only)."""
    train_subset: int | None = None
    """Use only N training images (handy for smoke tests)."""
    eval_subset: int | None = None
    """Use only N test images."""
    subset_order: Literal["first", "random"] = "first"
    """How --train-subset/--eval-subset pick images: the first N, or a seeded random N."""
    val_split: float = 0.0
    """folder data sets without a val/ folder: fraction held out (seeded, stratified) for evaluation."""
    coarse_labels: bool = False
    """cifar100 only: use the 20 coarse super-classes instead of the 100 fine labels."""
    strict_images: bool = False
    """folder data sets: refuse to start when any image is unreadable (all are listed) instead of skipping
    them with a warning."""

    # ---- optimisation ------------------------------------------------------------------------
    epochs: int = 3
    """Number of passes over the training set."""
    batch_size: int = 32
    """Images per process per step; the global batch is batch_size x world size x grad_accum."""
    grad_accum: int = 1
    """Micro-steps whose gradients are summed before one optimizer step."""
    lr: float = 1e-3
    """Base learning rate (before --lr-scale)."""
    lr_scale: Literal["none", "linear"] = "none"
    """linear: multiply --lr by global batch / --batch-size (the linear scaling rule); none: use --lr as is."""
    momentum: float = 0.9
    """SGD momentum (AdamW: beta1)."""
    weight_decay: float = 0.0
    """L2 penalty (decoupled for AdamW)."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """sgd (the reference recipe) or adamw."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warm-up, stepped per optimizer step."""
    warmup_epochs: float = 0.0
    """Linear warm-up from 0 to --lr over this many epochs."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: the accelerate config's choice under `accelerate launch`, else bf16 on GPUs that support it,
    fp16 on older GPUs, fp32 on CPU."""
    fp16_init_scale: float = 65536.0
    """fp16: the GradScaler's initial loss scale. Steps whose scaled gradients overflow are skipped and the
    scale halves (counted as overflow_skips in metrics.jsonl; not an error)."""
    dropout: float | None = None
    """Override the dropout probability of the model's Dropout layers (default: the model's own)."""
    compile: bool = False
    """torch.compile the model."""
    cache_features: bool = False
    """transfer mode with --no-augment: run the frozen backbone once per split and train the head on the
    cached features."""
    seed: int = 0
    """Seeds model init, data order and augmentation (per rank and epoch)."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (slower; for bitwise-reproducible GPU runs)."""

    # ---- run ---------------------------------------------------------------------------------
    output_dir: str | None = None
    """Run folder (config, metrics, checkpoints). Default: runs/<timestamp>."""
    overwrite: bool = False
    """Allow starting a new run in an output folder that holds another run (its files are replaced)."""
    resume: str | None = None
    """auto: continue from the newest complete checkpoint in --output-dir (start fresh if none);
    or a checkpoint folder."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every N optimizer steps (0: only at epoch ends)."""
    checkpoint_every_minutes: float = 0.0
    """Also checkpoint when this many minutes have passed since the last checkpoint (0: off)."""
    keep_last: int = 2
    """Step/epoch checkpoints to keep besides `best` (older ones are removed after a new one is complete)."""
    nan_policy: Literal["abort", "skip"] = "abort"
    """Non-finite loss: abort (no checkpoint of the broken state), or skip that step's update."""
    max_nan_skips: int = 10
    """skip policy: abort after this many non-finite steps in a row."""
    log_every: int = 20
    """Refresh the progress bar (one host sync) every N steps."""
    log_with: Literal["none", "tensorboard"] = "none"
    """Also log the metrics to TensorBoard (OUTDIR/tensorboard)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda:LOCAL_RANK when CUDA is available, else CPU."""
    dist_timeout: float = 300.0
    """Seconds a collective may wait before the job is declared dead (a crashed rank)."""
    debug: bool = False
    """Single process even under a launcher, no workers, a small subset, 1 epoch, anomaly detection."""

    def __post_init__(self) -> None:
        if self.debug:
            # Debug means "pdb works": one process, no worker processes, a short run.
            self.num_workers = 0
            self.epochs = 1
            self.train_subset = min(self.train_subset or 256, 256)
            self.eval_subset = min(self.eval_subset or 256, 256)
        if self.weights is None:
            self.weights = "none" if self.mode == "scratch" else "imagenet"
        self._validate()

    def _validate(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "image_size", "log_every", "keep_last",
                     "max_nan_skips"):
            _check(name, getattr(self, name), getattr(self, name) > 0, "must be > 0")
        for name in ("train_subset", "eval_subset", "finetune_last_n"):
            value = getattr(self, name)
            _check(name, value, value is None or value > 0, "must be > 0 when given")
        for name in ("num_workers", "checkpoint_every_steps", "seed"):
            _check(name, getattr(self, name), getattr(self, name) >= 0, "must be >= 0")
        for name in ("warmup_epochs", "weight_decay", "checkpoint_every_minutes"):
            _check(name, getattr(self, name), getattr(self, name) >= 0, "must be >= 0")
        _check("lr", self.lr, self.lr > 0, "must be > 0")
        _check("momentum", self.momentum, 0 <= self.momentum < 1, "must be in [0, 1)")
        _check("label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "must be in [0, 1)")
        _check("dropout", self.dropout, self.dropout is None or 0 <= self.dropout < 1, "must be in [0, 1)")
        _check("val_split", self.val_split, 0 <= self.val_split < 1, "must be in [0, 1)")
        _check("dist_timeout", self.dist_timeout, self.dist_timeout > 0, "must be > 0")
        _check("fp16_init_scale", self.fp16_init_scale, self.fp16_init_scale > 0, "must be > 0")
        for name, hint in typing.get_type_hints(Config).items():
            choices = _choices(hint)
            if choices:
                value = getattr(self, name)
                _check(name, value, value in choices, f"must be one of {', '.join(choices)}")
        _check("model", self.model, bool(self.model.strip()), "must name a torchvision model")
        if self.mode == "transfer" and self.weights == "none":
            raise ValueError(
                "weights='none' with mode='transfer' would train a head on a frozen *random* backbone; "
                "use --weights imagenet (or a file), or --mode scratch"
            )
        if self.finetune_last_n is not None and self.mode != "finetune":
            raise ValueError(f"finetune_last_n={self.finetune_last_n} only applies to --mode finetune, "
                             f"got mode={self.mode!r}")
        if self.cache_features and (self.mode != "transfer" or self.augment):
            raise ValueError(
                "cache_features=True needs --mode transfer and --no-augment: with augmentation every epoch "
                "sees different crops, so features computed once would silently drop the augmentation"
            )
        if self.coarse_labels and self.dataset != "cifar100":
            raise ValueError(f"coarse_labels=True only applies to --dataset cifar100, got {self.dataset!r}")

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**values)


def _check(name: str, value: Any, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")


def _choices(hint: Any) -> tuple[str, ...]:
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return ()


@functools.cache
def field_docs() -> dict[str, str]:
    """Field name -> the docstring written under it (parsed from this file, so help text has one source)."""
    tree = ast.parse(inspect.getsource(Config))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs


def _base_type(hint: Any) -> type:
    """int | None -> int; Literal[...] -> str."""
    if _choices(hint):
        return str
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field (`finetune_last_n` -> `--finetune-last-n`); defaults stay None so we can
    tell which flags were actually given and let them win over a TOML file."""
    parser.add_argument("--config", metavar="TOML", help="Read settings from a TOML file; flags win over it.")
    hints = typing.get_type_hints(Config)
    docs = field_docs()
    for f in dataclasses.fields(Config):
        hint = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        base = _base_type(hint)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=base, default=None, choices=_choices(hint) or None,
                                metavar=None if _choices(hint) else f.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults < TOML (--config) < flags given on the command line."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_toml(Path(args.config)))
    for f in dataclasses.fields(Config):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    try:
        return Config.from_dict(values)
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid configuration: {err}") from None


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config; keys may use dashes or underscores, and may sit under a [train] table."""
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None
    data = data.get("train", data)
    return {key.replace("-", "_"): value for key, value in data.items()}
