"""Chunks that neighbouring batches share: decoded once for all of a worker's readers, read
back exactly, never more stored than the budget, and nothing left once every batch has read."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import rasterio
from conftest import open_memfds, scene, write_raster
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio import windows

from pipeline import halos, reading
from pipeline.chunks import ChunkCache, ChunkGrid, ChunkReader, chunk_users
from pipeline.halos import ChunkStore, SharedChunks
from pipeline.windows import read_parts, source_window, tile_batches, tile_spec

READERS = 2
BANDS = [1, 2, 3, 4]
SPEC = tile_spec(64, 16, 4)  # on 600 x 700 px: 3 x 3 chunks of 256, 11 x 10 tiles, batches of 4


def plan(path, batch=4, parts=1):
    """As the runner plans ``path``: its chunk grid, its batches, and how many of their reads
    (``parts`` per batch) need each chunk."""
    with rasterio.open(path) as src:
        grid = ChunkReader.of(src, BANDS).grid
        batches = tile_batches(src.width, src.height, SPEC, batch)
    return grid, batches, chunk_users(grid, read_parts(batches, parts))


@pytest.fixture(scope="module")
def raster(tmp_path_factory):
    return str(write_raster(tmp_path_factory.mktemp("halos") / "in.tif", scene(600, 700, seed=3)))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 700), st.integers(1, 700), st.sampled_from([(16, 4), (32, 16), (64, 0), (64, 32)]),
       st.sampled_from([1, 4, 7, 64]), st.sampled_from([16, 64, 256]), st.booleans())
def test_a_chunks_users_are_the_batches_whose_reads_overlap_it(width, height, tiling, batch, block, striped):
    grid = ChunkGrid.of(width, height, block, width if striped else block)
    batches = tile_batches(width, height, tile_spec(*tiling, 4), batch, striped)
    counts = chunk_users(grid, batches).array()
    assert counts.shape == grid.shape
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            chunk = grid.window(i, j)
            assert counts[i, j] == sum(any(windows.intersect(source_window(t.read, width, height), chunk)
                                           for t in tiles) for tiles in batches)


def test_the_users_of_a_plan_are_the_chunks_its_batches_decode_read_alone(raster, monkeypatch):
    grid, batches, users = plan(raster)
    monkeypatch.setattr(reading, "CHUNKS", ChunkCache())
    for tiles in batches:
        reading.read_tiles(raster, tiles, BANDS, SPEC.read_size, uuid.uuid4().hex, keep=False)
    assert reading.CHUNKS.misses == users.array().sum() > grid.count  # so each reader decoded halos again


@pytest.mark.parametrize("dtype, nodata", [("uint16", None), ("int16", -5000), ("float32", -9999.0)])
@pytest.mark.parametrize("threads, batch, parts", [(1, 4, 1), (3, 4, 1), (1, 16, 4), (2, 16, 4)])  # in parts side by side
def test_readers_decode_each_chunk_once_and_read_what_the_worker_would(tmp_path, dtype, nodata, threads, batch, parts):
    data = scene(600, 700, dtype=dtype, seed=8)
    if nodata is not None:
        data[:, 250:270, 240:300] = nodata  # masks travel through the store too
    path = str(write_raster(tmp_path / "in.tif", data, nodata=nodata))
    grid, batches, users = plan(path, batch, parts)
    pool = reading.reader_pool(READERS)
    key = uuid.uuid4().hex

    def read(tiles):
        with reading.lend_elsewhere(pool, path, tiles, BANDS, SPEC.read_size, key, dtype=np.dtype(dtype),
                                    users=users, parts=parts) as batch:
            return batch.x.copy(), batch.valid.copy(), batch.masks

    before = reading.chunks_decoded()
    with ThreadPoolExecutor(threads) as workers:
        read_there = list(workers.map(read, batches))
    assert reading.chunks_decoded() - before == grid.count  # against users.sum() without the store
    for tiles, (x, valid, masks) in zip(batches, read_there):
        here = reading.read_tiles(path, tiles, BANDS, SPEC.read_size)
        np.testing.assert_array_equal(x, here.x)
        np.testing.assert_array_equal(valid, here.valid)
        for a, b in zip(masks, here.masks):
            np.testing.assert_array_equal(a, b)
    assert reading.STORES.stored(key) == 0  # the last batch to read each chunk freed it
    asyncio.run(reading.forget_chunks(key))
    assert reading.STORES.stored(key) is None and not open_memfds("tilepipe-chunks")
    with reading.lend_elsewhere(pool, path, batches[0], BANDS, SPEC.read_size, key, dtype=np.dtype(dtype),
                                users=users):
        assert reading.STORES.stored(key) is None  # a late batch of a forgotten input makes no new store


def test_without_a_plan_readers_decode_halos_again(raster):
    grid, batches, users = plan(raster)
    pool = reading.reader_pool(READERS)
    key = uuid.uuid4().hex
    before = reading.chunks_decoded()
    for tiles in batches:
        with reading.lend_elsewhere(pool, raster, tiles, BANDS, SPEC.read_size, key, dtype=np.dtype("uint16")):
            pass
    assert reading.chunks_decoded() - before == users.array().sum()
    assert reading.STORES.stored(key) is None


def test_where_no_store_can_be_made_readers_decode_their_own_and_say_so_once(raster, monkeypatch, caplog):
    def no_holes(fd, offset, size):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(halos, "_punch", no_holes)  # its memory could not be given back
    monkeypatch.setattr(reading, "STORES", halos.ChunkStores())
    grid, batches, users = plan(raster)
    pool = reading.reader_pool(READERS)
    key = uuid.uuid4().hex
    before = reading.chunks_decoded()
    with caplog.at_level(logging.WARNING, logger="pipeline.halos"):
        for tiles in batches:
            with reading.lend_elsewhere(pool, raster, tiles, BANDS, SPEC.read_size, key, dtype=np.dtype("uint16"),
                                        users=users) as batch:
                np.testing.assert_array_equal(batch.x, reading.read_tiles(raster, tiles, BANDS, SPEC.read_size).x)
    assert reading.chunks_decoded() - before == users.array().sum()
    said = [r.getMessage() for r in caplog.records if "no store of shared chunks" in r.getMessage()]
    assert len(said) == 1 and "not supported" in said[0]
    assert not open_memfds("tilepipe-chunks")


def read_alone(path, batches, shared, sizes=None):
    """Each batch read as a reader reads it (in this process), with ``shared``; the store's
    bytes after each batch appended to ``sizes``."""
    out = []
    for tiles in batches:
        out.append(reading.read_tiles(path, tiles, BANDS, SPEC.read_size, uuid.uuid4().hex, keep=False,
                                      shared=shared).x.copy())
        if sizes is not None:
            sizes.append(shared.stored_bytes())
    return out


@pytest.mark.parametrize("slots", [0, 1, 3, 1000])
def test_a_store_holds_at_most_its_budget_and_nothing_once_all_have_read(raster, slots):
    grid, batches, users = plan(raster)
    key = uuid.uuid4().hex
    store = ChunkStore.create(key, users)
    slot = 256 * 256 * len(BANDS) * 2
    sizes = []
    try:
        with SharedChunks.open(store.path, key, budget=slots * slot) as shared:
            got = read_alone(raster, batches, shared, sizes)
            decoded, copied = shared.decoded, shared.copied
        assert max(sizes) <= slots * slot and store.stored_bytes() == sizes[-1] == 0
    finally:
        store.close()
    for x, tiles in zip(got, batches):
        np.testing.assert_array_equal(x, reading.read_tiles(raster, tiles, BANDS, SPEC.read_size).x)
    assert decoded + copied == users.array().sum()
    if slots == 0:
        assert copied == 0
    if slots == 1000:
        assert decoded == grid.count


def test_a_batch_read_twice_reads_the_same_and_leaves_nothing(raster):
    """As a batch retried after its reader died: it counts as a reader of its chunks again, so
    a later batch may decode one that was freed early; none is read wrong or kept."""
    grid, batches, users = plan(raster)
    key = uuid.uuid4().hex
    store = ChunkStore.create(key, users)
    try:
        with SharedChunks.open(store.path, key) as shared:
            got = read_alone(raster, [batches[0], *batches], shared)
        assert store.stored_bytes() == 0
    finally:
        store.close()
    for x, tiles in zip(got, [batches[0], *batches]):
        np.testing.assert_array_equal(x, reading.read_tiles(raster, tiles, BANDS, SPEC.read_size).x)


def test_a_failed_decode_stores_nothing_and_the_next_reader_decodes_it(raster):
    grid, batches, users = plan(raster)
    key = uuid.uuid4().hex
    store = ChunkStore.create(key, users)
    i, j = (int(v) for v in np.argwhere(users.array() > 1)[0])
    try:
        with SharedChunks.open(store.path, key) as shared, rasterio.open(raster) as src:
            reader = ChunkReader.of(src, BANDS)

            def broken():
                raise rasterio.errors.RasterioError("a block cannot be decoded")

            with pytest.raises(rasterio.errors.RasterioError):
                shared.get(i, j, reader.slot_bytes, broken, None)
            assert store.stored_bytes() == 0
            area = reader.grid.window(i, j)
            chunk = shared.get(i, j, reader.slot_bytes, lambda: reader._load(area), None)
            np.testing.assert_array_equal(chunk.values, src.read(BANDS, window=area))
            assert store.stored_bytes() == reader.slot_bytes  # stored for the batches still to read it
            assert shared.decoded == 1 and shared.copied == 0
    finally:
        store.close()


def test_a_chunk_that_cannot_be_stored_is_still_read(raster, monkeypatch):
    """A store that cannot take a chunk costs the batches a decode each, never their chunk."""
    def no_room(self, c, slot_bytes, chunk):  # half of it written, as a store out of room might
        os.pwrite(self.fd, chunk.values.tobytes()[: chunk.nbytes // 2], self._data + c * slot_bytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(SharedChunks, "_write", no_room)
    grid, batches, users = plan(raster)
    key = uuid.uuid4().hex
    store = ChunkStore.create(key, users)
    try:
        with SharedChunks.open(store.path, key) as shared:
            got = read_alone(raster, batches, shared)
            assert shared.copied == 0 and shared.decoded == users.array().sum()
        assert store.stored_bytes() == 0
        assert os.fstat(store.fd).st_blocks * 512 <= 4096  # its records alone: the half-written chunks are given back
    finally:
        store.close()
    for x, tiles in zip(got, batches):
        np.testing.assert_array_equal(x, reading.read_tiles(raster, tiles, BANDS, SPEC.read_size).x)


def test_a_store_is_used_only_by_the_input_it_was_made_for(raster, tmp_path):
    _, _, users = plan(raster)
    key = uuid.uuid4().hex
    store = ChunkStore.create(key, users)
    try:
        with SharedChunks.open(store.path, uuid.uuid4().hex) as other, \
                SharedChunks.open(store.path, key) as own, \
                SharedChunks.open(str(tmp_path / "gone"), key) as missing, \
                SharedChunks.open(raster, key) as not_a_store, \
                SharedChunks.open(None, key) as none:
            assert other is None and missing is None and not_a_store is None and none is None
            assert own is not None and own.shape == users.shape
    finally:
        store.close()


def test_a_reader_that_dies_decoding_a_chunk_leaves_it_to_the_next(raster):
    """The kernel drops a dead process's locks: a reader waiting for the chunk decodes it."""
    grid, batches, users = plan(raster)
    key = uuid.uuid4().hex
    store = ChunkStore.create(key, users)
    i, j = (int(v) for v in np.argwhere(users.array() > 1)[0])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({store.path!r}, os.O_RDWR)\n"
         f"fcntl.lockf(fd, fcntl.LOCK_EX, 1, {i * grid.shape[1] + j})\n"
         "print('locked', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with SharedChunks.open(store.path, key) as shared, rasterio.open(raster) as src:
            reader = ChunkReader.of(src, BANDS)
            area = reader.grid.window(i, j)
            done = threading.Event()
            waiter = threading.Thread(target=lambda: (shared.get(i, j, reader.slot_bytes,
                                                                 lambda: reader._load(area), None), done.set()))
            waiter.start()
            assert not done.wait(0.5)  # the chunk's producer holds it
            holder.kill()
            waiter.join(30)
            assert done.is_set() and shared.decoded == 1
    finally:
        holder.kill()
        holder.wait()
        store.close()
