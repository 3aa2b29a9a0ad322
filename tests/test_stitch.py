"""A batch's tile cores placed into the rectangles they are written as."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from rasterio.windows import Window

from pipeline.stitch import NODATA, class_counts, place
from pipeline.windows import core_blocks, tile_batches, tile_spec


@pytest.mark.parametrize("valid", ["some", "every other tile", "all"])
@pytest.mark.parametrize("bands", [(), (3,)])
def test_a_block_holds_each_cores_prediction_clipped_with_nodata_where_the_input_has_none(bands, valid):
    spec = tile_spec(8, 4, 4)
    width, height = 21, 13  # the last column of tiles is 5 pixels wide, the last row 5 high
    [group] = tile_batches(width, height, spec, 6)
    rng = np.random.default_rng(0)
    predictions = rng.integers(0, 100, (len(group), *bands, 8, 8), dtype=np.uint8)
    masks = [rng.random((t.core.height, t.core.width)) > 0.2 for t in group]
    if valid != "some":
        masks = [np.ones_like(m) if valid == "all" or i % 2 else m for i, m in enumerate(masks)]
    [(window, members)] = core_blocks(group)
    assert window == Window(0, 0, width, height)

    got = place(window, group, members, predictions, masks)

    assert got.shape == (*bands, height, width) and got.dtype == np.uint8
    for i, tile in enumerate(group):
        rows, cols = tile.core.toslices()
        want = np.where(masks[i], predictions[i][..., : tile.core.height, : tile.core.width], NODATA)
        np.testing.assert_array_equal(got[..., rows, cols], want)


@given(arrays(np.uint8, st.tuples(st.integers(0, 5), st.integers(0, 9), st.integers(0, 9))), st.booleans())
def test_class_counts_are_those_of_bincount(codes, transposed):
    codes = codes.transpose(2, 0, 1) if transposed else codes  # any layout, odd sizes and empty ones too
    counts = class_counts(codes)
    assert counts.shape == (256,)
    np.testing.assert_array_equal(counts, np.bincount(codes.ravel(), minlength=256))


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 31, 32, 33, 1001])
def test_class_counts_are_exact_across_the_pieces_they_are_widened_in(size):
    codes = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    for piece in (1, 3, 8, 16, 64):  # pieces of pairs: sizes around 2 * piece and beyond
        np.testing.assert_array_equal(class_counts(codes, piece), np.bincount(codes, minlength=256))
