"""Reading a scene through the shared chunk cache against each batch alone (``make bench``; slow).

Reads and normalises every batch of the bench's 4096^2 scene, 256-tiled and striped, on 2
threads as a run's workers do: with each batch decoding its own blocks (no cache, as before
``pipeline/chunks.py``) and through the cache, twice each in turns, the better of each kept.
Prints seconds and decodes per chunk side by side and writes
``outputs/benchmarks/reads-batch<N>.json``. Environment: ``TILEPIPE_BENCH_SIZE``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline import bench, reading
from pipeline.chunks import ChunkCache, ChunkReader
from pipeline.io import inspect_raster
from pipeline.windows import tile_batches, tile_spec

pytestmark = pytest.mark.benchmark
ROOT = Path(__file__).resolve().parents[1]


def striped_copy(src_path: Path, dst_path: Path) -> Path:
    """The scene again, deflate in strips of one row (GDAL's default layout), written by bands of rows."""
    with rasterio.open(src_path) as src:
        profile = {**src.profile, "tiled": False, "compress": "deflate"}
        for key in ("blockxsize", "blockysize"):
            profile.pop(key, None)
        with rasterio.open(dst_path, "w", **profile) as dst:
            for _, window in src.block_windows(1):
                if window.col_off == 0:
                    band = rasterio.windows.Window(0, window.row_off, src.width, window.height)
                    dst.write(src.read(window=band), window=band)
    return dst_path


def read_all(path: Path, batches: list, cached: bool, monkeypatch) -> tuple[float, ChunkCache, list]:
    cache = ChunkCache()
    monkeypatch.setattr(reading, "CHUNKS", cache)
    key = uuid.uuid4().hex if cached else None
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        out = list(pool.map(lambda b: reading.read_tiles(str(path), b, [1, 2, 3, 4], 384, key), batches))
    return time.perf_counter() - t0, cache, out


@pytest.mark.parametrize("batch", [8, 64])
def test_the_chunk_cache_reads_a_scene_faster(tmp_path, monkeypatch, batch):
    size = int(os.environ.get("TILEPIPE_BENCH_SIZE", "4096"))
    tiled = bench.write_scene(tmp_path / "tiled.tif", size, 4)
    striped = striped_copy(tiled, tmp_path / "striped.tif")
    results = {}
    for name, path in (("tiled 256", tiled), ("strips of 1 row", striped)):
        info = inspect_raster(path, [1, 2, 3, 4])
        batches = tile_batches(size, size, tile_spec(256, 64, 16), batch, info.striped)  # as the runner plans them
        with rasterio.open(path) as src:
            grid = ChunkReader.of(src, [1, 2, 3, 4]).grid
        chunks = grid.count
        times = {False: [], True: []}
        for cached in (False, True) * 2:  # the better of two, taken in turns: the first in a process is slower
            seconds, cache, out = read_all(path, batches, cached, monkeypatch)
            times[cached].append(seconds)
            if not cached:
                reference = out
            else:
                assert all(np.array_equal(a.x, b.x) for a, b in zip(reference, out))
        alone, shared = min(times[False]), min(times[True])
        results[name] = {"each_batch_alone_s": alone, "shared_chunks_s": shared, "speedup": alone / shared,
                         "decodes_per_chunk": cache.misses / chunks, "chunks": chunks}
    print(json.dumps(results, indent=1))
    out_dir = ROOT / "outputs" / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"reads-batch{batch}.json").write_text(json.dumps({"size": size, "batch": batch, **results}, indent=1))
    for name, r in results.items():
        assert r["decodes_per_chunk"] <= 1.3, name
        assert r["speedup"] > 1.0, name
