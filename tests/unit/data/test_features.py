"""--cache-features: train the head on features computed once; same head as the uncached path."""

import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from dtl.config import Config
from dtl.data import features
from tests.conftest import train_inproc


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_cached_features_give_the_same_head(tmp_path, resnet_weights, capfd):
    common = ["--dataset", "synthetic", "--image-size", "32", "--device", "cpu", "--model", "resnet18",
              "--mode", "transfer", "--weights", str(resnet_weights), "--no-augment", "--epochs", "3",
              "--train-subset", "96", "--eval-subset", "40", "--batch-size", "16", "--lr", "0.01", "--seed", "4"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert train_inproc(*common, "--output-dir", str(plain)) == 0
    assert train_inproc(*common, "--cache-features", "--output-dir", str(cached)) == 0
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(cached / "model.safetensors"))
    # the frozen backbone is bit-identical; the head agrees up to float summation order in the features
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("fc."))
    rows = [json.loads(line) for line in (cached / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # the head did train
    torch.testing.assert_close(b["fc.weight"], a["fc.weight"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b["fc.bias"], a["fc.bias"], atol=1e-5, rtol=1e-4)
    assert (cached / "features" / "train.safetensors").is_file()

    again = tmp_path / "again"
    (again / "features").mkdir(parents=True)
    for name in ("train", "test"):
        (again / "features" / f"{name}.safetensors").write_bytes(
            (cached / "features" / f"{name}.safetensors").read_bytes())
    capfd.readouterr()
    assert train_inproc(*common, "--cache-features", "--output-dir", str(again), "--overwrite") == 0
    assert "reused from" in capfd.readouterr().err


def test_flip_tta_on_cached_features_scores_the_mirrored_images(tmp_path, resnet_weights):
    common = ["--dataset", "synthetic", "--image-size", "32", "--device", "cpu", "--model", "resnet18",
              "--mode", "transfer", "--weights", str(resnet_weights), "--no-augment", "--epochs", "1",
              "--train-subset", "32", "--eval-subset", "24", "--batch-size", "16", "--seed", "4", "--tta", "flip"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert train_inproc(*common, "--output-dir", str(plain)) == 0
    assert train_inproc(*common, "--cache-features", "--output-dir", str(cached)) == 0
    a, b = (json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in (plain, cached))
    # the TTA numbers are those of the images and their mirrors, not of mirrored feature vectors
    torch.testing.assert_close(b["test_loss"], a["test_loss"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b["test_loss_plain"], a["test_loss_plain"], atol=1e-4, rtol=1e-4)
    assert b["test_loss"] != b["test_loss_plain"]  # the mirrors did count
    assert "mirrored" in load_file(str(cached / "features" / "test.safetensors"))
    assert "mirrored" not in load_file(str(cached / "features" / "train.safetensors"))


def test_stored_features_without_mirrors_are_not_reused_for_flip_tta(tmp_path):
    cfg = Config(mode="transfer", augment=False, cache_features=True)
    found = features.CachedSplit(torch.randn(5, 3), torch.arange(5))
    features.store(tmp_path, cfg, "test", found)
    hit = features.cached(tmp_path, cfg, "test", 5, torch.device("cpu"))
    assert torch.equal(hit.features, found.features) and hit.mirrored is None
    assert features.cached(tmp_path, cfg, "test", 5, torch.device("cpu"), mirrored=True) is None
    features.store(tmp_path, cfg, "test", features.CachedSplit(found.features, found.labels, -found.features))
    assert torch.equal(features.cached(tmp_path, cfg, "test", 5, torch.device("cpu"), mirrored=True).mirrored,
                       -found.features)


def test_cache_features_refused_with_augmentation():
    with pytest.raises(ValueError, match="augment"):
        Config(mode="transfer", cache_features=True)


def test_cache_features_refuses_a_convolutional_head(tmp_path, capfd):
    weights = tmp_path / "squeezenet.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), weights)
    code = train_inproc("--dataset", "synthetic", "--image-size", "32", "--device", "cpu", "--model",
                        "squeezenet1_1", "--mode", "transfer", "--weights", str(weights), "--no-augment",
                        "--cache-features", "--train-subset", "16", "--eval-subset", "8", "--output-dir",
                        str(tmp_path / "run"))
    assert code == 2
    assert "classifier.1) is a convolution followed by pooling" in capfd.readouterr().err
    assert not (tmp_path / "run").exists()
