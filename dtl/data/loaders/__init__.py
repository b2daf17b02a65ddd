"""The loaders that feed training and evaluation, one module per concern: `base` (the `BatchLoader` protocol and
the sampler-driven `SampledLoader`), one module per pipeline family (`device`, `decode`, `workers`, `webdataset`:
tar shards; `kept`: the evaluation that decodes once), `transforms` (which transforms they apply, from the config)
and `pipeline` (which pipeline a run takes, and its train and eval loaders). The names below are the package's
interface."""

from dtl.data.loaders.base import BatchLoader, SampledLoader
from dtl.data.loaders.decode import DecodeLoader
from dtl.data.loaders.device import DeviceLoader
from dtl.data.loaders.kept import KeptEvalLoader
from dtl.data.loaders.pipeline import build_loaders, eval_loader, resolve_pipeline
from dtl.data.loaders.webdataset import ShardLoader
from dtl.data.loaders.workers import WorkerLoader

__all__ = ["BatchLoader", "DecodeLoader", "DeviceLoader", "KeptEvalLoader", "SampledLoader", "ShardLoader",
           "WorkerLoader", "build_loaders", "eval_loader", "resolve_pipeline"]
