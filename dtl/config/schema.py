"""The training settings: typed dataclasses grouped by concern, one per section of a run's `Config`
(`dtl.config.resolve` puts them together; `dtl.config.loading` fills them from flags and TOML).

Sections: `backbone`, `data`, `optim`, `run`, `checkpoint`, `dist` -- each a dataclass whose fields carry, in
their metadata (`dtl.config.rules`), their documentation (also the flag's ``--help`` text, so the two never
drift apart) and, where they have one, their rule, checked in ``__post_init__`` (a ValueError naming the field
and the value). What spans sections is resolved and checked by `Config` (`dtl.config.resolve`); a component is
handed the section it needs. Flags and TOML keys stay flat (``--lr 0.01``, ``lr = 0.01``, optionally under
``[train]``); a TOML file may also use section tables (``[optim]`` with ``lr = 0.01``). The resolved config is
saved flat (config.json, every checkpoint).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from dtl.config.rules import (
    FRACTION,
    FRACTION_IF_GIVEN,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_IF_GIVEN,
    PROBABILITY,
    bare_flag,
    doc,
    rule,
    validate_section,
)

__all__ = [
    "DEVICES", "PRECISIONS", "RECIPES", "SECTIONS", "SECTION_OF", "BackboneConfig", "CheckpointConfig", "DataConfig",
    "DistConfig", "OptimConfig", "RunConfig",
]

#: The precisions and devices a run (and `dtl eval`/`predict`/`doctor`) may ask for: spelled here only.
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
DEVICES: tuple[str, ...] = typing.get_args(Device)


@dataclass
class BackboneConfig:
    """The network: which backbone, how it is initialised and which part of it trains."""

    model: str = field(default="vgg16", metadata=rule(lambda v: bool(v.strip()), "must name a torchvision model") | doc(
        "torchvision classification model name, or timm/NAME for a timm model (see `dtl models [--source timm]`)."))
    mode: Literal["transfer", "finetune", "scratch", "lp-ft"] = field(default="transfer", metadata=doc(
        """transfer: frozen pretrained backbone, only the new head trains; finetune: pretrained init, everything (or the
        last --finetune-last-n blocks) trains; scratch: random init, everything trains."""))
    weights: str | None = field(default=None, metadata=doc(
        """imagenet | none | a torchvision weight enum name (IMAGENET1K_V1) or timm tag | a .safetensors/.pth file.
        Default: imagenet for transfer/finetune, none for scratch."""))
    finetune_last_n: int | None = field(default=None, metadata=POSITIVE_IF_GIVEN | doc(
        """finetune/lp-ft mode: number of backbone blocks (counted from the end) to unfreeze with the head; default
        all."""))
    keep_head: bool = field(default=False, metadata=doc(
        """Keep the head of the loaded weights (continuing on the same label set) instead of a newly initialised one;
        refused when it does not have as many outputs as the data set has classes. Default: every run from pretrained
        weights or a weight file starts from a new head, whatever the file's head."""))
    lp_epochs: int = field(default=1, metadata=NON_NEGATIVE | doc(
        """lp-ft mode: epochs that train the head alone (a linear probe, the backbone frozen and its BatchNorm
        statistics fixed) before the backbone (or its last --finetune-last-n blocks) is unfrozen."""))
    lp_lr_mult: float = field(default=1.0, metadata=POSITIVE | doc(
        """lp-ft mode: the probe epochs learn at this multiple of the schedule's learning rate (only the head trains
        then, and a linear probe tolerates, and needs, a far higher rate than fine-tuning the backbone)."""))
    freeze_bn_stats: bool | None = field(default=None, metadata=doc(
        """Keep every BatchNorm layer's running statistics as loaded and normalise with them in training too (as in
        evaluation; detectron2's FrozenBN, mmcv's norm_eval), while its affine weights still train: batch statistics of
        few labelled images in small batches are noisy, and re-estimating the running ones from them moves the features
        under the head. Needs loaded weights (not --weights none). Default: on for --mode lp-ft (its probe fits the head
        to the features under the loaded statistics; keeping them is keeping what LP-FT protects), off otherwise."""))
    dropout: float | None = field(default=None, metadata=FRACTION_IF_GIVEN | doc(
        "Override the dropout probability of the model's Dropout layers (default: the model's own)."))
    drop_path: float | None = field(default=None, metadata=FRACTION_IF_GIVEN | doc(
        """Stochastic depth (drop path) rate: torchvision's stochastic_depth_prob, the rate of the deepest block,
        lower ones scaled down linearly (ConvNeXt, EfficientNet v1/v2, Swin, MaxViT; refused for models without it);
        timm/... models: timm's drop_path_rate. Default: the model's own (e.g. 0.1 for convnext_tiny, 0.2 for
        efficientnet_b0)."""))

    def __post_init__(self) -> None:
        validate_section(self)


@dataclass
class DataConfig:
    """What the run reads and how batches are made."""

    dataset: Literal["cifar10", "cifar100", "synthetic", "folder", "hf", "webdataset"] = field(
        default="cifar10", metadata=doc(
            """cifar10 | cifar100 | synthetic (a small learnable CIFAR-format set generated in memory) | folder (an
            image folder) | hf (a Hugging Face data set: pip install 'dtl[hf]') | webdataset (tar shards: pip install
            'dtl[webdataset]')."""))
    data_dir: str = field(default="./data", metadata=doc(
        """Where the data set lives. CIFAR: the folder holding cifar-10-batches-py/ or -bin/ or the .tar.gz; folder: the
        image folder; hf: a folder written by save_to_disk, a folder of Parquet files, or hf://NAME (a Hub data set,
        as --hf-name NAME); webdataset: the training shards, a brace pattern or a '::'-separated list of paths or
        webdataset URLs (e.g. 'DIR/train-{000000..000127}.tar', 'pipe:curl -s URL'), or a folder written by `dtl data
        shards` (its manifest.json names the train and val shards)."""))
    hf_name: str | None = field(default=None, metadata=rule(lambda v: v is None or bool(v.strip()),
                                                            "must name a Hub data set when given") | doc(
        """--dataset hf: a Hugging Face Hub data set (NAME or OWNER/NAME, e.g. cifar10, food101), read through the HF
        cache: fetched once per node by its first process (the others wait), offline from the cache with
        HF_HUB_OFFLINE=1 (the `datasets` cache, or a snapshot that `hf download --repo-type dataset NAME` put in the
        hub cache)."""))
    hf_config: str | None = field(default=None, metadata=doc(
        "--dataset hf: the data set's configuration (subset) name, for Hub data sets that have several."))
    hf_revision: str | None = field(default=None, metadata=doc(
        "--dataset hf with a Hub data set: the revision (a branch, tag or commit) to read; default: main."))
    hf_train_split: str = field(default="train", metadata=doc("--dataset hf: the split that trains."))
    hf_eval_split: str | None = field(default=None, metadata=doc(
        """--dataset hf: the split that evaluates. Default: the first of validation, val, valid, test that the data
        set has; with none of them, --val-split holds out part of the training split."""))
    image_column: str | None = field(default=None, metadata=doc(
        """--dataset hf: the column holding the images (default: the one column whose feature is an Image);
        --dataset webdataset: the key (extension) of a sample's image (default: the first of jpg, jpeg, png, webp,
        as written)."""))
    label_column: str | None = field(default=None, metadata=doc(
        """--dataset hf: the column holding the labels (default: the one ClassLabel column, whose names are the
        classes; else a column named label or labels of integers). A column of strings is accepted when named
        here: its sorted distinct values become the classes. --dataset webdataset: the key of a sample's label,
        an integer as text (default: cls)."""))
    eval_data: str | None = field(default=None, metadata=doc(
        """--dataset webdataset: the evaluation shards (a pattern or list as for --data-dir). Default: the val shards
        of the manifest.json beside the training shards."""))
    shuffle_buffer: int = field(default=1000, metadata=POSITIVE | doc(
        """--dataset webdataset: samples shuffled together within a worker's stream (after the shards' order is
        shuffled per epoch): each window of this many consecutive samples is permuted, so a resume in the middle
        of an epoch restarts reading at most this many samples before its position."""))
    skip_bad_images: bool = field(default=False, metadata=doc(
        """--dataset hf and webdataset: skip images that cannot be decoded (counted and logged) instead of stopping
        with a message that names them. (Image folders always skip unreadable files with a warning, or refuse them
        with --strict-images.)"""))
    download: bool = field(default=True, metadata=doc(
        "Download the official archive when it is missing (rank 0 only)."))
    image_size: int = field(default=224, metadata=POSITIVE | doc(
        "Side of the square images fed to the network (the reference recipe resizes 32 px CIFAR to 224)."))
    augment: bool = field(default=True, metadata=doc(
        """Training augmentation: --crop (RandomResizedCrop, scale 0.5-1) + horizontal flip, and --auto-augment,
        --random-erasing when given. --no-augment: the eval transform."""))
    data_pipeline: Literal["auto", "device", "workers", "decode"] = field(default="auto", metadata=doc(
        """device: the split lives on the device as one uint8 tensor and is augmented in batches (CIFAR, synthetic, and
        image folders or HF data sets with --cache-images); workers: a DataLoader with worker processes and per-image
        transforms; decode (image folders, HF data sets, webdataset shards): workers read the encoded images, each batch
        is decoded on the device (nvJPEG on a GPU, the CPU decoder otherwise), resized to --cache-size squares and
        augmented in batches as by device -- for folders too large to cache. auto: device for in-memory data sets and
        cached images, decode for other folders, HF data sets and shards (the log says which). workers keeps
        torchvision's per-image semantics: crops of the whole image, the model's own resampling (bicubic for some timm
        models)."""))
    image_decoder: Literal["auto", "torchcodec", "torchvision"] = field(default="auto", metadata=doc(
        """folder, hf and webdataset data sets: the library that decodes JPEG/PNG/WebP (on the CPU, and nvJPEG on a
        GPU): torchcodec (pip install 'dtl[torchcodec]'), torchvision (torchvision.io, deprecated since torchvision
        0.29); auto: torchcodec when installed. Other formats (BMP, TIFF, ...) go through PIL."""))
    cache_images: str | None = field(default=None, metadata=bare_flag("auto") | doc(
        """folder and hf data sets: decode every image once into a uint8 cache (one memory-mapped file per split, images
        resized to --cache-size squares), then train and evaluate from it with the device pipeline. --cache-images
        alone: in image-cache/ beside the run folder (OUTDIR/../image-cache, e.g. runs/image-cache, so the runs under
        runs/ share it); --cache-images DIR: in DIR. Rebuilt, with a message, when the split's files changed (list,
        sizes, modification times; an HF data set's Arrow files) or the cache is damaged."""))
    cache_size: int | None = field(default=None, metadata=POSITIVE_IF_GIVEN | doc(
        """--cache-images (and --data-pipeline decode): each image is resized so its shorter side is this many pixels,
        then centre-cropped to a square. Default: --image-size, so evaluation sees exactly the pixels of the file
        pipeline's Resize + CenterCrop; a larger size (e.g. 256 for 224) keeps more detail for the random crops, at
        (256/224)^2 = 1.3x the disk and memory."""))
    eval_memory_mib: float = field(default=1024.0, metadata=NON_NEGATIVE | doc(
        """folder and hf data sets without --cache-images: keep the evaluation split's decoded, resized uint8 images (on
        the device) after the first evaluation when this rank's share fits in this many MiB, so later evaluations do not
        decode again (3 x image-size^2 bytes per image: 1,000 images at 224 px take 147 MiB); 0: off."""))
    num_workers: int = field(default=2, metadata=NON_NEGATIVE | doc(
        "DataLoader worker processes per rank (workers pipeline only)."))
    train_subset: int | None = field(default=None, metadata=POSITIVE_IF_GIVEN | doc(
        "Use only N training images (handy for smoke tests)."))
    eval_subset: int | None = field(default=None, metadata=POSITIVE_IF_GIVEN | doc("Use only N test images."))
    subset_order: Literal["auto", "first", "random", "stratified"] = field(default="auto", metadata=doc(
        """How --train-subset/--eval-subset pick images: the first N, a seeded random N, or a stratified N (each class
        in proportion to its size, seeded per class). auto: stratified for folder and hf data sets (whose images are
        often sorted by class, so the first N would be one or two classes), first for the others (already shuffled;
        shards are read in order, so for webdataset a subset is always the first N)."""))
    val_split: float = field(default=0.0, metadata=FRACTION | doc(
        """folder data sets without a val/ folder, hf data sets without an evaluation split: fraction held out (seeded,
        stratified) for evaluation."""))
    coarse_labels: bool = field(default=False, metadata=doc(
        "cifar100 only: use the 20 coarse super-classes instead of the 100 fine labels."))
    strict_images: bool = field(default=False, metadata=doc(
        """folder data sets: refuse to start when any image is unreadable (all are listed) instead of skipping them with
        a warning."""))
    class_balance: Literal["none", "loss", "sampler"] = field(default="none", metadata=doc(
        """Class imbalance: loss = weight the cross-entropy by inverse class frequency of the training split; sampler =
        draw training images class-balanced (with replacement); per-class test accuracy is logged."""))
    cache_features: bool = field(default=False, metadata=doc(
        """transfer mode with --no-augment: run the frozen backbone once per split and train the head on the cached
        features."""))
    crop: Literal["resized", "pad"] = field(default="resized", metadata=doc(
        """Training crop (then a flip). resized: RandomResizedCrop(image_size, --crop-scale). pad: CIFAR's
        RandomCrop(image_size, --crop-padding, --padding-mode), after Resize(image_size) if the images differ."""))
    crop_scale: tuple[float, float] = field(default=(0.5, 1.0), metadata=rule(
        lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "must be MIN MAX with 0 < MIN <= MAX <= 1") | doc(
        "--crop resized: crop area as a fraction of the image, MIN MAX (torchvision's default: 0.08 1)."))
    crop_padding: int = field(default=4, metadata=NON_NEGATIVE | doc(
        "--crop pad: pixels of padding on every side before the random crop."))
    padding_mode: Literal["constant", "reflect"] = field(default="constant", metadata=doc(
        "--crop pad: constant (zeros, torchvision's RandomCrop default) or reflect."))
    auto_augment: Literal["none", "ta_wide", "randaugment", "augmix"] = field(default="none", metadata=doc(
        """torchvision's TrivialAugmentWide() | RandAugment(--ra-num-ops, --ra-magnitude) | AugMix(--augmix-severity,
        width 3, depth 1-3, alpha 1), per image on the uint8 crop, before normalisation."""))
    ra_num_ops: int = field(default=2, metadata=NON_NEGATIVE | doc(
        "--auto-augment randaugment: ops applied in a row per image."))
    ra_magnitude: int = field(default=9, metadata=rule(lambda v: 0 <= v <= 30, "must be in [0, 30] (31 magnitude bins)")
                              | doc("--auto-augment randaugment: magnitude bin (0-30)."))
    augmix_severity: int = field(default=3, metadata=rule(lambda v: 1 <= v <= 10, "must be in [1, 10]") | doc(
        "--auto-augment augmix: severity of the ops (1-10)."))
    random_erasing: float = field(default=0.0, metadata=PROBABILITY | doc(
        "Probability of RandomErasing(scale=(0.02, 0.33), ratio=(0.3, 3.3)) per image, after normalisation."))
    random_erasing_value: Literal["0", "random"] = field(default="0", metadata=doc(
        "Erased pixels: 0 (the mean colour, after normalisation) or random (standard normal noise)."))

    def __post_init__(self) -> None:
        validate_section(self)
        self._check_sources()

    def _check_sources(self) -> None:
        """The settings of one data source given with another, and what shards cannot do (they are read in
        order, not indexed)."""
        only = {"hf": ("hf_name", "hf_config", "hf_revision", "hf_eval_split"), "webdataset": ("eval_data",)}
        for dataset, names in only.items():
            for name in names:
                if getattr(self, name) is not None and self.dataset != dataset:
                    raise ValueError(f"{name} applies to --dataset {dataset}, got dataset={self.dataset!r}")
        if self.hf_train_split != "train" and self.dataset != "hf":
            raise ValueError(f"hf_train_split applies to --dataset hf, got dataset={self.dataset!r}")
        sources = ("hf", "webdataset")
        for name in ("image_column", "label_column"):
            if getattr(self, name) is not None and self.dataset not in sources:
                raise ValueError(f"{name} applies to --dataset hf or webdataset, got dataset={self.dataset!r}")
        if self.skip_bad_images and self.dataset not in sources:
            raise ValueError(f"skip_bad_images applies to --dataset hf or webdataset (image folders skip unreadable "
                             f"files by default; --strict-images refuses them), got dataset={self.dataset!r}")
        if self.hf_name is not None and self.data_dir.startswith("hf://") and self.data_dir[5:] != self.hf_name:
            raise ValueError(f"hf_name={self.hf_name!r} and data_dir={self.data_dir!r} name two data sets: give one")
        if self.dataset != "webdataset":
            return
        shards = "webdataset shards are read in order, not by index"
        if self.data_pipeline in ("device", "workers"):
            raise ValueError(f"data_pipeline={self.data_pipeline!r} with dataset='webdataset': {shards}; their own "
                             "loader decodes in workers and augments in batches (--data-pipeline auto or decode)")
        if self.cache_images is not None:
            raise ValueError(f"cache_images with dataset='webdataset': {shards} (shards are for data that outgrows "
                             "a node); drop --cache-images, or cache an image folder or an HF data set")
        if self.class_balance == "sampler":
            raise ValueError(f"class_balance='sampler' with dataset='webdataset': {shards}, so no sampler can draw "
                             "them class-balanced; use --class-balance loss")
        if self.subset_order not in ("auto", "first"):
            raise ValueError(f"subset_order={self.subset_order!r} with dataset='webdataset': {shards}, so a subset "
                             "is the first N samples (--subset-order first)")
        if self.val_split:
            raise ValueError(f"val_split={self.val_split} with dataset='webdataset': {shards}; give the evaluation "
                             "shards (--eval-data)")


@dataclass
class OptimConfig:
    """How the weights are updated."""

    epochs: int = field(default=3, metadata=POSITIVE | doc("Number of passes over the training set."))
    batch_size: int = field(default=32, metadata=POSITIVE | doc(
        "Images per process per step; the global batch is batch_size x world size x grad_accum."))
    grad_accum: int = field(default=1, metadata=POSITIVE | doc(
        "Micro-steps whose gradients are summed before one optimizer step."))
    lr: float = field(default=1e-3, metadata=POSITIVE | doc("Base learning rate (before --lr-scale)."))
    lr_scale: Literal["none", "linear"] = field(default="none", metadata=doc(
        "linear: multiply --lr by global batch / --batch-size (the linear scaling rule); none: use --lr as is."))
    momentum: float = field(default=0.9, metadata=FRACTION | doc("SGD momentum (AdamW: beta1)."))
    weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE | doc("L2 penalty (decoupled for AdamW)."))
    optimizer: Literal["sgd", "adamw"] = field(default="sgd", metadata=doc("sgd (the reference recipe) or adamw."))
    lr_schedule: Literal["constant", "cosine"] = field(default="constant", metadata=doc(
        "Learning-rate schedule after warm-up, stepped per optimizer step."))
    warmup_epochs: float = field(default=0.0, metadata=NON_NEGATIVE | doc(
        "Linear warm-up from 0 to --lr over this many epochs."))
    label_smoothing: float = field(default=0.0, metadata=FRACTION | doc("Cross-entropy label smoothing."))
    head_lr_mult: float = field(default=1.0, metadata=POSITIVE | doc(
        "The new head learns at this multiple of the learning rate (the backbone at the rate itself)."))
    layer_decay: float = field(default=1.0, metadata=rule(lambda v: 0 < v <= 1, "must be in (0, 1]") | doc(
        """Layer-wise learning-rate decay D in (0, 1]: the head at the rate, the backbone block below it at D x, the
        next at D^2 x, ... down to the stem (blocks as tabled in dtl/models/torchvision_backbones.py). 1: off."""))
    wd_norm_bias: bool = field(default=False, metadata=doc(
        """Apply --weight-decay to biases and normalisation parameters too (by default they get none, as in timm and
        torchvision's reference recipes)."""))
    ema_decay: float = field(default=0.0, metadata=FRACTION | doc(
        """Keep an exponential moving average of the weights with this decay (e.g. 0.999; warmed up as
        min(D, (1 + step) / (10 + step))), evaluated each epoch beside the raw weights; 0: off."""))
    ema_every: int = field(default=1, metadata=POSITIVE | doc("Update the EMA every N optimizer steps."))
    clip_grad_norm: float | None = field(default=None, metadata=POSITIVE_IF_GIVEN | doc(
        """Clip the global gradient norm (of the parameters that train) to this value, once per optimizer step, after
        unscaling; the pre-clip norm's epoch mean and max go to metrics.jsonl."""))
    mixup: float = field(default=0.0, metadata=NON_NEGATIVE | doc(
        """MixUp alpha (timm's --mixup): mix each batch with itself reversed, lam ~ Beta(alpha, alpha); trains on
        soft targets (--label-smoothing folded in). Train accuracy then counts the dominant label (weight >= 0.5).
        0: off."""))
    cutmix: float = field(default=0.0, metadata=NON_NEGATIVE | doc(
        """CutMix alpha (timm's --cutmix): paste a box of the reversed batch, lam ~ Beta(alpha, alpha) corrected to the
        box's clipped area; with --mixup too, one of the two per batch (--mix-switch-prob). 0: off."""))
    mix_prob: float = field(default=1.0, metadata=PROBABILITY | doc(
        "Probability that a batch is mixed at all (timm's --mixup-prob)."))
    mix_switch_prob: float = field(default=0.5, metadata=PROBABILITY | doc(
        """With both --mixup and --cutmix: probability of CutMix rather than MixUp for a batch (timm's
        --mixup-switch-prob)."""))

    def __post_init__(self) -> None:
        validate_section(self)


@dataclass
class RunConfig:
    """How the run executes: numerics, seeds, non-finite losses, logging."""

    recipe: Literal["plain", "strong"] = field(default="plain", metadata=doc(
        """plain: the settings as given (the reference recipe's defaults). strong: the fine-tuning recipe measured on
        few-label real transfer tasks (RESULTS.md) -- AdamW at lr 1e-3 (constant lr, no weight decay, no label
        smoothing, BatchNorm statistics updated, no heavy augmentation: each measured not to help on both tasks).
        Settings given explicitly (flags, TOML) still win, and the log says which did."""))
    precision: Precision = field(default="auto", metadata=doc(
        """auto: the accelerate config's choice under `accelerate launch`, else bf16 on GPUs that support it, fp16 on
        older GPUs, fp32 on CPU."""))
    fp16_init_scale: float = field(default=65536.0, metadata=POSITIVE | doc(
        """fp16: the GradScaler's initial loss scale. Steps whose scaled gradients overflow are skipped and the scale
        halves (counted as overflow_skips in metrics.jsonl; not an error)."""))
    compile: bool = field(default=False, metadata=doc("torch.compile the model."))
    seed: int = field(default=0, metadata=NON_NEGATIVE | doc(
        "Seeds model init, data order and augmentation (per rank and epoch)."))
    deterministic: bool = field(default=False, metadata=doc(
        "Ask torch for deterministic kernels (slower; for bitwise-reproducible GPU runs)."))
    nan_policy: Literal["abort", "skip"] = field(default="abort", metadata=doc(
        "Non-finite loss: abort (no checkpoint of the broken state), or skip that step's update."))
    max_nan_skips: int = field(default=10, metadata=POSITIVE | doc(
        "skip policy: abort after this many non-finite steps in a row."))
    early_stop_patience: int | None = field(default=None, metadata=POSITIVE_IF_GIVEN | doc(
        """Stop after this many epochs without an improvement of --early-stop-metric (all ranks at the same epoch);
        model.safetensors is then the best epoch's weights, and best.json follows that metric."""))
    early_stop_metric: Literal["test_loss", "test_acc"] = field(default="test_loss", metadata=doc(
        "What --early-stop-patience watches (lower test_loss / higher test_acc is better)."))
    early_stop_min_delta: float = field(default=0.0, metadata=NON_NEGATIVE | doc(
        "The smallest change of --early-stop-metric that counts as an improvement."))
    log_every: int = field(default=20, metadata=POSITIVE | doc(
        "Refresh the progress bar (one host sync) every N steps."))
    progress_every: float = field(default=30.0, metadata=NON_NEGATIVE | doc(
        """When stderr is not a terminal (SLURM output files, pipes): seconds between two plain progress lines
        (position, ETA, loss, accuracy, images/s; no carriage returns; 0: every step). A terminal gets a tqdm bar."""))
    log_with: str = field(default="none", metadata=rule(
        lambda v: {n.strip() for n in v.split(",")} <= {"none", "tensorboard", "wandb", "mlflow"},
        "must be none or a comma-separated list of tensorboard, wandb, mlflow") | doc(
        """Also log the metrics to trackers, comma-separated: tensorboard (OUTDIR/tensorboard), wandb, mlflow (rank 0;
        one tracker run per dtl run, continued on --resume)."""))
    wandb_project: str | None = field(default=None, metadata=doc(
        "--log-with wandb: the W&B project (default: WANDB_PROJECT, else W&B's default)."))
    mlflow_experiment: str | None = field(default=None, metadata=doc(
        "--log-with mlflow: the MLflow experiment (default: MLFLOW_EXPERIMENT_NAME, else MLflow's Default)."))
    debug: bool = field(default=False, metadata=doc(
        "Single process even under a launcher, no workers, a small subset, 1 epoch, anomaly detection."))
    tta: Literal["none", "flip"] = field(default="none", metadata=doc(
        """Test-time augmentation at evaluation: flip = the mean of the logits of each image and its horizontal mirror
        (test_loss/test_acc are then the TTA numbers; test_loss_plain/test_acc_plain are logged beside)."""))

    def __post_init__(self) -> None:
        validate_section(self)


@dataclass
class CheckpointConfig:
    """Where the run lives and when it is saved."""

    output_dir: str | None = field(default=None, metadata=doc(
        "Run folder (config, metrics, checkpoints). Default: runs/<timestamp>."))
    overwrite: bool = field(default=False, metadata=doc(
        "Allow starting a new run in an output folder that holds another run (its files are replaced)."))
    resume: str | None = field(default=None, metadata=doc(
        """auto: continue from the newest complete checkpoint in --output-dir (start fresh if none); or a checkpoint
        folder."""))
    checkpoint_every_steps: int = field(default=0, metadata=NON_NEGATIVE | doc(
        "Also checkpoint every N optimizer steps (0: only at epoch ends)."))
    checkpoint_every_minutes: float = field(default=0.0, metadata=NON_NEGATIVE | doc(
        "Also checkpoint when this many minutes have passed since the last checkpoint (0: off)."))
    best_of: Literal["raw", "ema", "both"] = field(default="both", metadata=doc(
        "With --ema-decay: which test accuracy picks the best checkpoint (both: whichever is higher)."))
    keep_last: int = field(default=2, metadata=POSITIVE | doc(
        "Step/epoch checkpoints to keep besides `best` (older ones are removed after a new one is complete)."))

    def __post_init__(self) -> None:
        validate_section(self)


@dataclass
class DistConfig:
    """Which device, and how long collectives may wait."""

    device: Device = field(default="auto", metadata=doc("auto: cuda:LOCAL_RANK when CUDA is available, else CPU."))
    dist_timeout: float = field(default=300.0, metadata=POSITIVE | doc(
        "Seconds a collective may wait before the job is declared dead (a crashed rank)."))
    strategy: Literal["auto", "ddp", "fsdp"] = field(default="auto", metadata=doc(
        """How several processes share the model. ddp: every rank holds the whole model, gradients and optimizer state,
        gradients are all-reduced. fsdp: PyTorch's FSDP2 (`fully_shard` per backbone block and at the root): parameters,
        gradients and optimizer state are split across ranks (per-rank bytes / world size), parameters all-gathered per
        block for forward and backward; checkpoints are sharded (each rank writes its part; --output-dir must be on a
        filesystem every node sees). auto: fsdp under `accelerate launch` with an FSDP config (distributed_type: FSDP),
        else ddp."""))
    fsdp_cpu_offload: bool = field(default=False, metadata=doc(
        """fsdp: keep the sharded parameters, gradients and optimizer state in CPU memory (FSDP2's CPUOffloadPolicy; the
        optimizer steps on the CPU). Frees GPU memory, costs host-device copies."""))
    fsdp_bf16_reduce: bool = field(default=False, metadata=doc(
        "fsdp with --precision bf16: reduce-scatter the gradients in bf16 (half the bytes) instead of fp32."))
    grad_compress: Literal["none", "bf16", "powersgd"] = field(default="none", metadata=doc(
        """ddp only: compress the gradient all-reduce with torch's communication hooks. bf16: gradients sent as bf16
        (half the bytes); powersgd: rank-R PowerSGD with error feedback (--powersgd-rank; VGG16 at rank 4 sends about
        1/200 of the bytes). Bytes per step are logged (comm_bytes_per_step in metrics.jsonl). Ignored, with a warning,
        in a single process (nothing is all-reduced)."""))
    powersgd_rank: int = field(default=4, metadata=POSITIVE | doc(
        """--grad-compress powersgd: rank of the low-rank approximation of each gradient matrix (higher: more bytes,
        closer to the exact gradient)."""))
    powersgd_start_iter: int = field(default=2, metadata=rule(
        lambda v: v >= 2, "must be >= 2 (DDP rebuilds its buckets after the first step; torch's PowerSGD needs "
                          "at least two plain steps)") | doc(
        """--grad-compress powersgd: optimizer steps with a plain all-reduce before compressing (torch's default is
        1000; more plain steps at the start can help accuracy)."""))
    powersgd_warm_start: bool = field(default=True, metadata=doc(
        """--grad-compress powersgd: reuse last step's Q matrices as the starting point of the power iteration (torch's
        warm start) instead of new random ones each step."""))

    def __post_init__(self) -> None:
        validate_section(self)


#: --recipe strong: what it sets unless the setting is given explicitly (README: "Fine-tuning knobs"). Kept
#: only what helped on both real few-label transfer tasks of RESULTS.md (digits, CIFAR-10 photos); weight
#: decay 0.05, cosine with warm-up, label smoothing, frozen BatchNorm statistics, layer decay, a head lr
#: multiplier, gradient clipping, EMA and heavy augmentation were measured there and left out (RESULTS.md says
#: at which lengths some of them do help).
RECIPES: dict[str, dict[str, Any]] = {
    "plain": {},
    "strong": {"optimizer": "adamw", "lr": 1e-3},
}
SECTIONS: dict[str, type] = {"backbone": BackboneConfig, "data": DataConfig, "optim": OptimConfig,
                             "run": RunConfig, "checkpoint": CheckpointConfig, "dist": DistConfig}
#: flat field name -> its section
SECTION_OF: dict[str, str] = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}

