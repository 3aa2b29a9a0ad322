"""Raster reads: what an input holds, and one tile's pixels with their validity mask."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipeline.chunks import ChunkReader
from pipeline.errors import InputError
from pipeline.windows import Tile, reflect_indices, reflect_pads, source_window

GDAL_PATH = re.compile(r"^(/vsi[a-z0-9_]+/|[a-z][a-z0-9+.-]*://)")


def is_gdal_path(text: str) -> bool:
    """Whether ``text`` is a path only GDAL can open (``/vsizip/...``, ``/vsis3/...``, ``s3://...``)."""
    return bool(GDAL_PATH.match(text))


class GdalPath(str):
    """A GDAL virtual path: opened by rasterio, never by the OS; ``name``/``stem`` as on a Path."""

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        name = self.name
        return name.rsplit(".", 1)[0] if "." in name[1:] else name

    def child(self, name: str) -> GdalPath:
        return GdalPath(f"{self.rstrip('/')}/{name}")


InputPath = Path | GdalPath


@dataclasses.dataclass(frozen=True)
class RasterInfo:
    """The georeferencing and layout of one input, read once by the driver."""

    path: InputPath
    width: int
    height: int
    count: int
    dtypes: tuple[str, ...]
    crs: CRS | None
    transform: rasterio.Affine
    block_shape: tuple[int, int]
    """Rows and columns of the first band's blocks (its strips, in a striped file)."""

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def striped(self) -> bool:
        """Whether a block spans the raster's width, so any read decodes whole rows of it."""
        return self.block_shape[1] >= self.width


def inspect_raster(path: InputPath, bands: list[int]) -> RasterInfo:
    """Open ``path`` and check it can feed ``bands``; :class:`InputError` says why not."""
    if isinstance(path, Path) and not path.is_file():
        raise InputError(f"{path.name}: not a file")
    if isinstance(path, Path) and path.stat().st_size == 0:
        raise InputError(f"{path.name}: empty file (0 bytes)")
    try:
        with rasterio.open(path) as src:
            info = RasterInfo(path, src.width, src.height, src.count, tuple(src.dtypes), src.crs, src.transform,
                              tuple(src.block_shapes[bands[0] - 1]))
            if max(bands) > src.count:
                raise InputError(f"{path.name}: has {src.count} band(s), the workflow reads band {max(bands)}")
            # Reading the last pixel catches most truncated files before any tile is scheduled.
            src.read(bands, window=Window(src.width - 1, src.height - 1, 1, 1))
    except InputError:
        raise
    except (RasterioError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise InputError(f"{path.name}: not a readable raster ({reason})") from exc
    return info


@dataclasses.dataclass(frozen=True)
class Normaliser:
    """``(raw * scale + offset - mean) / std`` per band; invalid pixels become 0 (the mean).

    Applied on the device, in the compiled forward pass (:class:`pipeline.infer.Predictor`):
    batches travel as the input's own values, so the host does no arithmetic on them.
    """

    scale: tuple[float, ...]
    offset: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @functools.cached_property
    def gain_bias(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-band ``scale / std`` and ``(offset - mean) / std`` (float32): the normalised value
        is ``raw * gain + bias``."""
        scale, offset, mean, std = (np.asarray(v, np.float32) for v in (self.scale, self.offset, self.mean, self.std))
        return scale / std, (offset - mean) / std


def wire_dtype(dtypes: Sequence[str]) -> np.dtype:
    """The dtype a batch of bands of ``dtypes`` is read into and sent to the device in: their
    common integer type where it has at most 16 bits (their values exactly, in no more bytes
    than bfloat16), float32 otherwise (the device normalises in float32 anyway)."""
    common = np.result_type(*dtypes)
    if np.issubdtype(common, np.integer) and common.itemsize <= 2:
        return common
    return np.dtype(np.float32)


def pack_valid(valid: np.ndarray) -> np.ndarray:
    """Validity (..., S) as bits, 8 pixels a byte along the last axis (``np.packbits``): how a
    batch's validity travels, an eighth of the bytes of a bool per pixel."""
    return np.packbits(valid, axis=-1)


def packed_shape(tiles: int, size: int) -> tuple[int, int, int]:
    """The shape of :func:`pack_valid` of ``tiles`` tiles of ``size`` x ``size`` pixels."""
    return tiles, size, -(-size // 8)


def read_tile(src: rasterio.DatasetReader, tile: Tile, bands: list[int], reader: ChunkReader | None = None,
              out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels (bands, S, S) of ``tile.read`` and where they are valid (S, S); the pixels
    written into ``out`` (cast to its dtype) where given, with no copy beside it.

    Context beyond the raster is reflected; a pixel is valid when every band's dataset
    mask (nodata value, internal mask or alpha) says so and its value is finite. The pixels
    come through ``reader`` (``src``'s decoded chunks, shared with the tiles around this
    one); without it nothing is kept.
    """
    read, source = tile.read, source_window(tile.read, src.width, src.height)
    reader = ChunkReader.of(src, bands) if reader is None else reader
    inside = (source.height, source.width) == (read.height, read.width)
    pads = ((0, 0), (0, 0)) if inside else reflect_pads(read, source)
    if pads is None:  # reflected back past its own start: gathered by reflected indices
        data, masks = reader.read(source)
        valid = _validity(data, masks)
        rows = reflect_indices(read.row_off, read.row_off + read.height, src.height) - source.row_off
        cols = reflect_indices(read.col_off, read.col_off + read.width, src.width) - source.col_off
        data, valid = data.take(rows, axis=1).take(cols, axis=2), valid.take(rows, axis=0).take(cols, axis=1)
        if out is None:
            return data, valid
        np.copyto(out, data, casting="unsafe")
        return out, valid
    (top, bottom), (left, right) = pads
    if out is None:
        out = np.empty((len(bands), read.height, read.width), reader.dtype)
    region = out[:, top : out.shape[1] - bottom, left : out.shape[2] - right]
    _, masks = reader.read(source, out=region)
    valid = _validity(region, masks)
    if inside:
        return out, valid
    reflect_in_place(out, pads)  # numpy's reflect padding, without a padded copy
    return out, np.pad(valid, pads, mode="reflect")


def _validity(data: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
    """Where every band's mask is set and, for floats, every band's value is finite."""
    valid = np.ones(data.shape[1:], bool) if masks is None else np.all(masks > 0, axis=0)
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.all(np.isfinite(data), axis=0)
    return valid


def reflect_in_place(data: np.ndarray, pads: tuple[tuple[int, int], tuple[int, int]]) -> None:
    """Fill the margins ``pads`` (rows, then columns) of ``data`` (bands, rows, cols) by
    reflecting what they enclose, as ``np.pad(inner, ((0, 0), *pads), mode="reflect")`` would;
    each pad must be shorter than what it reflects."""
    for axis, (before, after) in ((1, pads[0]), (2, pads[1])):
        moved = np.moveaxis(data, axis, 0)
        size = moved.shape[0]
        if before:
            moved[:before] = moved[2 * before : before : -1]
        if after:
            end = size - after
            moved[end:] = np.flip(moved[end - 1 - after : end - 1], axis=0)


def open_input(path: str | os.PathLike[str], what: str = "raster") -> rasterio.DatasetReader:
    """Open an input raster for reading, turning rasterio's errors into :class:`InputError`."""
    try:
        return rasterio.open(path)
    except (RasterioError, OSError) as exc:
        raise InputError(f"{path}: cannot open {what} ({str(exc).splitlines()[0]})") from exc
