"""Tile reads: reflected context, validity from nodata, NaN and internal masks."""

import numpy as np
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import scene, write_raster
from pipeline.errors import InputError
from pipeline.io import inspect_raster, read_tile, reflect_in_place, wire_dtype
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


@pytest.mark.parametrize("dtypes, wire", [(["uint16"] * 4, "uint16"), (["uint8", "uint8"], "uint8"),
                                         (["int16"], "int16"), (["uint8", "uint16"], "uint16"),
                                         (["int16", "uint16"], "float32"), (["uint32"], "float32"),
                                         (["float32"], "float32"), (["float64"], "float32")])
def test_batches_travel_in_the_inputs_own_integers_up_to_16_bits_else_float32(dtypes, wire):
    assert wire_dtype(dtypes) == np.dtype(wire)


@given(st.integers(2, 12), st.integers(2, 12), st.data())
@settings(max_examples=200, deadline=None)
def test_reflecting_in_place_is_numpys_reflect_padding(rows, cols, data):
    pads = tuple((data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))) for n in (rows, cols))
    inner = np.arange(2 * rows * cols, dtype=np.int32).reshape(2, rows, cols)
    (top, bottom), (left, right) = pads
    out = np.full((2, top + rows + bottom, left + cols + right), -1, np.int32)
    out[:, top : top + rows, left : left + cols] = inner
    reflect_in_place(out, pads)
    np.testing.assert_array_equal(out, np.pad(inner, ((0, 0), *pads), mode="reflect"))


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


@pytest.mark.parametrize("shape", [(5, 7), (33, 20), (70, 90)])  # gathered, padded and inside tiles
@pytest.mark.parametrize("dtype, into", [("uint16", "uint16"), ("int32", "float32"), ("float32", "float32")])
def test_a_tile_is_read_into_a_given_slot_in_its_dtype(tmp_path, shape, dtype, into):
    data = scene(*shape, bands=2, dtype=dtype)
    path = write_raster(tmp_path / "a.tif", data, nodata=data[0, 0, 0], tiled=shape[0] > 16)
    spec = tile_spec(16, 8, 8)
    batch = np.full((2, 2, spec.read_size, spec.read_size), 7, into)
    invalid = 0
    with rasterio.open(path) as src:
        for tile in plan_tiles(shape[1], shape[0], spec):
            want, want_valid = read_tile(src, tile, [1, 2])
            got, valid = read_tile(src, tile, [1, 2], out=batch[1])
            assert np.shares_memory(got, batch[1])
            np.testing.assert_array_equal(batch[1], want.astype(into))
            np.testing.assert_array_equal(valid, want_valid)
            np.testing.assert_array_equal(batch[0], 7)  # the other slot untouched
            invalid += (~valid).sum()
    assert invalid  # the nodata pixel, and its reflections


@pytest.mark.parametrize("tiled, striped", [(True, False), (False, True)])
def test_inspection_says_whether_reads_decode_whole_rows(tmp_path, tiled, striped):
    path = write_raster(tmp_path / "s.tif", scene(40, 48), tiled=tiled)
    info = inspect_raster(path, [1, 2])
    assert info.striped is striped and info.block_shape[1] == (16 if tiled else 48)
