"""dtl.data.samplers: class-balanced draws (uniform over classes, disjoint rank positions, a pure function of
(seed, epoch)), inverse-frequency class weights, and --class-balance end to end."""

from __future__ import annotations

import json

import torch

from dtl.data import cifar
from dtl.data.samplers import ClassBalancedSampler, class_weights
from dtl.data.splits import Split
from dtl.distributed import DistEnv
from tests.conftest import assert_same_weights, rewind_copy, train_inproc

IMBALANCED = torch.tensor([0] * 1000 + [1] * 100)  # 10:1


def test_class_balanced_draws_are_uniform_over_classes_and_disjoint_across_ranks():
    for epoch in (0, 1):
        shards = []
        for rank in (0, 1):
            sampler = ClassBalancedSampler(IMBALANCED, DistEnv(rank=rank, world_size=2), seed=4)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
            assert len(shards[-1]) == len(sampler) == 550
        drawn = IMBALANCED[torch.tensor(shards[0] + shards[1])]
        share = torch.bincount(drawn, minlength=2).double() / len(drawn)
        assert ((share - 0.5).abs() <= 0.05).all(), share  # within 10% of uniform
        again = ClassBalancedSampler(IMBALANCED, DistEnv(rank=0, world_size=2), seed=4)
        again.set_epoch(epoch)
        assert list(again) == shards[0]  # the same order after a restart: resumes land on it
    one = ClassBalancedSampler(IMBALANCED, DistEnv(), seed=4)
    two = ClassBalancedSampler(IMBALANCED, DistEnv(), seed=4)
    two.set_epoch(1)
    assert list(one) != list(two)  # reshuffled per epoch


def test_class_weights_are_inverse_frequencies():
    weights = class_weights(IMBALANCED, 3)
    assert torch.allclose(weights, torch.tensor([1100 / (3 * 1000), 1100 / (3 * 100), 0.0], dtype=torch.float64))


def imbalanced_cifar(tmp_path):
    full = cifar.make_synthetic(400, seed=0)
    keep = torch.cat([torch.nonzero(full.labels == c).flatten()[: (40 if c == 0 else 4)] for c in range(10)])
    train = Split(full.images[keep], full.labels[keep], full.classes)
    return cifar.write_cifar10(tmp_path / "data", train, cifar.make_synthetic(40, seed=1), "py").parent


BALANCED_RUN = ["--dataset", "cifar10", "--no-download", "--image-size", "32", "--device", "cpu", "--model",
                "squeezenet1_1", "--mode", "scratch", "--batch-size", "8", "--log-every", "1", "--seed", "2"]


def test_loss_weights_are_printed_and_saved(tmp_path, capfd):
    data = imbalanced_cifar(tmp_path)
    out = tmp_path / "run"
    assert train_inproc(*BALANCED_RUN, "--data-dir", str(data), "--epochs", "1", "--class-balance", "loss",
                        "--output-dir", str(out)) == 0
    assert "class weights (inverse training frequency): airplane=0.190" in capfd.readouterr().err
    saved = json.loads((out / "config.json").read_text())["run"]["class_weights"]
    counts = torch.tensor([40] + [4] * 9, dtype=torch.float64)
    assert torch.allclose(torch.tensor(saved, dtype=torch.float64), 76 / (10 * counts))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(row["test_acc_per_class"]) == 10


def test_balanced_sampler_resumes_mid_epoch_bitwise(tmp_path):
    data = imbalanced_cifar(tmp_path)
    flags = [*BALANCED_RUN, "--data-dir", str(data), "--epochs", "2", "--class-balance", "sampler",
             "--checkpoint-every-steps", "3", "--keep-last", "20"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train_inproc(*flags, "--output-dir", str(full)) == 0
    rewind_copy(full, part, 3)  # 76 images / 8 = 10 steps per epoch: keep step 3
    assert train_inproc(*flags, "--output-dir", str(part), "--resume", "auto") == 0
    assert_same_weights(full, part)


def test_no_epoch_ends_in_a_batch_of_one(tmp_path):
    """721 images in batches of 16 leave one image alone at the end: a ResNet's BatchNorm cannot train on it."""
    from dtl.data.samplers import sampler_for

    sampler = sampler_for(torch.zeros(721, dtype=torch.int64), DistEnv(), seed=0, batch_size=16)
    assert len(sampler) == 720 and len(list(sampler)) == 720
    assert len(sampler_for(torch.zeros(722, dtype=torch.int64), DistEnv(), 0, batch_size=16)) == 722
    code = train_inproc("--dataset", "synthetic", "--image-size", "32", "--device", "cpu", "--model", "resnet18",
                        "--mode", "scratch", "--train-subset", "17", "--eval-subset", "8", "--batch-size", "16",
                        "--epochs", "1", "--output-dir", str(tmp_path / "run"))
    assert code == 0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["train_count"] == 16
