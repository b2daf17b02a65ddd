"""Every README block marked `<!-- cpu-test -->` runs offline, as written, on a CPU.

Mechanics (the only liberties taken): the blocks run in README order in one temporary folder holding a copy
of `train.py` and `launch/` (so `runs/...` and `data/...` land there; dtl itself is imported from this
checkout through PYTHONPATH), with this interpreter's bin folder first on PATH (`python`, `torchrun`,
`accelerate`, `dtl`), an empty torch hub cache, `HF_HUB_OFFLINE=1`, and the copied accelerate configs given
a free `main_process_port` (concurrent launches would collide on a fixed one). Bash lines joined at `\\`
continuations run one by one with `bash -c`; python blocks with `python -c`. Each must exit 0."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT, free_port

pytestmark = pytest.mark.slow
BLOCK = re.compile(r"<!-- cpu-test -->\s*\n```(bash|python)\n(.*?)```", re.S)


def cpu_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, commands) of each marked block: bash lines (continuations joined, blank/comment lines
    dropped), or the python block as one command."""
    blocks = []
    for lang, body in BLOCK.findall(text):
        if lang == "python":
            blocks.append((lang, [body]))
            continue
        lines = [line.strip() for line in body.replace("\\\n", " ").splitlines()]
        blocks.append((lang, [line for line in lines if line and not line.startswith("#")]))
    return blocks


def test_the_extraction_sees_every_marked_block():
    text = (ROOT / "README.md").read_text()
    blocks = cpu_blocks(text)
    assert len(blocks) == text.count("<!-- cpu-test -->") >= 3
    commands = [c for _, cs in blocks for c in cs]
    assert any(c.startswith("torchrun ") for c in commands) and any(c.startswith("accelerate ") for c in commands)
    assert all("\\" not in c for _, cs in blocks if _ == "bash" for c in cs)


def test_every_cpu_line_of_the_readme_runs_offline(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "train.py", work)
    shutil.copytree(ROOT / "launch", work / "launch")
    for config in (work / "launch").glob("accelerate_*.yaml"):
        config.write_text(re.sub(r"main_process_port: \d+", f"main_process_port: {free_port()}", config.read_text()))
    env = {**os.environ, "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "TORCH_HOME": str(tmp_path / "torch_home"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for lang, commands in cpu_blocks((ROOT / "README.md").read_text()):
        for command in commands:
            argv = ["bash", "-c", command] if lang == "bash" else [PY, "-c", command]
            res = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, f"README line failed ({res.returncode}): {command}\n{res.stderr[-3000:]}"
    assert (work / "runs" / "try" / "model.safetensors").is_file() and (work / "try.png").is_file()
