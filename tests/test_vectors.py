"""Class polygons for vector users: one GeoPackage layer, simplified as a coverage."""

from __future__ import annotations

import fiona
import numpy as np
import pytest
import shapely
from conftest import write_raster
from shapely.geometry import shape
from test_outputs import CARD, PROVENANCE

from pipeline.outputs import finalize_mask
from pipeline.vectors import write_polygons


def regions(height: int = 30, width: int = 40) -> np.ndarray:
    """Water left, forest right, a staircase of bare soil across them, two nodata rows on top."""
    codes = np.zeros((height, width), np.uint8)
    codes[:, width // 2 :] = 3
    rows, cols = np.indices(codes.shape)
    codes[(cols - rows >= 5) & (cols - rows < 12)] = 10
    codes[:2] = 255
    return codes


def finished(tmp_path, codes: np.ndarray, crs: str | None = "utm", name: str = "m.tif"):
    tmp = write_raster(tmp_path / f"tmp-{name}", codes[None], crs=crs, nodata=255)
    return finalize_mask(tmp, tmp_path / name, CARD, PROVENANCE)


def read_layer(path):
    assert fiona.listlayers(path) == ["classes"]
    with fiona.open(path) as src:
        return src.crs, src.schema, src.tags(), [(shape(f.geometry), dict(f.properties)) for f in src]


def test_polygons_cover_each_class_exactly_with_code_and_name(tmp_path):
    codes = regions()
    gpkg = write_polygons(finished(tmp_path, codes), tmp_path / "m.gpkg", CARD, tolerance=0)
    crs, schema, tags, features = read_layer(gpkg)
    assert crs.to_epsg() == 32633 and PROVENANCE.items() <= tags.items()
    assert schema["properties"] == {"class_code": "int", "class_name": "str"}
    names = {c.code: c.name for c in CARD.classes}
    for code in (0, 3, 10):
        area = sum(g.area for g, p in features if p["class_code"] == code)
        assert area == (codes == code).sum() * 100.0  # 10 m pixels
    assert all(p["class_name"] == names[p["class_code"]] for _, p in features)
    assert {p["class_code"] for _, p in features} == {0, 3, 10}  # nodata is not a polygon
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gpkg", "m.png", "m.qml", "m.tif", "m.tif.aux.xml",
                                                          "tmp-m.tif"]


def test_simplified_polygons_keep_shared_edges_without_gaps_or_overlaps(tmp_path):
    mask = finished(tmp_path, regions())
    exact = [g for g, _ in read_layer(write_polygons(mask, tmp_path / "exact.gpkg", CARD, 0))[3]]
    simple = [g for g, _ in read_layer(write_polygons(mask, tmp_path / "simple.gpkg", CARD, 15.0))[3]]
    assert len(simple) == len(exact)
    assert shapely.get_num_coordinates(simple).sum() < shapely.get_num_coordinates(exact).sum()
    assert shapely.coverage_is_valid(np.array(simple, dtype=object))
    assert shapely.union_all(simple).area == pytest.approx(shapely.union_all(exact).area, rel=1e-9)


def test_polygons_of_a_mask_without_crs_are_in_pixel_units(tmp_path):
    codes = regions()
    crs, _, _, features = read_layer(write_polygons(finished(tmp_path, codes, crs=None), tmp_path / "p.gpkg", CARD, 0))
    assert not crs
    assert sum(g.area for g, p in features if p["class_code"] == 10) == (codes == 10).sum()


def test_a_negative_tolerance_is_refused_before_writing(tmp_path):
    mask = finished(tmp_path, regions())
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        write_polygons(mask, tmp_path / "p.gpkg", CARD, -1)
    assert not list(tmp_path.glob("*.gpkg")) and not list(tmp_path.glob(".*"))
