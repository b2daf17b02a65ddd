"""The run configuration: typed, documented, checked sections (`schema`, with their rules in `rules`) and
how flags and TOML files fill them (`loading`)."""

from __future__ import annotations

from dtl.config.rules import choices_of
from dtl.config.schema import (
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
)

__all__ = [
    "BackboneConfig", "CheckpointConfig", "Config", "DataConfig", "DistConfig", "OptimConfig", "RECIPES",
    "RunConfig", "SECTIONS", "SECTION_OF", "choices_of"
]
