"""SIGINT and SIGTERM become :class:`Interrupted`, even where Python drops the first raising."""

from __future__ import annotations

import signal

import pytest
from conftest import SignalledInFinaliser

from pipeline import interrupts
from pipeline.interrupts import Interrupted, interruptible


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_raises_interrupted_and_exits_128_plus_its_number(signum):
    with pytest.raises(Interrupted) as info:
        with interruptible():
            signal.raise_signal(signum)
    assert info.value.signum == signum and info.value.exit_code == 128 + signum
    assert signal.getsignal(signal.SIGTERM) is not interrupts._handler  # the handlers are put back


def test_an_interrupt_dropped_in_a_finaliser_is_raised_by_the_next_check(dropped):
    went_on = False
    with pytest.raises(Interrupted) as info:
        with interruptible():
            SignalledInFinaliser(signal.SIGTERM)  # collected at once: its finaliser runs here
            went_on = True
            interrupts.check()
    assert [type(d.exc_value) for d in dropped] == [Interrupted]  # the first raising was lost
    assert went_on and info.value.signum == signal.SIGTERM


def test_an_interrupt_dropped_with_nothing_checking_is_raised_as_the_block_ends(dropped):
    with pytest.raises(Interrupted) as info:
        with interruptible():
            SignalledInFinaliser(signal.SIGINT)
    assert len(dropped) == 1 and info.value.exit_code == 130


def test_check_is_quiet_without_a_signal_and_after_an_interrupted_block():
    with interruptible():
        interrupts.check()
    with pytest.raises(Interrupted):
        with interruptible():
            signal.raise_signal(signal.SIGTERM)
    interrupts.check()  # that run is over: the next one starts uninterrupted
    with interruptible():
        interrupts.check()
