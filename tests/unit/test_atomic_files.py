"""dtl.atomic_files: JSON files hold JSON (never NaN or Infinity), written whole or not at all."""

import json
import math

import pytest

from dtl import atomic_files


def test_a_non_finite_number_is_refused_naming_its_key(tmp_path):
    path = tmp_path / "status.json"
    payload = {"state": "running", "run": {"loss": math.inf, "per_class": [0.5, math.nan]}}
    with pytest.raises(ValueError, match=r"run\.loss, run\.per_class\[1\]"):
        atomic_files.write_json(path, payload)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_finite_payloads_are_written_as_strict_json(tmp_path):
    path = tmp_path / "a.json"
    atomic_files.write_json(path, {"b": [1.5, None], "a": 1})
    assert json.loads(path.read_text()) == {"a": 1, "b": [1.5, None]}
    assert atomic_files.json_text({"x": 1e308}) == '{"x": 1e+308}'
