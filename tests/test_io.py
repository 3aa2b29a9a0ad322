"""Tile reads: reflected context, validity from nodata, NaN and internal masks."""

import numpy as np
import pytest
import rasterio

from conftest import scene, write_raster
from pipeline.errors import InputError
from pipeline.io import Normaliser, inspect_raster, read_tile
from pipeline.windows import plan_tiles, tile_spec


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "float32"])
@pytest.mark.parametrize("shape", [(5, 7), (33, 20), (70, 90)])
def test_tile_reads_equal_crops_of_the_reflected_raster(tmp_path, dtype, shape):
    data = scene(*shape, bands=2, dtype=dtype)
    path = write_raster(tmp_path / "a.tif", data, tiled=shape[0] > 16)
    spec = tile_spec(16, 8, 8)
    with rasterio.open(path) as src:
        for tile in plan_tiles(shape[1], shape[0], spec):
            got, valid = read_tile(src, tile, [1, 2])
            assert got.shape == (2, spec.read_size, spec.read_size) and got.dtype == data.dtype
            assert valid.all()
            rows = np.arange(tile.read.row_off, tile.read.row_off + spec.read_size)
            cols = np.arange(tile.read.col_off, tile.read.col_off + spec.read_size)
            pad = 64
            ref = np.pad(data, ((0, 0), (pad, pad), (pad, pad)), mode="reflect") if min(shape) > 1 else None
            if ref is not None:
                np.testing.assert_array_equal(got, ref[:, rows[0] + pad : rows[-1] + pad + 1, cols[0] + pad : cols[-1] + pad + 1])


@pytest.mark.parametrize("shape", [(5, 7), (33, 20), (64, 96)])
def test_reflected_context_carries_its_validity(tmp_path, shape):
    data = scene(*shape, bands=2, dtype="int16")
    data[:, 0, :3] = data[:, -2:, -1] = data[:, 3, 0] = -1  # nodata on every edge
    path = write_raster(tmp_path / "n.tif", data, nodata=-1)
    spec = tile_spec(16, 8, 8)
    pad = 64
    with rasterio.open(path) as src:
        for tile in plan_tiles(shape[1], shape[0], spec):
            got, valid = read_tile(src, tile, [1, 2])
            rows = np.arange(tile.read.row_off, tile.read.row_off + spec.read_size) + pad
            cols = np.arange(tile.read.col_off, tile.read.col_off + spec.read_size) + pad
            if min(shape) > 1:
                want = np.pad(np.all(data != -1, axis=0), pad, mode="reflect")[np.ix_(rows, cols)]
                np.testing.assert_array_equal(valid, want)
                np.testing.assert_array_equal(got, np.pad(data, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")[:, rows][:, :, cols])


def test_validity_follows_nodata_nan_and_internal_masks(tmp_path):
    data = scene(24, 24, bands=2, dtype="float32")
    data[0, 2, 3] = -9999.0
    data[1, 5, 5] = np.nan
    mask = np.ones((24, 24), bool)
    mask[10:12, 10:12] = False
    path = write_raster(tmp_path / "m.tif", data, nodata=-9999.0, mask=None)
    masked = write_raster(tmp_path / "internal.tif", scene(24, 24, bands=2), mask=mask)
    spec = tile_spec(24, 0, 8)
    tile = plan_tiles(24, 24, spec)[0]
    with rasterio.open(path) as src:
        _, valid = read_tile(src, tile, [1, 2])
    assert not valid[2, 3] and not valid[5, 5] and valid.sum() == 24 * 24 - 2
    with rasterio.open(masked) as src:
        _, valid = read_tile(src, tile, [1, 2])
    np.testing.assert_array_equal(valid, mask)


def test_normaliser_maps_raw_values_and_zeroes_invalid_pixels():
    norm = Normaliser(scale=(2.0, 1.0), offset=(0.0, -1.0), mean=(4.0, 0.0), std=(2.0, 0.5))
    data = np.array([[[3.0, 5.0]], [[1.0, 2.0]]])
    valid = np.array([[True, False]])
    z = norm(data, valid)
    assert z.shape == (2, 1, 2) and z.dtype == np.float32  # bands stay first
    np.testing.assert_allclose(z[:, 0, 0], [(3 * 2 - 4) / 2, (1 - 1) / 0.5])
    np.testing.assert_array_equal(z[:, 0, 1], [0.0, 0.0])


@pytest.mark.parametrize("content, reason", [(b"", "empty"), (b"\x00garbage" * 50, "not a readable raster")])
def test_bad_files_are_named_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.tif"
    path.write_bytes(content)
    with pytest.raises(InputError, match=reason) as err:
        inspect_raster(path, [1])
    assert str(err.value).startswith("bad.tif:") and "\n" not in str(err.value)


def test_band_short_files_are_rejected(tmp_path):
    path = write_raster(tmp_path / "two.tif", scene(8, 8, bands=2))
    with pytest.raises(InputError, match="has 2 band"):
        inspect_raster(path, [1, 2, 3, 4])


def test_truncated_files_are_rejected(tmp_path):
    path = write_raster(tmp_path / "t.tif", scene(64, 64), tiled=True)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError):
        inspect_raster(path, [1, 2, 3, 4])


def test_normaliser_writes_into_a_given_slot():
    norm = Normaliser(scale=(1.0,), offset=(0.0,), mean=(1.0,), std=(2.0,))
    batch = np.full((2, 1, 2, 2), 7.0, np.float32)
    data = np.array([[[3, 5], [1, 1]]], np.uint16)
    valid = np.array([[True, True], [False, True]])
    got = norm(data, valid, out=batch[1])
    assert got.base is batch or got is batch[1] or np.shares_memory(got, batch)
    np.testing.assert_array_equal(batch[1, 0], [[1.0, 2.0], [0.0, 0.0]])
    np.testing.assert_array_equal(batch[0], 7.0)  # the other slot untouched


@pytest.mark.parametrize("tiled, striped", [(True, False), (False, True)])
def test_inspection_says_whether_reads_decode_whole_rows(tmp_path, tiled, striped):
    path = write_raster(tmp_path / "s.tif", scene(40, 48), tiled=tiled)
    info = inspect_raster(path, [1, 2])
    assert info.striped is striped and info.block_shape[1] == (16 if tiled else 48)
