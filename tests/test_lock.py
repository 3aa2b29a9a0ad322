"""The per-workflow lock: one holder at a time, the holder named, a dead holder's lock taken."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.lock import LockHeld, hold_lock, lock_path


def test_a_second_holder_is_refused_with_the_first_named(tmp_path):
    path = tmp_path / "state" / "run.lock"
    with hold_lock(path) as stale:
        assert stale is None
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started"]
        message = f"another run of this workflow is in progress \\(pid {os.getpid()} on"
        with pytest.raises(LockHeld, match=message), hold_lock(path):
            pass
    assert path.read_text() == ""  # released cleanly
    with hold_lock(path) as stale:
        assert stale is None


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    path = tmp_path / "run.lock"
    code = ("import os, sys; from pipeline.lock import hold_lock\n"
            f"with hold_lock(__import__('pathlib').Path({str(path)!r})):\n"
            "    os.kill(os.getpid(), 9)\n")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == -9
    dead = json.loads(path.read_text())
    with hold_lock(path) as stale:
        assert stale == dead and stale["pid"] != os.getpid()


def test_each_output_directory_has_its_own_lock(tmp_path):
    a, b = lock_path(tmp_path, tmp_path / "out-a"), lock_path(tmp_path, tmp_path / "out-b")
    assert a != b and a.parent == tmp_path
    assert lock_path(tmp_path, tmp_path / "out-a" / ".." / "out-a") == a
    with hold_lock(a), hold_lock(b):
        pass
