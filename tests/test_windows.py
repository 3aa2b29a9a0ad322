"""The tile plan covers every pixel once, with one read shape, on the pooling grid."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from pipeline.windows import (
    batch_band_rows,
    batches,
    core_blocks,
    MOST_PARTS,
    PART_TILES,
    parts_per_batch,
    plan_tiles,
    part_slices,
    reflect_indices,
    reflect_pads,
    seamless_halo,
    source_span,
    source_window,
    tile_batches,
    tile_spec,
)

sizes = st.integers(min_value=1, max_value=300)
specs = st.tuples(st.sampled_from([1, 2, 4, 8]), st.integers(1, 12), st.integers(0, 6)).map(
    lambda t: tile_spec(t[0] * t[1] * 4, t[0] * t[2], t[0]))


@given(radius=st.integers(0, 500), factor=st.sampled_from([1, 2, 4, 8, 16, 32]))
def test_the_seamless_halo_is_the_least_multiple_of_the_factor_that_covers_the_radius(radius, factor):
    halo = seamless_halo(radius, factor)
    assert halo % factor == 0 and radius <= halo < radius + factor
    tile_spec(factor, halo, factor)  # a valid halo for the model


@given(width=sizes, height=sizes, spec=specs, band_rows=st.integers(1, 5))
def test_cores_tile_the_raster_exactly_once(width, height, spec, band_rows):
    cover = np.zeros((height, width), np.int32)
    for tile in plan_tiles(width, height, spec, band_rows):
        c = tile.core
        cover[c.row_off : c.row_off + c.height, c.col_off : c.col_off + c.width] += 1
    assert (cover == 1).all()


@given(width=sizes, height=sizes, spec=specs)
def test_every_read_window_has_one_shape_and_holds_its_core(width, height, spec):
    for tile in plan_tiles(width, height, spec):
        assert (tile.read.width, tile.read.height) == (spec.read_size, spec.read_size)
        inner = tile.core_in_read
        assert (inner.col_off, inner.row_off) == (spec.halo, spec.halo)
        assert inner.col_off + inner.width <= spec.read_size and inner.row_off + inner.height <= spec.read_size


@given(width=sizes, height=sizes, spec=specs)
def test_read_origins_sit_on_the_pooling_grid(width, height, spec):
    factor = np.gcd(spec.tile, spec.halo) if spec.halo else spec.tile
    for tile in plan_tiles(width, height, spec):
        assert tile.read.col_off % factor == 0 and tile.read.row_off % factor == 0


@given(width=st.integers(1, 40), height=st.integers(1, 40), col=st.integers(-50, 40), row=st.integers(-50, 40),
       side=st.integers(1, 90))
def test_reflect_pads_pad_the_source_into_the_reflected_read(width, height, col, row, side):
    raster = np.arange(width * height).reshape(height, width)
    read = Window(col, row, side, side)
    source = source_window(read, width, height)
    pads = reflect_pads(read, source)
    want = raster[np.ix_(reflect_indices(row, row + side, height), reflect_indices(col, col + side, width))]
    if pads is not None:
        inside = raster[source.row_off : source.row_off + source.height, source.col_off : source.col_off + source.width]
        np.testing.assert_array_equal(np.pad(inside, pads, mode="reflect"), want)
    if 0 <= col and col + side <= width and 0 <= row and row + side <= height:
        assert pads == ((0, 0), (0, 0))  # a read inside the raster pads nothing


@pytest.mark.parametrize("width, height", [(64, 96), (32, 16), (256, 48)])
def test_every_tile_of_a_raster_cut_into_whole_tiles_is_padded(width, height):
    """The fast path is the common one; a last, narrow tile may reflect past its own read."""
    for tile in plan_tiles(width, height, tile_spec(16, 8, 8)):
        assert reflect_pads(tile.read, source_window(tile.read, width, height)) is not None


@given(size=st.integers(1, 50), start=st.integers(-120, 60), length=st.integers(1, 120))
def test_reflection_matches_numpy_pad(size, start, length):
    axis = np.arange(size)
    pad = max(0, -start, start + length - size)
    padded = np.pad(axis, pad, mode="reflect") if size > 1 else np.zeros(size + 2 * pad, int)
    expected = padded[start + pad : start + pad + length]
    got = reflect_indices(start, start + length, size)
    np.testing.assert_array_equal(got, expected)
    lo, hi = source_span(got)
    assert 0 <= lo < hi <= size


@pytest.mark.parametrize("tile, halo", [(100, 8), (64, 12), (0, 8), (64, -8)])
def test_misaligned_or_invalid_tiling_is_rejected_with_the_field_name(tile, halo):
    with pytest.raises(ValueError, match="tile|halo"):
        tile_spec(tile, halo, 8)


def test_batches_keep_order_and_size():
    assert batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("batch, rows", [(1, 1), (2, 1), (4, 2), (7, 1), (8, 2), (12, 3), (16, 4), (32, 4), (64, 8)])
def test_a_batch_is_the_squarest_block_that_divides_it(batch, rows):
    assert batch_band_rows(batch) == rows


@given(count=st.integers(1, 600), most=st.integers(1, 20))
def test_a_batchs_part_slices_are_consecutive_nearly_equal_parts_of_it(count, most):
    parts = part_slices(count, most)
    assert [i for part in parts for i in range(count)[part]] == list(range(count))
    sizes = {part.stop - part.start for part in parts}
    assert max(sizes) - min(sizes) <= 1
    assert len(parts) <= min(most, MOST_PARTS)
    assert len(parts) == 1 or min(sizes) >= PART_TILES
    assert len(parts) == min(most, MOST_PARTS, max(1, count // PART_TILES))


@pytest.mark.parametrize("readers, threads, parts", [(16, 2, 8), (16, 4, 4), (16, 16, 1), (2, 16, 1), (0, 2, 1),
                                                     (64, 2, MOST_PARTS), (12, 5, 2)])
def test_a_batch_is_cut_into_as_many_parts_as_keep_the_readers_busy(readers, threads, parts):
    assert parts_per_batch(readers, threads) == parts


def test_a_batch_of_64_is_read_a_column_of_its_block_per_slice():
    spec = tile_spec(16, 4, 4)
    group = tile_batches(16 * 8, 16 * 8, spec, 64)[0]
    columns = [grid_cells(group[part], 16) for part in part_slices(len(group))]
    assert columns == [{(r, c) for r in range(8)} for c in range(8)]


def grid_cells(batch, tile):
    return {(t.core.row_off // tile, t.core.col_off // tile) for t in batch}


def test_batches_are_blocks_of_the_tile_grid():
    spec = tile_spec(16, 4, 4)
    groups = tile_batches(16 * 16, 16 * 6, spec, 8)  # 6 rows x 16 columns of tiles
    assert [len(g) for g in groups] == [8] * 12
    assert grid_cells(groups[0], 16) == {(r, c) for r in (0, 1) for c in range(4)}
    assert grid_cells(groups[5], 16) == {(r, c) for r in (2, 3) for c in range(4, 8)}
    for group in groups:  # 2 x 4 blocks: read windows span 2 + 4 tiles, not 1 + 8
        cells = grid_cells(group, 16)
        rows, cols = {r for r, _ in cells}, {c for _, c in cells}
        assert len(rows) == 2 and len(cols) == 4


def test_a_striped_rasters_batches_run_along_its_rows():
    spec = tile_spec(16, 4, 4)
    groups = tile_batches(16 * 16, 16 * 6, spec, 8, striped=True)  # each read decodes whole rows
    assert [len(g) for g in groups] == [8] * 12
    assert grid_cells(groups[0], 16) == {(0, c) for c in range(8)}
    assert grid_cells(groups[3], 16) == {(1, c) for c in range(8, 16)}


@given(width=sizes, height=sizes, spec=specs, batch=st.integers(1, 20), striped=st.booleans())
def test_batches_hold_every_tile_once_and_only_the_last_is_short(width, height, spec, batch, striped):
    groups = tile_batches(width, height, spec, batch, striped)
    assert all(len(g) == batch for g in groups[:-1]) and 1 <= len(groups[-1]) <= batch
    got = sorted((t.core.row_off, t.core.col_off) for g in groups for t in g)
    assert got == sorted((t.core.row_off, t.core.col_off) for t in plan_tiles(width, height, spec))


@settings(deadline=None)  # a plan of up to 75 x 75 tiles, every batch checked: slow on a loaded machine
@given(width=sizes, height=sizes, spec=specs, batch=st.integers(1, 70), striped=st.booleans())
def test_a_batchs_blocks_are_exactly_its_cores(width, height, spec, batch, striped):
    for group in tile_batches(width, height, spec, batch, striped):
        blocks = assert_exact_blocks(group, width, height)
        assert len(blocks) <= 4  # partial columns at either end, and a band's end: a few writes, not one per tile


@settings(deadline=None)
@given(width=sizes, height=sizes, spec=specs, data=st.data())
def test_any_set_of_tiles_is_joined_only_where_its_cores_touch(width, height, spec, data):
    tiles = plan_tiles(width, height, spec)
    group = data.draw(st.lists(st.sampled_from(tiles), min_size=1, max_size=len(tiles), unique=True))
    assert_exact_blocks(group, width, height)


def assert_exact_blocks(group, width, height):
    """Every tile in one block, every block exactly covered by its tiles' cores, no overlap."""
    blocks = core_blocks(group)
    assert sorted(i for _, members in blocks for i in members) == list(range(len(group)))
    top, left = min(w.row_off for w, _ in blocks), min(w.col_off for w, _ in blocks)
    bottom, right = max(w.row_off + w.height for w, _ in blocks), max(w.col_off + w.width for w, _ in blocks)
    assert bottom <= height and right <= width
    cover = np.zeros((bottom - top, right - left), np.int32)  # the blocks' bounding box
    for window, members in blocks:
        inside = np.zeros((window.height, window.width), np.int32)
        for i in members:
            c = group[i].core
            dy, dx = c.row_off - window.row_off, c.col_off - window.col_off
            assert dy >= 0 and dx >= 0 and dy + c.height <= window.height and dx + c.width <= window.width
            inside[dy : dy + c.height, dx : dx + c.width] += 1
        assert (inside == 1).all()
        cover[window.row_off - top : window.row_off - top + window.height,
              window.col_off - left : window.col_off - left + window.width] += 1
    assert cover.max() == 1
    return blocks


def test_a_batch_that_is_a_block_of_the_grid_is_one_rectangle():
    spec = tile_spec(16, 4, 4)
    groups = tile_batches(16 * 16 - 5, 16 * 6, spec, 8)  # the last column of tiles is 11 pixels wide
    assert [core_blocks(g)[0][0] for g in groups[:2]] == [Window(0, 0, 64, 32), Window(64, 0, 64, 32)]
    [(window, members)] = core_blocks(groups[3])
    assert window == Window(192, 0, 59, 32) and sorted(members) == list(range(8))
    assert all(len(core_blocks(g)) == 1 for g in groups)
