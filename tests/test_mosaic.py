"""VRT mosaics of a run: one per CRS and resolution, opening in rasterio with its masks' pixels."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import from_bounds
from test_outputs import CARD
from test_products import GEO, UTM, write_run

from pipeline.mosaic import Grid, mosaic_vrt, plan_mosaics


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Six finished masks and the run products written for them (see :func:`write_run`)."""
    return write_run(tmp_path_factory.mktemp("run"))


def test_mosaic_opens_with_rasterio_covers_its_masks_and_keeps_their_pixels(run):
    out, masks, _ = run
    members = [masks[n] for n in ("a_west.tif", "b_east.tif", "c_overlap.tif")]
    with rasterio.open(out / "mosaic-epsg32633-10x10.vrt") as vrt:
        assert vrt.crs == UTM and vrt.res == (10, 10) and vrt.nodata == 255 and vrt.count == 1
        assert vrt.colormap(1)[3] == (*CARD.classes[1].rgb, 255)
        mosaic = vrt.read(1)
        for path in members:
            with rasterio.open(path) as src:
                b, v = src.bounds, vrt.bounds
                assert v.left <= b.left and v.bottom <= b.bottom and v.right >= b.right and v.top >= b.top
                window = from_bounds(*src.bounds, transform=vrt.transform).round_offsets().round_lengths()
                part, data = vrt.read(1, window=window), src.read(1)
                if path.name == "c_overlap.tif":  # drawn last: its data wins, its nodata shows what lies below
                    assert (part[data != 255] == 10).all() and set(np.unique(part[data == 255])) == {0, 3}
                else:
                    assert ((part == data) | (part == 10)).all()
        assert vrt.bounds == (500000, 4649600, 501000, 4650000)
        assert (mosaic == 255).sum() == 5 * 50  # only the west mask's nodata rows stay empty
    band = ET.parse(out / "mosaic-epsg32633-10x10.vrt").getroot().find("VRTRasterBand")
    assert [c.text or "" for c in band.find("CategoryNames")][:4] == ["water", "", "", "forest & <wood>"]
    with rasterio.open(out / "mosaic-epsg4326.vrt") as vrt, rasterio.open(masks["geo/e_geo.tif"]) as src:
        assert vrt.crs == GEO and vrt.bounds == pytest.approx(src.bounds)
        np.testing.assert_array_equal(vrt.read(1), src.read(1))


def test_plan_mosaics_groups_by_crs_and_resolution_and_leaves_out_what_cannot_be_mosaicked():
    grids = [
        Grid(Path("a.tif"), UTM, from_origin(0, 100, 10, 10), 5, 5),
        Grid(Path("b.tif"), UTM, from_origin(55, 100, 10, 10), 5, 5),  # half a pixel off the grid of a
        Grid(Path("c.tif"), UTM, from_origin(0, 100, 10, 10) @ Affine.rotation(10), 5, 5),
        Grid(Path("d.tif"), None, Affine.identity(), 5, 5),
        Grid(Path("e.tif"), CRS.from_proj4("+proj=laea +lat_0=52 +lon_0=10 +ellps=GRS80 +units=m"),
             from_origin(0, 100, 10, 10), 5, 5),
    ]
    mosaics = plan_mosaics(grids)
    assert [(m.name, [g.path.name for g in m.grids]) for m in mosaics] == [
        ("mosaic-crs-" + mosaics[0].name[11:21] + ".vrt", ["e.tif"]), ("mosaic-epsg32633.vrt", ["a.tif", "b.tif"])]
    utm = mosaics[1]
    assert utm.shape == (5, 11) and utm.bounds == (0, 50, 105, 100)
    sources = ET.fromstring(mosaic_vrt(utm, Path("."), CARD, {})).findall("VRTRasterBand/ComplexSource/DstRect")
    assert [s.attrib for s in sources] == [{"xOff": "0", "yOff": "0", "xSize": "5", "ySize": "5"},
                                           {"xOff": "5.5", "yOff": "0", "xSize": "5", "ySize": "5"}]

