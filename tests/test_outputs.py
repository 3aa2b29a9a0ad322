"""Finished masks: valid COGs a GIS opens in colour, with class names, overviews and provenance."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from conftest import write_raster
from rio_cogeo.cogeo import cog_validate
from test_overviews import one_level

from pipeline import outputs
from pipeline.outputs import (
    Compression,
    MaskFiles,
    category_names,
    finalize_confidence,
    finalize_mask,
    finalize_probabilities,
    quicklook_shape,
    stored_pixels,
    write_quicklook,
)
from unet_flax.card import ClassInfo, ModelCard
from unet_flax.model import UNetConfig

# Codes with gaps, so category names need empty entries; a name that needs XML escaping.
CARD = ModelCard(
    name="tiny", unet=UNetConfig(in_bands=4, num_classes=3, depth=2, base_width=4),
    band_names=("blue", "green", "red", "nir"),
    classes=(ClassInfo(0, "water", "#1f78b4"), ClassInfo(3, "forest & <wood>", "#33a02c"),
             ClassInfo(10, "bare soil", "#b07b4f")),
    mean=(0.5,) * 4, std=(0.25,) * 4,
)
PROVENANCE = {
    "TILEPIPE_MODEL": "tiny", "TILEPIPE_MODEL_SHA256": "ab" * 32, "TILEPIPE_WORKFLOW_SHA256": "cd" * 32,
    "TILEPIPE_VERSION": "0.1.0", "TILEPIPE_INPUT": "scene_a.tif", "TILEPIPE_INPUT_CHECKSUM": "blake3:" + "ef" * 32,
    "TILEPIPE_RUN_ID": "run-1", "TILEPIPE_TIME": "2024-05-01T10:00:00+00:00",
}
CODES = {0, 3, 10, 255}


def checker_mask(height: int = 600, width: int = 600) -> np.ndarray:
    """Codes 0 and 10 alternating pixel by pixel (averaging would make 5), a block of 3, nodata rows."""
    rows, cols = np.indices((height, width))
    codes = np.where((rows + cols) % 2 == 0, 0, 10).astype(np.uint8)
    codes[height // 2 :, width // 2 :] = 3
    codes[:40] = 255
    return codes


def tmp_raster(tmp_path: Path, data: np.ndarray, crs: str | None = "utm", name: str = "tmp-classes.tif") -> Path:
    data = data if data.ndim == 3 else data[None]
    (tmp_path / "work").mkdir(exist_ok=True)
    return write_raster(tmp_path / "work" / name, data, crs=crs, nodata=255)


@pytest.fixture
def finished(tmp_path):
    """A 600x600 UTM mask finalized into ``out/``; returns (source codes, dest)."""
    codes = checker_mask()
    (tmp_path / "out").mkdir()
    return codes, finalize_mask(tmp_raster(tmp_path, codes), tmp_path / "out" / "scene_a.tif", CARD, PROVENANCE)


def test_the_writers_class_counts_are_kept_in_the_band_and_checked_against_its_size(tmp_path):
    codes = checker_mask()
    counts = np.bincount(codes.ravel(), minlength=256)
    dest = finalize_mask(tmp_raster(tmp_path, codes), tmp_path / "counted.tif", CARD, PROVENANCE, pixels=counts)
    with rasterio.open(dest) as out:
        assert out.tags(1)["CLASS_3_PIXELS"] == str(counts[3]) and out.tags(1)["NODATA_PIXELS"] == str(40 * 600)
        np.testing.assert_array_equal(stored_pixels(out), counts)
    short = counts.copy()
    short[0] -= 1  # counts that miss a pixel are not the mask's: refused
    dest = finalize_mask(tmp_raster(tmp_path, codes, name="b.tif"), tmp_path / "short.tif", CARD, PROVENANCE,
                         pixels=short)
    with rasterio.open(dest) as out:
        assert stored_pixels(out) is None
    with rasterio.open(finalize_mask(tmp_raster(tmp_path, codes, name="c.tif"), tmp_path / "plain.tif", CARD,
                                     PROVENANCE)) as out:
        assert stored_pixels(out) is None


@pytest.mark.parametrize("crs", ["utm", "geographic", None])
def test_mask_is_a_valid_cog_with_the_input_grid_and_pixels(tmp_path, crs):
    codes = checker_mask()
    tmp = tmp_raster(tmp_path, codes, crs)
    dest = finalize_mask(tmp, tmp_path / "mask.tif", CARD, PROVENANCE)
    valid, errors, _ = cog_validate(dest, quiet=True)
    assert valid and not errors
    with rasterio.open(tmp) as src, rasterio.open(dest) as out:
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)
        assert out.count == 1 and out.dtypes == ("uint8",) and out.nodata == 255
        assert out.block_shapes == [(256, 256)] and out.compression.name == "deflate"
        np.testing.assert_array_equal(out.read(1), codes)


def test_overviews_are_built_by_mode_so_they_hold_only_class_codes(finished):
    _, dest = finished
    with rasterio.open(dest) as src:
        assert src.overviews(1) == [2, 4]
        assert src.tags()["OVERVIEW_RESAMPLING"] == "MODE"
    for level in range(2):
        with rasterio.open(dest, overview_level=level) as ovr:
            values = set(np.unique(ovr.read(1)).tolist())
            assert values <= CODES and {3, 255} <= values and values & {0, 10}  # an average would give 5


def test_colour_table_has_each_class_colour_and_transparent_nodata(finished):
    _, dest = finished
    with rasterio.open(dest) as src:
        assert src.colorinterp[0].name == "palette"
        table = src.colormap(1)
    for c in CARD.classes:
        assert table[c.code] == (*c.rgb, 255)
    assert table[255][3] == 0


def test_gdal_reads_back_category_names_and_attribute_table_from_the_pam_sidecar(tmp_path, finished):
    _, dest = finished
    # GDAL copying the mask to a VRT serialises what it read: names come back through GDAL itself.
    rasterio.shutil.copy(dest, tmp_path / "back.vrt", driver="VRT")
    band = ET.parse(tmp_path / "back.vrt").getroot().find("VRTRasterBand")
    names = [c.text or "" for c in band.find("CategoryNames")]
    assert names == category_names(CARD) == ["water", "", "", "forest & <wood>", "", "", "", "", "", "", "bare soil"]
    rows = [[f.text for f in row] for row in band.find("GDALRasterAttributeTable").findall("Row")]
    assert rows == [[str(c.code), c.name, *map(str, c.rgb)] for c in CARD.classes]
    # A TIFF cannot hold them: without the sidecar the names are gone, the band tags stay.
    MaskFiles(dest).aux.unlink()
    rasterio.shutil.copy(dest, tmp_path / "bare.vrt", driver="VRT")
    assert ET.parse(tmp_path / "bare.vrt").getroot().find("VRTRasterBand/CategoryNames") is None
    with rasterio.open(dest) as src:
        assert src.tags(1)["CLASS_3_NAME"] == "forest & <wood>" and src.tags(1)["CLASS_10_COLOR"] == "#b07b4f"
        assert src.descriptions == ("class (tiny)",)


def test_every_raster_output_carries_the_provenance_tags(tmp_path, finished):
    _, dest = finished
    conf = finalize_confidence(tmp_raster(tmp_path, np.full((20, 30), 70, np.uint8), name="c.tif"),
                               tmp_path / "out" / "scene_a.confidence.tif", PROVENANCE)
    probs = finalize_probabilities(tmp_raster(tmp_path, np.full((3, 20, 30), 30, np.uint8), name="p.tif"),
                                   tmp_path / "out" / "scene_a.probabilities.tif", CARD, PROVENANCE)
    for path in (dest, conf, probs, MaskFiles(dest).quicklook):
        with rasterio.open(path) as src:
            assert PROVENANCE.items() <= src.tags().items(), path


def textured(finalize: str) -> np.ndarray:
    """600 x 600 pixels of a smooth field: a class mask's codes, or a confidence in percent."""
    yy, xx = np.mgrid[0:600, 0:600]
    field = np.sin(xx / 17) + np.cos(yy / 23) + 0.3 * np.sin((xx + yy) / 7)
    if finalize == "confidence":
        return (np.abs(np.sin(field * 3)) * 100).astype(np.uint8)
    return np.clip((field + 2.3) / 4.6 * len(CARD.classes), 0, len(CARD.classes) - 1).astype(np.uint8)


def finalize_as(tmp_path: Path, finalize: str, pixels: np.ndarray, compression: Compression) -> Path:
    name = f"{finalize}-{compression.codec}-{compression.level}"
    tmp, dest = tmp_raster(tmp_path, pixels, name=f"{name}.tif"), tmp_path / name / "scene.tif"
    dest.parent.mkdir()
    if finalize == "mask":
        return finalize_mask(tmp, dest, CARD, PROVENANCE, compression=compression)
    return finalize_confidence(tmp, dest, PROVENANCE, compression=compression)


@pytest.mark.parametrize("finalize", ["mask", "confidence"])
@pytest.mark.parametrize("codec, low, high", [("deflate", 1, 9), ("zstd", 1, 19)])
def test_a_lower_level_writes_the_same_pixels_in_more_bytes(tmp_path, finalize, codec, low, high):
    pixels, sizes = textured(finalize), {}
    for level in (low, high):
        written = finalize_as(tmp_path, finalize, pixels, Compression(codec, level))
        sizes[level] = written.stat().st_size
        with rasterio.open(written) as src:
            assert src.compression.name == codec and src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            np.testing.assert_array_equal(src.read(1), pixels)
    assert sizes[low] > sizes[high], sizes


@pytest.mark.parametrize("finalize", ["mask", "confidence"])
@pytest.mark.parametrize("compression", [Compression(), Compression("zstd"), Compression("lzw")])
def test_every_codec_writes_a_cog_of_the_same_pixels_with_its_overviews(tmp_path, finalize, compression):
    pixels = textured(finalize)
    written = finalize_as(tmp_path, finalize, pixels, compression)
    assert cog_validate(written, quiet=True)[0]
    with rasterio.open(written) as src:
        assert src.compression.name == compression.codec and src.overviews(1)[0] == 2
        np.testing.assert_array_equal(src.read(1), pixels)
        with rasterio.open(src.name, overview_level=0) as ovr:
            assert ovr.read(1).shape == (300, 300)


@pytest.mark.parametrize("codec, level, message", [
    ("deflate", 13, "deflate levels are 1-12"), ("zstd", 0, "zstd levels are 1-22"), ("lzw", 1, "lzw has no levels"),
    ("jpeg", None, "compression must be one of deflate, zstd, lzw")])
def test_a_codec_takes_only_its_own_levels(codec, level, message):
    with pytest.raises(ValueError, match=message):
        Compression(codec, level)


def test_qgis_style_lists_every_class_with_its_colour_and_name(finished):
    _, dest = finished
    root = ET.parse(MaskFiles(dest).style).getroot()
    renderer = root.find("pipe/rasterrenderer")
    assert root.tag == "qgis" and renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = [(int(e.get("value")), e.get("color"), e.get("label")) for e in renderer.iter("paletteEntry")]
    assert entries == [(c.code, c.color, c.name) for c in CARD.classes]


def test_quicklook_renders_the_embedded_colour_table_with_transparent_nodata(tmp_path):
    codes = np.full((1000, 600), 255, np.uint8)  # quadrants: water, forest, bare, nodata
    codes[:500, :300], codes[:500, 300:], codes[500:, :300] = 0, 3, 10
    dest = finalize_mask(tmp_raster(tmp_path, codes), tmp_path / "m.tif", CARD, PROVENANCE)
    with rasterio.open(MaskFiles(dest).quicklook) as png:
        assert png.driver == "PNG" and (png.height, png.width) == quicklook_shape(1000, 600, 512) == (512, 307)
        rgba = png.read()
    expected = {(128, 75): (*CARD.classes[0].rgb, 255), (128, 230): (*CARD.classes[1].rgb, 255),
                (384, 75): (*CARD.classes[2].rgb, 255), (384, 230): (0, 0, 0, 0)}
    for (row, col), colour in expected.items():
        assert tuple(rgba[:, row, col]) == colour
    again = write_quicklook(dest, tmp_path / "small.png", max_size=64)
    with rasterio.open(again) as png:
        assert (png.height, png.width) == (64, 38)


def test_sidecars_are_published_beside_the_mask_and_nothing_partial_is_left(finished):
    _, dest = finished
    names = sorted(p.name for p in dest.parent.iterdir())
    assert names == ["scene_a.png", "scene_a.qml", "scene_a.tif", "scene_a.tif.aux.xml"]


def test_a_failure_leaves_no_partial_files_and_keeps_the_previous_mask(tmp_path, finished, monkeypatch):
    codes, dest = finished
    before = {p.name: p.read_bytes() for p in dest.parent.iterdir()}

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(outputs, "_render_quicklook", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        finalize_mask(tmp_raster(tmp_path, codes[::-1].copy(), name="again.tif"), dest, CARD, PROVENANCE)
    assert {p.name: p.read_bytes() for p in dest.parent.iterdir()} == before


def test_a_missing_input_raises_and_writes_nothing(tmp_path):
    with pytest.raises(rasterio.errors.RasterioIOError):
        finalize_mask(tmp_path / "gone.tif", tmp_path / "m.tif", CARD, PROVENANCE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("data", [np.zeros((2, 8, 8), np.uint8), np.zeros((1, 8, 8), np.uint16)])
def test_a_mask_must_be_one_uint8_band(tmp_path, data):
    tmp = tmp_raster(tmp_path, data)
    with pytest.raises(ValueError, match="tmp-classes.tif: a class mask must have 1 uint8 band"):
        finalize_mask(tmp, tmp_path / "m.tif", CARD, PROVENANCE)
    assert not (tmp_path / "m.tif").exists()


@pytest.mark.parametrize("resampling, predictor", [("MODE", False), ("AVERAGE", True)])
def test_uncompressed_temporary_overviews_leave_the_cog_byte_for_byte_the_same(tmp_path, resampling, predictor):
    codes = checker_mask(515, 333)  # odd sizes: GDAL's own overview sizes, not multiples of two
    tmp = tmp_raster(tmp_path, codes)
    root = outputs.vrt_dataset(333, 515, None, None, {})
    outputs.vrt_source(outputs.vrt_band(root, 1, description="codes", tags={}), tmp, 1)
    outputs._write_cog(root, tmp_path / "ours.tif", resampling=resampling, predictor=predictor)
    with rasterio.open(outputs.vrt_text(root)) as src:  # GDAL's default: its temporary overviews compressed
        rasterio.shutil.copy(src, tmp_path / "gdal.tif", driver="COG", **outputs.cog_options(resampling, predictor))
    with rasterio.open(tmp_path / "ours.tif") as src:
        assert src.overviews(1) == [2, 4]
    assert (tmp_path / "ours.tif").read_bytes() == (tmp_path / "gdal.tif").read_bytes()


def mode_cog(tmp_path: Path, codes: np.ndarray, name: str, ours: bool) -> Path:
    """``codes`` as a COG with overviews by GDAL's MODE (``ours``: computed by tilepipe)."""
    tmp = tmp_raster(tmp_path, codes, name=f"{name}-source.tif")
    root = outputs.vrt_dataset(codes.shape[1], codes.shape[0], None, None, {})
    band = outputs.vrt_band(root, 1, description="codes", tags={}, card=CARD)
    outputs.vrt_source(band, tmp, 1)
    with rasterio.open(tmp) as src, outputs._mode_overviews(src, tmp_path / name) as levels:
        if ours:
            outputs.vrt_overviews(band, levels, 1)
        outputs._write_cog(root, tmp_path / name, resampling="MODE", predictor=False)
    return tmp_path / name


def random_codes(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Codes pixel by pixel at random, a tenth nodata, and a nodata corner: ties everywhere."""
    rng = np.random.default_rng(seed)
    codes = rng.choice(np.array([0, 3, 10], np.uint8), (height, width))
    codes[rng.random((height, width)) < 0.1] = 255
    codes[: height // 5, : width // 7] = 255
    return codes


@pytest.mark.parametrize("height, width", [(1024, 768), (512, 1536), (600, 600)])
def test_mode_overviews_from_numpy_make_gdals_own_cog_byte_for_byte_where_sides_are_even(tmp_path, height, width):
    codes = random_codes(height, width)
    ours, gdal = mode_cog(tmp_path, codes, "ours.tif", True), mode_cog(tmp_path, codes, "gdal.tif", False)
    with rasterio.open(ours) as src:
        assert len(src.overviews(1)) >= 1
    assert ours.read_bytes() == gdal.read_bytes()
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]  # the overviews' files are gone


@pytest.mark.parametrize("height, width", [(515, 333), (257, 1029)])
def test_mode_overviews_of_odd_sides_have_gdals_levels_and_look_like_gdals(tmp_path, height, width):
    codes = np.kron(random_codes(height // 8 + 1, width // 8 + 1, seed=1), np.ones((8, 8), np.uint8))[:height, :width]
    ours, gdal = mode_cog(tmp_path, codes, "ours.tif", True), mode_cog(tmp_path, codes, "gdal.tif", False)
    with rasterio.open(ours) as a, rasterio.open(gdal) as b:
        assert a.overviews(1) == b.overviews(1) and a.profile == b.profile
        np.testing.assert_array_equal(a.read(1), codes)
        levels = len(a.overviews(1))
    expected = codes
    for level in range(levels):
        with rasterio.open(ours, overview_level=level) as mine, rasterio.open(gdal, overview_level=level) as theirs:
            assert mine.shape == theirs.shape
            expected = one_level(expected, *mine.shape)
            got = mine.read(1)
            np.testing.assert_array_equal(got, expected)
            # GDAL stretches its windows over odd sides (3 pixels, not 2): the odd pixel out differs
            assert 0.85 < np.mean(got == theirs.read(1)) < 1


def test_confidence_is_a_percent_cog_with_averaged_overviews(tmp_path):
    conf = np.full((600, 600), 40, np.uint8)
    conf[:, 1::2] = 60  # averaging gives 50; nodata rows stay nodata
    conf[:8] = 255
    dest = finalize_confidence(tmp_raster(tmp_path, conf), tmp_path / "a.confidence.tif", PROVENANCE)
    assert cog_validate(dest, quiet=True)[0]
    with rasterio.open(dest) as src:
        assert src.nodata == 255 and src.dtypes == ("uint8",) and src.units == ("%",)
        assert src.overviews(1) == [2, 4] and src.descriptions == ("confidence",)
        np.testing.assert_array_equal(src.read(1), conf)
    with rasterio.open(dest, overview_level=0) as ovr:
        half = ovr.read(1)
    assert (half[:4] == 255).all() and (half[4:] == 50).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.confidence.tif", "work"]


def test_probabilities_have_one_named_band_per_class(tmp_path):
    probs = np.stack([np.full((40, 50), v, np.uint8) for v in (10, 60, 30)])
    dest = finalize_probabilities(tmp_raster(tmp_path, probs), tmp_path / "a.probabilities.tif", CARD, PROVENANCE)
    assert cog_validate(dest, quiet=True)[0]
    with rasterio.open(dest) as src:
        assert src.count == 3 and src.nodata == 255 and src.shape == (40, 50)
        assert src.descriptions == tuple(f"probability of {c.name}" for c in CARD.classes)
        assert [src.tags(b)["CLASS_CODE"] for b in (1, 2, 3)] == ["0", "3", "10"]
        np.testing.assert_array_equal(src.read(), probs)
    with pytest.raises(ValueError, match="must have 3 uint8 band"):
        finalize_probabilities(tmp_raster(tmp_path, probs[:2], name="two.tif"), tmp_path / "b.tif", CARD, PROVENANCE)
