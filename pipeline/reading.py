"""Reading a batch of tiles: in the worker's own threads, or in reader processes beside it.

A batch is the input's values as read, in their wire dtype (:func:`pipeline.io.wire_dtype`:
uint16 stays uint16), and where they are valid; the compiled forward pass normalises it, so
neither a reader nor the worker does arithmetic on it.

A worker's threads share one cache of decoded chunks (:data:`CHUNKS`). On a CPU host that is
enough: the model is the cost. On an accelerator the host is the cost, and one Python process
reads no more than about 48 Mpx/s of 4-band uint16 tiles however many threads it runs (the
GIL; 164 Mpx/s in 16 processes, on a 16-core H200 host). There a :func:`reader_pool` reads
each batch in child processes, in parts side by side (:func:`pipeline.windows.part_slices`:
up to 8; of a batch of 64, a column of 8 tiles each), so that a few batches in flight keep
every reader busy and the memory of a run follows the batches in flight, not the readers.
Each part is read
(through a chunk cache of its own, emptied after it, and a small GDAL block cache) into shared
memory that the worker maps as the batch and keeps for a next one (:data:`BUFFERS`). The chunks
that neighbouring parts both read (their halos) are decoded once for all the worker's readers,
through a store per input (:data:`STORES`, :mod:`pipeline.halos`). This module imports no JAX,
so the children stay light.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import logging
import math
import mmap
import os
import threading
from collections.abc import Hashable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import rasterio
from rasterio import windows
from rasterio.windows import Window

from pipeline import children
from pipeline.chunks import ChunkCache, ChunkReader, ChunkUsers
from pipeline.halos import ChunkStores, SharedChunks
from pipeline.io import pack_valid, packed_shape, read_tile, wire_dtype
from pipeline.stitch import core_mask
from pipeline.windows import Tile, part_slices, source_window

LOG = logging.getLogger(__name__)

CHUNKS = ChunkCache()
"""Decoded chunks of inputs, shared by the threads of this process."""

_decoded_elsewhere = [0]  # chunks this process's reader processes decoded for its batches
_decoded_lock = threading.Lock()


def chunks_decoded() -> int:
    """Chunks decoded so far for this process's batches, in its threads and in its readers:
    against the chunks of the inputs read, how often a chunk was decoded again."""
    with _decoded_lock:
        return CHUNKS.misses + _decoded_elsewhere[0]


@dataclasses.dataclass(frozen=True)
class BatchInputs:
    """One batch read: the input's values (n, bands, S, S) in its wire dtype
    (:func:`pipeline.io.wire_dtype`), where they are valid (n, S, S) as bits
    (:func:`pipeline.io.pack_valid`), and each core's validity. The device normalises them
    (:class:`pipeline.io.Normaliser`)."""

    x: np.ndarray
    valid: np.ndarray
    masks: tuple[np.ndarray, ...]


def read_tiles(path: str, tiles: Sequence[Tile], bands: Sequence[int], read_size: int, key: Hashable = None,
               out: np.ndarray | None = None, valid: np.ndarray | None = None, dtype: np.dtype | None = None,
               keep: bool = True, shared: SharedChunks | None = None,
               src: rasterio.DatasetReader | None = None) -> BatchInputs:
    """Read ``tiles`` of ``path``, each straight into its slot of the batch (``out`` and
    ``valid``, packed, if given, else new arrays; in ``dtype``, by default the input's wire dtype);
    with ``key``, through :data:`CHUNKS`, sized for batches like this one, or (not ``keep``)
    for this batch alone, whose chunks and GDAL's blocks are then let go; the chunks other
    batches read too through ``shared`` where given (and of this input's chunk grid); from
    ``src``, ``path`` open already, where given."""
    masks = []
    with contextlib.nullcontext(src) if src is not None else rasterio.open(path) as src:
        if out is None:
            dtype = wire_dtype([src.dtypes[b - 1] for b in bands]) if dtype is None else dtype
            out = np.empty((len(tiles), len(bands), read_size, read_size), dtype)
        valid = np.empty(packed_shape(len(tiles), read_size), np.uint8) if valid is None else valid
        reader = ChunkReader.of(src, bands, CHUNKS if key is not None else None, key)
        if shared is not None and shared.shape == reader.grid.shape:
            reader = dataclasses.replace(reader, shared=shared)
        if key is not None:
            CHUNKS.resize(_chunk_budget(reader, tiles, keep), key)
        try:
            with contextlib.nullcontext() if keep else rasterio.Env(GDAL_CACHEMAX=reader.gdal_cache_bytes):
                for i, tile in enumerate(tiles):
                    _, tile_valid = read_tile(src, tile, list(bands), reader, out=out[i])
                    valid[i] = pack_valid(tile_valid)
                    masks.append(core_mask(tile_valid, tile))
        finally:
            if not keep and key is not None:
                CHUNKS.forget(key)
    return BatchInputs(out, valid, tuple(masks))


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
    processes keep none beyond each batch, and its :data:`STORES` store goes.)"""
    CHUNKS.forget(read_key)
    STORES.forget(read_key)


def reader_pool(processes: int) -> concurrent.futures.ProcessPoolExecutor | None:
    """This process's pool of ``processes`` readers (:func:`pipeline.children.pool`); None
    for 0, or in a daemonic process, which may not have children."""
    if processes < 1:
        return None
    pool = children.pool("readers", processes)
    if pool is None:
        _no_children()
    return pool


def start_readers(processes: int) -> frozenset[int]:
    """Start this process's ``processes`` readers now rather than with the first batches,
    and return their process ids once every one has started."""
    pool = reader_pool(processes)
    return frozenset() if pool is None else frozenset(children.start(pool, processes, __name__))


@dataclasses.dataclass(frozen=True, eq=False)
class SharedBatch:
    """Memory a reader process writes a batch into and this process maps: an anonymous file
    (``memfd``, so no name is ever left behind) that readers open through ``/proc``. It holds
    the batch's values, then where they are valid (:func:`_map_tiles`)."""

    fd: int
    shape: tuple[int, ...]
    """(tiles, bands, S, S) of values it holds."""
    dtype: np.dtype

    @classmethod
    def create(cls, shape: tuple[int, ...], dtype: np.dtype) -> SharedBatch:
        """A new buffer, its memory reserved now: a host short of it fails here (OSError),
        rather than with SIGBUS in the reader that writes into it."""
        if not hasattr(os, "memfd_create"):
            raise OSError(errno.ENOSYS, "no memfd_create on this system")
        fd = os.memfd_create("tilepipe-batch", os.MFD_CLOEXEC)
        try:
            _reserve(fd, _size(shape, dtype))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, shape, dtype)

    @property
    def path(self) -> str:
        """The file as a reader opens it."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    @functools.cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """This process's (read-only) mapping of the values and the validity, made on first
        use and kept."""
        return _map_tiles(self.fd, self.shape, self.dtype, 0, self.shape[0])

    def close(self) -> None:
        """Close the file; its memory goes with the last view of :attr:`arrays`."""
        os.close(self.fd)


def _size(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes of a batch of ``shape`` values of ``dtype`` and its validity (as bits)."""
    return math.prod(shape) * dtype.itemsize + math.prod(packed_shape(shape[0], shape[-1]))


class BatchBuffers:
    """Shared buffers lent to one batch at a time and kept for the next. A buffer per batch
    cost this process its reservation and then its freeing, and the reader a page fault per
    page it wrote: about 100 ms of a core for a batch of 64 tiles of 384 px (then in bfloat16)."""

    def __init__(self) -> None:
        self._free: list[SharedBatch] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lend(self, shape: tuple[int, ...], dtype: np.dtype) -> Iterator[SharedBatch | None]:
        """A buffer of at least ``shape[0]`` tiles of ``shape[1:]`` for the with-block (None
        where none can be had)."""
        with self._lock:
            fits = [b for b in self._free if b.dtype == dtype and b.shape[1:] == shape[1:] and b.shape[0] >= shape[0]]
            buffer = min(fits, key=lambda b: b.shape[0]) if fits else None
            if buffer is not None:
                self._free.remove(buffer)
        buffer = buffer or _new_buffer(shape, dtype)
        try:
            yield buffer
        finally:
            if buffer is not None:
                with self._lock:
                    self._free.append(buffer)

    def clear(self) -> None:
        """Close the buffers not lent now."""
        with self._lock:
            free, self._free = self._free, []
        for buffer in free:
            buffer.close()

    def __len__(self) -> int:
        """Buffers kept, not lent now."""
        return len(self._free)


BUFFERS = BatchBuffers()
"""This process's buffers for batches read in its reader processes."""


STORES = ChunkStores()
"""This process's stores of the chunks its readers share (:mod:`pipeline.halos`)."""


async def drop_buffers() -> None:
    """Close a worker's idle batch buffers, and its stores of chunks, at the end of a run (a
    coroutine, as :func:`forget_chunks` is)."""
    BUFFERS.clear()
    STORES.clear()


class NoSharedBatch(Exception):
    """A reader process could not open its batch's shared memory."""


def read_elsewhere(pool: concurrent.futures.ProcessPoolExecutor, path: str, tiles: Sequence[Tile],
                   bands: Sequence[int], read_size: int, key: Hashable = None, *, dtype: np.dtype,
                   users: ChunkUsers | None = None, parts: int = 1) -> BatchInputs:
    """:func:`read_tiles` in one of ``pool``'s processes, in ``dtype`` (the wire dtype the
    planner chose): the same batch, read beside this process's GIL into shared memory of its
    own, which this process maps (no copy) and which lasts as long as the batch. Where it
    cannot be shared, the batch is read here. It is read in (at most) ``parts`` parts side by
    side (:func:`pipeline.windows.part_slices`); with ``users`` (its plan's, counting those
    parts), the chunks other reads need too are decoded once for all of them (:data:`STORES`)."""
    shape, dtype = (len(tiles), len(bands), read_size, read_size), np.dtype(dtype)
    buffer = _new_buffer(shape, dtype)
    try:
        return _read_shared(pool, buffer, path, tiles, bands, read_size, key, dtype, users, parts)
    finally:
        if buffer is not None:
            buffer.close()  # its mapping holds the memory


@contextlib.contextmanager
def lend_elsewhere(pool: concurrent.futures.ProcessPoolExecutor, path: str, tiles: Sequence[Tile],
                   bands: Sequence[int], read_size: int, key: Hashable = None, *,
                   dtype: np.dtype, users: ChunkUsers | None = None, parts: int = 1) -> Iterator[BatchInputs]:
    """:func:`read_elsewhere` into a buffer of :data:`BUFFERS` lent for the with-block: the
    batch is valid inside it only."""
    shape, dtype = (len(tiles), len(bands), read_size, read_size), np.dtype(dtype)
    with BUFFERS.lend(shape, dtype) as buffer:
        yield _read_shared(pool, buffer, path, tiles, bands, read_size, key, dtype, users, parts)


def _read_shared(pool: concurrent.futures.ProcessPoolExecutor, buffer: SharedBatch | None, path: str,
                 tiles: Sequence[Tile], bands: Sequence[int], read_size: int, key: Hashable,
                 dtype: np.dtype, users: ChunkUsers | None, parts: int) -> BatchInputs:
    """The batch read into ``buffer`` by ``parts`` readers side by side, a part each
    (:func:`pipeline.windows.part_slices`), or here where there is none (or the readers could not
    open an earlier one)."""
    if buffer is None or _UNSHARED:
        return read_tiles(path, tiles, bands, read_size, key, dtype=dtype)
    tiles = tuple(tiles)
    try:
        with STORES.lend(key, users) as store:
            results = _read_parts(pool, [(buffer.path, buffer.shape, dtype, path, tiles[part], tuple(bands),
                                          read_size, key, store, part.start) for part in part_slices(len(tiles), parts)])
    except BrokenProcessPool:
        children.drop(pool)
        raise
    except NoSharedBatch as exc:
        _UNSHARED.append(str(exc))
        _cannot_share(f"reader processes cannot open shared memory ({exc})")
        return read_tiles(path, tiles, bands, read_size, key, dtype=dtype)
    masks = [mask for part_masks, _ in results for mask in part_masks]
    with _decoded_lock:
        _decoded_elsewhere[0] += sum(decoded for _, decoded in results)
    x, valid = buffer.arrays
    return BatchInputs(x[: len(tiles)], valid[: len(tiles)],
                       tuple(_all_valid(t.core.height, t.core.width) if m is None else m for m, t in zip(masks, tiles)))


def _read_parts(pool: concurrent.futures.ProcessPoolExecutor, parts: list[tuple]) -> list:
    """:func:`_read_into` for each of ``parts`` (its arguments) in ``pool``, their results in
    order. Every part has ended, failed or not, before this returns or raises: a part still
    writing into a buffer lent to the next batch would corrupt it."""
    futures = []
    try:
        for args in parts:
            futures.append(pool.submit(_read_into, *args))
    finally:
        concurrent.futures.wait(futures)
    error = next((e for e in (future.exception() for future in futures) if e is not None), None)
    results = None if error is not None else [future.result() for future in futures]
    del futures
    if error is not None:
        try:
            raise error
        finally:  # its traceback holds this frame: held here too, the error and the batch it failed would be a cycle
            error = None
    return results


_UNSHARED: list[str] = []
"""Why this process's readers cannot open shared memory, once they could not."""


def _new_buffer(shape: tuple[int, ...], dtype: np.dtype) -> SharedBatch | None:
    """A new :class:`SharedBatch`, or None where none would serve: the readers cannot open
    one, or (said once) none can be made, for want of room or of memfd on this system."""
    if _UNSHARED:
        return None
    try:
        return SharedBatch.create(shape, dtype)
    except OSError as exc:
        _cannot_share(f"no shared memory for a batch ({exc.strerror})")
        return None


def _reserve(fd: int, size: int) -> None:
    """Give the file ``size`` bytes of memory now."""
    os.posix_fallocate(fd, 0, size)


@functools.cache
def _all_valid(height: int, width: int) -> np.ndarray:
    """The (read-only) mask of a core without nodata: readers send None for it."""
    mask = np.ones((height, width), bool)
    mask.flags.writeable = False
    return mask


@functools.cache
def _no_children() -> None:
    """Say once per process that a daemonic worker reads in its threads, and how to change that."""
    LOG.warning("this Dask worker is a daemonic process, which cannot start reader processes: batches are read "
                "in its threads (start its nanny with DASK_DISTRIBUTED__WORKER__DAEMON=False to allow them)")


@functools.cache
def _cannot_share(reason: str) -> None:
    """Say once per process that batches are read in the worker's threads, and why."""
    LOG.warning("%s: reading batches in this process instead of its readers", reason)


def _read_into(target: str, shape: tuple[int, ...], dtype: np.dtype, path: str, tiles: tuple[Tile, ...],
               bands: tuple[int, ...], read_size: int, key: Hashable,
               store: str | None = None, start: int = 0) -> tuple[tuple[np.ndarray | None, ...], int]:
    """A reader process's task: ``tiles`` into tiles ``start`` on of the shared file ``target``
    (a :class:`SharedBatch` of ``shape``; a part of its batch, which other readers read beside
    it); each core's mask returned, None where every pixel is valid, and how many chunks it
    decoded (a reader runs one task at a time). The reader keeps nothing for its next part:
    among many readers, its next part is seldom beside this one, and sixteen readers each keeping
    a batch's chunks held a gigabyte. The chunks other parts read too (neighbouring parts of
    its batch, and of the batches around it) go through the worker's ``store`` (a path, or
    None), which holds each until the last of its parts has read it (:mod:`pipeline.halos`)."""
    try:
        fd = os.open(target, os.O_RDWR)
    except OSError as exc:
        raise NoSharedBatch(f"{target}: {exc.strerror}") from None
    try:
        x, valid = _map_tiles(fd, shape, dtype, start, start + len(tiles), writable=True)
    finally:
        os.close(fd)
    decoded = CHUNKS.misses
    with SharedChunks.open(store, str(key)) as shared, _held_open(path, key) as src:
        masks = read_tiles(path, tiles, bands, read_size, key, out=x, valid=valid, keep=False, shared=shared,
                           src=src).masks
        decoded = CHUNKS.misses - decoded - (shared.copied if shared is not None else 0)
    del x, valid  # and with them their mappings (after an error, with the traceback's frames)
    return tuple(None if m.all() else m for m in masks), decoded


_HELD: list[tuple[str, Hashable, rasterio.DatasetReader]] = []
"""The input a reader process read its last part from, kept open for the next part of the
same plan (an open is about a millisecond, and a batch is read in up to eight parts)."""


@contextlib.contextmanager
def _held_open(path: str, key: Hashable) -> Iterator[rasterio.DatasetReader]:
    """``path`` open for a part of the plan ``key``, and kept open after it (without a key,
    or after an error, it is closed)."""
    if _HELD and _HELD[0][:2] != (path, key):
        _HELD.pop()[2].close()
    src = _HELD[0][2] if _HELD else rasterio.open(path)
    try:
        yield src
    except BaseException:
        if _HELD:
            _HELD.pop()
        src.close()
        raise
    if key is None:
        src.close()
    elif not _HELD:
        _HELD.append((path, key, src))


def _map_tiles(fd: int, shape: tuple[int, ...], dtype: np.dtype, start: int, stop: int,
               writable: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Tiles ``start:stop`` of a :class:`SharedBatch` of ``shape``: their values (``dtype``),
    and where they are valid (bits, :func:`pipeline.io.pack_valid`), which follow the values of
    every tile. Each region is mapped alone, read-only, or (``writable``, a reader's part)
    with its pages at once: writing through faults would take ~45 ms a batch, and mapping the
    whole batch in each part would populate it once per part. The mappings go with the arrays."""
    tile_values = math.prod(shape[1:]) * dtype.itemsize
    tile_bits = math.prod(packed_shape(1, shape[-1]))
    n = stop - start
    regions = ((start * tile_values, n * tile_values, dtype, (n, *shape[1:])),
               (shape[0] * tile_values + start * tile_bits, n * tile_bits, np.dtype(np.uint8),
                packed_shape(n, shape[-1])))
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if writable else 0)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    arrays = []
    for offset, size, kind, part_shape in regions:
        skip = offset % mmap.ALLOCATIONGRANULARITY
        memory = mmap.mmap(fd, skip + size, flags, prot, offset=offset - skip)
        arrays.append(np.frombuffer(memory, kind, size // kind.itemsize, offset=skip).reshape(part_shape))
    return arrays[0], arrays[1]
