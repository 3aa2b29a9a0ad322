"""STAC of a run: an Item per mask and a Collection linking the Items and the mosaics.

STAC documents are validated offline against the core STAC 1.1.0 schemas that pystac ships;
the label, classification and projection extension schemas live online only, so their
fields are checked by reading them back through pystac's extension classes.
"""


from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from pystac.extensions.classification import ClassificationExtension
from pystac.extensions.label import LabelExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.validation.stac_validator import JsonSchemaSTACValidator
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds
from test_outputs import CARD, PROVENANCE
from test_products import UTM, finished_mask, full, write_run

from pipeline.outputs import MaskFiles, finalize_mask
from pipeline.products import write_run_products
from pipeline.stac import stac_item


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Six finished masks and the run products written for them (see :func:`write_run`)."""
    return write_run(tmp_path_factory.mktemp("run"))


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


def test_an_items_class_counts_come_from_the_masks_tags_when_it_has_them(tmp_path):
    mask = finished_mask(tmp_path, "plain.tif", full(3), UTM, from_origin(500000, 4650000, 10, 10))
    counts = ClassificationExtension.ext(stac_item(mask, CARD).assets["labels"]).classes
    assert [c.count for c in counts] == [0, 2000, 0, 0]  # no tags: counted from the pixels
    stored = np.zeros(256, np.int64)
    stored[[0, 3, 10, 255]] = [500, 700, 600, 200]  # adds up to 40 x 50: taken as the writer's count
    tagged = finalize_mask(mask, tmp_path / "out" / "tagged.tif", CARD, PROVENANCE, pixels=stored)
    counts = ClassificationExtension.ext(stac_item(tagged, CARD).assets["labels"]).classes
    assert [c.count for c in counts] == [500, 700, 600, 200]
