"""Describing a mask (``tilepipe inspect``): size, georeferencing, class areas, provenance."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from pyproj import CRS as ProjCRS
from rasterio.transform import xy
from rio_cogeo.cogeo import cog_validate

from pipeline.outputs import open_raster, provenance_of
from pipeline.stitch import NODATA


def _class_info(src: rasterio.DatasetReader) -> dict[int, tuple[str, str]]:
    """Names and colours of the classes a mask declares in its band tags (tilepipe's own)."""
    tags = src.tags(1)
    info = {}
    for key, name in tags.items():
        m = re.fullmatch(r"CLASS_(\d+)_NAME", key)
        if m:
            code = int(m.group(1))
            info[code] = (name, tags.get(f"CLASS_{code}_COLOR", ""))
    return info


def _row_areas(src: rasterio.DatasetReader) -> tuple[np.ndarray, str, str]:
    """Area of one pixel in each row, its unit and method (planar, geodesic or pixels)."""
    if src.crs is None:
        if src.transform == Affine.identity():
            return np.ones(src.height), "pixels", "pixels"
        return np.full(src.height, src.res[0] * src.res[1]), "square map units (no CRS)", "planar"
    if src.crs.is_geographic:
        geod = ProjCRS.from_wkt(src.crs.to_wkt()).get_geod()
        areas = np.empty(src.height)
        for row in range(src.height):
            lons, lats = xy(src.transform, [row, row, row + 1, row + 1], [0, 1, 1, 0], offset="ul")
            areas[row] = abs(geod.polygon_area_perimeter(lons, lats)[0])
        return areas, "m²", "geodesic"
    units = src.crs.linear_units
    return (np.full(src.height, src.res[0] * src.res[1]),
            "m²" if units in ("metre", "meter", "m") else f"square {units}", "planar")


def class_totals(src: rasterio.DatasetReader) -> tuple[np.ndarray, np.ndarray, str, str]:
    """Pixel count and area of every code 0..255, block by block."""
    row_area, unit, method = _row_areas(src)
    pixels = np.zeros(256, np.int64)
    area = np.zeros(256)
    for _, window in src.block_windows(1):
        codes = src.read(1, window=window).ravel()
        rows = slice(window.row_off, window.row_off + window.height)
        pixels += np.bincount(codes, minlength=256)
        area += np.bincount(codes, weights=np.repeat(row_area[rows], window.width), minlength=256)
    return pixels, area, unit, method


def describe_mask(path: Path) -> dict:
    """Size, georeferencing, class pixels/areas/percentages and provenance of a mask."""
    path = Path(path)
    with open_raster(path) as src:
        info = _class_info(src)
        colours = src.colormap(1) if src.colorinterp[0].name == "palette" else {}
        nodata = NODATA if src.nodata is None else int(src.nodata)
        pixels, area, unit, method = class_totals(src)
        valid_area = area.sum() - area[nodata]
        codes = sorted(set(info) | {int(c) for c in np.flatnonzero(pixels) if c != nodata})
        crs = src.crs
        desc = {
            "path": str(path),
            "width": src.width, "height": src.height, "count": src.count, "dtype": src.dtypes[0],
            "nodata": src.nodata,
            "crs": crs.to_string() if crs else None,
            "crs_name": ProjCRS.from_wkt(crs.to_wkt()).name if crs else None,
            "geographic": bool(crs and crs.is_geographic),
            "transform": list(src.transform)[:6],
            "bounds": dict(zip(("left", "bottom", "right", "top"), src.bounds, strict=True)),
            "resolution": list(src.res),
            "overviews": src.overviews(1),
            "cog": cog_validate(path, quiet=True)[0],
            "area_unit": unit, "area_method": method,
            "valid_pixels": int(pixels.sum() - pixels[nodata]), "nodata_pixels": int(pixels[nodata]),
            "valid_area": float(valid_area),
            "classes": [{
                "code": code,
                "name": info.get(code, (f"class {code}", ""))[0],
                "color": info.get(code, ("", ""))[1] or _hex(colours.get(code)),
                "pixels": int(pixels[code]),
                "area": float(area[code]),
                "percent": float(100 * area[code] / valid_area) if valid_area else 0.0,
            } for code in codes],
            "provenance": provenance_of(src),
        }
    return desc


def _hex(rgba: tuple[int, ...] | None) -> str:
    return "" if rgba is None else "#{:02x}{:02x}{:02x}".format(*rgba[:3])


def format_description(desc: dict) -> str:
    """The text ``tilepipe inspect`` prints for :func:`describe_mask`'s result."""
    b = desc["bounds"]
    nodata = "none" if desc["nodata"] is None else f"{desc['nodata']:g}"
    crs = f"{desc['crs']} ({desc['crs_name']})" if desc["crs"] else "none (pixel coordinates only)"
    overviews = ", ".join(f"1/{f}" for f in desc["overviews"]) or "none"
    lines = [
        desc["path"],
        (f"  size         {desc['width']} x {desc['height']} pixels, {desc['count']} band(s) {desc['dtype']}, "
         f"nodata {nodata}"),
        f"  CRS          {crs}",
        (f"  bounds       left {b['left']:.12g}, bottom {b['bottom']:.12g}, "
         f"right {b['right']:.12g}, top {b['top']:.12g}"),
        f"  resolution   {desc['resolution'][0]:.12g} x {desc['resolution'][1]:.12g}",
        f"  overviews    {overviews}; Cloud-Optimized GeoTIFF: {'yes' if desc['cog'] else 'no'}",
        f"  valid        {desc['valid_pixels']} pixels, {desc['nodata_pixels']} nodata",
        "",
        f"classes (area in {desc['area_unit']}, {desc['area_method']}; % of valid area)",
    ]
    width = max([len(c["name"]) for c in desc["classes"]] + [4])
    lines.append(f"  {'code':>4}  {'name':<{width}}  {'pixels':>12}  {'area':>20}  {'%':>6}")
    for c in desc["classes"]:
        lines.append(f"  {c['code']:>4}  {c['name']:<{width}}  {c['pixels']:>12}  "
                     f"{c['area']:>20,.2f}  {c['percent']:>6.2f}")
    lines += ["", "provenance"]
    prov = desc["provenance"]
    if prov:
        key_width = max(len(k) for k in prov)
        lines += [f"  {k:<{key_width}}  {v}" for k, v in sorted(prov.items())]
    else:
        lines.append("  none recorded (not written by tilepipe?)")
    return "\n".join(lines)
