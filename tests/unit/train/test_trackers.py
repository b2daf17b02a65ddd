"""--log-with wandb / mlflow for real, without network: W&B offline (its .wandb run files read back) and MLflow
with a local SQLite store; a resume continues the same tracker run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from dtl.distributed import signals
from dtl.train import trackers
from tests.conftest import TINY, train_inproc

SMALL = [*TINY, "--train-subset", "32", "--eval-subset", "16"]


def wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline W&B run file: a 7-byte header (':W&B', magic, version), then
    LevelDB-style log blocks of 32 KiB whose records have a 7-byte header (crc32c, length, type: 1 full,
    2 first, 3 middle, 4 last). wandb 0.31 ships no Python reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def key_of(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_one_run_across_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off"),
                       ("WANDB_DIR", str(tmp_path / "elsewhere")), ("WANDB_CONFIG_DIR", str(tmp_path / "cfg")),
                       ("WANDB_CACHE_DIR", str(tmp_path / "cache")), ("WANDB_DATA_DIR", str(tmp_path / "data"))):
        monkeypatch.setenv(var, value)
    out = tmp_path / "run"
    common = [*SMALL, "--log-with", "wandb", "--wandb-project", "dtl-test", "--output-dir", str(out)]
    assert train_inproc(*common, "--epochs", "1") == 0
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]["id"]
    assert train_inproc(*common, "--epochs", "2", "--resume", "auto") == 0
    assert json.loads((out / "trackers.json").read_text())["wandb"]["id"] == run_id

    run_dirs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2 and all(d.name.endswith(f"-{run_id}") for d in run_dirs)  # one W&B run, resumed
    history, config = {}, {}
    for d in run_dirs:
        for rec in wandb_records(d / f"run-{run_id}.wandb"):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                assert rec.run.run_id == run_id and rec.run.project == "dtl-test"
            elif kind == "history":
                history[rec.history.step.num] = {key_of(i): json.loads(i.value_json) for i in rec.history.item}
            elif kind == "config":
                config.update({key_of(i): json.loads(i.value_json) for i in rec.config.update})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == [r["global_step"] for r in rows]
    for row in rows:
        logged = history[row["global_step"]]
        assert logged["epoch"] == row["epoch"] and logged["test_acc"] == pytest.approx(row["test_acc"])
        assert logged["train_loss"] == pytest.approx(row["train_loss"])
    assert config["epochs"] == 2 and config["run.world_size"] == 1 and config["model"] == "squeezenet1_1"
    files = {p.name for p in (run_dirs[-1] / "files").iterdir()}
    assert {"model.safetensors", "curves.png"} <= files


def test_mlflow_one_run_across_a_preemption_and_resume(tmp_path, monkeypatch):
    """A stop signal in epoch 2 (exit 75: the MLflow run is KILLED with epoch 1 logged), then --resume: the
    same MLflow run continues to FINISHED with both epochs."""
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # a database store keeps artifacts in ./mlruns of the working folder
    out = tmp_path / "run"
    common = [*TINY, "--train-subset", "48", "--eval-subset", "16", "--epochs", "2", "--log-with", "mlflow",
              "--mlflow-experiment", "dtl-test", "--output-dir", str(out)]
    calls = iter(range(100))
    with monkeypatch.context() as m:  # a signal arrives at the first step of epoch 2 (3 steps per epoch)
        m.setattr(signals, "requested", lambda: next(calls) >= 2)
        assert train_inproc(*common) == 75
    saved = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert saved["tracking_uri"] == uri
    client = mlflow.MlflowClient(uri)
    assert client.get_run(saved["run_id"]).info.status == "KILLED"
    assert len(client.get_metric_history(saved["run_id"], "test_acc")) == 1
    assert train_inproc(*common, "--resume", "auto") == 0
    experiment = client.get_experiment_by_name("dtl-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [saved["run_id"]]  # one MLflow run for the resumed dtl run
    run = runs[0]
    assert run.info.status == "FINISHED"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(run.info.run_id, "test_acc")
    assert [(m.step, m.value) for m in history] == [(r["global_step"], pytest.approx(r["test_acc"])) for r in rows]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "epoch")] == [1, 2]
    assert run.data.params["model"] == "squeezenet1_1" and run.data.params["run.launcher"] == "python"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"model.safetensors", "curves.png"}


def test_a_missing_tracker_package_is_one_message_and_nothing_written(tmp_path, monkeypatch, caplog):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    out = tmp_path / "run"
    assert train_inproc(*SMALL, "--log-with", "tensorboard,wandb", "--output-dir", str(out)) == 2
    assert not out.exists()
    assert train_inproc(*SMALL, "--log-with", "comet", "--output-dir", str(out)) == 2


def test_names_and_scalars():
    assert trackers.names("none") == [] and trackers.names("tensorboard, mlflow") == ["tensorboard", "mlflow"]
    row = {"epoch": 2, "test_loss": 0.5, "test_acc_per_class": [0.25, 1.0], "nan": float("nan")}
    assert trackers.scalars(row) == {"epoch": 2.0, "test_loss": 0.5, "test_acc_per_class/0": 0.25,
                                     "test_acc_per_class/1": 1.0}
    assert trackers.flat_params({"lr": 0.1, "run": {"versions": {"torch": "2"}, "ids": [1]}}) == {
        "lr": 0.1, "run.versions.torch": "2", "run.ids": "[1]"}
