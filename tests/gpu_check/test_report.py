"""`tests.gpu_check.report`: the table, the log tail, the JSON report."""

from __future__ import annotations

import json

from tests.gpu_check import report
from tests.gpu_check.report import Outcome


def test_the_table_wraps_the_figures_under_their_column():
    rows = [Outcome("inputs", seconds=1.25, figures={"weights": "vgg16 528 MiB", "weights_s": 3.14159}),
            Outcome("speed", "FAIL", 12.0, reason="goals missed", summary="x " * 80),
            Outcome("compile_recompiles", "SKIP", reason="needs the GPU run")]
    lines = report.format_table(rows).splitlines()
    assert lines[0].split() == ["step", "result", "seconds", "figures"] and set(lines[1]) == {"-"}
    assert lines[2] == f"{'inputs':<20} {'PASS':<6} {1.25:>8.1f}  weights=vgg16 528 MiB, weights_s=3.142"
    assert lines[3].startswith(f"{'speed':<20} FAIL       12.0  goals missed | x x")
    assert lines[4].startswith(" " * 38 + "x") and all(len(line) <= report.WIDTH for line in lines)
    assert lines[-1].endswith("SKIP        0.0  needs the GPU run")
    assert report.fmt({"a": [1.0, 12345.6], "b": "s"}) == "{a=[1, 12346], b=s}"


def test_the_tail_keeps_the_last_state_of_a_progress_bar(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("one\nbar  10%\rbar  50%\rbar 100%\r\n" + "".join(f"line {i}\n" for i in range(40)))
    assert report.tail(log, 3) == ["line 37", "line 38", "line 39"]
    assert report.tail(log, 42)[:2] == ["one", "bar 100%"]
    assert report.tail(tmp_path / "missing.log") == []


def test_the_json_report_and_its_copy(tmp_path):
    outcomes = [Outcome("inputs"), Outcome("bench", "FAIL", reason="r"), Outcome("pytest_cuda", "SKIP")]
    result = report.report(outcomes, "cpu-smoke", 3.0, 480.0, tmp_path, {"torch": "x"})
    assert (result["result"], result["failed"], result["profile"]) == ("FAIL", ["bench"], "cpu-smoke")
    assert [s["name"] for s in result["steps"]] == ["inputs", "bench", "pytest_cuda"]
    report.write_report(result, tmp_path / "r" / "gpu_check.json", tmp_path / "out")
    assert json.loads((tmp_path / "r" / "gpu_check.json").read_text()) == json.loads(
        (tmp_path / "out" / "gpu_check.json").read_text()) == json.loads(json.dumps(result))
    assert report.report(outcomes[::2], "gpu", 1.0, 450.0, tmp_path, {})["result"] == "PASS"
