"""The loaders that feed training and evaluation (`pipeline`)."""

from dtl.data.loaders.pipeline import (
    BatchLoader,
    DecodeLoader,
    DeviceLoader,
    KeptEvalLoader,
    WorkerLoader,
    augment_chain,
    build_loaders,
    eval_loader,
    load_splits,
    load_splits_once,
    resolve_pipeline,
    v2_transform,
)

__all__ = ["BatchLoader", "DecodeLoader", "DeviceLoader", "KeptEvalLoader", "WorkerLoader", "augment_chain",
           "build_loaders", "eval_loader", "load_splits", "load_splits_once", "resolve_pipeline", "v2_transform"]
