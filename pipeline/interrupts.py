"""SIGINT and SIGTERM as an exception a run unwinds through, cleaning up as it goes.

A signal's Python handler runs in the main thread, between two bytecodes of whatever it is
running. Where that is a finaliser (an object's ``__del__``, such as a Dask future's, or a
weakref callback), Python prints the exception and drops it: the run went on and exited 0,
and the handler had already set the signals aside. So the signal is also kept here, and
:func:`check` raises it again where the run next looks (each time its loop wakes), and the
with-block of :func:`interruptible` raises it at its end if nothing did.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []
"""The signal that interrupted the run in progress in this process (none: not interrupted)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; a BaseException so no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum: int, frame: object) -> None:
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    _received.append(signum)
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into :class:`Interrupted`; later ones wait for the cleanup.
    In a thread other than the main one (which alone receives signals) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _received.clear()
    try:
        yield
        check()  # the body ended as if no signal came: its exception was dropped on the way
    finally:
        _received.clear()
        for s, h in previous.items():
            signal.signal(s, h)


def check() -> None:
    """Raise :class:`Interrupted` if a signal has come since :func:`interruptible` began (its
    first raising may have been dropped in a finaliser). Called where a run waits, not in the
    cleanup an interrupt runs, so the interrupt is raised once where it was not lost."""
    if _received:
        raise Interrupted(_received[0])
