"""Class polygons of a mask, for vector users: one GeoPackage layer, simplified as a coverage."""

from __future__ import annotations

import math
from pathlib import Path

import fiona
import numpy as np
import shapely
from fiona.crs import CRS as FionaCRS
from rasterio.features import shapes
from shapely.affinity import affine_transform
from shapely.geometry import mapping, shape

from pipeline.outputs import Stage, open_raster, provenance_of, within
from pipeline.stitch import NODATA
from unet_flax.card import ModelCard

POLYGON_LAYER = "classes"


def write_polygons(mask_path: Path, dest_gpkg: Path, card: ModelCard, tolerance: float, *,
                   stage: Stage | None = None) -> Path:
    """One GeoPackage layer of class polygons (class_code, class_name), simplified as a coverage.

    ``tolerance`` is in CRS units (0 keeps pixel edges); the simplification works on the whole
    coverage, so neighbours keep shared edges: no gaps or overlaps. The mask is read whole.
    """
    if not tolerance >= 0:
        raise ValueError(f"polygon simplify tolerance must be >= 0 (CRS units), got {tolerance}")
    names = {c.code: c.name for c in card.classes}
    with open_raster(mask_path) as src:
        data = src.read(1)
        nodata = NODATA if src.nodata is None else int(src.nodata)
        found = list(shapes(data, mask=data != nodata))  # in pixel coordinates: exact integers
        transform, pixel = src.transform, math.sqrt(src.res[0] * src.res[1])
        crs = FionaCRS.from_wkt(src.crs.to_wkt()) if src.crs else None
        tags = provenance_of(src)
    geoms = np.array([shape(g) for g, _ in found], dtype=object)
    if tolerance > 0 and len(geoms):
        # Every pixel corner on an edge becomes a vertex, so neighbours share vertices: a coverage.
        geoms = shapely.coverage_simplify(shapely.segmentize(geoms, 1.0), tolerance / pixel)
    geoms = [affine_transform(g, transform.to_shapely()) for g in geoms]
    schema = {"geometry": "Polygon", "properties": {"class_code": "int", "class_name": "str"}}
    with within(stage) as stage:
        partial = stage.add(Path(dest_gpkg))
        with fiona.open(partial, "w", driver="GPKG", layer=POLYGON_LAYER, schema=schema, crs=crs) as dst:
            dst.update_tags(tags)
            dst.writerecords(
                fiona.Feature.from_dict(geometry=mapping(g), properties={
                    "class_code": int(v), "class_name": names.get(int(v), f"class {int(v)}")})
                for g, (_, v) in zip(geoms, found, strict=True))
    return Path(dest_gpkg)
