"""Final products of a run: COGs, class names, styles, quicklooks, polygons, mosaics, STAC.

Every file is written under a temporary name beside its destination and renamed when
complete, so a reader never sees a partial file where a finished one belongs. A TIFF cannot
hold category names or a raster attribute table: GDAL keeps them in the PAM sidecar
``<mask>.aux.xml``, which GDAL, QGIS and ArcGIS read. Colour table, class names in band
tags and provenance tags live inside the TIFF.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fiona
import numpy as np
import pystac
import rasterio
import rasterio.shutil
import shapely
from affine import Affine
from fiona.crs import CRS as FionaCRS
from pyproj import CRS as ProjCRS
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.label import LabelClasses, LabelExtension, LabelType
from pystac.extensions.projection import ProjectionExtension
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import shapes
from rasterio.transform import xy
from rasterio.warp import transform_bounds, transform_geom
from rasterio.windows import Window, from_bounds
from rio_cogeo.cogeo import cog_validate
from shapely.affinity import affine_transform
from shapely.geometry import mapping, shape

from unet_flax.checkpoint import ModelCard

NODATA = 255
BLOCK = 256
QUICKLOOK_SIZE = 512
POLYGON_LAYER = "classes"
PROVENANCE_PREFIX = "TILEPIPE_"
XML_MEDIA_TYPE = "application/xml"

# GDAL raster attribute table enums (gdal.h): field types and usages.
_GFT_INTEGER, _GFT_STRING = 0, 2
_GFU_NAME, _GFU_MINMAX, _GFU_RED, _GFU_GREEN, _GFU_BLUE = 2, 5, 6, 7, 8


# --- file names and atomic publication -------------------------------------------------


def temporary_name(dest: Path, suffix: str = "") -> Path:
    """A hidden name beside ``dest`` that no finished output ever has."""
    return dest.with_name(f".{dest.name}.{os.getpid()}.partial{suffix}")


@dataclasses.dataclass(frozen=True)
class MaskFiles:
    """The files that belong to one mask, all named from the mask's path."""

    mask: Path

    @property
    def aux(self) -> Path:
        """GDAL's PAM sidecar: category names and raster attribute table."""
        return self.mask.with_name(self.mask.name + ".aux.xml")

    @property
    def style(self) -> Path:
        """QGIS default style, loaded automatically beside the raster."""
        return self.mask.with_suffix(".qml")

    @property
    def quicklook(self) -> Path:
        """PNG through the colour table; the STAC Item's thumbnail."""
        return self.mask.with_suffix(".png")

    @property
    def confidence(self) -> Path:
        """Optional COG of the highest class probability, in percent."""
        return self.mask.with_name(f"{self.mask.stem}.confidence.tif")

    @property
    def probabilities(self) -> Path:
        """Optional COG with one band per class, in percent."""
        return self.mask.with_name(f"{self.mask.stem}.probabilities.tif")

    @property
    def polygons(self) -> Path:
        """Optional GeoPackage of class polygons."""
        return self.mask.with_suffix(".gpkg")

    @property
    def item(self) -> Path:
        """The mask's STAC Item."""
        return self.mask.with_name(f"{self.mask.stem}.item.json")


class _Stage:
    """Partial files of one product: renamed onto their destinations together, or removed."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path, bool]] = []

    def add(self, dest: Path, partial: Path | None = None, *, optional: bool = False) -> Path:
        """Register ``dest``; return the partial name to write (an optional one may not appear)."""
        partial = partial or temporary_name(dest, dest.suffix)
        self.pairs.append((partial, dest, optional))
        return partial

    def publish(self) -> None:
        """Rename sidecars first and the first registered (main) file last."""
        missing = [str(p) for p, _, optional in self.pairs if not optional and not p.exists()]
        if missing:
            raise FileNotFoundError(f"partial output(s) never written: {', '.join(missing)}")
        for partial, dest, _ in reversed(self.pairs):
            if partial.exists():
                os.replace(partial, dest)
            else:  # an optional sidecar this version did not write: drop a stale one
                dest.unlink(missing_ok=True)

    def clean(self) -> None:
        """Remove partial files and whatever GDAL or SQLite left beside them."""
        for partial, _, _ in self.pairs:
            if partial.parent.is_dir():
                for leftover in partial.parent.iterdir():
                    if leftover.name.startswith(partial.name):
                        leftover.unlink(missing_ok=True)


@contextmanager
def _staged() -> Iterator[_Stage]:
    stage = _Stage()
    try:
        yield stage
    finally:
        stage.clean()


# --- classes: colour table, names, QGIS style -------------------------------------------


def colormap(card: ModelCard) -> dict[int, tuple[int, int, int, int]]:
    """Colour of each class code; nodata is transparent."""
    table = {c.code: (*c.rgb, 255) for c in card.classes}
    table[NODATA] = (0, 0, 0, 0)
    return table


def category_names(card: ModelCard) -> list[str]:
    """GDAL category names: one per code from 0 to the highest class code, '' where unused."""
    names = [""] * (max(c.code for c in card.classes) + 1)
    for c in card.classes:
        names[c.code] = c.name
    return names


def class_tags(card: ModelCard) -> dict[str, str]:
    """Band metadata naming each class code and its colour (kept inside the TIFF)."""
    tags = {"CLASSES": ",".join(str(c.code) for c in card.classes)}
    for c in card.classes:
        tags[f"CLASS_{c.code}_NAME"] = c.name
        tags[f"CLASS_{c.code}_COLOR"] = c.color
    return tags


def qml_style(card: ModelCard) -> str:
    """A QGIS paletted-renderer style with the card's colours and names; nodata unlisted."""
    qgis = ET.Element("qgis", version="3.28.0", styleCategories="AllStyleCategories")
    pipe = ET.SubElement(qgis, "pipe")
    renderer = ET.SubElement(pipe, "rasterrenderer", type="paletted", band="1", opacity="1",
                             alphaBand="-1", nodataColor="")
    ET.SubElement(renderer, "rasterTransparency")
    palette = ET.SubElement(renderer, "colorPalette")
    for c in sorted(card.classes, key=lambda c: c.code):
        ET.SubElement(palette, "paletteEntry", value=str(c.code), color=c.color.lower(), alpha="255", label=c.name)
    ET.SubElement(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    ET.SubElement(pipe, "huesaturation", saturation="0", grayscaleMode="0", invertColors="0", colorizeOn="0",
                  colorizeRed="255", colorizeGreen="128", colorizeBlue="128", colorizeStrength="100")
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")
    ET.SubElement(qgis, "blendMode").text = "0"
    ET.indent(qgis)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(qgis, encoding="unicode") + "\n"


# --- VRT XML: the carrier of everything GDAL should copy into a COG ---------------------


def _metadata(parent: ET.Element, tags: Mapping[str, str]) -> None:
    if tags:
        md = ET.SubElement(parent, "Metadata")
        for key, value in tags.items():
            ET.SubElement(md, "MDI", key=key).text = str(value)


def _vrt_dataset(width: int, height: int, crs: CRS | None, transform: Affine | None,
                 tags: Mapping[str, str]) -> ET.Element:
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    if crs is not None:
        ET.SubElement(root, "SRS").text = crs.to_wkt()
    if transform is not None:
        ET.SubElement(root, "GeoTransform").text = ", ".join(repr(v) for v in transform.to_gdal())
    _metadata(root, tags)
    return root


def _vrt_band(root: ET.Element, band: int, *, description: str, tags: Mapping[str, str],
              unit: str | None = None, card: ModelCard | None = None) -> ET.Element:
    """A uint8 band, nodata 255; with ``card`` paletted, with category names and an attribute table."""
    el = ET.SubElement(root, "VRTRasterBand", dataType="Byte", band=str(band))
    ET.SubElement(el, "Description").text = description
    _metadata(el, tags)
    ET.SubElement(el, "NoDataValue").text = str(NODATA)
    if unit:
        ET.SubElement(el, "UnitType").text = unit
    if card is None:
        ET.SubElement(el, "ColorInterp").text = "Gray"
        return el
    ET.SubElement(el, "ColorInterp").text = "Palette"
    table = ET.SubElement(el, "ColorTable")
    colours = colormap(card)
    for code in range(256):
        r, g, b, a = colours.get(code, (0, 0, 0, 0))
        ET.SubElement(table, "Entry", c1=str(r), c2=str(g), c3=str(b), c4=str(a))
    cats = ET.SubElement(el, "CategoryNames")
    for name in category_names(card):
        ET.SubElement(cats, "Category").text = name
    rat = ET.SubElement(el, "GDALRasterAttributeTable", tableType="thematic")
    fields = [("Value", _GFT_INTEGER, _GFU_MINMAX), ("Class", _GFT_STRING, _GFU_NAME),
              ("Red", _GFT_INTEGER, _GFU_RED), ("Green", _GFT_INTEGER, _GFU_GREEN), ("Blue", _GFT_INTEGER, _GFU_BLUE)]
    for i, (name, ftype, usage) in enumerate(fields):
        defn = ET.SubElement(rat, "FieldDefn", index=str(i))
        ET.SubElement(defn, "Name").text = name
        ET.SubElement(defn, "Type").text = str(ftype)
        ET.SubElement(defn, "Usage").text = str(usage)
    for i, c in enumerate(sorted(card.classes, key=lambda c: c.code)):
        row = ET.SubElement(rat, "Row", index=str(i))
        for value in (c.code, c.name, *c.rgb):
            ET.SubElement(row, "F").text = str(value)
    return el


def _vrt_source(band_el: ET.Element, path: Path, band: int, *, relative_to: Path | None = None,
                src: Window | None = None, dst: Window | None = None, nodata: int | None = None) -> None:
    """A source band; with ``nodata`` a ComplexSource, so its nodata pixels do not paint over others."""
    el = ET.SubElement(band_el, "ComplexSource" if nodata is not None else "SimpleSource")
    if nodata is not None:
        el.set("resampling", "nearest")
    name = ET.SubElement(el, "SourceFilename", relativeToVRT="1" if relative_to else "0")
    name.text = Path(os.path.relpath(path, relative_to)).as_posix() if relative_to else str(path)
    ET.SubElement(el, "SourceBand").text = str(band)
    for tag, window in (("SrcRect", src), ("DstRect", dst)):
        if window is not None:
            ET.SubElement(el, tag, xOff=_num(window.col_off), yOff=_num(window.row_off),
                          xSize=_num(window.width), ySize=_num(window.height))
    if nodata is not None:
        ET.SubElement(el, "NODATA").text = str(nodata)


def _num(value: float) -> str:
    """A window offset or size for VRT XML: an integer when it is one (to 1e-6 pixel)."""
    rounded = round(value)
    return str(rounded) if abs(value - rounded) < 1e-6 else f"{value:.10g}"


def _vrt_text(root: ET.Element) -> str:
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def _georeferencing(src: rasterio.DatasetReader) -> tuple[CRS | None, Affine | None]:
    """The source's CRS and transform; no transform when it has none (identity in rasterio)."""
    has_transform = src.crs is not None or src.transform != Affine.identity()
    return src.crs, (src.transform if has_transform else None)


def _open(path: Path | str) -> rasterio.DatasetReader:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


# --- Cloud-Optimized GeoTIFFs ------------------------------------------------------------


def _write_cog(vrt: ET.Element, partial: Path, *, resampling: str, predictor: bool) -> None:
    """GDAL's COG driver: tiled, DEFLATE, overviews by ``resampling``; copies PAM items to aux.xml."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(_vrt_text(vrt)) as src:
            rasterio.shutil.copy(src, partial, driver="COG", BLOCKSIZE=BLOCK, COMPRESS="DEFLATE",
                                 PREDICTOR="YES" if predictor else "NO", OVERVIEW_RESAMPLING=resampling,
                                 OVERVIEWS="AUTO", BIGTIFF="IF_SAFER")


def _expect(src: rasterio.DatasetReader, path: Path, count: int, what: str) -> None:
    if src.count != count or any(d != "uint8" for d in src.dtypes):
        raise ValueError(f"{path}: a {what} must have {count} uint8 band(s), found {src.count} "
                         f"band(s) of {', '.join(sorted(set(src.dtypes)))}")


def _dataset_tags(provenance: Mapping[str, str], resampling: str) -> dict[str, str]:
    return {**{k: str(v) for k, v in provenance.items()}, "OVERVIEW_RESAMPLING": resampling}


def finalize_mask(tmp_mask: Path, dest: Path, card: ModelCard, provenance: dict[str, str]) -> Path:
    """Write ``tmp_mask`` (uint8 codes, nodata 255) as a COG at ``dest`` with its sidecars, atomically.

    Sidecars: ``.aux.xml`` (category names, attribute table), ``.qml`` style and ``.png`` quicklook.
    """
    files = MaskFiles(Path(dest))
    with _staged() as stage:
        cog = stage.add(files.mask)
        stage.add(files.aux, cog.with_name(cog.name + ".aux.xml"))
        style = stage.add(files.style)
        png = stage.add(files.quicklook)
        with _open(tmp_mask) as src:
            _expect(src, Path(tmp_mask), 1, "class mask")
            root = _vrt_dataset(src.width, src.height, *_georeferencing(src), _dataset_tags(provenance, "MODE"))
            band = _vrt_band(root, 1, description=f"class ({card.name})", tags=class_tags(card), card=card)
            _vrt_source(band, Path(tmp_mask).resolve(), 1)
        _write_cog(root, cog, resampling="MODE", predictor=False)
        style.write_text(qml_style(card), encoding="utf-8")
        _render_quicklook(cog, png, QUICKLOOK_SIZE)
        stage.publish()
    return files.mask


def finalize_confidence(tmp_conf: Path, dest: Path, provenance: dict[str, str]) -> Path:
    """Write ``tmp_conf`` (max softmax probability, uint8 0-100, nodata 255) as a COG, atomically."""
    return _finalize_continuous(Path(tmp_conf), Path(dest), provenance, [("confidence", {})], "confidence raster")


def finalize_probabilities(tmp: Path, dest: Path, card: ModelCard, provenance: dict[str, str]) -> Path:
    """Write ``tmp`` (one uint8 0-100 band per class, in card order, nodata 255) as a COG, atomically."""
    bands = [(f"probability of {c.name}", {"CLASS_CODE": str(c.code), "CLASS_NAME": c.name}) for c in card.classes]
    return _finalize_continuous(Path(tmp), Path(dest), provenance, bands, "probability raster")


def _finalize_continuous(tmp: Path, dest: Path, provenance: Mapping[str, str],
                         bands: Sequence[tuple[str, dict[str, str]]], what: str) -> Path:
    with _staged() as stage:
        cog = stage.add(dest)
        stage.add(MaskFiles(dest).aux, cog.with_name(cog.name + ".aux.xml"), optional=True)
        with _open(tmp) as src:
            _expect(src, tmp, len(bands), what)
            root = _vrt_dataset(src.width, src.height, *_georeferencing(src), _dataset_tags(provenance, "AVERAGE"))
            for index, (description, tags) in enumerate(bands, start=1):
                band = _vrt_band(root, index, description=description, tags=tags, unit="%")
                _vrt_source(band, tmp.resolve(), index)
        _write_cog(root, cog, resampling="AVERAGE", predictor=True)
        stage.publish()
    return dest


# --- quicklook -------------------------------------------------------------------------------


def write_quicklook(mask: Path, dest: Path, max_size: int = QUICKLOOK_SIZE) -> Path:
    """An RGBA PNG of ``mask`` through its own colour table, at most ``max_size`` px on the long side."""
    with _staged() as stage:
        partial = stage.add(Path(dest))
        _render_quicklook(Path(mask), partial, max_size)
        stage.publish()
    return Path(dest)


def quicklook_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    """Rows and columns of a quicklook: the raster's shape scaled down to fit ``max_size``."""
    scale = min(1.0, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _render_quicklook(mask: Path, dest: Path, max_size: int) -> None:
    with _open(mask) as src:
        try:
            table = src.colormap(1)
        except ValueError as exc:
            raise ValueError(f"{mask}: no colour table to render a quicklook through") from exc
        lut = np.zeros((256, 4), np.uint8)
        for code, rgba in table.items():
            lut[code] = rgba
        if src.nodata is not None:
            lut[int(src.nodata)] = 0
        codes = src.read(1, out_shape=quicklook_shape(src.height, src.width, max_size), resampling=Resampling.mode)
        tags = _provenance_of(src)
    rgba = np.moveaxis(lut[codes], -1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(dest, "w", driver="PNG", width=rgba.shape[2], height=rgba.shape[1], count=4,
                           dtype="uint8", WRITE_METADATA_AS_TEXT="YES") as dst:
            dst.write(rgba)
            dst.update_tags(**tags)


def _provenance_of(src: rasterio.DatasetReader) -> dict[str, str]:
    return {k: v for k, v in src.tags().items() if k.startswith(PROVENANCE_PREFIX)}


# --- polygons --------------------------------------------------------------------------------


def write_polygons(mask_path: Path, dest_gpkg: Path, card: ModelCard, tolerance: float) -> Path:
    """One GeoPackage layer of class polygons (class_code, class_name), simplified as a coverage.

    ``tolerance`` is in CRS units (0 keeps pixel edges); the simplification works on the whole
    coverage, so neighbours keep shared edges: no gaps or overlaps. The mask is read whole.
    """
    if not tolerance >= 0:
        raise ValueError(f"polygon simplify tolerance must be >= 0 (CRS units), got {tolerance}")
    names = {c.code: c.name for c in card.classes}
    with _open(mask_path) as src:
        data = src.read(1)
        nodata = NODATA if src.nodata is None else int(src.nodata)
        found = list(shapes(data, mask=data != nodata))  # in pixel coordinates: exact integers
        transform, pixel = src.transform, math.sqrt(src.res[0] * src.res[1])
        crs = FionaCRS.from_wkt(src.crs.to_wkt()) if src.crs else None
        tags = _provenance_of(src)
    geoms = np.array([shape(g) for g, _ in found], dtype=object)
    if tolerance > 0 and len(geoms):
        # Every pixel corner on an edge becomes a vertex, so neighbours share vertices: a coverage.
        geoms = shapely.coverage_simplify(shapely.segmentize(geoms, 1.0), tolerance / pixel)
    geoms = [affine_transform(g, transform.to_shapely()) for g in geoms]
    schema = {"geometry": "Polygon", "properties": {"class_code": "int", "class_name": "str"}}
    with _staged() as stage:
        partial = stage.add(Path(dest_gpkg))
        with fiona.open(partial, "w", driver="GPKG", layer=POLYGON_LAYER, schema=schema, crs=crs) as dst:
            dst.update_tags(tags)
            dst.writerecords(
                fiona.Feature.from_dict(geometry=mapping(g), properties={
                    "class_code": int(v), "class_name": names.get(int(v), f"class {int(v)}")})
                for g, (_, v) in zip(geoms, found, strict=True))
        stage.publish()
    return Path(dest_gpkg)


# --- describing a mask -----------------------------------------------------------------------


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


def _class_totals(src: rasterio.DatasetReader) -> tuple[np.ndarray, np.ndarray, str, str]:
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
    with _open(path) as src:
        info = _class_info(src)
        colours = src.colormap(1) if src.colorinterp[0].name == "palette" else {}
        nodata = NODATA if src.nodata is None else int(src.nodata)
        pixels, area, unit, method = _class_totals(src)
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
            "provenance": _provenance_of(src),
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
        f"  size         {desc['width']} x {desc['height']} pixels, {desc['count']} band(s) {desc['dtype']}, "
        f"nodata {nodata}",
        f"  CRS          {crs}",
        f"  bounds       left {b['left']:.12g}, bottom {b['bottom']:.12g}, "
        f"right {b['right']:.12g}, top {b['top']:.12g}",
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


# --- run products: VRT mosaics ---------------------------------------------------------------


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

    @property
    def transform(self) -> Affine:
        """North-up grid of the mosaic, from the top left of its masks."""
        left, _, _, top = self.bounds
        return rasterio.transform.from_origin(left, top, *self.res)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """Union of the masks' bounds."""
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
    root = _vrt_dataset(width, height, mosaic.crs, mosaic.transform, tags)
    band = _vrt_band(root, 1, description=f"class ({card.name})", tags=class_tags(card), card=card)
    for g in mosaic.grids:
        dst = from_bounds(*g.bounds, transform=mosaic.transform)
        _vrt_source(band, g.path, 1, relative_to=vrt_dir, src=Window(0, 0, g.width, g.height), dst=dst,
                    nodata=NODATA)
    return _vrt_text(root)


def _grid(path: Path) -> Grid:
    with _open(path) as src:
        crs, transform = _georeferencing(src)
        return Grid(Path(path), crs, transform or Affine.identity(), src.width, src.height)


def write_mosaics(outdir: Path, masks: Sequence[Path], card: ModelCard, run_id: str) -> list[Path]:
    """One ``mosaic-<crs>.vrt`` in ``outdir`` per group of :func:`plan_mosaics`."""
    written = []
    tags = {"TILEPIPE_RUN_ID": run_id, "TILEPIPE_MODEL": card.name}
    for mosaic in plan_mosaics(_grid(m) for m in masks):
        dest = Path(outdir) / mosaic.name
        with _staged() as stage:
            stage.add(dest).write_text(mosaic_vrt(mosaic, Path(outdir), card, tags), encoding="utf-8")
            stage.publish()
        written.append(dest)
    return written


# --- run products: STAC --------------------------------------------------------------------


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
    grid = _grid(mask)
    with _open(mask) as src:
        tags = _provenance_of(src)
        pixels, _, _, _ = _class_totals(src)
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
        with _staged() as stage:
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


def write_run_products(outdir: Path, masks: list[Path], card: ModelCard, run_id: str) -> list[Path]:
    """After a run: quicklooks that are missing, VRT mosaics, STAC Items and the Collection."""
    written = []
    for mask in masks:
        png = MaskFiles(Path(mask)).quicklook
        if not png.exists():
            written.append(write_quicklook(Path(mask), png))
    mosaics = write_mosaics(Path(outdir), masks, card, run_id)
    return written + mosaics + write_stac(Path(outdir), masks, card, run_id, mosaics)
