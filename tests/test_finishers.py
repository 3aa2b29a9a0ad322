"""Publishing in finisher processes: the driver's GIL stays with the run, and a finisher's
death costs at most the files it was publishing."""

import os
import re
import signal
import threading
import time

import numpy as np
import rasterio
from conftest import scene, write_raster
from rasterio.windows import Window
from test_outputs import CARD, PROVENANCE

from pipeline import children, sink
from pipeline.cli import main
from pipeline.config import OutputSection
from pipeline.io import inspect_raster
from pipeline.sink import MaskSink
from pipeline.tasks import BatchResult, BlockResult


def run(workflow, *extra):
    return main(["run", str(workflow), "--no-progress", *extra])


def inputs_of(tmp_path, *names, size=300):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(names):
        write_raster(folder / f"{name}.tif", scene(size, size + 40, seed=i))
    return folder


def test_finishers_that_died_idle_are_replaced_and_every_file_is_published(tmp_path, make_workflow):
    pool = sink.finisher_pool()
    for pid in children.start(pool, sink.FINISHERS, sink.__name__):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)

    assert run(make_workflow(inputs_of(tmp_path, "a", "b"))) == 0

    assert sink.finisher_pool() is not pool
    for name in ("a", "b"):
        with rasterio.open(tmp_path / "out" / f"{name}.tif") as out:
            assert out.read(1).shape == (300, 340)


def test_a_sink_publishes_through_new_finishers_when_the_old_ones_died_idle(tmp_path):
    write_raster(tmp_path / "a.tif", scene(64, 80))
    info = inspect_raster(tmp_path / "a.tif", [1, 2, 3, 4])
    dest = tmp_path / "out" / "a.tif"
    mask = MaskSink(info, dest, OutputSection(dir=dest.parent), num_classes=3)
    classes = np.full((64, 80), 3, np.uint8)
    mask.write(BatchResult((BlockResult(Window(0, 0, 80, 64), classes),), 1,
                           np.bincount(classes.ravel(), minlength=256), "cpu", "here", (0.0, 0.0)))
    pool = sink.finisher_pool()
    for pid in children.start(pool, sink.FINISHERS, sink.__name__):  # after the run started them, before its first file is done
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)

    assert mask.finalize(CARD, PROVENANCE) == dest

    assert sink.finisher_pool() is not pool
    with rasterio.open(dest) as out:
        assert (out.read(1) == 3).all()


def test_a_finisher_killed_while_publishing_fails_that_file_and_the_next_run_publishes_it(
        tmp_path, make_workflow, capsys):
    workflow = make_workflow(inputs_of(tmp_path, "big", size=1024), tiling={"tile": 128, "batch": 8})
    out = tmp_path / "out"
    killed = []
    stop = threading.Event()

    def kill_the_publisher() -> None:  # a partial named by another process than this one is a finisher's
        while not stop.is_set() and not killed:
            for partial in out.glob(".*.partial*"):
                pid = int(re.search(r"\.(\d+)\.partial", partial.name).group(1))
                if pid != os.getpid():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            time.sleep(0.002)

    watcher = threading.Thread(target=kill_the_publisher)
    watcher.start()
    try:
        assert run(workflow) == 1
    finally:
        stop.set()
        watcher.join()

    assert killed
    error = [line for line in capsys.readouterr().err.splitlines() if "big.tif" in line and "BrokenProcessPool" in line]
    assert error, "the failure is reported by name"
    assert not (out / "big.tif").exists()

    assert run(workflow) == 0
    with rasterio.open(out / "big.tif") as mask:
        assert mask.read(1).shape == (1024, 1064)
    assert not list(out.glob(".*.partial*"))


def test_a_daemonic_process_publishes_in_its_own_threads():
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:  # a pool's processes are daemonic
        assert pool.apply(_has_finishers) is False


def _has_finishers() -> bool:
    return sink.finisher_pool() is not None
