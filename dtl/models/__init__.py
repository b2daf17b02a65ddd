"""Backbones: torchvision and timm models built for a task (weights, a new head, frozen per mode, blocks).
The package exports what the rest of dtl calls."""

from __future__ import annotations

from dtl.models.backbones import (
    backbone_blocks,
    build_model,
    check_image_size,
    check_model_name,
    classification_models,
    count_parameters,
    family,
    fetch_weights,
    freeze,
    freeze_frozen_norms,
    head_classes,
    head_name,
    is_weight_file,
    load_into,
    load_state_file,
    memory_format,
    new_head,
    preprocessing,
    replace_head,
    run_prefix_without_grad,
    skeleton,
)
from dtl.models.pooling import DeterministicAdaptiveAvgPool2d, deterministic_pooling

__all__ = [
    "DeterministicAdaptiveAvgPool2d", "backbone_blocks", "build_model", "check_image_size", "check_model_name",
    "classification_models", "count_parameters", "deterministic_pooling", "family", "fetch_weights", "freeze",
    "freeze_frozen_norms", "head_classes", "head_name", "is_weight_file", "load_into", "load_state_file",
    "memory_format", "new_head", "preprocessing", "replace_head", "run_prefix_without_grad", "skeleton"
]
