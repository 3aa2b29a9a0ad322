"""Per-thread CPU of this process by role: what says whether one thread caps a run."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from pipeline.thread_cpu import ThreadCpu, role_of, summarise, thread_times


@pytest.mark.parametrize(("name", "role"), [
    ("MainThread", "driver"),
    ("0-Dask-Default-Threads-26121-3", "tasks"),
    ("IO loop", "dask"),
    ("Dask-Offload_0", "dask"),
    ("tilepipe-hash_0", "checksums"),
    ("tilepipe-cog_1", "publishing"),
    ("tf_XLAEigen", "xla"),
    ("python", "native"),
])
def test_threads_have_roles_by_name(name, role):
    assert role_of(name) == role


def burn(seconds: float) -> None:
    """Use ``seconds`` of this thread's CPU."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        sum(range(1000))


def test_a_busy_thread_is_found_and_its_cpu_counted_in_its_role():
    burned, release = threading.Event(), threading.Event()
    busy = threading.Thread(target=lambda: (burn(0.4), burned.set(), release.wait(10)), name="tilepipe-hash_0")
    with ThreadCpu(interval=0.05) as sampled:
        busy.start()
        burned.wait(10)
        time.sleep(0.15)  # a sample after its work, while it still lives
    release.set()
    busy.join()
    share = sampled.result
    assert share.busiest == "tilepipe-hash_0 (checksums)"
    assert 0.35 <= share.roles["checksums"] == share.busiest_s <= 0.5  # clock ticks of 10 ms
    assert share.roles.get("driver", 0.0) < 0.2  # this thread mostly slept
    assert share.threads["checksums"] == 1 and share.seconds >= share.busiest_s


def test_cpu_before_the_block_is_not_counted():
    burn(0.3)
    with ThreadCpu(interval=0.05) as sampled:
        time.sleep(0.1)
    assert sampled.result.roles["driver"] < 0.1


def test_thread_times_read_each_task_and_names_with_parentheses(tmp_path):
    tick = os.sysconf("SC_CLK_TCK")
    for tid, name, utime, stime in ((11, "python", 3 * tick, tick), (12, "odd (name) x", 0, tick // 2)):
        (tmp_path / str(tid)).mkdir()
        fields = ["S", *["0"] * 10, str(utime), str(stime), *["0"] * 30]
        (tmp_path / str(tid) / "stat").write_text(f"{tid} ({name}) {' '.join(fields)}\n")
    (tmp_path / "13").mkdir()  # a thread that ended while it was listed
    assert thread_times(str(tmp_path)) == {11: ("python", 4.0), 12: ("odd (name) x", 0.5)}
    assert os.getpid() in thread_times()  # this process's own main thread


def test_summarise_sums_roles_and_keeps_the_busiest():
    share = summarise([("MainThread", "driver", 1.0), ("0-Dask-Default-Threads-1-0", "tasks", 0.5),
                       ("0-Dask-Default-Threads-1-1", "tasks", 1.5), ("python", "native", 0.25)], seconds=4.0)
    assert share.roles == {"driver": 1.0, "tasks": 2.0, "native": 0.25}
    assert share.threads == {"driver": 1, "tasks": 2, "native": 1}
    assert (share.busiest, share.busiest_s, share.seconds) == ("0-Dask-Default-Threads-1-1 (tasks)", 1.5, 4.0)


SQUARES = """
import contextlib, json, sys, time
from pipeline.thread_cpu import ThreadCpu, starting
import jax, jax.numpy as jnp
with starting("xla") if sys.argv[1] == "claim" else contextlib.nullcontext():
    x = jnp.ones((256, 256))
    square = jax.jit(lambda x: x @ x)
    square(x).block_until_ready()
with ThreadCpu(interval=0.05) as sampled:
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:
        square(x).block_until_ready()
print(json.dumps({"roles": sampled.result.roles, "threads": sampled.result.threads}))
"""


def test_unnamed_threads_take_the_role_of_the_code_that_started_them():
    """XLA's CPU client starts a dozen threads Python does not know, named after the interpreter,
    which run its compiled code too; started inside ``starting("xla")`` (in a fresh process,
    where JAX makes its devices then) they count as XLA's, not as some other library's."""
    runs = {how: json.loads(subprocess.run([sys.executable, "-c", SQUARES, how], capture_output=True, text=True,
                                           check=True).stdout.splitlines()[-1])
            for how in ("claim", "leave")}
    claimed, left = runs["claim"], runs["leave"]
    assert claimed["threads"]["xla"] >= left["threads"]["xla"] + 10
    assert claimed["roles"].get("native", 0.0) <= 0.05 * claimed["roles"]["xla"], claimed
    assert claimed["roles"]["xla"] > 0.1
