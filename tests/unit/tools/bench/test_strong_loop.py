"""The strong hand-written loop (`dtl.tools.bench.strong_loop`) and its training rate alone
(`dtl.tools.bench.strong_rate`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dtl.data.constants import IMAGENET_MEAN, IMAGENET_STD
from dtl.tools.bench import settings, strong_loop, strong_rate
from tests.unit.tools.bench.test_side_by_side import TINY, bench_args


def strong_config(*flags: str):
    return settings.bench_config(bench_args(["--model", "resnet18", *TINY, *flags]))


def test_strong_loop_transfer_trains_the_head_alone_with_the_prefix_under_no_grad(tmp_path: Path) -> None:
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    loop = strong_loop.StrongLoop(strong_config("--mode", "transfer", "--weights", str(weights)), torch.device("cpu"))
    prefix, head = loop.parts
    assert isinstance(head, torch.nn.Linear) and isinstance(prefix.fc, torch.nn.Identity)
    assert [p for g in loop.optimizer.param_groups for p in g["params"]] == list(head.parameters())
    frozen = [p.detach().clone() for p in prefix.parameters()]
    head_before = head.weight.detach().clone()
    images, labels = next(loop.train_batches)
    loop.train_step(2)
    assert all(torch.equal(a, b) for a, b in zip(frozen, prefix.parameters()))
    assert not torch.equal(head_before, head.weight)
    assert all(p.grad is None for p in prefix.parameters())  # no graph through the prefix
    # transfer on a CPU: channels_last (no convolution trains), as dtl.models.memory_format decides
    assert images.is_contiguous(memory_format=torch.channels_last) and labels.shape == (8,)


def test_strong_loop_batches_are_resized_and_normalised_on_the_device() -> None:
    cfg = strong_config("--mode", "scratch", "--weights", "none", "--image-size", "48")
    loop = strong_loop.StrongLoop(cfg, torch.device("cpu"))
    raw = loop.test_images[:8]
    expected = torch.nn.functional.interpolate(raw.float(), size=(48, 48), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = (expected / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    images, labels = next(loop.eval_batches)  # the test set in order
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, loop.test_labels[:8])
    assert images.is_contiguous()  # scratch trains convolutions: NCHW on a CPU
    assert loop.precision.name == "fp32" and loop.optimizer.defaults["foreach"]


def test_strong_loop_train_rate_for_several_cases_in_one_process(tmp_path: Path) -> None:
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"scratch_b8": ["--batch-size", "8"], "scratch_b4": ["--batch-size", "4"]}))
    out = tmp_path / "strong.json"
    assert strong_rate.main(["--cases", str(cases), "--model", "squeezenet1_1", "--mode", "scratch", "--weights",
                             "none", "--device", "cpu", "--image-size", "32", "--train-subset", "64",
                             "--eval-subset", "16", "--steps", "3", "--warmup", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"scratch_b8", "scratch_b4"}
    assert (result["scratch_b8"]["batch_size"], result["scratch_b4"]["batch_size"]) == (8, 4)
    for entry in result.values():
        assert entry["steps"] == 3 and entry["images_per_s"] > 0 and entry["precision"] == "fp32"
