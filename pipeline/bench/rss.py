"""Peak memory of a process tree: its RSS and PSS sampled in a thread, the readers' stores of
shared chunks (memory no process maps), and a process's own high-water mark from the kernel."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class RssSampler:
    """Peak resident memory of a process and all its children, sampled in a thread every
    ``interval`` s: the sum of their RSS (:attr:`peak`), and of their PSS (:attr:`peak_pss`),
    which counts a page that several of them map once (a batch in shared memory, mapped by a
    worker and the reader writing it, and the libraries of spawned children; Linux only, else
    RSS). The children are listed again only every ``relist`` s: listing them scans every
    process on the machine, and doing it at each sample took 7% of a core here, taken from the
    run being measured. Both include the stores of chunks the readers share
    (:mod:`pipeline.halos`): memory no process maps, so in no RSS."""

    def __init__(self, pid: int, interval: float = 0.2, relist: float = 1.0):
        import psutil

        self._root = psutil.Process(pid)
        self._interval, self._relist = interval, relist
        self.peak = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        procs: list[Any] = []
        listed = float("-inf")
        while not self._stop.is_set():
            if time.monotonic() - listed >= self._relist:
                try:
                    procs = [self._root, *self._root.children(recursive=True)]
                except psutil.Error:
                    return
                listed = time.monotonic()
            rss = pss = 0
            for proc in procs:
                try:
                    resident = proc.memory_info().rss
                except psutil.Error:
                    continue
                rss += resident
                pss += _pss(proc.pid, resident)
            stored = _chunk_stores(proc.pid for proc in procs)
            self.peak, self.peak_pss = max(self.peak, rss + stored), max(self.peak_pss, pss + stored)
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _chunk_stores(pids: Iterable[int]) -> int:
    """Bytes held by the stores of shared chunks (:mod:`pipeline.halos`) that ``pids`` have
    open, each store once (Linux; 0 elsewhere)."""
    held: dict[int, int] = {}
    for pid in pids:
        try:
            entries = list(os.scandir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        for entry in entries:
            try:
                if os.readlink(entry.path).startswith("/memfd:tilepipe-chunks"):
                    st = os.stat(entry.path)
                    held[st.st_ino] = st.st_blocks * 512
            except OSError:  # closed meanwhile
                continue
    return sum(held.values())


def _pss(pid: int, rss: int) -> int:
    """A process's proportional set size in bytes (``/proc/<pid>/smaps_rollup``: about a
    millisecond for 2 GB); ``rss`` where that cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss


def own_peak_rss() -> int:
    """This process's peak resident memory in bytes, as the kernel keeps it (Linux ``VmHWM``);
    0 where unknown. Not ``ru_maxrss``: a child started from a large process inherits its
    parent's figure there."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else 0
