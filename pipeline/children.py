"""Pools of child processes beside a process whose GIL is busy: the worker's readers
(:mod:`pipeline.reading`) and the driver's finishers (:mod:`pipeline.sink`).

Children are spawned, never forked (a process running JAX has threads a fork would copy in
whatever state they were), import only what their tasks need, keep the heap one task frees
for the next, leave Ctrl-C to their parent (which stops its run and then its pools), and end
when their parent is gone: a parent killed, by the out-of-memory killer say, does not shut
its pools down, and idle children would wait forever.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ctypes
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time

PARENT_POLL = 0.5
"""Seconds between a child's looks at whether its parent still lives."""

HEAP_KEPT = 256 * 2**20
"""Freed heap a child keeps for its next task rather than handing it back (glibc)."""
MMAP_THRESHOLD = 32 * 2**20
"""Allocations this large a child maps afresh, smaller ones come from its heap: the most that
glibc's adaptive threshold reaches."""


_POOLS: dict[tuple[str, int], concurrent.futures.ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def pool(name: str, processes: int) -> concurrent.futures.ProcessPoolExecutor | None:
    """This process's pool ``name`` of ``processes`` children, one for every thread that
    asks (its children start with its first tasks); None in a daemonic process (a Dask worker
    process of a local cluster, say), which may not have children."""
    with _POOLS_LOCK:
        known = _POOLS.get((name, processes))
        if known is None and not multiprocessing.current_process().daemon:
            known = _POOLS[(name, processes)] = concurrent.futures.ProcessPoolExecutor(
                processes, mp_context=multiprocessing.get_context("spawn"), initializer=_watch,
                initargs=(os.getpid(),))
        return known


@atexit.register
def _forget_pools() -> None:
    """Let the pools go while the interpreter still has its modules: a pool collected during
    their teardown fails in its own clean-up (``'NoneType' object has no attribute 'util'``)."""
    with _POOLS_LOCK:
        _POOLS.clear()


def drop(broken: concurrent.futures.ProcessPoolExecutor) -> None:
    """Forget a broken pool (a child was killed, or ran out of memory): the next ask starts a new one."""
    with _POOLS_LOCK:
        for key, known in list(_POOLS.items()):
            if known is broken:
                del _POOLS[key]


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
    """A child's start: ignore Ctrl-C, keep freed heap (:func:`_keep_heap`) in small pages
    (:func:`_small_pages`), and end when ``parent`` is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _keep_heap()
    _small_pages()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        os._exit(1)

    threading.Thread(target=watch, name="tilepipe-child-parent", daemon=True).start()


def _keep_heap() -> None:
    """Fix glibc's heap thresholds in this process (:data:`HEAP_KEPT`, :data:`MMAP_THRESHOLD`),
    so that what one task frees serves the next; elsewhere, nothing.

    A reader's every chunk is a fresh array of about 512 KB, and glibc's adaptive thresholds
    kept mapping such arrays afresh, or trimming the heap and growing it again: the kernel
    faulted in and zeroed the pages of every chunk, 18-22 ms of system time for a batch of 64
    tiles read alone, against 5-8 ms with the thresholds fixed."""
    if not glibc():
        return
    mallopt = ctypes.CDLL(None).mallopt
    mallopt(_M_TRIM_THRESHOLD, HEAP_KEPT)
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>


def _small_pages() -> None:
    """No transparent huge pages for this process (Linux; elsewhere, nothing).

    A child inherits the command's ``glibc.malloc.hugetlb=1`` (:mod:`pipeline.launch`: for
    XLA's scratch memory), under which glibc asks for huge pages for its heap, and the kernel
    then zeroes 2 MB at a fault as the heap grows: 16 readers and 2 finishers beside a run
    (2 cores, host emulation) took 73-78 and 14-15 ms of CPU per Mpx written with huge pages,
    64-67 and 11-12 without. Children never run XLA."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)


_PR_SET_THP_DISABLE = 41  # <linux/prctl.h>


def glibc() -> bool:
    """Whether this process's C library is glibc."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr, or a C library that does not answer
        return False
