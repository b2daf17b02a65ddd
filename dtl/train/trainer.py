"""`train(cfg, groups, device)`: the one code path every launcher runs.

Order of a run: build and validate everything (`dtl.train.build.prepare`: the `RunParts` and the `TrainState`)
before anything is written; create the run folder (`RunFolder.start`); epochs of train + eval
(`dtl.train.loop.fit`), with checkpoints at epoch ends, every N steps/minutes and on a stop signal; the final
weights and curves at the end (`RunFolder.finish`).
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from dtl.config import Config
from dtl.data import features
from dtl.distributed import ProcessGroups
from dtl.errors import EXIT_PREEMPTED
from dtl.train import loop
from dtl.train.build import prepare


def train(cfg: Config, groups: ProcessGroups, device: torch.device) -> int:
    """Train as configured, in the process groups `setup` made; the exit code (0 done, 75 stopped by a signal
    after checkpointing)."""
    parts, state = prepare(cfg, groups, device)
    cached = ("computed" if parts.new_features else "reused") if cfg.data.cache_features else None
    parts.folder.start(cfg, asdict(parts.info), state, parts.splits, parts.model.unwrapped(), cached_features=cached)
    if groups.env.is_main:
        for name, (feats, labels) in parts.new_features.items():
            features.store(parts.folder.outdir, cfg, name, feats, labels)
    if parts.new_features:
        groups.wait_for_main()  # ~1 GB of features for CIFAR-10 at 224 px: not under the NCCL timeout
    ending = "failed"  # for the trackers' run status
    try:
        with torch.autograd.set_detect_anomaly(cfg.run.debug):
            code = loop.fit(parts, state)
        ending = "preempted" if code == EXIT_PREEMPTED else "completed"
        return code
    except Exception:
        parts.folder.status("failed", 1, state, parts.checkpointer.last)
        raise
    finally:
        parts.folder.close(ending)
