"""Per-run products: one VRT mosaic per CRS and resolution, a STAC Item per mask, a Collection.

STAC documents are validated offline against the core STAC 1.1.0 schemas that pystac ships;
the label, classification and projection extension schemas live online only, so their
fields are checked by reading them back through pystac's extension classes.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine
from pystac.extensions.classification import ClassificationExtension
from pystac.extensions.label import LabelExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.validation.stac_validator import JsonSchemaSTACValidator
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds
from rasterio.windows import from_bounds
from test_outputs import CARD, PROVENANCE

from pipeline.outputs import Grid, MaskFiles, finalize_mask, mosaic_vrt, plan_mosaics, write_run_products

UTM, GEO = CRS.from_epsg(32633), CRS.from_epsg(4326)


def finished_mask(root: Path, name: str, codes: np.ndarray, crs: CRS | None, transform: Affine | None) -> Path:
    """Write ``codes`` as the runner does (temporary tiled GeoTIFF) and finalize it under ``root/out``."""
    tmp = root / "work" / name.replace("/", "_")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=codes.shape[1], height=codes.shape[0], count=1, dtype="uint8", nodata=255,
                   tiled=True, blockxsize=16, blockysize=16)
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(codes, 1)
    dest = root / "out" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    return finalize_mask(tmp, dest, CARD, {**PROVENANCE, "TILEPIPE_INPUT": Path(name).name})


def full(value: int, shape=(40, 50)) -> np.ndarray:
    return np.full(shape, value, np.uint8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Six finished masks and the run products written for them.

    Three UTM masks at 10 m (two side by side, one overlapping both with a little data), one
    UTM at 20 m, one geographic in a sub-folder and one without CRS.
    """
    root = tmp_path_factory.mktemp("run")
    west = full(0)
    west[:5] = 255
    overlap = full(255, (20, 50))
    overlap[5:15, 20:30] = 10
    masks = {
        "a_west.tif": finished_mask(root, "a_west.tif", west, UTM, from_origin(500000, 4650000, 10, 10)),
        "b_east.tif": finished_mask(root, "b_east.tif", full(3), UTM, from_origin(500500, 4650000, 10, 10)),
        "c_overlap.tif": finished_mask(root, "c_overlap.tif", overlap, UTM, from_origin(500250, 4649800, 10, 10)),
        "d_coarse.tif": finished_mask(root, "d_coarse.tif", full(10), UTM, from_origin(510000, 4650000, 20, 20)),
        "geo/e_geo.tif": finished_mask(root, "geo/e_geo.tif", full(3), GEO, from_origin(12.5, 41.9, 1e-4, 1e-4)),
        "f_plain.tif": finished_mask(root, "f_plain.tif", full(0), None, None),
    }
    written = write_run_products(root / "out", list(masks.values()), CARD, "run-1")
    return root / "out", masks, written


def test_run_products_are_mosaics_items_and_a_collection(run):
    out, masks, written = run
    expected = {"mosaic-epsg32633-10x10.vrt", "mosaic-epsg32633-20x20.vrt", "mosaic-epsg4326.vrt", "collection.json"}
    expected |= {MaskFiles(m).item.relative_to(out).as_posix() for m in masks.values()}
    assert {p.relative_to(out).as_posix() for p in written} == expected
    assert all(p.exists() for p in written)
    assert not [p for p in out.rglob(".*")], "partial files left behind"


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


def validate_core(path: Path) -> dict:
    """Validate a STAC document against pystac's bundled core schemas (no network)."""
    doc = json.loads(path.read_text())
    kind = pystac.STACObjectType.ITEM if doc["type"] == "Feature" else pystac.STACObjectType.COLLECTION
    JsonSchemaSTACValidator().validate_core(doc, kind, doc["stac_version"], str(path))
    return doc


def test_the_offline_validator_rejects_a_broken_item(run):
    out, masks, _ = run
    doc = json.loads(MaskFiles(masks["a_west.tif"]).item.read_text())
    del doc["properties"]["datetime"]
    with pytest.raises(pystac.STACValidationError):
        JsonSchemaSTACValidator().validate_core(doc, pystac.STACObjectType.ITEM, doc["stac_version"])


def test_items_validate_and_describe_labels_classes_and_projection(run):
    out, masks, _ = run
    for name, mask in masks.items():
        validate_core(MaskFiles(mask).item)
        item = pystac.Item.from_file(str(MaskFiles(mask).item))
        assert item.id == Path(name).stem and item.collection_id == "tilepipe-run-1"
        assert item.properties["tilepipe:input"] == Path(name).name
        assert item.properties["tilepipe:model_sha256"] == PROVENANCE["TILEPIPE_MODEL_SHA256"]
        assert item.datetime.isoformat() == "2024-05-01T10:00:00+00:00"
        label = LabelExtension.ext(item)
        assert label.label_type == "raster" and label.label_properties is None and label.label_tasks == ["segmentation"]
        assert [lc.classes for lc in label.label_classes] == [[0, 3, 10]]
        classes = ClassificationExtension.ext(item.assets["labels"]).classes
        assert [(c.value, c.title, c.color_hint) for c in classes[:3]] == [
            (c.code, c.name, c.color[1:].upper()) for c in CARD.classes]
        assert classes[1].name == "forest_wood" and classes[3].value == 255 and classes[3].nodata
        with rasterio.open(mask) as src:
            assert [c.count for c in classes] == [int((src.read(1) == v).sum()) for v in (0, 3, 10, 255)]
        for key in ("labels", "thumbnail", "gdal-pam", "qgis-style"):
            asset = item.assets[key]
            assert not Path(asset.href).is_absolute() and Path(asset.get_absolute_href()).exists()
        assert Path(item.assets["labels"].get_absolute_href()) == mask.resolve()
        assert Path(item.assets["thumbnail"].get_absolute_href()) == MaskFiles(mask).quicklook.resolve()
        proj = ProjectionExtension.ext(item)
        with rasterio.open(mask) as src:
            assert proj.shape == [src.height, src.width]
            if src.crs is None:
                assert item.geometry is None and item.bbox is None and proj.code is None
                continue
            assert proj.code == f"EPSG:{src.crs.to_epsg()}" and proj.transform == list(src.transform)[:6]
            west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        assert item.bbox == pytest.approx([west, south, east, north], abs=1e-9)
        lons, lats = zip(*item.geometry["coordinates"][0], strict=True)
        assert min(lons) == pytest.approx(west) and max(lats) == pytest.approx(north)


def test_collection_validates_links_every_item_and_the_mosaics(run):
    out, masks, _ = run
    doc = validate_core(out / "collection.json")
    assert all(not link["href"].startswith("/") for link in doc["links"])
    collection = pystac.Collection.from_file(str(out / "collection.json"))
    items = list(collection.get_items())
    assert sorted(i.id for i in items) == sorted(Path(n).stem for n in masks)
    west, south, east, north = collection.extent.spatial.bboxes[0]
    for item in items:
        if item.bbox:
            assert west <= item.bbox[0] and south <= item.bbox[1] and east >= item.bbox[2] and north >= item.bbox[3]
    assert {a.href for a in collection.assets.values()} == {
        "./mosaic-epsg32633-10x10.vrt", "./mosaic-epsg32633-20x20.vrt", "./mosaic-epsg4326.vrt"}
    geo_item = pystac.Item.from_file(str(MaskFiles(masks["geo/e_geo.tif"]).item))
    assert geo_item.get_single_link("collection").href == "../collection.json"


def test_masks_with_one_name_in_two_folders_get_distinct_item_ids(tmp_path):
    one = finished_mask(tmp_path, "north/scene.tif", full(0), UTM, from_origin(500000, 4650000, 10, 10))
    two = finished_mask(tmp_path, "south/scene.tif", full(3), UTM, from_origin(500000, 4640000, 10, 10))
    write_run_products(tmp_path / "out", [one, two], CARD, "run-2")
    ids = sorted(pystac.Item.from_file(str(MaskFiles(m).item)).id for m in (one, two))
    assert ids == ["north-scene", "south-scene"]
