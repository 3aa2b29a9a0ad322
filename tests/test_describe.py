"""``tilepipe inspect``: class areas, georeferencing and provenance of a mask."""

from __future__ import annotations

import pytest
from conftest import CRSS, write_raster
from pyproj import Geod
from shapely.geometry import box
from test_outputs import CARD, PROVENANCE
from test_vectors import finished, regions

from pipeline.cli import main
from pipeline.describe import describe_mask, format_description


def test_describe_reports_class_areas_in_crs_units_and_percentages(tmp_path):
    codes = regions()
    desc = describe_mask(finished(tmp_path, codes))
    assert desc["crs"] == "EPSG:32633" and desc["area_unit"] == "m²" and desc["area_method"] == "planar"
    assert (desc["width"], desc["height"], desc["nodata"], desc["cog"]) == (40, 30, 255, True)
    assert desc["resolution"] == [10.0, 10.0] and desc["provenance"] == PROVENANCE
    valid = (codes != 255).sum()
    assert desc["valid_pixels"] == valid and desc["nodata_pixels"] == 80
    for c, info in zip(desc["classes"], CARD.classes, strict=True):
        n = int((codes == info.code).sum())
        assert (c["code"], c["name"], c["color"], c["pixels"]) == (info.code, info.name, info.color, n)
        assert c["area"] == n * 100.0 and c["percent"] == pytest.approx(100 * n / valid)
    text = format_description(desc)
    for needle in ("EPSG:32633 (WGS 84 / UTM zone 33N)", "forest & <wood>", "area in m²", "TILEPIPE_RUN_ID",
                   "run-1", f"{100 * (codes == 10).sum() / valid:.2f}", "Cloud-Optimized GeoTIFF: yes"):
        assert needle in text


def test_describe_measures_geographic_masks_on_the_ellipsoid(tmp_path):
    codes = regions()
    desc = describe_mask(finished(tmp_path, codes, crs="geographic"))
    assert desc["geographic"] and desc["area_unit"] == "m²" and desc["area_method"] == "geodesic"
    b = desc["bounds"]
    footprint, _ = Geod(ellps="WGS84").geometry_area_perimeter(box(b["left"], b["bottom"], b["right"], b["top"]))
    nodata_area = abs(footprint) * 2 / 30  # two whole rows, ~the same latitude as the rest
    total = sum(c["area"] for c in desc["classes"])
    assert total == pytest.approx(abs(footprint) - nodata_area, rel=1e-5)
    assert sum(c["percent"] for c in desc["classes"]) == pytest.approx(100)


def test_describe_works_without_crs_and_on_masks_tilepipe_did_not_write(tmp_path):
    codes = regions()
    plain = write_raster(tmp_path / "plain.tif", codes[None], crs=None, nodata=255)
    desc = describe_mask(plain)
    assert desc["crs"] is None and desc["area_unit"] == "pixels" and desc["provenance"] == {}
    assert [(c["code"], c["name"], c["area"]) for c in desc["classes"]] == [
        (v, f"class {v}", float((codes == v).sum())) for v in (0, 3, 10)]
    text = format_description(desc)
    assert "none (pixel coordinates only)" in text and "none recorded" in text


def test_tilepipe_inspect_prints_the_description(tmp_path, capsys):
    mask = finished(tmp_path, regions())
    assert main(["inspect", str(mask)]) == 0
    assert capsys.readouterr().out.strip() == format_description(describe_mask(mask))
    assert CRSS["utm"][0].to_epsg() == 32633
