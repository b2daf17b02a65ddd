"""`train(cfg, env, device)`: the one code path every launcher runs.

Order of a run: build and validate everything (`dtl.setup.prepare`) before anything is written; create the
run folder (`dtl.rundir.start`); epochs of train + eval (`dtl.loop.fit`), with checkpoints at epoch ends,
every N steps/minutes and on a stop signal; final weights and curves at the end.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from dtl.config import Config
from dtl.data import features
from dtl.dist import DistEnv, unwrap, wait_for_main
from dtl.errors import EXIT_PREEMPTED
from dtl.train import loop, run_folder
from dtl.train.build import prepare


def train(cfg: Config, env: DistEnv, device: torch.device) -> int:
    """Train as configured; the exit code (0 done, 75 stopped by a signal after checkpointing)."""
    run = prepare(cfg, env, device)
    position = (run.progress.epoch, run.progress.global_step)
    info = asdict(run.info)
    run.metrics_log = run_folder.start(run.plan, cfg, env, info, position, run.splits, unwrap(run.model))
    if env.is_main:
        for name, (feats, labels) in run.new_features.items():
            features.store(run.outdir, cfg, name, feats, labels)
    if run.new_features:
        wait_for_main(env)  # ~1 GB of features for CIFAR-10 at 224 px: not under the NCCL timeout
    ending = "failed"  # for the trackers' run status
    try:
        with torch.autograd.set_detect_anomaly(cfg.run.debug):
            code = loop.fit(run)
        ending = "preempted" if code == EXIT_PREEMPTED else "completed"
        return code
    except Exception:
        loop.write_status(run, "failed", 1)
        raise
    finally:
        if run.metrics_log is not None:
            run.metrics_log.close(ending)
