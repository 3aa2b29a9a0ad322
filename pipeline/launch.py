"""The ``tilepipe`` command's entry point: the allocator's settings, then the CLI.

XLA's CPU runtime allocates each compiled call's scratch memory (about 50 MB a device for the
bench's U-Net) and frees it at the end. glibc serves allocations that large with fresh
``mmap``s, so every call faulted in and zeroed its scratch again, 4 KB at a time: 24,000 page
faults a batch of 8 tiles, 4-5% of the forward pass on the development machine. With
``glibc.malloc.hugetlb=1`` glibc asks for transparent huge pages on such mappings (where the
kernel's ``transparent_hugepage`` setting is ``madvise`` or ``always``): 900 faults a batch.
The setting is read when a process starts, so the command starts itself again once with it in
``GLIBC_TUNABLES``; the processes it starts inherit it. Only on Linux with glibc, and not where
``GLIBC_TUNABLES`` already names the setting or ``TILEPIPE_HUGE_PAGES=0``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"


def tunables(environ: Mapping[str, str], platform: str, libc: str | None) -> str | None:
    """The ``GLIBC_TUNABLES`` to start again with, or None to go on as is."""
    given = environ.get("GLIBC_TUNABLES", "")
    if platform != "linux" or not libc or not libc.startswith("glibc") or TUNABLE in given \
            or environ.get("TILEPIPE_HUGE_PAGES", "1") == "0":
        return None
    return ":".join(filter(None, (given, f"{TUNABLE}=1")))


def _libc() -> str | None:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None


def reexec() -> None:
    """Start this process again with :func:`tunables`, if any (does not return then)."""
    chosen = tunables(os.environ, sys.platform, _libc())
    if chosen is not None and sys.executable:
        sys.stdout.flush()
        try:
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": chosen})
        except OSError:  # go on as is: the setting only makes the forward pass faster
            pass


def main() -> None:
    reexec()
    from pipeline.cli import main as cli_main

    sys.exit(cli_main())
