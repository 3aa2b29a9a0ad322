"""CPU time of each thread of this process over a stretch of a run, summed by the role it plays.

A process's CPU in total says how much work it did, not whether one of its threads is the
limit: a run's process can use 2 of 16 cores and still cap the run, if one thread (the driver's
loop, say) is busy all the time. :class:`ThreadCpu` samples ``/proc/self/task`` in a thread of
its own and reports each role's CPU seconds and the busiest thread's (Linux; empty elsewhere).
A sample of 60 threads takes about 1 ms: 1% of a core at the bench's 0.1 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

ROLES = (
    ("driver", ("MainThread",)),
    ("tasks", ("Dask-Default-Threads",)),
    ("checksums", ("tilepipe-hash",)),
    ("publishing", ("tilepipe-cog",)),
    ("dask", ("IO loop", "Dask", "Profile", "TCP-Executor")),
    ("xla", ("tf_", "XLA", "pjrt", "llvm")),
)
"""A thread's role, by the first of these its name holds: the name Python gave it, else the
operating system's (the threads of XLA and other libraries); ``native`` for any other, unless
:func:`starting` saw it start."""

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

_STARTED_BY: dict[int, str] = {}
"""Unnamed threads of libraries, by thread id: the role of the code that started them (:func:`starting`)."""


def role_of(name: str) -> str:
    """The role of a thread called ``name`` (:data:`ROLES`)."""
    for role, marks in ROLES:
        if any(mark in name for mark in marks):
            return role
    return "native"


@contextlib.contextmanager
def starting(role: str, task_dir: str = "/proc/self/task") -> Iterator[None]:
    """The threads that the with-block starts and Python does not know play ``role``: XLA's CPU
    client starts a dozen unnamed ones with its devices and more at its first compile, which run
    its compiled code beside its named pool (a thread id the kernel reuses later keeps the role)."""
    before = set(thread_times(task_dir))
    try:
        yield
    finally:
        python = {t.native_id for t in threading.enumerate()}
        _STARTED_BY.update(dict.fromkeys(set(thread_times(task_dir)) - before - python, role))


def thread_times(task_dir: str = "/proc/self/task") -> dict[int, tuple[str, float]]:
    """Each live thread's operating-system name and CPU seconds (user and system), by thread id."""
    times = {}
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return times
    for tid in tids:
        try:
            with open(f"{task_dir}/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        times[int(tid)] = (name, (int(rest[11]) + int(rest[12])) / _TICK)  # utime and stime: fields 14 and 15
    return times


@dataclasses.dataclass(frozen=True)
class ThreadShare:
    """What one sampling found: CPU seconds by role, the busiest thread and the time sampled."""

    roles: dict[str, float]
    busiest: str | None
    """The busiest thread's name and role, as ``name (role)``."""
    busiest_s: float
    threads: dict[str, int]
    """Threads seen, by role."""
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ThreadCpu:
    """Per-thread CPU of this process while the with-block runs, sampled every ``interval`` s
    (threads started and ended inside it included, less their last interval), then
    :attr:`result`."""

    def __init__(self, interval: float = 0.1, task_dir: str = "/proc/self/task"):
        self._interval, self._task_dir = interval, task_dir
        self._first: dict[int, float] = {}
        self._last: dict[int, tuple[str, str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tilepipe-thread-cpu", daemon=True)
        self.result: ThreadShare | None = None

    def _sample(self, first: bool = False) -> None:
        python = {t.native_id: t.name for t in threading.enumerate()}
        for tid, (os_name, seconds) in thread_times(self._task_dir).items():
            if tid == self._thread.native_id:
                continue
            if first:
                self._first[tid] = seconds
            name = python.get(tid, os_name)
            started_by = None if tid in python else _STARTED_BY.get(tid)
            self._last[tid] = (name, started_by or role_of(name), seconds)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> ThreadCpu:
        self._t0 = time.perf_counter()
        self._thread.start()
        self._sample(first=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.result = summarise(((name, role, seconds - self._first.get(tid, 0.0))
                                 for tid, (name, role, seconds) in self._last.items()), time.perf_counter() - self._t0)


def summarise(threads: Iterable[tuple[str, str, float]], seconds: float) -> ThreadShare:
    """Threads' (name, role, CPU seconds) as a :class:`ThreadShare` of ``seconds`` sampled."""
    roles: dict[str, float] = {}
    counts: dict[str, int] = {}
    busiest, busiest_s = None, 0.0
    for name, role, cpu in threads:
        roles[role] = roles.get(role, 0.0) + cpu
        counts[role] = counts.get(role, 0) + 1
        if cpu > busiest_s:
            busiest, busiest_s = f"{name} ({role})", cpu
    return ThreadShare(roles, busiest, busiest_s, counts, seconds)
