"""Placing tile predictions: keep each tile's core, clip it to the raster, apply nodata, and
join a batch's cores into the rectangles it is written as."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from rasterio.windows import Window

from pipeline.windows import Tile

NODATA = 255


def core_mask(valid_read: np.ndarray, tile: Tile) -> np.ndarray:
    """The validity of the core pixels, cut from the validity of the read window."""
    c = tile.core_in_read
    return valid_read[c.row_off : c.row_off + c.height, c.col_off : c.col_off + c.width]


def place(block: Window, tiles: Sequence[Tile], members: Sequence[int], predictions: np.ndarray,
          masks: Sequence[np.ndarray], nodata: int = NODATA) -> np.ndarray:
    """The written part of ``block`` (a rectangle of :func:`~pipeline.windows.core_blocks`):
    each member tile's core prediction (``predictions[i]``: (..., tile, tile)) clipped to the
    raster and put at its place, nodata where the input has none."""
    out = np.empty((*predictions.shape[1:-2], block.height, block.width), np.uint8)
    for i in members:
        core = tiles[i].core
        h, w = core.height, core.width
        rows, cols = core.row_off - block.row_off, core.col_off - block.col_off
        core_out, prediction = out[..., rows : rows + h, cols : cols + w], predictions[i][..., :h, :w]
        if masks[i].all():  # most tiles: a copy, where np.where would take three times as long
            core_out[...] = prediction
        else:
            core_out[...] = np.where(masks[i], prediction, np.uint8(nodata))
    return out


COUNT_PIECE = 1 << 18
"""Pairs of codes :func:`class_counts` widens at a time, into a buffer of its thread's."""

_scratch = threading.local()


def class_counts(codes: np.ndarray, piece: int = COUNT_PIECE) -> np.ndarray:
    """How many of ``codes`` (uint8) hold each value 0-255.

    ``np.bincount`` widens every value to an index first: counting adjacent pairs of codes as
    uint16 halves that work, and widening ``piece`` pairs at a time into a buffer that the
    thread keeps spares the memory a whole batch's indices took. That memory, new for every
    batch (a batch of 64 tiles of 256: 17 MB) and zeroed by the kernel on first touch, was a
    third of the CPU of a run's process with 16 Dask threads (host emulation: 244 of 750 samples).
    """
    flat = np.ascontiguousarray(codes).reshape(-1)
    pairs = flat[: flat.size // 2 * 2].view(np.uint16)
    indices = getattr(_scratch, "indices", None)
    if indices is None or indices.size != piece:
        indices = _scratch.indices = np.empty(piece, np.intp)
    totals = np.zeros(1 << 16, np.int64)
    for start in range(0, pairs.size, piece):
        part = pairs[start : start + piece]
        np.copyto(indices[: part.size], part)
        totals += np.bincount(indices[: part.size], minlength=1 << 16)
    totals = totals.reshape(256, 256)
    counts = totals.sum(axis=0) + totals.sum(axis=1)
    if flat.size % 2:
        counts[flat[-1]] += 1
    return counts
