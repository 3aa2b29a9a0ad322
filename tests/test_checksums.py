"""Input checksums: of a file's bytes, or of a raster's content where only GDAL reads it."""

from __future__ import annotations

import os

import blake3
import numpy as np
import pytest
import rasterio
from conftest import scene, write_raster

import pipeline.checksums
from pipeline.checksums import READ_BYTES, file_checksum, raster_checksum
from pipeline.errors import InputError
from pipeline.io import GdalPath


@pytest.mark.parametrize("size", [0, 1, READ_BYTES - 1, READ_BYTES, READ_BYTES + 1, 3 * READ_BYTES + 7])
def test_a_file_checksum_is_blake3_of_its_bytes_read_in_any_number_of_pieces(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert file_checksum(path) == "blake3:" + blake3.blake3(data).hexdigest()


def test_an_unreadable_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        file_checksum(tmp_path / "missing.tif")


def _copy(src_path, dst_path, **changes):
    """``src_path`` rewritten with the same pixels, its profile changed by ``changes``."""
    with rasterio.open(src_path) as src:
        profile, data = src.profile, src.read()
    profile.update(changes)
    with rasterio.open(dst_path, "w", **profile) as dst:
        dst.write(data)
    return dst_path


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_a_raster_checksum_is_of_its_content_not_its_encoding(tmp_path, dtype):
    """The same pixels and georeferencing stored two ways have one checksum; a pixel, the
    transform or the nodata value changed gives another."""
    original = write_raster(tmp_path / "a.tif", scene(40, 50, 3, dtype))
    checksum = raster_checksum(GdalPath(original))
    assert checksum.startswith("blake3:") and len(checksum) == len("blake3:") + 64
    recoded = _copy(original, tmp_path / "b.tif", compress="lzw", blockxsize=32, blockysize=32)
    assert file_checksum(recoded) != file_checksum(original)
    assert raster_checksum(GdalPath(recoded)) == checksum

    with rasterio.open(original) as src:
        shifted = _copy(original, tmp_path / "c.tif", transform=src.transform @ rasterio.Affine.translation(1, 0))
    other_nodata = _copy(original, tmp_path / "d.tif", nodata=0)
    one_pixel = _copy(original, tmp_path / "e.tif")
    with rasterio.open(one_pixel, "r+") as dst:
        band = dst.read(2)
        band[17, 23] += 1
        dst.write(band, 2)
    changed = {raster_checksum(GdalPath(p)) for p in (shifted, other_nodata, one_pixel)}
    assert len(changed) == 3 and checksum not in changed


@pytest.mark.parametrize("tiled", [True, False], ids=["tiled", "striped"])
def test_a_raster_checksum_is_the_same_read_in_any_strips(tmp_path, monkeypatch, tiled):
    path = GdalPath(write_raster(tmp_path / "a.tif", scene(70, 30, 2), tiled=tiled))
    whole = raster_checksum(path)  # one strip
    monkeypatch.setattr(pipeline.checksums, "STRIP_BYTES", 1)  # a block (16 rows) or a row at a time
    assert raster_checksum(path) == whole


def test_a_raster_checksum_counts_the_mask(tmp_path):
    data = scene(32, 32, 2)
    plain = raster_checksum(GdalPath(write_raster(tmp_path / "a.tif", data)))
    mask = np.ones((32, 32), bool)
    mask[3, 4] = False
    assert raster_checksum(GdalPath(write_raster(tmp_path / "b.tif", data, mask=mask))) != plain


def test_an_unreadable_raster_is_named_in_one_line(tmp_path):
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff")
    with pytest.raises(InputError, match=r"^broken\.tif: not a readable raster \(") as err:
        raster_checksum(GdalPath(broken))
    assert "\n" not in str(err.value)
