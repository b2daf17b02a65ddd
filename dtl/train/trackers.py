"""Experiment trackers beside metrics.jsonl (`--log-with tensorboard,wandb,mlflow`, rank 0 only).

Each tracker gets the same per-epoch scalars as metrics.jsonl (x-axis: the global step; TensorBoard's: the
epoch), the resolved config as hyperparameters, and `model.safetensors` / `curves.png` at
the end. One tracker run per dtl run: W&B's run id and MLflow's run id (with its tracking URI) are stored in
OUTDIR/trackers.json and reused when the run continues (`--resume`), so a preempted and requeued job keeps
logging into the same W&B/MLflow run. The packages are optional: `check_available` refuses a missing one
before anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from dtl.errors import UserError

log = logging.getLogger("dtl")
TRACKERS_FILE = "trackers.json"
#: --log-with name -> (module that must be importable, pip extra)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
#: how a dtl run ended -> (W&B exit code, MLflow run status)
ENDINGS = {"completed": (0, "FINISHED"), "preempted": (75, "KILLED"), "failed": (1, "FAILED")}


class Tracker(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def finish(self, state: str) -> None: ...


def names(log_with: str) -> list[str]:
    """'tensorboard,wandb' -> ['tensorboard', 'wandb'] ('none' and blanks dropped)."""
    return [n for n in (part.strip() for part in log_with.split(",")) if n and n != "none"]


def check_available(log_with: str) -> None:
    """Every requested tracker's package is installed (checked on every rank before anything is written)."""
    for name in names(log_with):
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--log-with {name} needs the {module} package: pip install 'dtl[{extra}]'")


def flat_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as flat `a.b` keys with scalar values (lists as text), as trackers store them."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            out[f"{prefix}{key}"] = json.dumps(value)[:500]
        else:
            out[f"{prefix}{key}"] = value
    return out


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as scalars: lists (per-class accuracy) become `key/i`; non-finite values stay out
    (MLflow refuses them)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, v in items:
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[key if i is None else f"{key}/{i}"] = float(v)
    return out


class TensorBoardTracker:
    """OUTDIR/tensorboard; x-axis: the epoch."""

    def __init__(self, outdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency

        self.writer = SummaryWriter(str(outdir / "tensorboard"))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in params.items()))

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, int(metrics["epoch"]))
        self.writer.flush()

    def log_artifact(self, path: Path) -> None:
        """The files sit next to OUTDIR/tensorboard already."""

    def finish(self, state: str) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in OUTDIR/wandb; mode (online/offline), entity and API key come from W&B's own settings
    (WANDB_MODE, `wandb login`, ...); project from --wandb-project, else WANDB_PROJECT, else W&B's default."""

    def __init__(self, outdir: Path, project: str | None, saved: Mapping[str, Any]) -> None:
        import wandb  # optional dependency

        self.outdir = outdir
        try:
            self.run = wandb.init(id=saved.get("id"), resume="allow", dir=str(outdir),
                                  project=saved.get("project") or project, name=outdir.resolve().name,
                                  job_type="train")
        except Exception as err:  # noqa: BLE001 - no key, no network: one message saying what to do
            raise UserError(f"W&B could not start a run ({str(err).splitlines()[0]}): run `wandb login`, or "
                            "set WANDB_MODE=offline (sync later with `wandb sync`)") from None
        self.state = {"id": self.run.id, "project": self.run.project}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)  # a resume may change --epochs

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, state: str) -> None:
        import wandb

        self.run.finish(exit_code=ENDINGS[state][0])
        # wait for W&B's service process to write everything: multi-process runs leave with os._exit
        # (distributed.exit_process), which skips W&B's own exit hook
        wandb.teardown()


class MlflowTracker:
    """An MLflow run. Tracking URI: MLFLOW_TRACKING_URI, else MLflow's default (`sqlite:///mlflow.db` in the
    working folder for MLflow 3, `./mlruns` for MLflow 2); the URI is stored so a resume finds the run even
    when started from elsewhere. Experiment: --mlflow-experiment, else MLFLOW_EXPERIMENT_NAME, else
    MLflow's Default."""

    def __init__(self, outdir: Path, experiment: str | None, saved: Mapping[str, Any]) -> None:
        import mlflow  # optional dependency
        from mlflow.environment_variables import MLFLOW_EXPERIMENT_NAME

        uri = saved.get("tracking_uri") or mlflow.get_tracking_uri()
        self.client = mlflow.MlflowClient(uri)
        if saved.get("run_id"):
            self.run_id = saved["run_id"]
            try:
                self.logged = set(self.client.get_run(self.run_id).data.params)
            except mlflow.exceptions.MlflowException as err:
                raise UserError(f"MLflow run {self.run_id} (OUTDIR/{TRACKERS_FILE}) is not in {uri} "
                                f"({str(err).splitlines()[0][:200]}): remove the mlflow entry from "
                                f"{TRACKERS_FILE} to continue in a new MLflow run") from None
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = experiment or MLFLOW_EXPERIMENT_NAME.get()
            found = self.client.get_experiment_by_name(name) if name else None
            experiment_id = (found.experiment_id if found else self.client.create_experiment(name)) if name else "0"
            run = self.client.create_run(experiment_id, run_name=outdir.resolve().name)
            self.run_id, self.logged = run.info.run_id, set()
        self.state = {"run_id": self.run_id, "tracking_uri": uri}

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow refuses to change a parameter: a resume (which may raise --epochs) logs only new ones
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in self.logged]
        for i in range(0, len(new), 100):  # log_batch takes at most 100 parameters
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, state: str) -> None:
        self.client.set_terminated(self.run_id, ENDINGS[state][1])


def open_trackers(outdir: Path, log_with: str, resuming: bool, wandb_project: str | None = None,
                  mlflow_experiment: str | None = None) -> list[Tracker]:
    """Start (or, when `resuming`, continue) the requested trackers; their ids go to OUTDIR/trackers.json."""
    path = outdir / TRACKERS_FILE
    saved = json.loads(path.read_text()) if resuming and path.is_file() else {}
    trackers: list[Tracker] = []
    ids: dict[str, Any] = {}
    for name in names(log_with):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(outdir))
            continue
        tracker = (WandbTracker(outdir, wandb_project, saved.get(name, {})) if name == "wandb"
                   else MlflowTracker(outdir, mlflow_experiment, saved.get(name, {})))
        ids[name] = tracker.state
        trackers.append(tracker)
        log.info("%s run %s (%s)", name, next(iter(tracker.state.values())),
                 "continued" if saved.get(name) else "new")
    if ids:
        path.write_text(json.dumps({**saved, **ids}, indent=2) + "\n")
    return trackers
