"""Reading a batch of tiles: in the worker's own threads, or in reader processes beside it.

A worker's threads share one cache of decoded chunks (:data:`CHUNKS`). On a CPU host that is
enough: the model is the cost. On an accelerator the host is the cost, and one Python process
reads no more than about 48 Mpx/s of 4-band uint16 tiles however many threads it runs (the
GIL; 164 Mpx/s in 16 processes, on a 16-core H200 host). There a :func:`reader_pool` reads
each batch in a child process (through a chunk cache of its own, emptied after each batch,
and a small GDAL block cache) into a file in shared memory, which the worker maps as the
batch. This module imports no JAX, so the children stay light.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import math
import os
import tempfile
from collections.abc import Hashable, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import rasterio
from rasterio import windows
from rasterio.windows import Window

from pipeline import children
from pipeline.chunks import ChunkCache, ChunkReader
from pipeline.io import Normaliser, read_tile
from pipeline.stitch import core_mask
from pipeline.windows import Tile, source_window

LOG = logging.getLogger(__name__)

SHARED = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
"""Where reader processes leave a batch: memory (tmpfs) where the system has it."""

CHUNKS = ChunkCache()
"""Decoded chunks of inputs, shared by the threads of this process."""

FLOAT32 = np.dtype(np.float32)


@dataclasses.dataclass(frozen=True)
class BatchInputs:
    """One batch read and normalised: model inputs (n, bands, S, S), in the dtype the model
    takes them in, and each core's validity."""

    x: np.ndarray
    masks: tuple[np.ndarray, ...]


def read_tiles(path: str, tiles: Sequence[Tile], bands: Sequence[int], normaliser: Normaliser,
               read_size: int, key: Hashable = None, out: np.ndarray | None = None,
               dtype: np.dtype = FLOAT32, keep: bool = True) -> BatchInputs:
    """Read and normalise ``tiles`` of ``path``, each straight into its slot of the batch
    (``out`` if given, else a new array of ``dtype``); with ``key``, through :data:`CHUNKS`,
    sized for batches like this one, or (not ``keep``) for this batch alone, whose chunks and
    GDAL's blocks are then let go. A batch of another dtype than float32 (bfloat16) is
    normalised tile by tile in float32, then rounded into its slot."""
    x = np.empty((len(tiles), len(bands), read_size, read_size), dtype) if out is None else out
    scratch = None if x.dtype == FLOAT32 else np.empty(x.shape[1:], FLOAT32)
    masks = []
    with rasterio.open(path) as src:
        reader = ChunkReader.of(src, bands, CHUNKS if key is not None else None, key)
        if key is not None:
            CHUNKS.resize(_chunk_budget(reader, tiles, keep), key)
        try:
            with contextlib.nullcontext() if keep else rasterio.Env(GDAL_CACHEMAX=reader.gdal_cache_bytes):
                for i, tile in enumerate(tiles):
                    data, valid = read_tile(src, tile, list(bands), reader)
                    if scratch is None:
                        normaliser(data, valid, out=x[i])
                    else:
                        x[i] = normaliser(data, valid, out=scratch)
                    masks.append(core_mask(valid, tile))
        finally:
            if not keep and key is not None:
                CHUNKS.forget(key)
    return BatchInputs(x, tuple(masks))


def _chunk_budget(reader: ChunkReader, tiles: Sequence[Tile], keep: bool) -> int:
    """Bytes of chunks to keep while ``tiles`` are read: for batches like them (``keep``), or
    for this batch alone, its sweep (:meth:`pipeline.chunks.ChunkGrid.sweep`)."""
    src, grid = reader.src, reader.grid
    if keep:
        area = windows.intersection(windows.union(*(t.read for t in tiles)), Window(0, 0, src.width, src.height))
        return grid.budget(area, reader.pixel_bytes)
    sweep = grid.sweep(source_window(t.read, src.width, src.height) for t in tiles)
    return sweep * grid.rows * grid.cols * reader.pixel_bytes


async def forget_chunks(read_key: str) -> None:
    """Free this worker's chunks of an input whose batches are all read: a coroutine, so that
    ``Client.run`` can send it to every worker without waiting for their answers. (Reader
    processes keep none beyond each batch.)"""
    CHUNKS.forget(read_key)


def reader_pool(processes: int) -> concurrent.futures.ProcessPoolExecutor | None:
    """This process's pool of ``processes`` readers (:func:`pipeline.children.pool`); None
    for 0, or in a daemonic process, which may not have children."""
    if processes < 1:
        return None
    pool = children.pool("readers", processes)
    if pool is None:
        _no_children()
    return pool


def start_readers(processes: int) -> None:
    """Start this process's ``processes`` readers now rather than with the first batches,
    and return once every one has."""
    pool = reader_pool(processes)
    if pool is not None:
        children.start(pool, processes, __name__)


def read_elsewhere(pool: concurrent.futures.ProcessPoolExecutor, path: str, tiles: Sequence[Tile],
                   bands: Sequence[int], normaliser: Normaliser, read_size: int,
                   key: Hashable = None, dtype: np.dtype = FLOAT32) -> BatchInputs:
    """:func:`read_tiles` in one of ``pool``'s processes: the same batch, read beside this
    process's GIL. The batch passes through a file in :data:`SHARED`, which this process maps
    (no copy) and unlinks before return; where that has no room for it (a container's 64 MB
    ``/dev/shm``), the batch is read here."""
    shape, dtype = (len(tiles), len(bands), read_size, read_size), np.dtype(dtype)
    try:
        fd, name = tempfile.mkstemp(prefix=".tilepipe-batch-", dir=SHARED)
    except OSError as exc:
        _no_room(str(SHARED), exc.strerror)
        return read_tiles(path, tiles, bands, normaliser, read_size, key, dtype=dtype)
    try:
        try:
            _reserve(fd, math.prod(shape) * dtype.itemsize)
        except OSError as exc:
            _no_room(str(SHARED), exc.strerror)
            return read_tiles(path, tiles, bands, normaliser, read_size, key, dtype=dtype)
        try:
            masks = pool.submit(_read_into, name, shape, dtype, path, tuple(tiles), tuple(bands), normaliser,
                                read_size, key).result()
        except BrokenProcessPool:
            children.drop(pool)
            raise
        # The reader's pages, mapped rather than copied: the mapping outlives the file's name.
        return BatchInputs(np.memmap(name, dtype, "r", shape=shape).view(np.ndarray), masks)
    finally:
        os.close(fd)
        os.unlink(name)


def _reserve(fd: int, size: int) -> None:
    """Give the file ``size`` bytes of storage now: a full tmpfs fails here, rather than with
    SIGBUS in the reader that writes into it."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:
        os.ftruncate(fd, size)


@functools.cache
def _no_children() -> None:
    """Say once per process that a daemonic worker reads in its threads, and how to change that."""
    LOG.warning("this Dask worker is a daemonic process, which cannot start reader processes: batches are read "
                "in its threads (start its nanny with DASK_DISTRIBUTED__WORKER__DAEMON=False to allow them)")


@functools.cache
def _no_room(directory: str, reason: str) -> None:
    """Say once per process that batches are read in the worker's threads, and why."""
    LOG.warning("no room for a batch in %s (%s): reading batches in this process instead of its readers",
                directory, reason)


def _read_into(name: str, shape: tuple[int, ...], dtype: np.dtype, path: str, tiles: tuple[Tile, ...],
               bands: tuple[int, ...], normaliser: Normaliser, read_size: int, key: Hashable) -> tuple[np.ndarray, ...]:
    """A reader process's task: the batch into the file ``name``, the core masks returned.
    Nothing is kept for the next: among many readers, a reader's next batch is seldom beside
    this one, and sixteen readers each keeping a batch's chunks held a gigabyte."""
    out = np.memmap(name, dtype, "r+", shape=shape)
    return read_tiles(path, tiles, bands, normaliser, read_size, key, out=out, keep=False).masks
