"""Progress output: a tqdm bar on a terminal; plain timed lines (no carriage returns) anywhere else."""

from __future__ import annotations

import io
import logging
import re

from dtl.train import progress_bar
from tests.conftest import TINY, train_inproc


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_that_shows_stats_every_log_interval():
    term = FakeTerminal()
    bar = progress_bar.Progress(4, "epoch 1/1 train", stream=term)
    bar.update(1)
    assert bar.wants_stats(True) and not bar.wants_stats(False)  # --log-every decides, not the clock
    bar.show(loss="1.234")
    bar.close()
    assert "\r" in term.getvalue() and "loss=1.234" in term.getvalue()


def test_a_file_gets_plain_lines_only_when_one_is_due(monkeypatch, caplog):
    caplog.set_level(logging.INFO, "dtl")
    logging.getLogger("dtl").propagate = True
    out = io.StringIO()
    monkeypatch.setattr(progress_bar, "LINE_EVERY_S", 3600.0)
    bar = progress_bar.Progress(10, "eval", stream=out)
    bar.tick(3)
    assert not bar.wants_stats(True)  # not due yet: the caller reads no stats (no host sync)
    monkeypatch.setattr(progress_bar, "LINE_EVERY_S", 0.0)
    assert bar.wants_stats()
    bar.show(loss="0.500")
    assert out.getvalue() == ""  # nothing drawn on the stream itself
    line = caplog.records[-1].getMessage()
    assert re.fullmatch(r"eval: 3/10 \(30%\) eta \d+m\d\ds loss 0\.500", line), line
    assert not progress_bar.Progress(10, "x", enabled=False, stream=out).wants_stats(True)


def test_training_with_stderr_in_a_file_writes_lines_without_carriage_returns(capfdbinary, monkeypatch, tmp_path):
    monkeypatch.setattr(progress_bar, "LINE_EVERY_S", 0.0)  # evaluation: a line per batch instead of every 30 s
    assert train_inproc(*TINY, "--epochs", "1", "--train-subset", "48", "--eval-subset", "16",
                        "--progress-every", "0", "--output-dir", str(tmp_path / "run")) == 0
    err = capfdbinary.readouterr().err
    assert b"\r" not in err
    text = err.decode()
    for step in (1, 2, 3):
        assert re.search(rf"epoch 1/1 train: {step}/3 \(\d+%\) eta \S+ loss \d\.\d{{3}} acc \d\.\d{{3}} img_s \d+",
                         text), text
    assert "eval: 1/1 (100%)" in text
