"""A run's `Config`: the sections of `dtl.config.schema` put together and resolved, once, whenever a Config is
made (from flags and TOML by `dtl.config.loading`, from config.json or a checkpoint, by `Config.replace`).

Resolving: the --recipe's settings (`RECIPES`) go beneath everything given explicitly (`recipe_line` tells the
log which won); --debug shortens the run to one small epoch without worker processes; the defaults that depend
on other settings are filled in (weights, subset_order, freeze_bn_stats); then the checks that span sections
run, each a ValueError naming the settings that conflict. `fsdp_conflict` holds the ones for --strategy fsdp,
which the training build asks again when strategy auto turns into fsdp under `accelerate launch`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dtl.config.schema import (
    RECIPES,
    SECTION_OF,
    SECTIONS,
    BackboneConfig,
    CheckpointConfig,
    DataConfig,
    DistConfig,
    OptimConfig,
    RunConfig,
)
from dtl.errors import UserError

__all__ = ["Config", "fsdp_conflict", "recipe_line"]


class Config:
    """Everything that decides what a training run does, by section. Resolved once, saved with the run."""

    backbone: BackboneConfig
    data: DataConfig
    optim: OptimConfig
    run: RunConfig
    checkpoint: CheckpointConfig
    dist: DistConfig

    def __init__(self, **values: Any) -> None:
        """Flat settings (``Config(lr=0.1, mode="scratch")``) and/or whole sections (``optim={"lr": 0.1}``
        or ``optim=OptimConfig(...)``)."""
        given: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        run = values.get("run")
        run_recipe = run.recipe if isinstance(run, RunConfig) else (run or {}).get("recipe")
        recipe = values.get("recipe") or run_recipe or "plain"
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
        for key, value in RECIPES[recipe].items():  # beneath everything given explicitly
            given[SECTION_OF[key]][key] = value
        for key, value in values.items():
            if key in SECTIONS:
                if isinstance(value, SECTIONS[key]):
                    value = dataclasses.asdict(value)
                if not isinstance(value, dict):
                    raise ValueError(f"{key} must be a table of settings, got {value!r}")
                given[key].update(value)
            elif key in SECTION_OF:
                given[SECTION_OF[key]][key] = value
            else:
                raise ValueError(f"unknown config key {key!r}")
        for name, cls in SECTIONS.items():
            setattr(self, name, cls(**given[name]))
        _resolve(self)

    # ---- flat views ------------------------------------------------------------------------------
    @staticmethod
    def field_names() -> list[str]:
        return list(SECTION_OF)

    def to_dict(self) -> dict[str, Any]:
        """The flat settings (the format of config.json and of every checkpoint)."""
        return {k: v for name in SECTIONS for k, v in dataclasses.asdict(getattr(self, name)).items()}

    def replace(self, **changes: Any) -> Config:
        """A copy with some flat settings changed (checked again)."""
        return Config(**{**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        unknown = sorted(k for k in values if k not in SECTION_OF and k not in SECTIONS)
        if unknown:
            raise UserError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in SECTIONS) + ")"


def _resolve(cfg: Config) -> None:
    """The --debug overrides and the defaults that depend on other settings, then the checks that span
    sections."""
    b, d, o, r = cfg.backbone, cfg.data, cfg.optim, cfg.run
    if r.debug:
        # Debug means "pdb works": one process, no worker processes, a short run.
        d.num_workers, o.epochs = 0, 1
        d.train_subset = min(d.train_subset or 256, 256)
        d.eval_subset = min(d.eval_subset or 256, 256)
    if b.weights is None:
        b.weights = "none" if b.mode == "scratch" else "imagenet"
    if d.subset_order == "auto":
        d.subset_order = "stratified" if d.dataset in ("folder", "hf") else "first"
    if b.freeze_bn_stats is None:
        b.freeze_bn_stats = b.mode == "lp-ft"
    _check_across_sections(cfg)


def _check_across_sections(cfg: Config) -> None:
    """A ValueError for the first combination of settings that cannot run together."""
    b, d, o = cfg.backbone, cfg.data, cfg.optim
    if b.mode in ("transfer", "lp-ft") and b.weights == "none":
        raise ValueError(
            f"weights='none' with mode={b.mode!r} would train a head on a frozen *random* backbone; "
            "use --weights imagenet (or a file), or --mode scratch"
        )
    if b.freeze_bn_stats and b.weights == "none":
        raise ValueError(f"freeze_bn_stats=True keeps the loaded BatchNorm statistics, but "
                         f"weights={b.weights!r} loads none (random init has no statistics to keep): drop "
                         "--freeze-bn-stats, or pass --weights imagenet or a file")
    if b.keep_head and b.weights == "none":
        raise ValueError(f"keep_head=True keeps the head of the loaded weights, but weights={b.weights!r} "
                         "loads none: drop --keep-head, or pass --weights FILE")
    if b.finetune_last_n is not None and b.mode not in ("finetune", "lp-ft"):
        raise ValueError(f"finetune_last_n={b.finetune_last_n} only applies to --mode finetune, "
                         f"got mode={b.mode!r}")
    if d.cache_features and (b.mode != "transfer" or d.augment):
        raise ValueError(
            "cache_features=True needs --mode transfer and --no-augment: with augmentation every epoch "
            "sees different crops, so features computed once would silently drop the augmentation"
        )
    if not d.augment and (d.crop != "resized" or d.auto_augment != "none" or d.random_erasing > 0):
        raise ValueError("--crop pad, --auto-augment and --random-erasing need augmentation on; drop "
                         "--no-augment (or those settings)")
    if d.cache_features and (o.mixup > 0 or o.cutmix > 0):
        raise ValueError(f"mixup={o.mixup}/cutmix={o.cutmix} mix the images, but cache_features=True trains on "
                         "features computed once from unmixed images: drop --cache-features, or the mixing")
    if d.cache_images is not None and d.dataset not in ("folder", "hf"):
        raise ValueError(f"cache_images={d.cache_images!r} caches the decoded images of a folder or HF data set; "
                         f"dataset={d.dataset!r} is held in memory already: drop --cache-images")
    if d.data_pipeline == "decode" and d.dataset not in ("folder", "hf", "webdataset"):
        raise ValueError(f"data_pipeline='decode' decodes image files; dataset={d.dataset!r} has none: use "
                         "--data-pipeline device (or auto)")
    if d.data_pipeline == "decode" and d.cache_images is not None:
        raise ValueError("data_pipeline='decode' decodes the files every epoch, cache_images reads them from "
                         "the cache: drop one (--data-pipeline auto serves a cache with the device pipeline)")
    if cfg.dist.strategy == "fsdp":
        conflict = fsdp_conflict(cfg)
        if conflict:
            raise ValueError(conflict)
    if d.coarse_labels and d.dataset != "cifar100":
        raise ValueError(f"coarse_labels=True only applies to --dataset cifar100, got {d.dataset!r}")


def fsdp_conflict(cfg: Config) -> str | None:
    """Why this configuration cannot run under --strategy fsdp (None: it can). Checked when the config is
    built with strategy fsdp, and again when strategy auto resolves to fsdp under `accelerate launch`."""
    if cfg.dist.grad_compress != "none":
        return (f"grad_compress={cfg.dist.grad_compress!r} with strategy='fsdp': the gradient compression hooks "
                "are DDP's (FSDP reduce-scatters gradient shards; use --fsdp-bf16-reduce to halve its bytes); "
                "drop --grad-compress or use --strategy ddp")
    if cfg.run.compile:
        return ("compile=True with strategy='fsdp': dtl compiles the DDP model only; drop --compile or use "
                "--strategy ddp")
    if cfg.data.cache_features:
        return ("cache_features=True with strategy='fsdp': cached features train the head alone, which needs "
                "no sharding; drop --cache-features or use --strategy ddp")
    if cfg.run.precision == "fp16":
        return ("precision='fp16' with strategy='fsdp': the fp16 GradScaler is not wired to sharded gradients; "
                "use --precision bf16 (or fp32), or --strategy ddp")
    if cfg.backbone.mode == "lp-ft":
        return ("mode='lp-ft' with strategy='fsdp': lp-ft unfreezes the backbone mid-run, which FSDP2's "
                "sharded parameters do not follow; use --mode finetune (or transfer), or --strategy ddp")
    return None


def recipe_line(cfg: Config) -> str | None:
    """What --recipe set and what was given over it, for the log: ``recipe strong: optimizer=adamw;
    overridden by you: lr=0.01 (recipe: 0.001)``. A setting counts as overridden when
    its resolved value differs from the recipe's (so a config.json read back, where every value is explicit,
    says the same). None for `plain`, which sets nothing."""
    recipe = RECIPES[cfg.run.recipe]
    if not recipe:
        return None
    flat = cfg.to_dict()
    kept = [f"{key}={value}" for key, value in recipe.items() if flat[key] == value]
    changed = [f"{key}={flat[key]} (recipe: {value})" for key, value in recipe.items() if flat[key] != value]
    return (f"recipe {cfg.run.recipe}: {' '.join(kept) or '-'}; "
            f"overridden by you: {', '.join(changed) or 'nothing'}")
