"""Reading batches in reader processes: the same inputs as the worker's own threads read."""

import errno
import gc
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
import weakref
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import psutil
import pytest
import rasterio
from conftest import open_memfds, scene, write_raster
from test_run import run

from pipeline import reading, tasks
from pipeline.errors import InputError
from pipeline.chunks import ChunkReader
from pipeline.infer import resolve_readers
from pipeline.windows import MOST_PARTS, source_window, tile_batches, tile_spec

UINT16 = np.dtype(np.uint16)
FLOAT32 = np.dtype(np.float32)
READERS = 2  # one pool for the whole module: each new size spawns its processes


def leftovers():
    """The shared batch files this process has open: kept in ``reading.BUFFERS``, or by the
    mapping of a batch still in use."""
    return open_memfds("tilepipe-batch")


@pytest.mark.parametrize("dtype, nodata", [("uint16", None), ("int16", -5000), ("float32", -9999.0)])
@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("batch", [4, 9])  # 9: read in two parts, the second's validity off a page boundary
def test_a_reader_process_reads_the_batch_the_worker_would(tmp_path, dtype, nodata, keyed, batch):
    data = scene(70, 90, dtype=dtype, seed=4)
    if nodata is not None:
        data[:, :9, :13] = nodata
    if dtype == "float32":
        data[1, 40, 50] = np.nan
    path = str(write_raster(tmp_path / "in.tif", data, nodata=nodata, tiled=dtype != "int16"))
    spec = tile_spec(32, 16, 4)  # tiles at every edge reflect context beyond the raster
    key = uuid.uuid4().hex if keyed else None
    pool = reading.reader_pool(READERS)
    reading.BUFFERS.clear()
    before = leftovers()
    for tiles in tile_batches(90, 70, spec, batch):  # 9 tiles: batches of 4 end with one of 1
        here = reading.read_tiles(path, tiles, [1, 2, 3, 4], spec.read_size)
        there = reading.read_elsewhere(pool, path, tiles, [1, 2, 3, 4], spec.read_size, key, dtype=np.dtype(dtype),
                                       parts=MOST_PARTS)
        with reading.lend_elsewhere(pool, path, tiles, [1, 2, 3, 4], spec.read_size, key,
                                    dtype=np.dtype(dtype), parts=MOST_PARTS) as lent:
            for batch in (there, lent):
                assert batch.x.dtype == here.x.dtype == np.dtype(dtype)  # the input's own values
                np.testing.assert_array_equal(batch.x, here.x)
                np.testing.assert_array_equal(batch.valid, here.valid)
                assert len(batch.masks) == len(tiles)
                for a, b in zip(batch.masks, here.masks):
                    np.testing.assert_array_equal(a, b)
        assert len(reading.BUFFERS) == 1  # one buffer, lent to each batch in turn
    reading.BUFFERS.clear()
    del there, lent, batch
    assert leftovers() == before  # the rest went with the batches' last views


def test_the_chunks_a_batch_decodes_are_counted_where_it_is_read(tmp_path):
    path = str(write_raster(tmp_path / "in.tif", scene(600, 700, seed=2)))  # 3 x 3 chunks of 256
    spec = tile_spec(64, 16, 4)
    pool = reading.reader_pool(READERS)
    with rasterio.open(path) as src:
        grid = ChunkReader.of(src, [1, 2, 3, 4]).grid
    for tiles in tile_batches(700, 600, spec, 4)[::7]:
        chunks = {c for t in tiles for c in grid.covering(source_window(t.read, 700, 600))}
        for read in (lambda key: reading.read_tiles(path, tiles, [1, 2, 3, 4], spec.read_size, key),
                     lambda key: reading.read_elsewhere(pool, path, tiles, [1, 2, 3, 4], spec.read_size, key,
                                                        dtype=UINT16)):
            before = reading.chunks_decoded()
            read(uuid.uuid4().hex)  # a new input to the cache: each of its chunks decoded once
            assert reading.chunks_decoded() - before == len(chunks)


@pytest.mark.parametrize("batch", [4, 8])  # 8: two parts, each read by a reader of its own
def test_a_reader_process_reports_a_broken_input_and_goes_on(tmp_path, batch):
    good = write_raster(tmp_path / "good.tif", scene(40, 80))
    broken = tmp_path / "broken.tif"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated: header fine, blocks gone
    spec = tile_spec(16, 8, 4)
    tiles = tile_batches(80, 40, spec, batch)[0]
    pool = reading.reader_pool(READERS)
    before = leftovers()
    gc.disable()  # what is let go goes at once, or is held by a reference cycle
    try:
        with pytest.raises(InputError) as failed:  # said in a line, where GDAL's reason crosses from the reader
            reading.read_elsewhere(pool, str(broken), tiles, [1, 2, 3, 4], spec.read_size, dtype=UINT16, parts=2)
        assert re.fullmatch(r"its blocks at rows \d+-\d+, columns \d+-\d+ cannot be read \(RasterioIOError: .+\)",
                            str(failed.value)) and '"""' not in str(failed.value)
        error = weakref.ref(failed.value)
        del failed
        assert error() is None  # no cycle through it holds its traceback's frames (and their batches)
    finally:
        gc.enable()
    assert leftovers() == before
    x = reading.read_elsewhere(pool, str(good), tiles, [1, 2, 3, 4], spec.read_size, dtype=UINT16).x
    np.testing.assert_array_equal(x, reading.read_tiles(str(good), tiles, [1, 2, 3, 4], spec.read_size).x)


def test_a_killed_reader_fails_its_batch_and_the_next_batch_gets_new_readers(tmp_path):
    path = str(write_raster(tmp_path / "in.tif", scene(40, 40)))
    spec = tile_spec(32, 16, 4)
    tiles = tile_batches(40, 40, spec, 4)[0]
    reading.start_readers(3)  # a pool of its own, not the module's
    pool = reading.reader_pool(3)
    for pid in list(pool._processes):
        os.kill(pid, signal.SIGKILL)  # as the out-of-memory killer would
    before = leftovers()
    with pytest.raises(BrokenProcessPool):
        reading.read_elsewhere(pool, path, tiles, [1, 2, 3, 4], spec.read_size, dtype=UINT16)
    assert leftovers() == before
    fresh = reading.reader_pool(3)
    assert fresh is not pool
    x = reading.read_elsewhere(fresh, path, tiles, [1, 2, 3, 4], spec.read_size, dtype=UINT16).x
    np.testing.assert_array_equal(x, reading.read_tiles(path, tiles, [1, 2, 3, 4], spec.read_size).x)


def test_without_room_in_shared_memory_the_batch_is_read_in_the_worker(tmp_path, monkeypatch, caplog):
    def full(fd, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(reading, "_reserve", full)  # a host short of memory
    reading._cannot_share.cache_clear()
    path = str(write_raster(tmp_path / "in.tif", scene(40, 40)))
    spec = tile_spec(32, 16, 4)
    before = leftovers()
    with caplog.at_level(logging.WARNING, logger="pipeline.reading"):
        for tiles in tile_batches(40, 40, spec, 2):
            want = reading.read_tiles(path, tiles, [1, 2, 3, 4], spec.read_size).x
            x = reading.read_elsewhere(reading.reader_pool(READERS), path, tiles, [1, 2, 3, 4], spec.read_size,
                                       dtype=UINT16).x
            np.testing.assert_array_equal(x, want)
            with reading.lend_elsewhere(reading.reader_pool(READERS), path, tiles, [1, 2, 3, 4],
                                        spec.read_size, dtype=UINT16) as lent:
                np.testing.assert_array_equal(lent.x, want)
    assert leftovers() == before
    assert len([r for r in caplog.records if "no shared memory for a batch (No space left on device)" in r.getMessage()]) == 1  # 4 reads, said once


def test_readers_that_cannot_open_shared_memory_leave_reading_to_the_worker(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(reading.SharedBatch, "path", property(lambda _: str(tmp_path / "no-such-fd")))  # no /proc
    monkeypatch.setattr(reading, "_UNSHARED", [])
    monkeypatch.setattr(reading, "BUFFERS", reading.BatchBuffers())
    reading._cannot_share.cache_clear()
    path = str(write_raster(tmp_path / "in.tif", scene(40, 40)))
    spec = tile_spec(32, 16, 4)
    pool = reading.reader_pool(READERS)
    with caplog.at_level(logging.WARNING, logger="pipeline.reading"):
        for tiles in tile_batches(40, 40, spec, 2):
            want = reading.read_tiles(path, tiles, [1, 2, 3, 4], spec.read_size).x
            np.testing.assert_array_equal(reading.read_elsewhere(pool, path, tiles, [1, 2, 3, 4],
                                                                 spec.read_size, dtype=UINT16).x, want)
            with reading.lend_elsewhere(pool, path, tiles, [1, 2, 3, 4], spec.read_size, dtype=UINT16) as lent:
                np.testing.assert_array_equal(lent.x, want)
    said = [r.getMessage() for r in caplog.records if "cannot open shared memory" in r.getMessage()]
    assert len(said) == 1 and "no-such-fd" in said[0]
    assert len(reading.BUFFERS) <= 1  # no buffer made once the readers could not open one


def test_a_reader_keeps_its_input_open_for_the_next_part_of_the_same_plan_only(tmp_path):
    path = str(write_raster(tmp_path / "in.tif", scene(20, 20)))
    with reading._held_open(path, "plan-1") as first:
        pass
    with reading._held_open(path, "plan-1") as again:
        assert again is first and not first.closed
    with reading._held_open(path, "plan-2") as other:  # another plan: the input may have changed since
        assert other is not first and first.closed
    with pytest.raises(ValueError), reading._held_open(path, "plan-2") as failed:
        raise ValueError("a part failed")
    assert failed is other and other.closed and not reading._HELD  # not kept after an error
    with reading._held_open(path, None) as unkeyed:
        pass
    assert unkeyed.closed and not reading._HELD


def test_a_lent_buffer_serves_one_batch_at_a_time():
    buffers = reading.BatchBuffers()
    with buffers.lend((4, 2, 8, 8), UINT16) as a, buffers.lend((4, 2, 8, 8), UINT16) as b:
        (x, valid), (y, _) = a.arrays, b.arrays
        assert a is not b and x.shape == y.shape == (4, 2, 8, 8) and valid.shape == (4, 8, 1)  # validity as bits
        assert x.dtype == UINT16 and valid.dtype == np.uint8
        assert not x.flags.writeable and not valid.flags.writeable  # the reader writes, the worker only reads
    with buffers.lend((3, 2, 8, 8), UINT16) as c:  # a last, smaller batch fits either
        assert c in (a, b)
    with buffers.lend((4, 2, 8, 8), FLOAT32) as d, buffers.lend((5, 2, 8, 8), UINT16) as e:
        assert d not in (a, b) and e not in (a, b)
    assert len(buffers) == 4
    buffers.clear()
    assert len(buffers) == 0


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_run_with_reader_processes_writes_the_same_masks(tmp_path, make_workflow, monkeypatch, precision):
    elsewhere, dtypes, users, parts = [], set(), {}, set()

    def lend(*a, **k):
        elsewhere.append(a[1])
        dtypes.add(k["dtype"])
        parts.add(k["parts"])
        users[a[1]] = k["users"]
        return reading.lend_elsewhere(*a, **k)

    monkeypatch.setattr(tasks, "lend_elsewhere", lend)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        write_raster(inputs / f"s{i}.tif", scene(130, 150, seed=i), tiled=i == 0)
    outputs = {}
    for readers in (0, READERS):
        out = tmp_path / f"out{readers}"
        runtime = {"readers": readers, "precision": precision}
        assert run(make_workflow(inputs, output={"dir": str(out)}, runtime=runtime, tiling={"batch": 8},
                                 dask={"threads": 1})) == 0
        outputs[readers] = {}
        for i in range(2):
            with rasterio.open(out / f"s{i}.tif") as src:
                outputs[readers][i] = src.read(1)
    for i in range(2):
        np.testing.assert_array_equal(outputs[READERS][i], outputs[0][i])
    assert sorted(set(elsewhere)) == [str(inputs / "s0.tif"), str(inputs / "s1.tif")]  # the second run's batches
    assert dtypes == {np.dtype("uint16")}  # batches travel as read, whatever the model computes in
    assert parts == {READERS}  # one thread's batches, each read by every reader, a part each
    for path, planned in users.items():  # each batch carries its input's plan of chunks, for the readers to share
        with rasterio.open(path) as src:
            grid = ChunkReader.of(src, [1, 2, 3, 4]).grid
        assert planned.shape == grid.shape and planned.array().min() >= 1
    assert not leftovers() and len(reading.BUFFERS) == 0  # a run's buffers end with it


@pytest.mark.parametrize("how", ["killed", "interrupted"])
def test_readers_end_with_their_worker(tmp_path, how):
    """Killed (no atexit, no pool shutdown: as the out-of-memory killer would), or Ctrl-C in a
    terminal, which reaches every process of the group: the readers leave it to the worker."""
    worker = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys\n"
        "from pipeline import reading\n"
        # as a terminal's Python has it, whatever this test inherited (a background job ignores SIGINT)
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "try:\n"
        "    reading.start_readers(2)\n"
        "    print(*[p.pid for p in reading.reader_pool(2)._processes.values()], flush=True)\n"
        "    sys.stdin.read()\n"
        "except KeyboardInterrupt:\n    sys.exit(130)\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    readers = [int(pid) for pid in worker.stdout.readline().split()]
    assert len(readers) == 2 and all(alive(pid) for pid in readers)
    if how == "killed":
        worker.kill()
    else:
        os.killpg(worker.pid, signal.SIGINT)
    err = worker.communicate(timeout=30)[1]
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in readers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in readers)
    if how == "interrupted":
        assert worker.returncode == 130 and "Traceback" not in err, err


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a zombie has ended, reaped or not
    except psutil.NoSuchProcess:
        return False


def test_readers_resolve_by_backend():
    assert resolve_readers("auto", backend="cpu") == 0
    assert resolve_readers("auto", backend="gpu") == os.cpu_count()
    assert resolve_readers("auto", threads=1, backend="gpu") == min(MOST_PARTS, os.cpu_count())  # one batch's parts
    assert resolve_readers("auto", threads=10**6, backend="gpu") == os.cpu_count()
    assert resolve_readers(3, threads=1, backend="gpu") == 3
    assert reading.reader_pool(0) is None
