"""`dtl bench` (`dtl.tools.bench.side_by_side`): the JSON it writes (structure, positive numbers, ratios = dtl /
reference); never timings."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dtl import cli
from dtl.tools.bench import input_phases, settings
from dtl.tools.bench.report import PHASES

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
    transform = input_phases.v2_augment_transform(settings.bench_config(bench_args(
        ["--crop", "pad", "--auto-augment", "augmix", "--random-erasing", "0.5", *TINY])))
    names = [type(t).__name__ for t in transform.transforms]
    assert names == ["Resize", "RandomCrop", "RandomHorizontalFlip", "AugMix", "ToDtype", "Normalize",
                     "RandomErasing"]


def test_bench_mixup_adds_the_input_phase_against_v2_mixing_in_the_collate(tmp_path: Path) -> None:
    """--mixup/--cutmix alone add `input_augment` too: dtl's loader + `Mixer` against v2 per image with
    ``MixUp``/``CutMix`` in the collate function, the other phases reported as without mixing."""
    result = bench_with_input_augment(tmp_path, "--input-steps", "3", "--mixup", "0.2", "--cutmix", "1.0")
    assert result["meta"]["config"]["mixup"] == 0.2
