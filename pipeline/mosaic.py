"""VRT mosaics of a run's masks: one per CRS and resolution, nodata never painting over data."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.transform import xy
from rasterio.windows import Window, from_bounds

from pipeline.outputs import (
    class_tags,
    georeferencing,
    open_raster,
    staged,
    vrt_band,
    vrt_dataset,
    vrt_source,
    vrt_text,
)
from pipeline.stitch import NODATA
from unet_flax.card import ModelCard


@dataclasses.dataclass(frozen=True)
class Grid:
    """Where a mask lies: its path, CRS, transform and size."""

    path: Path
    crs: CRS | None
    transform: Affine
    width: int
    height: int

    @property
    def footprint(self) -> shapely.Polygon:
        """The outline of the raster's pixels in its CRS (rotation included)."""
        w, h = self.width, self.height
        xs, ys = xy(self.transform, [0, 0, h, h], [0, w, w, 0], offset="ul")
        return shapely.Polygon(np.column_stack([xs, ys]))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """Left, bottom, right, top in the CRS."""
        return tuple(float(v) for v in self.footprint.bounds)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Mosaic:
    """Masks that share CRS and resolution, mosaicked as one VRT named ``name``."""

    name: str
    crs: CRS
    res: tuple[float, float]
    grids: tuple[Grid, ...]

    @functools.cached_property
    def transform(self) -> Affine:
        """North-up grid of the mosaic, from the top left of its masks."""
        left, _, _, top = self.bounds
        return rasterio.transform.from_origin(left, top, *self.res)

    @functools.cached_property
    def bounds(self) -> tuple[float, float, float, float]:
        """Union of the masks' bounds (computed once: every source's placement uses them)."""
        b = np.array([g.bounds for g in self.grids])
        return float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())

    @property
    def shape(self) -> tuple[int, int]:
        """Rows and columns covering every mask."""
        window = from_bounds(*self.bounds, transform=self.transform)
        return math.ceil(window.height - 1e-6), math.ceil(window.width - 1e-6)


def crs_key(crs: CRS) -> str:
    """``epsg32633`` for an EPSG CRS, else ``crs-`` and a short hash of its WKT."""
    epsg = crs.to_epsg()
    return f"epsg{epsg}" if epsg else "crs-" + hashlib.sha256(crs.to_wkt().encode()).hexdigest()[:10]


def plan_mosaics(grids: Iterable[Grid]) -> list[Mosaic]:
    """Group north-up masks by CRS and resolution; masks without a CRS or rotated are left out."""
    groups: dict[tuple[str, tuple[float, float]], list[Grid]] = {}
    crss: dict[str, CRS] = {}
    for g in grids:
        t = g.transform
        if g.crs is None or t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
            continue
        key = crs_key(g.crs)
        crss[key] = g.crs
        res = (float(f"{t.a:.9g}"), float(f"{-t.e:.9g}"))
        groups.setdefault((key, res), []).append(g)
    per_crs = {}
    for key, _ in groups:
        per_crs[key] = per_crs.get(key, 0) + 1
    mosaics = []
    for (key, res), members in sorted(groups.items()):
        name = f"mosaic-{key}" + (f"-{res[0]:g}x{res[1]:g}" if per_crs[key] > 1 else "") + ".vrt"
        mosaics.append(Mosaic(name, crss[key], res, tuple(sorted(members, key=lambda g: str(g.path)))))
    return mosaics


def mosaic_vrt(mosaic: Mosaic, vrt_dir: Path, card: ModelCard, tags: Mapping[str, str]) -> str:
    """VRTDataset XML of ``mosaic`` with sources relative to ``vrt_dir``; nodata never paints over data."""
    height, width = mosaic.shape
    root = vrt_dataset(width, height, mosaic.crs, mosaic.transform, tags)
    band = vrt_band(root, 1, description=f"class ({card.name})", tags=class_tags(card), card=card)
    for g in mosaic.grids:
        dst = from_bounds(*g.bounds, transform=mosaic.transform)
        vrt_source(band, g.path, 1, relative_to=vrt_dir, src=Window(0, 0, g.width, g.height), dst=dst,
                    nodata=NODATA)
    return vrt_text(root)


def read_grid(path: Path) -> Grid:
    with open_raster(path) as src:
        crs, transform = georeferencing(src)
        return Grid(Path(path), crs, transform or Affine.identity(), src.width, src.height)


def write_mosaics(outdir: Path, masks: Sequence[Path], card: ModelCard, run_id: str) -> list[Path]:
    """One ``mosaic-<crs>.vrt`` in ``outdir`` per group of :func:`plan_mosaics`."""
    written = []
    tags = {"TILEPIPE_RUN_ID": run_id, "TILEPIPE_MODEL": card.name}
    for mosaic in plan_mosaics(read_grid(m) for m in masks):
        dest = Path(outdir) / mosaic.name
        with staged() as stage:
            stage.add(dest).write_text(mosaic_vrt(mosaic, Path(outdir), card, tags), encoding="utf-8")
            stage.publish()
        written.append(dest)
    return written
