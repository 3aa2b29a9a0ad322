"""Pools of child processes beside a process whose GIL is busy: the worker's readers
(:mod:`pipeline.reading`) and the driver's finishers (:mod:`pipeline.sink`).

Children are spawned, never forked (a process running JAX has threads a fork would copy in
whatever state they were), import only what their tasks need, leave Ctrl-C to their parent
(which stops its run and then its pools), and end when their parent is gone: a parent
killed, by the out-of-memory killer say, does not shut its pools down, and idle children
would wait forever.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import multiprocessing
import os
import signal
import threading
import time

PARENT_POLL = 0.5
"""Seconds between a child's looks at whether its parent still lives."""


def spawn_pool(processes: int) -> concurrent.futures.ProcessPoolExecutor | None:
    """A pool of ``processes`` children, which start with its first tasks; None in a daemonic
    process (a Dask worker process of a local cluster, say), which may not have children."""
    if multiprocessing.current_process().daemon:
        return None
    return concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_watch, initargs=(os.getpid(),))


def start(pool: concurrent.futures.ProcessPoolExecutor, processes: int, module: str) -> set[int]:
    """Start ``pool``'s ``processes`` children now rather than with its first tasks, each
    importing ``module`` (its tasks' module: GDAL takes about 0.4 s); return their process
    ids once every one is up."""
    started: set[int] = set()
    while len(started) < processes:  # a child that is up may answer for one still starting
        started.update(pool.map(_started, [module] * processes))
    return started


def _started(module: str) -> int:
    """A child's answer that it is up, with ``module`` imported: its process id, after long
    enough for the others to answer too."""
    importlib.import_module(module)
    time.sleep(0.01)
    return os.getpid()


def _watch(parent: int) -> None:
    """A child's start: ignore Ctrl-C, and end when ``parent`` is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        os._exit(1)

    threading.Thread(target=watch, name="tilepipe-child-parent", daemon=True).start()
