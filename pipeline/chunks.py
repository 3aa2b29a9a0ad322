"""Decoded chunks of an input raster, kept for the next tiles that need them.

GDAL decodes whole blocks: every tile of a 256-tiled input touches 3 x 3 of them through its
halo, and every tile of a striped input touches whole strips as wide as the raster. Each batch
opens the input anew, so before this cache each batch decoded its blocks again: every block
of a tiled input about three times, every strip of a striped input once per batch along its
row of tiles. A worker's threads now share one :class:`ChunkCache`, least recently used out,
bounded in bytes (:meth:`ChunkGrid.budget`): a band of batches across the raster where that is
small (the next band reuses this one's halo rows), so each block is decoded about once, and
the chunks of the batches in flight where it is not. The runner has the workers forget an
input's chunks once its tiles are all read.

A chunk is a whole number of the raster's blocks, at least ``CHUNK`` pixels on a side
(strips are grouped into chunks of about ``CHUNK`` rows), so a tile is assembled from a few
array copies whatever the block layout.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from rasterio.enums import MaskFlags
from rasterio.windows import Window

from pipeline.errors import InputError, one_line
from pipeline.windows import Tile, source_window

if TYPE_CHECKING:
    from pipeline.halos import SharedChunks

CHUNK = 256
BAND_BUDGET = 36 * 2**20
"""Most bytes kept for a band of batches across a tiled raster: a band 4096 px wide of 4 uint16
bands, batches of 8 tiles of 256 (34 MB); wider rasters keep less, so that memory does not
grow with the scene."""
SLACK = 1.5
"""Room beyond a batch's own chunks for the batches in flight beside it."""
GDAL_CACHE_FLOOR = 2 * 2**20
"""Least block cache a reader gives GDAL (its default is 5% of the host's memory)."""


@dataclasses.dataclass(frozen=True)
class ChunkGrid:
    """Chunks of ``rows`` x ``cols`` pixels over a ``width`` x ``height`` raster; pure geometry."""

    width: int
    height: int
    rows: int
    cols: int

    @classmethod
    def of(cls, width: int, height: int, block_rows: int, block_cols: int, target: int = CHUNK) -> ChunkGrid:
        """Whole blocks, at least ``target`` pixels (or the raster's size) on each side."""
        rows = min(-(-target // block_rows) * block_rows, -(-height // block_rows) * block_rows)
        cols = min(-(-target // block_cols) * block_cols, -(-width // block_cols) * block_cols)
        return cls(width, height, rows, cols)

    def covering(self, window: Window) -> list[tuple[int, int]]:
        """Indices ``(i, j)`` of the chunks a window inside the raster touches, row by row."""
        rows, cols = self.span(window)
        return [(i, j) for i in range(rows.start, rows.stop) for j in range(cols.start, cols.stop)]

    def span(self, window: Window) -> tuple[slice, slice]:
        """The rows and columns of chunks a window inside the raster touches."""
        r0, c0 = int(window.row_off), int(window.col_off)
        r1, c1 = r0 + int(window.height), c0 + int(window.width)
        return slice(r0 // self.rows, (r1 - 1) // self.rows + 1), slice(c0 // self.cols, (c1 - 1) // self.cols + 1)

    @property
    def shape(self) -> tuple[int, int]:
        """Rows and columns of chunks over the whole raster."""
        return -(-self.height // self.rows), -(-self.width // self.cols)

    @property
    def count(self) -> int:
        """Chunks in the whole raster."""
        return math.prod(self.shape)

    def window(self, i: int, j: int) -> Window:
        """Chunk ``(i, j)``, clipped to the raster."""
        row, col = i * self.rows, j * self.cols
        return Window(col, row, min(self.cols, self.width - col), min(self.rows, self.height - row))

    def budget(self, area: Window, pixel_bytes: int) -> int:
        """Bytes of chunks worth keeping while batches like ``area`` (a batch's read windows,
        inside the raster) are read, top to bottom in bands across the raster.

        A band of such batches across the whole width lets the next band reuse this one's
        halo rows, up to :data:`BAND_BUDGET`; beyond that (wide tiled rasters), enough for the
        batches in flight along the band, which share the chunks of their common edges. A
        striped raster's chunks are as wide as the raster, so a batch's own chunks are already
        its whole band, whatever its width: there memory grows with the width (striped inputs
        are batched row by row: a row of tiles of 256 reads 384 rows, 2 or 3 chunks of 256
        rows, 0.2-0.3 GB 50,000 px wide with 4 uint16 bands, and half as much again of slack).
        """
        first, last = area.row_off // self.rows, (area.row_off + area.height - 1) // self.rows
        band = (last - first + 1) * self.rows * -(-self.width // self.cols) * self.cols
        own = len(self.covering(area)) * self.rows * self.cols
        return int(max(min(band * pixel_bytes, BAND_BUDGET), SLACK * own * pixel_bytes))

    def sweep(self, windows: Iterable[Window]) -> int:
        """The fewest chunks a least-recently-used cache must hold to decode each chunk once
        while ``windows`` (inside the raster) are read in order: the most distinct chunks read
        from one read of a chunk to its next (its LRU stack distance). A batch read alone needs
        the chunks of about two columns of its tiles, not all of its own."""
        return _stack_distance([key for window in windows for key in self.covering(window)])


@dataclasses.dataclass(frozen=True)
class ChunkUsers:
    """How many batches of a plan read each chunk of a grid of ``shape`` chunks (row by row,
    ``counts`` as int32 bytes: small to send with each batch, and hashable)."""

    shape: tuple[int, int]
    counts: bytes

    def array(self) -> np.ndarray:
        return np.frombuffer(self.counts, np.int32).reshape(self.shape)

    @property
    def shared(self) -> bool:
        """Whether any chunk is read by more than one batch."""
        return bool((self.array() > 1).any())


def chunk_users(grid: ChunkGrid, batches: Iterable[Sequence[Tile]]) -> ChunkUsers:
    """How many of ``batches`` read each chunk of ``grid``: a batch reads the chunks its
    tiles' source windows (:func:`pipeline.windows.source_window`) touch, each once."""
    counts = np.zeros(grid.shape, np.int32)
    for tiles in batches:
        touched = np.zeros(grid.shape, bool)
        for tile in tiles:
            touched[grid.span(source_window(tile.read, grid.width, grid.height))] = True
        counts += touched
    return ChunkUsers(grid.shape, counts.tobytes())


def _stack_distance(keys: Sequence[Hashable]) -> int:
    """The largest number of distinct keys read from one read of a key to its next, that key
    included (1 if no key is read twice), in O(n log n): a Fenwick tree over the read times
    marks each key's latest read, so the marks between two reads count the keys read since."""
    tree = [0] * (len(keys) + 1)

    def mark(time: int, value: int) -> None:
        time += 1
        while time <= len(keys):
            tree[time] += value
            time += time & -time

    def marks_before(time: int) -> int:
        total = 0
        while time > 0:
            total += tree[time]
            time -= time & -time
        return total

    latest: dict[Hashable, int] = {}
    most = 1
    for time, key in enumerate(keys):
        if key in latest:
            most = max(most, marks_before(time) - marks_before(latest[key]))
            mark(latest[key], -1)
        mark(time, 1)
        latest[key] = time
    return most


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One chunk's values (bands, rows, cols) and GDAL's masks of them (None: all valid)."""

    values: np.ndarray
    masks: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + (0 if self.masks is None else self.masks.nbytes)


class ChunkCache:
    """Chunks by key, least recently used out once their bytes pass ``budget``; thread-safe.

    A missing chunk is loaded outside the lock (GDAL releases the GIL while it decodes), once:
    a thread that needs a chunk another thread is loading waits for it instead of decoding it
    again (the threads of a worker start a band of batches together, and a strip of a striped
    input belongs to every batch of its band).
    """

    def __init__(self, budget: int = 0):
        self.budget = budget
        self.hits = self.misses = self.bytes = 0
        self._chunks: collections.OrderedDict[Hashable, Chunk] = collections.OrderedDict()
        self._loading: dict[Hashable, concurrent.futures.Future[Chunk]] = {}
        self._owner: Hashable = None
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], Chunk]) -> Chunk:
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is not None:
                self._chunks.move_to_end(key)
                self.hits += 1
                return chunk
            loading = self._loading.get(key)
            if loading is None:
                self.misses += 1
                self._loading[key] = concurrent.futures.Future()
            else:
                self.hits += 1
        if loading is not None:
            return loading.result()
        try:
            chunk = load()
        except BaseException as exc:
            with self._lock:
                self._loading.pop(key).set_exception(exc)
            raise
        with self._lock:
            self._chunks[key] = chunk
            self.bytes += chunk.nbytes
            self._evict()
            self._loading.pop(key).set_result(chunk)
        return chunk

    def resize(self, budget: int, owner: Hashable = None) -> None:
        """Keep at most ``budget`` bytes from now on (the least recently used go first); for the
        same ``owner`` as the last call, at least what it asked for then, since the batches it
        asked for may still be in flight on other threads."""
        with self._lock:
            self.budget = max(budget, self.budget) if owner is not None and owner == self._owner else budget
            self._owner = owner
            self._evict()

    def forget(self, owner: Hashable) -> None:
        """Drop the chunks whose key starts with ``owner`` (an input whose tiles are all read)."""
        with self._lock:
            for key in [k for k in self._chunks if isinstance(k, tuple) and k[:1] == (owner,)]:
                self.bytes -= self._chunks.pop(key).nbytes
            if owner == self._owner:
                self._owner = None

    def _evict(self) -> None:
        while self.bytes > self.budget and self._chunks:
            _, chunk = self._chunks.popitem(last=False)
            self.bytes -= chunk.nbytes


@dataclasses.dataclass(frozen=True)
class ChunkReader:
    """Windows of one open input, read through ``cache`` under ``key``; the chunk grid and
    whether GDAL's masks apply are worked out once per open, not per tile."""

    src: rasterio.DatasetReader
    bands: tuple[int, ...]
    cache: ChunkCache
    key: Hashable
    grid: ChunkGrid
    masked: bool
    dtype: np.dtype
    """The dtype the bands are read in: their common type (worked out once: it is asked per chunk)."""
    shared: SharedChunks | None = None
    """Where chunks that other batches read too are decoded once for all (:mod:`pipeline.halos`)."""

    @classmethod
    def of(cls, src: rasterio.DatasetReader, bands: Sequence[int], cache: ChunkCache | None = None,
           key: Hashable = None) -> ChunkReader:
        """A reader of ``bands``; without ``cache`` it keeps nothing."""
        bands = tuple(bands)
        block_rows, block_cols = src.block_shapes[bands[0] - 1]
        masked = not all(src.mask_flag_enums[b - 1] == [MaskFlags.all_valid] for b in bands)
        return cls(src, bands, ChunkCache() if cache is None else cache, key,
                   ChunkGrid.of(src.width, src.height, block_rows, block_cols), masked,
                   np.result_type(*(src.dtypes[b - 1] for b in bands)))

    @property
    def gdal_cache_bytes(self) -> int:
        """Enough of GDAL's block cache for one chunk's blocks twice over (its masks are derived
        from the blocks its values were just read from): all a reader needs, since every block
        is read through a chunk, which :class:`ChunkCache` keeps."""
        return max(2 * self.grid.rows * self.grid.cols * self.value_bytes, GDAL_CACHE_FLOOR)

    @property
    def value_bytes(self) -> int:
        """Bytes of a pixel's values in the bands read."""
        return sum(np.dtype(self.src.dtypes[b - 1]).itemsize for b in self.bands)

    @property
    def pixel_bytes(self) -> int:
        """Bytes a cached pixel takes: the bands' values, and their masks where GDAL has any."""
        return self.value_bytes + (len(self.bands) if self.masked else 0)

    def read(self, window: Window, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The bands of ``window`` (inside the raster), assembled from chunks into ``out``
        (cast to its dtype) or a new array, and GDAL's per-band masks of it (None when no band
        has nodata, an internal mask or alpha)."""
        r0, c0 = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        data = np.empty((len(self.bands), h, w), self.dtype) if out is None else out
        valid = np.empty((len(self.bands), h, w), np.uint8) if self.masked else None
        for i, j in self.grid.covering(window):
            area = self.grid.window(i, j)
            chunk = self.cache.get((self.key, self.bands, i, j), lambda i=i, j=j, area=area: self._fetch(i, j, area))
            top, bottom = max(r0, area.row_off), min(r0 + h, area.row_off + area.height)
            left, right = max(c0, area.col_off), min(c0 + w, area.col_off + area.width)
            at = np.s_[:, top - r0 : bottom - r0, left - c0 : right - c0]
            part = np.s_[:, top - area.row_off : bottom - area.row_off, left - area.col_off : right - area.col_off]
            data[at] = chunk.values[part]
            if valid is not None:
                valid[at] = chunk.masks[part]
        return data, valid

    @property
    def slot_bytes(self) -> int:
        """The most bytes a chunk takes: a full chunk of every band, and its masks."""
        return self.grid.rows * self.grid.cols * len(self.bands) * (self.dtype.itemsize + self.masked)

    def _fetch(self, i: int, j: int, area: Window) -> Chunk:
        if self.shared is None:
            return self._load(area)
        return self.shared.get(i, j, self.slot_bytes, lambda: self._load(area), lambda: self._empty(area))

    def _empty(self, area: Window) -> Chunk:
        shape = (len(self.bands), int(area.height), int(area.width))
        return Chunk(np.empty(shape, self.dtype), np.empty(shape, np.uint8) if self.masked else None)

    def _load(self, area: Window) -> Chunk:
        bands = list(self.bands)
        try:
            return Chunk(self.src.read(bands, window=area).astype(self.dtype, copy=False),
                         self.src.read_masks(bands, window=area) if self.masked else None)
        except rasterio.errors.RasterioError as exc:
            reason = one_line(exc)
        # Raised in one line, GDAL's reason in it, and outside the handler: with GDAL's errors as
        # its context, neither a reader process nor Dask brings it back whole (Dask's copy of the
        # chain fails to unpickle, and the driver got "Exception: InputError(...)").
        rows, cols = area.toranges()
        raise InputError(f"its blocks at rows {rows[0]}-{rows[1] - 1}, columns {cols[0]}-{cols[1] - 1} "
                         f"cannot be read ({reason})")
