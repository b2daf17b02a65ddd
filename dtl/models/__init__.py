"""Backbones: a `Backbone` interface (`backbone`) with a torchvision and a timm source, chosen by name in
`registry`; a backbone built for a task with a new head (`build`), weight files (`weights`), what trains
(`freezing`) and deterministic pooling (`pooling`). The package exports what the rest of dtl calls."""

from __future__ import annotations

from dtl.models.backbone import Backbone
from dtl.models.build import build_model, head_classes, new_head
from dtl.models.freezing import count_parameters, freeze, freeze_frozen_norms, memory_format, run_prefix_without_grad
from dtl.models.pooling import DeterministicAdaptiveAvgPool2d, deterministic_pooling
from dtl.models.registry import backbone, backbone_blocks, fetch_weights, head_name, preprocessing, replace_head
from dtl.models.torchvision_backbones import check_image_size, check_model_name, classification_models, skeleton
from dtl.models.weights import is_weight_file, load_into, load_state_file

__all__ = [
    "Backbone", "DeterministicAdaptiveAvgPool2d", "backbone", "backbone_blocks", "build_model", "check_image_size",
    "check_model_name", "classification_models", "count_parameters", "deterministic_pooling", "fetch_weights",
    "freeze", "freeze_frozen_norms", "head_classes", "head_name", "is_weight_file", "load_into", "load_state_file",
    "memory_format", "new_head", "preprocessing", "replace_head", "run_prefix_without_grad", "skeleton",
]
