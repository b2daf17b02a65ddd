"""dtl.distributed.signals: stop requests only set a flag; a second Ctrl-C means now."""

from __future__ import annotations

import os
import signal

import pytest

from dtl.distributed import signals


@pytest.fixture
def handlers():
    saved = {s: signal.getsignal(s) for s in signals.HANDLED}
    signals.install()
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    signals.reset()


def test_a_signal_sets_the_flag_and_is_named(handlers):
    assert not signals.requested()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert signals.requested() and signals.received() == ["SIGUSR1"]
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.received() == ["SIGUSR1", "SIGTERM"]
    signals.reset()
    assert not signals.requested() and signals.received() == []


def test_a_second_ctrl_c_interrupts_at_once(handlers):
    os.kill(os.getpid(), signal.SIGINT)  # the first only asks for a checkpoint and a clean stop
    assert signals.requested()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
