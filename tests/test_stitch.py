"""A batch's tile cores placed into the rectangles they are written as."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rasterio.windows import Window

from pipeline.stitch import NODATA, code_pixels, place
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


@given(st.data(), st.integers(1, 6), st.integers(0, 300))
def test_a_batchs_code_counts_are_those_of_the_pixels_it_writes(data, classes, size):
    codes = np.array(data.draw(st.lists(st.integers(0, 254), min_size=classes, max_size=classes, unique=True)), np.uint8)
    index = np.array(data.draw(st.lists(st.integers(0, classes - 1), min_size=size, max_size=size)), int)
    valid = np.array(data.draw(st.lists(st.booleans(), min_size=size, max_size=size)), bool)
    written = np.where(valid, codes[index], NODATA)  # as placed: nodata where the input has none
    pixels = code_pixels(np.bincount(index[valid], minlength=classes), codes, size)
    np.testing.assert_array_equal(pixels, np.bincount(written, minlength=256))
