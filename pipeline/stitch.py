"""Placing tile predictions: keep each tile's core, clip it to the raster, apply nodata, and
join a batch's cores into the rectangles it is written as."""

from __future__ import annotations

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
        out[..., rows : rows + h, cols : cols + w] = np.where(masks[i], predictions[i][..., :h, :w], np.uint8(nodata))
    return out
