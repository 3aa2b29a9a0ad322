"""What identifies an input's content: a BLAKE3 checksum, written ``blake3:<hex>``.

A run checksums each new or changed input on one thread beside the inference, so no run of
such files outpaces the checksum: SHA-256 (1.4 GB/s here, 0.36 without SHA extensions) fell
below one H200's rate; BLAKE3 is as strong and 2.6-10 times faster (README, Running every night).
Checksums carry their algorithm, so a ledger's earlier ``sha256:`` ones compare, as unequal.
"""

from __future__ import annotations

import os

import blake3
import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipeline.errors import InputError
from pipeline.io import InputPath

ALGORITHM = "blake3"
READ_BYTES = 1 << 20
"""Read size: the file is read into one buffer, never mapped (a file truncated while mapped
kills the process with SIGBUS; a read only fails)."""
STRIP_BYTES = 8 << 20
"""About how much of a GDAL-only raster is read at once: a strip of whole rows."""


def file_checksum(path: str | os.PathLike[str]) -> str:
    """The checksum of a file's bytes; OSError if it cannot be read."""
    digest = blake3.blake3()
    buffer = bytearray(READ_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return f"{ALGORITHM}:{digest.hexdigest()}"


def raster_checksum(path: InputPath) -> str:
    """The checksum of a raster's georeferencing and every band's pixels and masks: the content
    checksum of an input that only GDAL can read (no bytes through the OS), the same however
    the raster is stored. :class:`InputError` (one line, naming the file) if it cannot be read.

    Read in strips of whole rows, whole blocks high and about :data:`STRIP_BYTES` of values, and
    hashed row by row (each row's bands, then their masks), so that neither the block layout nor
    the strip height changes the bytes hashed."""
    digest = blake3.blake3()
    try:
        with rasterio.open(path) as src:
            digest.update(repr((src.width, src.height, src.count, src.dtypes, src.nodatavals,
                                src.crs and src.crs.to_wkt(), tuple(src.transform))).encode())
            block_rows = src.block_shapes[0][0]
            row_bytes = src.width * sum(np.dtype(d).itemsize for d in src.dtypes)
            rows = block_rows * max(1, STRIP_BYTES // (row_bytes * block_rows))
            for row in range(0, src.height, rows):
                window = Window(0, row, src.width, min(rows, src.height - row))
                values, masks = src.read(window=window), src.read_masks(window=window)
                by_row = [np.ascontiguousarray(a.transpose(1, 0, 2)).reshape(window.height, -1).view(np.uint8)
                          for a in (values, masks)]
                digest.update(np.concatenate(by_row, axis=1))
    except (RasterioError, OSError) as exc:
        raise InputError(f"{path.name}: not a readable raster ({str(exc).splitlines()[0] if str(exc) else exc})") from exc
    return f"{ALGORITHM}:{digest.hexdigest()}"
