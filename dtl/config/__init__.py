"""The run configuration: typed, documented, checked sections (`schema`, with their rules in `rules`) and
how flags and TOML files fill them (`loading`)."""

from __future__ import annotations

from dtl.config.rules import choices_of
from dtl.config.schema import (
    DEVICES,
    PRECISIONS,
    RECIPES,
    SECTION_OF,
    SECTIONS,
    BackboneConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DistConfig,
    OptimConfig,
    RunConfig,
    recipe_line,
)

__all__ = [
    "DEVICES", "PRECISIONS", "RECIPES", "SECTIONS", "SECTION_OF", "BackboneConfig", "CheckpointConfig", "Config",
    "DataConfig", "DistConfig", "OptimConfig", "RunConfig", "choices_of", "recipe_line",
]
