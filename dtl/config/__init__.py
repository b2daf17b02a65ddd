"""The run configuration: typed, documented, checked sections (`schema`, with what a field carries -- its
documentation and its rule -- in `rules`), one resolved `Config` of them (`resolve`: recipe, --debug, dependent
defaults, the checks that span sections) and how flags and TOML files fill it (`loading`)."""

from __future__ import annotations

from dtl.config.resolve import Config, fsdp_conflict, recipe_line
from dtl.config.rules import choices_of
from dtl.config.schema import (
    DEVICES,
    PRECISIONS,
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

__all__ = [
    "DEVICES", "PRECISIONS", "RECIPES", "SECTIONS", "SECTION_OF", "BackboneConfig", "CheckpointConfig", "Config",
    "DataConfig", "DistConfig", "OptimConfig", "RunConfig", "choices_of", "fsdp_conflict", "recipe_line",
]
