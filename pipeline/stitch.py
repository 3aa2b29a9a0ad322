"""Placing tile predictions: keep each tile's core, clip it to the raster, apply nodata."""

from __future__ import annotations

import numpy as np

from pipeline.windows import Tile

NODATA = 255


def core_mask(valid_read: np.ndarray, tile: Tile) -> np.ndarray:
    """The validity of the core pixels, cut from the validity of the read window."""
    c = tile.core_in_read
    return valid_read[c.row_off : c.row_off + c.height, c.col_off : c.col_off + c.width]


def place(prediction: np.ndarray, valid_core: np.ndarray, tile: Tile, nodata: int = NODATA) -> np.ndarray:
    """The written part of a (tile x tile) core prediction: clipped to the raster, nodata
    where the input has none."""
    h, w = tile.core.height, tile.core.width
    return np.where(valid_core, prediction[:h, :w], np.uint8(nodata)).astype(np.uint8)
