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
        core_out, prediction = out[..., rows : rows + h, cols : cols + w], predictions[i][..., :h, :w]
        if masks[i].all():  # most tiles: a copy, where np.where would take three times as long
            core_out[...] = prediction
        else:
            core_out[...] = np.where(masks[i], prediction, np.uint8(nodata))
    return out


def code_pixels(class_pixels: np.ndarray, codes: np.ndarray, written: int, nodata: int = NODATA) -> np.ndarray:
    """How many of ``written`` pixels hold each code 0-255: ``class_pixels[k]`` (the device's
    count, :func:`pipeline.infer.class_pixels`) hold ``codes[k]``, and the rest ``nodata``.

    The device counts: on the host, going over every written pixel again took more of a worker
    thread's time than the rest of a batch's handling (7 of 12.5 ms of CPU for 64 tiles of 256)."""
    pixels = np.zeros(256, np.int64)
    np.add.at(pixels, codes, class_pixels)
    pixels[nodata] += written - int(class_pixels.sum())
    return pixels
