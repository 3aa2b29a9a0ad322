"""Per-run products: VRT mosaics and STAC written for the finished masks of a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.transform import from_origin
from test_outputs import CARD, PROVENANCE

from pipeline.outputs import MaskFiles, finalize_mask
from pipeline.products import write_run_products

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


def write_run(root: Path) -> tuple[Path, dict[str, Path], list[Path]]:
    """Six finished masks under ``root/out`` and the run products written for them.

    Three UTM masks at 10 m (two side by side, one overlapping both with a little data), one
    UTM at 20 m, one geographic in a sub-folder and one without CRS.
    """
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



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Six finished masks and the run products written for them (see :func:`write_run`)."""
    return write_run(tmp_path_factory.mktemp("run"))


def test_run_products_are_mosaics_items_and_a_collection(run):
    out, masks, written = run
    expected = {"mosaic-epsg32633-10x10.vrt", "mosaic-epsg32633-20x20.vrt", "mosaic-epsg4326.vrt", "collection.json"}
    expected |= {MaskFiles(m).item.relative_to(out).as_posix() for m in masks.values()}
    assert {p.relative_to(out).as_posix() for p in written} == expected
    assert all(p.exists() for p in written)
    assert not [p for p in out.rglob(".*")], "partial files left behind"
