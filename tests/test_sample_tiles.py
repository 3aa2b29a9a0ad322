"""The committed sample tiles are exactly what the seeded generator writes."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

SAMPLES = Path(__file__).resolve().parents[1] / "sample_tiles"
STEMS = ("scene_a", "scene_b", "scene_c")
FILES = [f"{stem}.tif" for stem in STEMS] + [f"labels/{stem}.tif" for stem in STEMS]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    subprocess.run([sys.executable, str(SAMPLES / "make_samples.py"), str(out)], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("name", FILES)
def test_committed_tiles_match_the_generator(regenerated, name):
    with rasterio.open(SAMPLES / name) as committed, rasterio.open(regenerated / name) as fresh:
        assert committed.profile == fresh.profile
        np.testing.assert_array_equal(committed.read(), fresh.read())


def test_generator_is_byte_identical(regenerated, tmp_path):
    subprocess.run([sys.executable, str(SAMPLES / "make_samples.py"), str(tmp_path)], check=True, capture_output=True)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (regenerated / name).read_bytes(), name


@pytest.mark.parametrize("stem", STEMS)
def test_scenes_are_georeferenced_small_and_have_a_nodata_edge(stem):
    with rasterio.open(SAMPLES / f"{stem}.tif") as image, rasterio.open(SAMPLES / "labels" / f"{stem}.tif") as labels:
        assert image.crs.to_epsg() == 32633 and image.res == (10.0, 10.0)
        assert image.count == 4 and image.dtypes[0] == "uint16" and image.nodata == 0
        assert image.descriptions == ("blue", "green", "red", "nir")
        assert image.profile["tiled"] and image.compression.name == "deflate"
        assert image.width % 256 or image.height % 256 or stem == "scene_a"
        assert (labels.crs, labels.transform, labels.shape) == (image.crs, image.transform, image.shape)
        assert labels.dtypes[0] == "uint8" and labels.nodata == 255
        data, classes = image.read(), labels.read(1)
    empty = (data == 0).all(axis=0)
    assert 0.03 < empty.mean() < 0.3
    np.testing.assert_array_equal(classes == 255, empty)
    assert set(np.unique(classes[~empty])) == {0, 1, 2, 3, 4}
    assert (SAMPLES / f"{stem}.tif").stat().st_size < 800_000


def test_scene_origins_differ():
    origins = set()
    for stem in STEMS:
        with rasterio.open(SAMPLES / f"{stem}.tif") as src:
            origins.add((src.transform.c, src.transform.f))
    assert len(origins) == 3


def test_classes_are_spectrally_distinct():
    with rasterio.open(SAMPLES / "scene_a.tif") as image, rasterio.open(SAMPLES / "labels" / "scene_a.tif") as labels:
        data, classes = image.read().astype(float), labels.read(1)
    ndvi = (data[3] - data[2]) / (data[3] + data[2] + 1e-9)
    water, forest, built = (np.median(ndvi[classes == c]) for c in (0, 1, 3))
    assert water < 0 < built < forest
