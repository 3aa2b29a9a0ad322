"""Decoded chunks: reads through the cache equal GDAL's reads, each chunk is decoded once."""

from __future__ import annotations

import collections
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import rasterio
from conftest import scene
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from pipeline import reading
from pipeline.chunks import (
    BAND_BUDGET,
    Chunk,
    ChunkCache,
    ChunkGrid,
    ChunkReader,
)
from pipeline.errors import InputError
from pipeline.windows import source_window, tile_batches, tile_spec

# (block rows, block cols) or None for strips of the given rows
LAYOUTS = {"tiled 16": (16, 16), "tiled 32x16": (32, 16), "strips of 1 row": 1, "strips of 7 rows": 7}


def layout_raster(path, data, layout, nodata=None, mask=None):
    count, height, width = data.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count, "dtype": data.dtype.name,
               "nodata": nodata, "compress": "deflate"}
    if isinstance(layout, tuple):
        profile.update(tiled=True, blockysize=layout[0], blockxsize=layout[1])
    else:
        profile.update(tiled=False, blockysize=layout)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if mask is not None:
            dst.write_mask(mask.astype(np.uint8) * 255)
    return path


@pytest.fixture(params=list(LAYOUTS), scope="module")
def raster(request, tmp_path_factory):
    """A 70 x 90 raster in each block layout, with nodata in band 2 and an internal mask."""
    data = scene(70, 90, bands=3, seed=3)
    data[1, 5:9, 30:40] = 0
    mask = np.ones((70, 90), bool)
    mask[40:50, 0:20] = False
    path = tmp_path_factory.mktemp("chunks") / "r.tif"
    return layout_raster(path, data, LAYOUTS[request.param], nodata=0, mask=mask)


windows = st.builds(lambda r, c, h, w: Window(c, r, min(w, 90 - c), min(h, 70 - r)),
                    st.integers(0, 69), st.integers(0, 89), st.integers(1, 70), st.integers(1, 90))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(windows, min_size=1, max_size=6), st.sampled_from([[1, 2, 3], [2], [3, 1]]),
       st.integers(0, 40_000))
def test_reads_through_the_cache_equal_gdal_reads(raster, ws, bands, budget):
    cache = ChunkCache(budget)  # small budgets evict between and within reads
    with rasterio.open(raster) as src:
        for window in ws:
            data, masks = ChunkReader.of(src, bands, cache, "r").read(window)
            np.testing.assert_array_equal(data, src.read(bands, window=window))
            np.testing.assert_array_equal(masks, src.read_masks(bands, window=window))
            assert cache.bytes <= cache.budget


def test_unmasked_reads_have_no_masks(tmp_path):
    path = layout_raster(tmp_path / "plain.tif", scene(20, 30, bands=2), (16, 16))
    with rasterio.open(path) as src:
        data, masks = ChunkReader.of(src, [1, 2], ChunkCache(), "p").read(Window(3, 2, 20, 15))
        assert masks is None
        np.testing.assert_array_equal(data, src.read([1, 2], window=Window(3, 2, 20, 15)))


@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from([1, 7, 16, 256, 512]),
       st.sampled_from([16, 128, 256, 300]), st.data())
def test_chunks_are_whole_blocks_and_cover_a_window_exactly(width, height, block_rows, block_cols, data):
    grid = ChunkGrid.of(width, height, block_rows, min(block_cols, width) if block_cols == 300 else block_cols)
    assert grid.rows % block_rows == 0 and grid.rows >= min(256, height)
    row = data.draw(st.integers(0, height - 1))
    col = data.draw(st.integers(0, width - 1))
    window = Window(col, row, data.draw(st.integers(1, width - col)), data.draw(st.integers(1, height - row)))
    covered = np.zeros((height, width), int)
    for i, j in grid.covering(window):
        w = grid.window(i, j)
        assert w.width > 0 and w.height > 0
        covered[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] += 1
    inside = covered[row : row + window.height, col : col + window.width]
    assert (inside == 1).all()  # every pixel of the window in exactly one chunk
    assert grid.count == len(grid.covering(Window(0, 0, width, height)))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(1, 200), st.sampled_from([1, 7, 16, 64]), st.data())
def test_a_sweep_is_the_least_cache_that_decodes_each_chunk_once(width, height, block, data):
    """Reading windows in order through a least-recently-used cache of ``sweep`` chunks loads
    each chunk once; one chunk fewer loads some chunk twice."""
    grid = ChunkGrid.of(width, height, block, block, target=16)
    inside = st.builds(lambda r, c, h, w: Window(c, r, min(w, width - c), min(h, height - r)),
                       st.integers(0, height - 1), st.integers(0, width - 1), st.integers(1, 60), st.integers(1, 60))
    reads = data.draw(st.lists(inside, min_size=1, max_size=12))
    sweep = grid.sweep(reads)

    def loads(capacity):
        cache, loaded = ChunkCache(budget=capacity), collections.Counter()
        for window in reads:
            for key in grid.covering(window):
                cache.get(key, lambda key=key: loaded.update([key]) or chunk(1))
        return loaded

    assert set(loads(sweep).values()) == {1}
    if sweep > 1:
        assert max(loads(sweep - 1).values()) > 1


def test_a_batch_of_8_x_8_tiles_read_alone_needs_three_columns_of_its_chunks_not_all():
    """Its tiles are read column by column: a column's chunks and the next's are enough."""
    grid = ChunkGrid.of(8192, 8192, 256, 256)
    spec = tile_spec(256, 64, 16)
    for tiles in tile_batches(8192, 8192, spec, 64):
        reads = [source_window(t.read, 8192, 8192) for t in tiles]
        own = {key for window in reads for key in grid.covering(window)}
        rows = {i for i, _ in own}
        assert grid.sweep(reads) <= 3 * len(rows) < len(own)


MB = 2**20


@pytest.mark.parametrize("width, block, expected", [
    (4096, (256, 256), 4 * 256 * 4096 * 8),  # a band of 4 chunk rows across the raster
    (32768, (256, 256), BAND_BUDGET),  # a wider band is not kept whole
    (32768, (512, 512), None),  # 8 x 8 tiles: the batch's own 6 x 6 chunks, and room beside them
    (32768, (1, 32768), 1.5 * 4 * 256 * 32768 * 8),  # strips: one batch's chunks are its band
])
def test_a_band_of_batches_is_kept_up_to_a_bound_that_strips_cannot_keep(width, block, expected):
    grid = ChunkGrid.of(width, 8192, *block)
    batch = Window(448, 448, 1152, 640)  # 2 x 4 tiles of 256 with halos of 64, rows 448..1088
    if expected is None:
        batch, expected = Window(448, 448, 2176, 2176), 1.5 * 36 * 512 * 512 * 8
    assert grid.budget(batch, pixel_bytes=8) == int(expected)


def chunk(n: int) -> Chunk:
    return Chunk(np.zeros(n, np.uint8), None)


def test_the_least_recently_used_chunks_go_first_once_the_budget_is_passed():
    cache = ChunkCache(budget=300)
    for key in "abc":
        cache.get(key, lambda: chunk(100))
    cache.get("a", lambda: pytest.fail("a is kept"))  # a is now the most recent
    cache.get("d", lambda: chunk(100))  # 400 bytes: b, the least recent, goes
    assert (cache.hits, cache.misses, cache.bytes) == (1, 4, 300)
    loads = []
    cache.get("b", lambda: loads.append("b") or chunk(100))
    assert loads == ["b"]
    cache.resize(100)
    assert cache.bytes == 100
    cache.get("b", lambda: pytest.fail("b, the most recent, is kept"))


def test_an_inputs_budget_does_not_shrink_under_its_batches_in_flight():
    cache = ChunkCache()
    cache.resize(300, "a")
    cache.resize(100, "a")  # a smaller batch of the same input: the larger one may still be reading
    assert cache.budget == 300
    cache.resize(100, "b")  # the next input sets its own
    assert cache.budget == 100
    cache.forget("b")
    cache.resize(50, "b")  # the same name after it was forgotten starts afresh
    assert cache.budget == 50


def test_threads_that_miss_the_same_chunk_load_it_once():
    cache = ChunkCache(budget=10_000)
    started, release, loads = threading.Event(), threading.Event(), []

    def load():
        loads.append(threading.current_thread().name)
        started.set()
        release.wait(5)
        return chunk(10)

    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(cache.get, "k", load)
        started.wait(5)
        others = [pool.submit(cache.get, "k", load) for _ in range(3)]
        release.set()
        results = [first.result(5)] + [f.result(5) for f in others]
    assert len(loads) == 1 and all(r is results[0] for r in results)
    assert (cache.misses, cache.hits) == (1, 3)


def test_a_failed_load_reaches_every_waiter_and_is_not_kept():
    cache = ChunkCache(budget=10_000)

    def broken():
        raise OSError("TIFFReadEncodedTile() failed")

    with pytest.raises(OSError, match="TIFFReadEncodedTile"):
        cache.get("k", broken)
    assert cache.get("k", lambda: chunk(10)).values.size == 10  # loaded again, not the failure


@pytest.mark.parametrize("layout", ["tiled 16", "strips of 1 row"])
@pytest.mark.parametrize("threads", [1, 3])
def test_a_whole_input_decodes_each_chunk_once_and_reads_the_same(tmp_path, monkeypatch, layout, threads):
    """Every batch of a run, through the worker's cache sized by the batches: before the cache,
    each batch decoded its chunks again (strips once per batch along their band)."""
    monkeypatch.setattr(reading, "CHUNKS", ChunkCache())
    data = scene(1400, 1400, bands=2, seed=5)
    path = str(layout_raster(tmp_path / "in.tif", data, LAYOUTS[layout]))
    spec = tile_spec(64, 16, 16)
    batches = tile_batches(1400, 1400, spec, 8, striped=layout.startswith("strips"))  # as the runner plans them
    key = uuid.uuid4().hex
    with ThreadPoolExecutor(threads) as pool:
        cached = list(pool.map(lambda b: reading.read_tiles(path, b, [1, 2], spec.read_size, key), batches))
    plain = [reading.read_tiles(path, b, [1, 2], spec.read_size) for b in batches]
    for a, b in zip(cached, plain):
        np.testing.assert_array_equal(a.x, b.x)
    with rasterio.open(path) as src:
        grid = ChunkReader.of(src, [1, 2]).grid
    chunks = grid.count
    assert reading.CHUNKS.misses == chunks if threads == 1 else chunks <= reading.CHUNKS.misses <= 1.1 * chunks
    assert reading.CHUNKS.hits > 4 * chunks


class CountingCache(ChunkCache):
    """A chunk cache that counts each chunk's loads."""

    def __init__(self):
        super().__init__()
        self.loads = collections.Counter()

    def get(self, key, load):
        def counted():
            self.loads[key] += 1
            return load()

        return super().get(key, counted)


@pytest.mark.parametrize("layout", ["tiled 16", "tiled 32x16", "strips of 7 rows"])
@pytest.mark.parametrize("batch", [8, 9, 64])
def test_a_batch_read_alone_decodes_each_of_its_chunks_once_and_keeps_none(tmp_path, monkeypatch, layout, batch):
    """A reader process's batches (``keep=False``): the next one is seldom beside this one, so
    the cache holds what one batch needs to decode each of its chunks once (its sweep), and is
    empty between batches."""
    data = scene(300, 340, bands=2, seed=6)
    data[0, :20, :30] = 0
    path = str(layout_raster(tmp_path / "in.tif", data, LAYOUTS[layout], nodata=0))
    spec = tile_spec(64, 16, 16)
    key = uuid.uuid4().hex
    for tiles in tile_batches(340, 300, spec, batch, striped=layout.startswith("strips")):
        monkeypatch.setattr(reading, "CHUNKS", CountingCache())
        alone = reading.read_tiles(path, tiles, [1, 2], spec.read_size, key, keep=False)
        assert reading.CHUNKS.loads and set(reading.CHUNKS.loads.values()) == {1}
        assert reading.CHUNKS.bytes == 0
        plain = reading.read_tiles(path, tiles, [1, 2], spec.read_size)
        np.testing.assert_array_equal(alone.x, plain.x)
        for a, b in zip(alone.masks, plain.masks):
            np.testing.assert_array_equal(a, b)


def test_a_batch_read_alone_that_fails_keeps_nothing_either(tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "CHUNKS", CountingCache())
    good = layout_raster(tmp_path / "good.tif", scene(300, 340, bands=2, seed=7), LAYOUTS["tiled 16"])
    broken = tmp_path / "broken.tif"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size * 19 // 20])  # the last rows of blocks are gone
    spec = tile_spec(64, 16, 16)
    tiles = tile_batches(340, 300, spec, 64)[0]
    with pytest.raises(InputError, match=r"its blocks at rows \d+-\d+, columns \d+-\d+ cannot be read \(RasterioIOError"):
        reading.read_tiles(str(broken), tiles, [1, 2], spec.read_size, "k", keep=False)
    assert len(reading.CHUNKS.loads) > 1  # the first chunks were read before the failure
    assert reading.CHUNKS.bytes == 0
