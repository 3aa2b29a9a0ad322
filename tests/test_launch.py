"""The command's entry point starts itself again, once, with glibc's huge-page setting."""

import os
import subprocess
import sys

import pytest

from pipeline.launch import TUNABLE, tunables

GLIBC = "glibc 2.36"


@pytest.mark.parametrize("environ,platform,libc,expected", [
    ({}, "linux", GLIBC, f"{TUNABLE}=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "linux", GLIBC, f"glibc.malloc.arena_max=2:{TUNABLE}=1"),
    ({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, "linux", GLIBC, None),  # the user's choice stands (and no loop)
    ({"TILEPIPE_HUGE_PAGES": "0"}, "linux", GLIBC, None),
    ({}, "linux", None, None),  # musl and other C libraries
    ({}, "darwin", None, None),
])
def test_tunables(environ, platform, libc, expected):
    assert tunables(environ, platform, libc) == expected


@pytest.mark.skipif(tunables({}, sys.platform, os.confstr("CS_GNU_LIBC_VERSION") if sys.platform == "linux" else None)
                    is None, reason="not Linux with glibc")
def test_the_entry_point_runs_with_the_setting_once():
    code = ("import os; from pipeline import launch; print('start', flush=True); launch.reexec(); "
            "print(os.environ['GLIBC_TUNABLES'])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "TILEPIPE_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["start", "start", f"{TUNABLE}=1"]  # started again once, then went on
