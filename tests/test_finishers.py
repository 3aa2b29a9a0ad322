"""Publishing a finished file: on the driver's threads on CPU, in finisher processes on
accelerators (or as ``runtime.finishers`` says), where a finisher's death costs at most the
files it was publishing."""

import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import rasterio
from conftest import scene, write_raster
from rasterio.windows import Window
from test_outputs import CARD, PROVENANCE

from pipeline import children, outputs, sink
from pipeline.cli import main
from pipeline.config import OutputSection, load_workflow
from pipeline.io import inspect_raster
from pipeline.runner import run_workflow
from pipeline.sink import MaskSink, resolve_finishers
from pipeline.tasks import BatchResult, BlockResult

FINISHERS = {"finishers": 2}


def run(workflow, *extra):
    return main(["run", str(workflow), "--no-progress", *extra])


def inputs_of(tmp_path, *names, size=300):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(names):
        write_raster(folder / f"{name}.tif", scene(size, size + 40, seed=i))
    return folder


def kill_idle_finishers(processes=2):
    pool = sink.finisher_pool(processes)
    for pid in children.start(pool, processes, sink.__name__):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    return pool


class PartialWatch:
    """Process ids in the names of the partial files that appear in ``out`` while it runs;
    with ``kill``, SIGKILL the first process other than this one that writes one."""

    def __init__(self, out, kill=False):
        self.out, self.kill = out, kill
        self.stage, self.killed = set(), []  # pids of publication partials (x.tif's, not the sink's temporaries)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch)

    def watch(self):
        while not self.stop.is_set() and not self.killed:
            for partial in self.out.glob(".*.partial*"):
                found = re.search(r"\.(\d+)\.partial(.*)$", partial.name)
                if found and not found.group(2).startswith("-"):
                    pid = int(found.group(1))
                    self.stage.add(pid)
                    if self.kill and pid != os.getpid():
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append(pid)
                        break
            time.sleep(0.002)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.mark.parametrize("setting, backend, cores, expected", [
    ("auto", "cpu", 16, 0), ("auto", "gpu", 2, sink.FINISHERS), ("auto", "gpu", 8, sink.FINISHERS),
    ("auto", "gpu", 16, 5), ("auto", "tpu", 96, 32), (0, "gpu", 16, 0), (3, "cpu", 2, 3)])
def test_finishers_are_a_third_of_an_accelerator_hosts_cores_unless_the_workflow_says_otherwise(setting, backend,
                                                                                                 cores, expected):
    assert resolve_finishers(setting, backend, cores) == expected


@pytest.mark.parametrize("codec, level, backend, expected", [
    ("deflate", "auto", "cpu", 6), ("deflate", "auto", "gpu", 5), ("deflate", "auto", "tpu", 5),
    ("zstd", "auto", "cpu", 9), ("zstd", "auto", "gpu", 1), ("deflate", 9, "gpu", 9), ("deflate", 1, "cpu", 1),
    ("zstd", 12, "gpu", 12), ("lzw", "auto", "cpu", None), ("lzw", "auto", "gpu", None)])
def test_the_level_is_gdals_on_cpu_and_cheaper_on_accelerators_unless_the_workflow_says(codec, level, backend,
                                                                                        expected):
    section = OutputSection(dir="out", compression=codec, level=level)
    assert sink.resolve_compression(section, backend) == outputs.Compression(codec, expected)


@pytest.mark.parametrize("runtime, in_driver", [({}, True), (FINISHERS, False)])
def test_a_file_is_published_where_the_setting_says(tmp_path, make_workflow, runtime, in_driver):
    out = tmp_path / "out"
    with PartialWatch(out) as watch:
        assert run(make_workflow(inputs_of(tmp_path, "big", size=1024), tiling={"tile": 128, "batch": 8},
                                 runtime=runtime)) == 0
    assert watch.stage, "the publication's partial files were seen"
    assert (watch.stage == {os.getpid()}) is in_driver
    with rasterio.open(out / "big.tif") as mask:
        assert mask.read(1).shape == (1024, 1064)


def test_finishers_that_died_idle_are_replaced_and_every_file_is_published(tmp_path, make_workflow):
    pool = kill_idle_finishers()

    assert run(make_workflow(inputs_of(tmp_path, "a", "b"), runtime=FINISHERS)) == 0

    assert sink.finisher_pool(2) is not pool
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
    pool = kill_idle_finishers()  # after the run started them, before its first file is done

    assert mask.finalize(CARD, PROVENANCE, finishers=2) == dest

    assert sink.finisher_pool(2) is not pool
    with rasterio.open(dest) as out:
        assert (out.read(1) == 3).all()


def test_a_finisher_killed_while_publishing_fails_that_file_and_the_next_run_publishes_it(
        tmp_path, make_workflow, capsys):
    workflow = make_workflow(inputs_of(tmp_path, "big", size=1024), tiling={"tile": 128, "batch": 8},
                             runtime=FINISHERS)
    out = tmp_path / "out"
    with PartialWatch(out, kill=True) as watch:
        assert run(workflow) == 1

    assert watch.killed
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
    return sink.finisher_pool(2) is not None


@pytest.mark.parametrize("handle_bytes", [1, 2 * 256 * 520, sink.VERIFY_BYTES],
                         ids=["a handle per row of blocks", "two rows a handle", "one handle"])
def test_verification_reads_every_row_of_blocks_and_names_a_corrupt_one(tmp_path, monkeypatch, handle_bytes):
    monkeypatch.setattr(sink, "VERIFY_BYTES", handle_bytes)
    path = tmp_path / "out.tif"
    profile = {"driver": "GTiff", "width": 520, "height": 600, "count": 1, "dtype": "uint8", "tiled": True,
               "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(scene(600, 520, bands=1, dtype="uint8", seed=3))
    info = inspect_raster(path, [1])
    sink.verify_raster(path, info, 1)
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_1_2", "TIFF", bidx=1))  # the last row of blocks
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 64)
    with pytest.raises(rasterio.errors.RasterioError):
        sink.verify_raster(path, info, 1)
    with pytest.raises(sink.OutputError, match="out.tif: written 1 band"):
        sink.verify_raster(path, info, 2)


@pytest.mark.parametrize("slow", [False, True], ids=["publishing keeps up", "publishing lags"])
def test_the_report_says_how_long_publication_held_batches_back_and_how_long_it_took_after_them(
        tmp_path, make_workflow, monkeypatch, slow):
    """Finished files wait for a publishing thread, at most twice as many as there are threads
    (2 here); past that the driver stops taking results and submitting batches until one is
    published. The report counts that wait, which says whether publishing bounds the run."""
    real = sink.publish

    def lagging(*args):
        time.sleep(1.0)
        return real(*args)

    if slow:
        monkeypatch.setattr(sink, "publish", lagging)
    names = [f"s{i}" for i in range(8)] if slow else ["s0"]
    wf = load_workflow(make_workflow(inputs_of(tmp_path, *names, size=64), tiling={"tile": 64, "batch": 4},
                                     output={"dir": str(tmp_path / "out"), "run_products": False}))
    report = run_workflow(wf, progress=False)
    assert report.count("ok") == len(names)
    assert (report.publish_wait_s > 0) is slow  # the fifth finished file waits while batches are in flight
    assert report.publish_tail_s > 0  # the last file is published after the last batch
    if slow:  # eight files, two at a time, a second each, less what the wait took
        assert report.publish_tail_s + report.publish_wait_s >= 2.0
    assert report.to_json()["publish_wait_s"] == report.publish_wait_s


def test_a_sink_publishes_at_the_level_its_workers_device_resolves_to(tmp_path):
    """``level: auto`` is resolved when the sink is made, for its workers' backend:
    never handed to GDAL as it is written."""
    write_raster(tmp_path / "a.tif", scene(300, 340))
    info = inspect_raster(tmp_path / "a.tif", [1, 2, 3, 4])
    rng = np.random.default_rng(3)
    classes = np.kron(rng.integers(0, 4, (38, 43), dtype=np.uint8), np.ones((8, 8), np.uint8))[:300, :340]
    classes[rng.random(classes.shape) < 0.05] = 2
    blocks = {}
    for name, backend, level in (("cpu", "cpu", "auto"), ("gpu", "gpu", "auto"), ("five", "cpu", 5), ("six", "gpu", 6)):
        dest = tmp_path / name / "a.tif"
        mask = MaskSink(info, dest, OutputSection(dir=dest.parent, level=level), 4, backend)
        assert mask.files.compression == sink.resolve_compression(mask.files.section, backend)
        mask.write(BatchResult((BlockResult(Window(0, 0, 340, 300), classes),), 1,
                               np.bincount(classes.ravel(), minlength=256), backend, "here", (0.0, 0.0)))
        mask.finalize(CARD, PROVENANCE)
        with rasterio.open(dest) as out:
            np.testing.assert_array_equal(out.read(1), classes)
            blocks[name] = [out.block_size(1, i, j) for (i, j), _ in out.block_windows(1)]
    assert blocks["cpu"] == blocks["six"] != blocks["gpu"] == blocks["five"]
