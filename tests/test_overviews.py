"""Mask overviews in numpy: GDAL's levels and sizes, GDAL's MODE wherever a side is even."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.overviews import (
    _counted_modes,
    mode_2x2,
    overview_count,
    overview_shape,
    pair_starts,
    paired,
)

ND = 255


def reference_mode(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """GDAL's MODE by its definition, one window at a time: count the valid values of the
    window ``x[r : r + 2, c : c + 2]`` in scan order; the first to exceed the best count so far wins."""
    out = np.full((len(rows), len(cols)), ND, np.uint8)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            counts: dict[int, int] = {}
            best = 0
            for v in x[r : r + 2, c : c + 2].ravel().tolist():
                if v != ND:
                    counts[v] = counts.get(v, 0) + 1
                    if counts[v] > best:
                        best, out[i, j] = counts[v], v
    return out


def one_level(x: np.ndarray, height: int, width: int) -> np.ndarray:
    return mode_2x2(paired(paired(x, pair_starts(x.shape[-2], height), -2), pair_starts(x.shape[-1], width), -1), ND)


def masks_of(codes: list[int]) -> st.SearchStrategy[np.ndarray]:
    """Masks of ``codes``: few distinct values and plenty of nodata, so ties and empty windows are common."""
    return st.tuples(st.integers(1, 40), st.integers(1, 40)).flatmap(
        lambda shape: arrays(np.uint8, shape, elements=st.sampled_from(codes)))


masks = masks_of([0, 3, 7, ND])
SMALL = [0, 3, 7, 14, ND]
"""Codes whose modes are looked up (all below 15)."""
ANY = [0, 3, 15, 16, 200, 254, ND]
"""Codes whose modes are counted."""


@pytest.mark.parametrize("codes", [SMALL, ANY], ids=["looked-up", "counted"])
@given(data=st.data())
def test_each_overview_pixel_is_the_mode_of_its_window_as_gdal_counts_it(codes, data):
    x = data.draw(masks_of(codes))
    height, width = overview_shape(x.shape[1], x.shape[0], 1)
    rows, cols = pair_starts(x.shape[0], height), pair_starts(x.shape[1], width)
    np.testing.assert_array_equal(one_level(x, height, width), reference_mode(x, rows, cols))


@given(x=masks_of([0, 1, 7, 13, 14, ND]), big=st.sampled_from([15, 16, 128, 254]), batch=st.integers(1, 3))
def test_looked_up_modes_are_the_counted_ones_and_one_larger_code_counts_them_all(x, big, batch):
    even = np.stack([x[: x.shape[0] // 2 * 2, : x.shape[1] // 2 * 2]] * batch)
    looked_up = mode_2x2(even, ND)
    np.testing.assert_array_equal(looked_up, _counted_modes(even, ND))
    if even.size:  # one code the table has no room for: every window is counted, and the rest agree
        wider = even.copy()
        wider.flat[0] = big
        counted = mode_2x2(wider, ND)
        np.testing.assert_array_equal(counted, _counted_modes(wider, ND))
        np.testing.assert_array_equal(counted.flat[1:], looked_up.flat[1:])


@given(source=st.integers(1, 600))
def test_pairs_are_gdals_windows_on_even_sides_and_centred_on_their_footprints_on_odd_ones(source):
    size = max(1, source // 2)
    starts = pair_starts(source, size)
    if source % 2 == 0:
        np.testing.assert_array_equal(starts, 2 * np.arange(size))
    if source > 1:
        assert starts[0] >= 0 and starts[-1] + 2 <= source and (np.diff(starts) >= 2).all()
        footprint_centres = (np.arange(size) + 0.5) * source / size
        assert np.abs(starts + 1 - footprint_centres).max() <= 0.5 + 1e-9


@given(x=masks, cuts=st.lists(st.integers(1, 39), max_size=4))
def test_paired_rows_read_in_pieces_are_the_rows_read_at_once(x, cuts):
    height = overview_shape(x.shape[1], x.shape[0], 1)[0]
    starts = pair_starts(x.shape[0], height)
    whole = paired(x, starts, -2)
    edges = sorted({0, height, *(c for c in cuts if c < height)})
    pieces = []
    for a, b in itertools.pairwise(edges):
        part = starts[a:b]
        strip = x[part[0] : min(part[-1] + 2, x.shape[0])]
        pieces.append(paired(strip, part - part[0], -2))
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_a_side_that_is_not_halved_is_refused():
    with pytest.raises(ValueError, match="halves a side of 10 or 11, not 12"):
        pair_starts(12, 5)


@pytest.mark.parametrize("height, width", [(256, 256), (257, 257), (515, 333), (1024, 768), (300, 2100), (4097, 7),
                                           (3, 600)])
def test_levels_and_their_sizes_are_those_of_gdals_cog_driver(tmp_path, height, width):
    with rasterio.open(tmp_path / "m.tif", "w", driver="GTiff", width=width, height=height, count=1, dtype="uint8",
                       nodata=ND) as dst:
        dst.write(np.zeros((1, height, width), np.uint8))
    rasterio.shutil.copy(tmp_path / "m.tif", tmp_path / "cog.tif", driver="COG", BLOCKSIZE=256,
                         OVERVIEW_RESAMPLING="NEAREST")
    with rasterio.open(tmp_path / "cog.tif") as cog:
        levels = len(cog.overviews(1))
    assert overview_count(width, height, 256) == levels
    for level in range(1, levels + 1):
        with rasterio.open(tmp_path / "cog.tif", overview_level=level - 1) as ovr:
            assert ovr.shape == overview_shape(width, height, level)
