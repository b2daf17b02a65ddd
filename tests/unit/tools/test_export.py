"""dtl export: each format for ResNet-18 and a timm model, ONNX for VGG16, verified; a failed check leaves
nothing."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from dtl import models
from dtl.data import datasets
from dtl.tools import export
from tests.conftest import TINY, main_inproc, train_inproc

SMALL = [*TINY, "--epochs", "1", "--train-subset", "32", "--eval-subset", "16", "--no-augment"]


def trained(tmp_path_factory, model: str, *extra: str):
    out = tmp_path_factory.mktemp(model.replace("/", "_")) / "run"
    assert train_inproc(*SMALL, "--model", model, "--output-dir", str(out), *extra) == 0
    return out


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    return trained(tmp_path_factory, "resnet18", "--ema-decay", "0.5")


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    return trained(tmp_path_factory, "timm/test_vit")


def run_through(fmt: str, path, x: torch.Tensor) -> torch.Tensor:
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    return torch.jit.load(str(path))(x)


def reference_logits(run, x: torch.Tensor, ema: bool = False) -> torch.Tensor:
    cfg = json.loads((run / "config.json").read_text())["config"]
    model = models.build_model(cfg["model"], 10, "none", 32).eval()
    model.load_state_dict(load_file(str(run / ("model_ema.safetensors" if ema else "model.safetensors"))))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("which", ["resnet_run", "timm_run"])
def test_each_format_is_written_verified_and_loads(which, fmt, request, tmp_path, capsys):
    run = request.getfixturevalue(which)
    target = tmp_path / f"model.{fmt}"
    assert main_inproc("export", "--checkpoint", str(run), "--format", fmt, "--output", str(target)) == 0
    out = capsys.readouterr().out
    assert "verified on 8 images of the run's synthetic test split: max |logit difference|" in out
    prep = json.loads((tmp_path / "preprocessing.json").read_text())
    assert prep["size"] == prep["crop"] == 32 and len(prep["classes"]) == 10
    card = (tmp_path / "README.md").read_text()
    assert "test accuracy" in card and "dtl train --model" in card
    x = torch.randn(5, 3, 32, 32)
    if fmt == "safetensors":
        cfg = json.loads((run / "config.json").read_text())["config"]
        fresh = models.build_model(cfg["model"], 10, "none", 32).eval()
        fresh.load_state_dict(load_file(str(target)))
        got = fresh(x).detach()
    else:
        got = run_through(fmt, target, x)  # a batch size other than the traced one: the batch axis is dynamic
    assert torch.allclose(got, reference_logits(run, x), atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["README.md", "preprocessing.json", target.name])


def test_timm_preprocessing_is_the_models(timm_run, tmp_path):
    assert main_inproc("export", "--checkpoint", str(timm_run), "--format", "safetensors",
                       "--output", str(tmp_path / "m.safetensors")) == 0
    prep = json.loads((tmp_path / "preprocessing.json").read_text())
    assert (prep["mean"], prep["std"], prep["model"]) == ([0.5] * 3, [0.5] * 3, "timm/test_vit")


@pytest.mark.slow
def test_vgg16_onnx_at_its_smallest_size(tmp_path_factory, tmp_path, capsys, monkeypatch, fake_vgg16_home):
    """VGG16 as ONNX at 32 px, where its adaptive pooling turns a 1x1 map into 7x7 (what the TorchScript-based
    exporter could not export), verified by the export itself with onnxruntime on the run's test images. ONNX
    only, and no second onnxruntime session here: each pass over VGG16's 528 MB is the costly part of this
    file, and every format is checked independently on ResNet-18 and a timm model above."""
    monkeypatch.setenv("TORCH_HOME", str(fake_vgg16_home))  # transfer from (random) "ImageNet" weights
    run = trained(tmp_path_factory, "vgg16", "--mode", "transfer", "--train-subset", "8", "--eval-subset", "8",
                  "--batch-size", "8")
    target = tmp_path / "vgg16.onnx"
    assert main_inproc("export", "--checkpoint", str(run), "--format", "onnx", "--output", str(target)) == 0
    out = capsys.readouterr().out
    assert "(onnx, opset 18)" in out and "verified on 8 images of the run's synthetic test split" in out
    assert target.stat().st_size > 500 * 2**20  # the weights inside the file (external_data=False)
    assert json.loads((tmp_path / "preprocessing.json").read_text())["model"] == "vgg16"


def test_a_failed_check_exits_1_and_leaves_no_file(resnet_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "max_difference", lambda ref, exported, batch: (0.5, 1e-4))
    target = tmp_path / "out" / "model.pt"
    assert main_inproc("export", "--checkpoint", str(resnet_run), "--format", "torchscript",
                       "--output", str(target)) == 1
    assert "does not match PyTorch: max |logit difference| 0.5 > tolerance 0.0001" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []  # no model, no temp file, no card


def test_ema_exports_the_averaged_weights(resnet_run, tmp_path):
    """--ema picks the weights, whatever the format (TorchScript here: the cheapest to write and check)."""
    target = tmp_path / "ema.pt"
    assert main_inproc("export", "--checkpoint", str(resnet_run), "--format", "torchscript", "--output",
                       str(target), "--ema") == 0
    x = torch.randn(2, 3, 32, 32)
    ema, raw = reference_logits(resnet_run, x, ema=True), reference_logits(resnet_run, x)
    assert not torch.allclose(ema, raw, atol=1e-3)
    assert np.allclose(run_through("torchscript", target, x).detach().numpy(), ema.numpy(), atol=1e-4)
    assert "EMA (" in (tmp_path / "README.md").read_text()


def test_ema_without_ema_weights_and_missing_onnx_are_user_errors(timm_run, tmp_path, monkeypatch, capsys):
    target = tmp_path / "m.onnx"
    assert main_inproc("export", "--checkpoint", str(timm_run), "--format", "safetensors", "--output", str(target),
                       "--ema") == 2
    assert "trained without --ema-decay" in capsys.readouterr().err
    assert main_inproc("export", "--checkpoint", str(timm_run), "--format", "onnx", "--output", str(tmp_path)) == 2
    assert f"--output {tmp_path} is a folder: give a file name (e.g. {tmp_path / 'model.onnx'})" in \
        capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main_inproc("export", "--checkpoint", str(timm_run), "--format", "onnx", "--output", str(target)) == 2
    assert "pip install 'dtl[onnx]'" in capsys.readouterr().err and not target.exists()


def test_synthetic_batch_when_the_data_is_gone(timm_run, tmp_path, monkeypatch, capsys):
    def gone(*args, **kwargs):
        raise OSError("no such folder")

    monkeypatch.setattr(datasets, "load_splits", gone)
    assert main_inproc("export", "--checkpoint", str(timm_run), "--format", "torchscript",
                       "--output", str(tmp_path / "m.pt")) == 0
    assert "a synthetic batch (8 seeded random images through the eval transform; the run's test data is " \
           "unavailable: no such folder)" in capsys.readouterr().out


def test_max_difference_sees_a_wrong_model_and_a_fixed_batch_size():
    model = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4)
    assert export.max_difference(model, model, x)[0] == 0.0
    diff, tol = export.max_difference(model, lambda t: model(t) + 0.01, x)
    assert diff == pytest.approx(0.01) and tol == pytest.approx(1e-4 * max(1.0, model(x).abs().max().item()))
    with pytest.raises(export.ExportError, match="shape"):
        export.max_difference(model, lambda t: model(x), x)  # ignores the batch size it is given
