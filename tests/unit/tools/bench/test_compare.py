"""`dtl bench`: the JSON it writes (structure, positive numbers, ratios = dtl / reference); never timings."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision.transforms import v2

from dtl import cli
from dtl.data.augment.transform import IMAGENET_MEAN, IMAGENET_STD
from dtl.errors import UserError
from dtl.tools.bench import compare, input_phases, overhead, strong_loop, strong_rate
from dtl.tools.bench.report import PHASES, Options

TINY = ["--device", "cpu", "--image-size", "32", "--batch-size", "8", "--steps", "2", "--warmup", "1",
        "--repeats", "2", "--train-subset", "64", "--eval-subset", "32"]


def numbers(obj: Any, where: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from numbers(value, f"{where}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from numbers(value, f"{where}[{i}]")
    else:
        assert isinstance(obj, (int, float)) and not isinstance(obj, bool), f"{where} is {obj!r}"
        yield where, float(obj)


def check_result(result: dict[str, Any]) -> None:
    assert set(result) == {"meta", "reference", "strong", "dtl", "ratio", "ratio_strong"}
    for side in ("reference", "strong", "dtl", "ratio", "ratio_strong"):
        assert set(result[side]) == {"input", "train_step", "eval_step"}, side
        for where, value in numbers(result[side], side):
            assert math.isfinite(value) and value > 0, f"{where} = {value}"
    for key, other in (("ratio", "reference"), ("ratio_strong", "strong")):
        for phase, ratio in result[key].items():
            assert "images_per_s" in ratio
            for name, value in ratio.items():
                if name == "images_per_s_paired":  # the median of per-round dtl / other
                    runs = zip(result["dtl"][phase]["runs"], result[other][phase]["runs"])
                    expected = statistics.median(d / r for d, r in runs)
                else:
                    expected = result["dtl"][phase][name] / result[other][phase][name]
                assert value == pytest.approx(expected), (key, phase, name)
    for side in ("reference", "strong", "dtl"):
        for phase, entry in result[side].items():
            assert len(entry["runs"]) == result["meta"]["repeats"]
            assert entry["images_per_s"] == pytest.approx(statistics.median(entry["runs"])), (side, phase)
    meta = result["meta"]
    for key in ("device", "model", "mode", "image_size", "batch_size", "precision", "torch", "date", "command"):
        assert key in meta, key
    assert meta["command"].startswith("python -m dtl.cli bench")


def bench_main(argv: list[str]) -> int:
    return cli.main(["bench", *argv])


def bench_args(argv: list[str]):
    return cli.build_parser().parse_args(["bench", *argv])


def test_bench_scratch_squeezenet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    code = bench_main(["--model", "squeezenet1_1", "--mode", "scratch", "--weights", "none", *TINY,
                       "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    check_result(result)
    meta = result["meta"]
    assert (meta["model"], meta["mode"], meta["image_size"], meta["batch_size"]) == ("squeezenet1_1", "scratch", 32, 8)
    assert meta["precision"] == {"reference": "fp32", "strong": "fp32", "dtl": "fp32"}
    assert meta["dataset"] == "synthetic" and meta["threads"] == torch.get_num_threads()
    for side in ("reference", "strong", "dtl"):  # measured in a subprocess per side, per phase
        assert all("peak_rss_mib" in result[side][phase] for phase in PHASES)
    # on a CPU the input phases are stretched to a second of timed work; the steps as asked
    assert meta["timed_steps"]["dtl"]["train_step"] == 2
    table = capsys.readouterr().out
    assert "reference img/s" in table and "dtl/strong" in table and all(phase in table for phase in PHASES)


def test_bench_transfer_resnet18_weights_file(tmp_path: Path) -> None:
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "bench.json"
    code = bench_main(["--model", "resnet18", "--mode", "transfer", "--weights", str(weights), *TINY,
                       "--memory", "off", "--flops", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    check_result(result)
    assert result["meta"]["mode"] == "transfer" and result["meta"]["weights"] == str(weights)
    flops = result["meta"]["flops_per_image"]
    assert flops["dtl"] == pytest.approx(flops["reference"], rel=1e-3)  # the same model, counted per side
    assert flops["strong"] == pytest.approx(flops["reference"], rel=1e-3)
    # transfer: the backward pass only reaches the head, so a train step costs about one forward
    assert flops["dtl"]["eval_step"] <= flops["dtl"]["train_step"] < 1.2 * flops["dtl"]["eval_step"]
    for side in ("reference", "strong", "dtl"):
        assert result[side]["train_step"]["tflops"] > 0 and "peak_rss_mib" not in result[side]["train_step"]


def test_bench_flags_are_trains_plus_its_own() -> None:
    args = bench_args(["--model", "resnet18", "--mode", "scratch", "--device", "cpu"])
    cfg = compare.bench_config(args)
    assert cfg.data.dataset == "synthetic"
    assert (cfg.data.train_subset, cfg.data.eval_subset) == compare.SYNTHETIC_COUNTS["cpu"]
    assert (cfg.backbone.model, cfg.backbone.mode, cfg.backbone.weights) == ("resnet18", "scratch", "none")
    args = bench_args(["--data-dir", "somewhere", "--device", "cpu"])
    cfg = compare.bench_config(args)
    assert cfg.data.dataset == "cifar10" and cfg.data.train_subset is None
    args = bench_args(["--steps", "0"])
    with pytest.raises(UserError, match="--steps"):
        compare.options_from_args(args, "x")
    assert bench_main(["--dataset", "folder", "--data-dir", "/nonexistent/dtl-bench", "--device", "cpu"]) == 2


def bench_with_input_augment(tmp_path: Path, *flags: str) -> dict[str, Any]:
    """`dtl bench` (TINY, no memory probe) with `flags`: it succeeds and reports `input_augment` on both sides, with
    the ratio of their medians like every phase; returns the JSON result."""
    out = tmp_path / "bench.json"
    code = bench_main(["--model", "squeezenet1_1", "--mode", "scratch", "--weights", "none", *TINY, "--memory", "off",
                       "--min-seconds", "0", *flags, "--json", str(out)])  # structure, not timing: no stretching
    assert code == 0
    result = json.loads(out.read_text())
    for side in ("reference", "dtl", "ratio"):
        assert set(result[side]) == {*PHASES, "input_augment"}, side
    assert set(result["strong"]) == set(result["ratio_strong"]) == set(PHASES)  # it has no augmentation
    assert result["ratio"]["input_augment"]["images_per_s"] == pytest.approx(
        result["dtl"]["input_augment"]["images_per_s"] / result["reference"]["input_augment"]["images_per_s"])
    return result


def test_bench_augmented_input_phase_against_torchvision_v2(tmp_path: Path) -> None:
    """--auto-augment/--crop pad/--random-erasing add the `input_augment` phase: dtl's loader against a per-image
    torchvision v2 pipeline with the same ops, reported like every phase (medians, ratios)."""
    result = bench_with_input_augment(tmp_path, "--auto-augment", "ta_wide", "--crop", "pad", "--random-erasing",
                                      "0.25", "--input-steps", "2")
    assert result["meta"]["config"]["auto_augment"] == "ta_wide"
    transform = input_phases.v2_augment_transform(compare.bench_config(bench_args(
        ["--crop", "pad", "--auto-augment", "augmix", "--random-erasing", "0.5", *TINY])))
    names = [type(t).__name__ for t in transform.transforms]
    assert names == ["Resize", "RandomCrop", "RandomHorizontalFlip", "AugMix", "ToDtype", "Normalize",
                     "RandomErasing"]


def test_bench_mixup_adds_the_input_phase_against_v2_mixing_in_the_collate(tmp_path: Path) -> None:
    """--mixup/--cutmix alone add `input_augment` too: dtl's loader + `Mixer` against v2 per image with
    ``MixUp``/``CutMix`` in the collate function, the other phases reported as without mixing."""
    result = bench_with_input_augment(tmp_path, "--input-steps", "3", "--mixup", "0.2", "--cutmix", "1.0")
    assert result["meta"]["config"]["mixup"] == 0.2


def test_the_v2_reference_mixes_like_timm_batch_mode():
    """The reference side's collate: v2 MixUp/CutMix chosen like timm's switch, applied with --mix-prob; off
    when mixing is off."""
    cfg = compare.bench_config(bench_args([*TINY, "--mixup", "0.2", "--cutmix", "1.0", "--mix-switch-prob", "0.25",
                                         "--mix-prob", "0.8"]))
    t = input_phases.v2_mix_transform(cfg, 10)
    assert isinstance(t, v2.RandomApply) and t.p == 0.8
    choice = t.transforms[0]
    assert [type(c).__name__ for c in choice.transforms] == ["MixUp", "CutMix"] and choice.p == [0.75, 0.25]
    assert input_phases.v2_mix_transform(compare.bench_config(bench_args([*TINY])), 10) is None
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 10
    collate = input_phases._MixCollate(input_phases.v2_mix_transform(cfg, 10))
    x, y = collate(list(zip(images, labels)))
    assert x.shape == images.shape and y.shape == (8, 10)
    torch.testing.assert_close(y.sum(1), torch.ones(8))


def strong_config(*flags: str):
    return compare.bench_config(bench_args(["--model", "resnet18", *TINY, *flags]))


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


def test_calibration_stretches_a_measurement_to_the_minimum_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps are decided from one timed measurement (its time faked here: no timing in tests)."""
    monkeypatch.setattr(compare, "timed_run", lambda loop, fn, steps: (8 * steps, 0.01 * steps))
    assert compare.calibrated_steps(None, None, 5, 2.0) == 200  # 10 ms a step -> 200 steps for 2 s
    assert compare.calibrated_steps(None, None, 500, 2.0) == 500  # already long enough
    assert compare.calibrated_steps(None, None, 5, 0.0) == 5
    monkeypatch.setattr(compare, "timed_run", lambda loop, fn, steps: (8 * steps, 0.0))
    assert compare.calibrated_steps(None, None, 5, 2.0) == compare.MAX_STEPS
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert compare.min_seconds(gpu, "train_step") == compare.min_seconds(gpu, "input") == compare.MIN_SECONDS_GPU
    assert compare.min_seconds(cpu, "train_step") == 0 and compare.min_seconds(cpu, "input_augment") > 0
    assert compare.min_seconds(cpu, "input", Options(min_seconds=0.0).min_seconds) == 0


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


def test_overhead_bench_runs_both_loops_and_reports_the_ratio(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "overhead.json"
    assert overhead.main(["--steps", "20", "--repeats", "3", "--warmup", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    us = result["us_per_step"]
    assert us["dtl"] > 0 and us["bare"] > 0 and len(result["runs_us"]["dtl"]) == 3
    assert result["ratio"] == pytest.approx(us["dtl"] / us["bare"])
    assert result["ratio_paired"] == pytest.approx(statistics.median(
        d / b for d, b in zip(result["runs_us"]["dtl"], result["runs_us"]["bare"])))
    assert "dtl / bare" in capsys.readouterr().out


def test_overhead_bench_runs_dtl_s_own_epoch_loop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """dtl's side is loop.train_one_epoch itself (agreement, meters, progress, checks), not a copy of it."""
    from dtl.train import loop

    calls = []
    original = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = overhead.measure(steps=5, repeats=1, warmup=0)
    assert len(calls) == 5 and result["meta"]["steps"] == 5
