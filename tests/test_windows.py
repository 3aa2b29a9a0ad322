"""The tile plan covers every pixel once, with one read shape, on the pooling grid."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from pipeline.windows import batches, plan_tiles, reflect_indices, source_span, tile_spec

sizes = st.integers(min_value=1, max_value=300)
specs = st.tuples(st.sampled_from([1, 2, 4, 8]), st.integers(1, 12), st.integers(0, 6)).map(
    lambda t: tile_spec(t[0] * t[1] * 4, t[0] * t[2], t[0]))


@given(width=sizes, height=sizes, spec=specs)
def test_cores_tile_the_raster_exactly_once(width, height, spec):
    cover = np.zeros((height, width), np.int32)
    for tile in plan_tiles(width, height, spec):
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
