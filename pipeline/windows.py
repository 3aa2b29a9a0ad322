"""The tile plan: pure geometry over integers, no raster opened here.

A raster of ``width`` x ``height`` is cut into core tiles of ``tile`` pixels on a grid whose
origin is the raster's upper-left corner. Each tile is read with ``halo`` pixels of context
on every side, so every read window has the same shape (``tile + 2 * halo``) and one
compiled function serves the whole run. Context beyond the raster's edge comes from
reflecting the raster about its edge (numpy's ``reflect`` mode), the same for every tile.
With ``tile`` and ``halo`` multiples of the U-Net's down-sampling factor, every read window
starts on the same pooling grid, so a pixel's class does not depend on which tile holds it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
from rasterio.windows import Window


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """Tile size and halo, checked against the model's down-sampling factor."""

    tile: int
    halo: int

    @property
    def read_size(self) -> int:
        """Side of every read window and of the model's input."""
        return self.tile + 2 * self.halo

    @property
    def core(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Where the written core sits in the model's input: rows, then columns, ``[start, stop)``
        (:data:`unet_flax.model.Region`)."""
        span = (self.halo, self.halo + self.tile)
        return span, span


def tile_spec(tile: int, halo: int, factor: int) -> TileSpec:
    """Validate ``tile``/``halo`` once; both must be multiples of ``factor``."""
    if tile <= 0 or halo < 0:
        raise ValueError(f"tile must be positive and halo non-negative, got tile={tile}, halo={halo}")
    for name, value in (("tile", tile), ("halo", halo)):
        if value % factor:
            raise ValueError(
                f"tiling.{name}={value} must be a multiple of the model's down-sampling factor {factor} "
                f"(try {max(factor, round(value / factor) * factor)})"
            )
    return TileSpec(tile, halo)


def seamless_halo(radius: int, factor: int) -> int:
    """The least halo that is a multiple of ``factor`` and covers a receptive ``radius``: with
    it, tiles predict what the whole image would."""
    return -(-radius // factor) * factor


@dataclasses.dataclass(frozen=True)
class Tile:
    """One tile: ``core`` is the part written (clipped to the raster), ``read`` is the
    full halo-expanded window fed to the model (it may extend beyond the raster)."""

    core: Window
    read: Window

    @property
    def core_in_read(self) -> Window:
        """Where the core sits inside the read window's array."""
        return Window(self.core.col_off - self.read.col_off, self.core.row_off - self.read.row_off,
                      self.core.width, self.core.height)


def plan_tiles(width: int, height: int, spec: TileSpec, band_rows: int = 1) -> list[Tile]:
    """Tiles covering a ``width`` x ``height`` raster, in bands of ``band_rows`` tile rows
    taken column by column (``band_rows=1``: row by row)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"raster size must be positive, got {width}x{height}")
    if band_rows < 1:
        raise ValueError(f"band_rows must be positive, got {band_rows}")
    return list(_iter_tiles(width, height, spec, band_rows))


def _iter_tiles(width: int, height: int, spec: TileSpec, band_rows: int) -> Iterator[Tile]:
    t, h = spec.tile, spec.halo
    for top in range(0, height, t * band_rows):
        for col in range(0, width, t):
            for row in range(top, min(top + t * band_rows, height), t):
                core = Window(col, row, min(t, width - col), min(t, height - row))
                read = Window(col - h, row - h, spec.read_size, spec.read_size)
                yield Tile(core, read)


def batch_band_rows(batch: int) -> int:
    """Tile rows per band for batches of ``batch`` consecutive tiles: the divisor of ``batch``
    nearest below its square root, so a batch is as square a block of tiles as it can be.

    Neighbouring read windows share their halo, and a block's windows share more of it than
    a row's: each of a batch's reads decodes fewer of the input's blocks (8 tiles as 2 x 4
    instead of 1 x 8; 64 as 8 x 8).
    """
    return max(d for d in range(1, math.isqrt(max(batch, 1)) + 1) if batch % d == 0)


def tile_batches(width: int, height: int, spec: TileSpec, batch: int, striped: bool = False) -> list[list[Tile]]:
    """The tile plan cut into batches of ``batch`` tiles (the last may be short), each a
    compact block of the grid where the raster allows; row by row for a ``striped`` raster,
    whose every read decodes whole rows anyway, so that a batch spans as few of them as it can."""
    return batches(plan_tiles(width, height, spec, 1 if striped else batch_band_rows(batch)), batch)


def core_blocks(tiles: Sequence[Tile]) -> list[tuple[Window, tuple[int, ...]]]:
    """The cores of ``tiles`` joined into as few rectangles as rows of the grid allow, each
    with the indices of the tiles that exactly cover it: a batch is written a rectangle at a
    time rather than a tile at a time (one block of 64 tiles is one write, not 64)."""
    strips: dict[tuple[int, int], list[list[int]]] = {}  # a tile row's runs of adjacent cores
    for i in sorted(range(len(tiles)), key=lambda i: (tiles[i].core.row_off, tiles[i].core.col_off)):
        core = tiles[i].core
        runs = strips.setdefault((core.row_off, core.height), [])
        last = tiles[runs[-1][-1]].core if runs else None
        if last is not None and last.col_off + last.width == core.col_off:
            runs[-1].append(i)
        else:
            runs.append([i])
    blocks: list[tuple[Window, list[int]]] = []
    open_below: dict[tuple[int, int, int], int] = {}  # (col, width, bottom row) -> a block a run may extend
    for (row, height), runs in sorted(strips.items()):
        for run in runs:
            col, width = tiles[run[0]].core.col_off, sum(tiles[i].core.width for i in run)
            k = open_below.pop((col, width, row), None)
            if k is None:
                k = len(blocks)
                blocks.append((Window(col, row, width, height), run))
            else:
                above, members = blocks[k]
                blocks[k] = (Window(col, above.row_off, width, above.height + height), members + run)
            open_below[(col, width, row + height)] = k
    return [(window, tuple(members)) for window, members in blocks]


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Source indices for positions ``start..stop-1`` of an axis of ``size`` pixels,
    reflected about the edges without repeating the edge pixel (numpy ``reflect``)."""
    positions = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(positions)
    period = 2 * (size - 1)
    folded = np.mod(positions, period)
    return np.where(folded < size, folded, period - folded)


def source_span(indices: np.ndarray) -> tuple[int, int]:
    """The smallest ``[lo, hi)`` range of source pixels that holds ``indices``."""
    return int(indices.min()), int(indices.max()) + 1


def source_window(read: Window, width: int, height: int) -> Window:
    """The smallest window of a ``width`` x ``height`` raster holding every pixel that
    ``read`` reflects onto: what is read from the raster for it."""
    if read.row_off >= 0 and read.col_off >= 0 and read.row_off + read.height <= height \
            and read.col_off + read.width <= width:
        return read  # inside: nothing is reflected
    r0, r1 = source_span(reflect_indices(read.row_off, read.row_off + read.height, height))
    c0, c1 = source_span(reflect_indices(read.col_off, read.col_off + read.width, width))
    return Window(c0, r0, c1 - c0, r1 - r0)


def reflect_pads(read: Window, source: Window) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """How far ``read`` reaches past its ``source`` window (:func:`source_window`) on each
    side, ``((top, bottom), (left, right))``, where numpy's reflect padding of the source gives
    the read: the source lies inside the read and every pad is within one reflection. None
    otherwise (a read that reflects back past its own start, or a raster narrower than the halo)."""
    top, left = source.row_off - read.row_off, source.col_off - read.col_off
    bottom = read.row_off + read.height - source.row_off - source.height
    right = read.col_off + read.width - source.col_off - source.width
    if min(top, bottom, left, right) < 0 or max(top, bottom) >= source.height or max(left, right) >= source.width:
        return None
    return (top, bottom), (left, right)


def batches(items: list, size: int) -> list[list]:
    """Consecutive groups of at most ``size`` items."""
    return [items[i : i + size] for i in range(0, len(items), size)]


MOST_PARTS = 8
"""Most parts a batch's read is split into, for as many reader processes at once."""

PART_TILES = 4
"""Fewest tiles in a part: each is a task of its own, and the chunks along its edges are read
from the store of shared chunks rather than from its reader's own."""


def part_slices(count: int, parts: int = MOST_PARTS) -> list[slice]:
    """A batch of ``count`` tiles cut into consecutive parts of nearly equal size that reader
    processes read side by side: ``parts``, at most :data:`MOST_PARTS`, none under
    :data:`PART_TILES` tiles unless the batch is. A batch of 64 tiles, 8 x 8 taken column by
    column (:func:`tile_batches`), is read a column of 8 tiles per part in 8 parts."""
    parts = max(1, min(parts, MOST_PARTS, count // PART_TILES))
    bounds = [count * k // parts for k in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def read_parts(groups: Sequence[Sequence[Tile]], parts: int = MOST_PARTS) -> list[Sequence[Tile]]:
    """Every batch of ``groups`` cut into (at most) ``parts`` (:func:`part_slices`): the reads
    reader processes make, in order."""
    return [group[part] for group in groups for part in part_slices(len(group), parts)]


def parts_per_batch(readers: int, threads: int) -> int:
    """Parts each batch's read is cut into where a worker's ``threads`` each wait for their own
    batch: enough for them to keep its ``readers`` busy, and no more, since each part costs its
    reader more (the chunks it shares with the next part go through the store)."""
    return max(1, min(MOST_PARTS, readers // max(threads, 1)))
