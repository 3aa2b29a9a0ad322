"""STAC of a run: an Item beside each mask (projection, label, classification) and a Collection."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pystac
import shapely
from pyproj import CRS as ProjCRS
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.label import LabelClasses, LabelExtension, LabelType
from pystac.extensions.projection import ProjectionExtension
from rasterio.warp import transform_bounds, transform_geom
from shapely.geometry import mapping

from pipeline.describe import class_totals
from pipeline.mosaic import Grid, read_grid
from pipeline.outputs import (
    PROVENANCE_PREFIX,
    MaskFiles,
    open_raster,
    provenance_of,
    staged,
    stored_pixels,
)
from pipeline.stitch import NODATA
from unet_flax.card import ModelCard

XML_MEDIA_TYPE = "application/xml"


def _stac_name(name: str) -> str:
    """A classification-extension class name: letters, digits, - and _ only."""
    return re.sub(r"[^0-9A-Za-z_-]+", "_", name).strip("_") or "class"


def _item_time(tags: Mapping[str, str], path: Path) -> dt.datetime:
    try:
        return pystac.utils.str_to_datetime(tags["TILEPIPE_TIME"])
    except (KeyError, ValueError):
        return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)


def _footprint(grid: Grid) -> tuple[dict[str, Any], list[float]]:
    """GeoJSON footprint and bbox in EPSG:4326 of a georeferenced mask."""
    ring = shapely.segmentize(grid.footprint, grid.footprint.length / 64)  # follows curved edges
    geometry = transform_geom(grid.crs, "EPSG:4326", mapping(ring), precision=9)
    bbox = list(transform_bounds(grid.crs, "EPSG:4326", *shapely.bounds(ring), densify_pts=21))
    return geometry, bbox


def _href(path: Path, start: Path) -> str:
    return "./" + Path(os.path.relpath(path, start)).as_posix()


def stac_item(mask: Path, card: ModelCard) -> pystac.Item:
    """A STAC Item for ``mask`` with projection, label and classification fields; absolute asset hrefs."""
    mask = Path(mask)
    files = MaskFiles(mask)
    grid = read_grid(mask)
    with open_raster(mask) as src:
        tags = provenance_of(src)
        pixels = stored_pixels(src)
        if pixels is None:  # a mask without its counts: count them
            pixels, _, _, _ = class_totals(src)
    geometry, bbox = _footprint(grid) if grid.crs else (None, None)
    time = _item_time(tags, mask)
    properties = {f"tilepipe:{k[len(PROVENANCE_PREFIX):].lower()}": v for k, v in tags.items()}
    item = pystac.Item(id=mask.stem, geometry=geometry, bbox=bbox, datetime=time,
                       properties={"created": pystac.utils.datetime_to_str(time), **properties})
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    epsg = grid.crs.to_epsg() if grid.crs else None
    proj.apply(epsg=epsg, wkt2=None if epsg or grid.crs is None else ProjCRS.from_wkt(grid.crs.to_wkt()).to_wkt(),
               shape=[grid.height, grid.width], transform=list(grid.transform)[:6],
               bbox=list(grid.bounds) if grid.crs else None)
    classes = sorted(card.classes, key=lambda c: c.code)
    LabelExtension.ext(item, add_if_missing=True).apply(
        label_description=f"Land-cover classes predicted by the U-Net model {card.name}",
        label_type=LabelType.RASTER,
        label_properties=None,
        label_classes=[LabelClasses.create(classes=[c.code for c in classes], name=None)],
        label_tasks=["segmentation"],
        label_methods=["automated"],
    )
    labels = pystac.Asset(str(mask.resolve()), title=f"class mask ({card.name})",
                          media_type=pystac.MediaType.COG, roles=["labels", "data"])
    item.add_asset("labels", labels)
    valid = max(int(pixels.sum() - pixels[NODATA]), 1)
    ClassificationExtension.ext(labels, add_if_missing=True).apply(classes=[
        *(Classification.create(value=c.code, name=_stac_name(c.name), title=c.name, description=c.name,
                                color_hint=c.color[1:].upper(), count=int(pixels[c.code]),
                                percentage=round(100 * float(pixels[c.code]) / valid, 4)) for c in classes),
        Classification.create(value=NODATA, name="nodata", title="no data", description="no data", nodata=True,
                              count=int(pixels[NODATA])),
    ])
    extras = [("thumbnail", files.quicklook, pystac.MediaType.PNG, ["thumbnail"], "quicklook"),
              ("gdal-pam", files.aux, XML_MEDIA_TYPE, ["metadata"], "GDAL category names and attribute table"),
              ("qgis-style", files.style, XML_MEDIA_TYPE, ["metadata"], "QGIS style"),
              ("confidence", files.confidence, pystac.MediaType.COG, ["data"], "confidence (%)"),
              ("probabilities", files.probabilities, pystac.MediaType.COG, ["data"], "class probabilities (%)"),
              ("polygons", files.polygons, pystac.MediaType.GEOPACKAGE, ["data"], "class polygons")]
    for key, path, media_type, roles, title in extras:
        if path.exists():
            item.add_asset(key, pystac.Asset(str(path.resolve()), title=title, media_type=media_type, roles=roles))
    return item


def run_collection(items: Sequence[pystac.Item], card: ModelCard, run_id: str) -> pystac.Collection:
    """The run's STAC Collection holding ``items``."""
    boxes = [i.bbox for i in items if i.bbox]
    bbox = ([min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
            if boxes else [-180.0, -90.0, 180.0, 90.0])
    times = [i.datetime for i in items if i.datetime] or [dt.datetime.now(dt.UTC)]
    return pystac.Collection(
        id=f"tilepipe-{run_id}",
        title=f"tilepipe run {run_id}",
        description=f"Land-cover masks of tilepipe run {run_id}, predicted by the U-Net model {card.name}; "
                    f"classes: {', '.join(f'{c.code} {c.name}' for c in card.classes)}.",
        extent=pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([[min(times), max(times)]])),
        license="other",
        catalog_type=pystac.CatalogType.SELF_CONTAINED,
        summaries=pystac.Summaries({"label:type": ["raster"], "label:tasks": ["segmentation"],
                                    "tilepipe:model": [card.name]}),
    )


def write_stac(outdir: Path, masks: Sequence[Path], card: ModelCard, run_id: str,
               mosaics: Sequence[Path] = ()) -> list[Path]:
    """``<stem>.item.json`` beside each mask and ``collection.json`` in ``outdir``; relative links."""
    outdir = Path(outdir)
    items = [stac_item(m, card) for m in masks]
    _unique_ids(items, masks, outdir)
    collection = run_collection(items, card, run_id)
    collection.set_self_href(str((outdir / "collection.json").resolve()))
    for vrt in mosaics:
        collection.add_asset(Path(vrt).stem, pystac.Asset(_href(vrt, outdir), title="VRT mosaic of the run's masks",
                                                          media_type=XML_MEDIA_TYPE, roles=["data", "mosaic"]))
    for item, mask in zip(items, masks, strict=True):
        collection.add_item(item)
        item.set_self_href(str(MaskFiles(Path(mask)).item.resolve()))
        item.make_asset_hrefs_relative()
    documents = [(MaskFiles(Path(m)).item, item.to_dict(include_self_link=False))
                 for item, m in zip(items, masks, strict=True)]
    documents.append((outdir / "collection.json", collection.to_dict(include_self_link=False)))
    written = []
    for path, doc in documents:
        with staged() as stage:
            stage.add(path).write_text(_json(doc), encoding="utf-8")
            stage.publish()
        written.append(path)
    return written


def _unique_ids(items: Sequence[pystac.Item], masks: Sequence[Path], outdir: Path) -> None:
    """Masks of one stem in different folders get ids from their path below ``outdir``."""
    stems = [i.id for i in items]
    for item, mask in zip(items, masks, strict=True):
        if stems.count(item.id) > 1:
            item.id = "-".join(Path(os.path.relpath(Path(mask).with_suffix(""), outdir)).parts)


def _json(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
