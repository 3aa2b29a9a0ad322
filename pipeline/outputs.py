"""Finished rasters of a run: COGs with class names and styles, quicklooks, atomic publication.

Every file is written under a temporary name beside its destination and renamed when
complete, so a reader never sees a partial file where a finished one belongs. A TIFF cannot
hold category names or a raster attribute table: GDAL keeps them in the PAM sidecar
``<mask>.aux.xml``, which GDAL, QGIS and ArcGIS read. Colour table, class names in band
tags and provenance tags live inside the TIFF.

Polygons are in :mod:`pipeline.vectors`, mask statistics in :mod:`pipeline.describe`, VRT
mosaics in :mod:`pipeline.mosaic`, STAC in :mod:`pipeline.stac` and the per-run products
in :mod:`pipeline.products`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from pipeline.overviews import (
    mode_2x2,
    overview_count,
    overview_shape,
    pair_starts,
    paired,
)
from pipeline.stitch import NODATA
from unet_flax.card import ModelCard

BLOCK = 256
QUICKLOOK_SIZE = 512
PROVENANCE_PREFIX = "TILEPIPE_"

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


class Stage:
    """Partial files of one product: renamed onto their destinations together, or removed."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path, bool]] = []

    def add(self, dest: Path, partial: Path | None = None, *, optional: bool = False) -> Path:
        """Register ``dest``; return the partial name to write (an optional one may not appear).

        An optional file whose partial is never written is removed from ``dest`` on publish,
        so a stale one from an earlier run does not outlive the product it belonged to.
        """
        partial = partial or temporary_name(dest, dest.suffix)
        self.pairs.append((partial, dest, optional))
        return partial

    def partial(self, dest: Path) -> Path:
        """The partial name registered for ``dest``."""
        return next(partial for partial, d, _ in self.pairs if d == dest)

    def publish(self) -> None:
        """Rename sidecars first and the first registered (main) file last."""
        missing = [str(p) for p, _, optional in self.pairs if not optional and not p.exists()]
        if missing:
            raise FileNotFoundError(f"partial output(s) never written: {', '.join(missing)}")
        for partial, dest, _ in reversed(self.pairs):
            if partial.exists():
                os.replace(partial, dest)
            else:  # an optional file this product does not have: drop a stale one
                dest.unlink(missing_ok=True)

    def clean(self) -> None:
        """Remove partial files and whatever GDAL or SQLite left beside them."""
        names: dict[Path, list[str]] = {}
        for partial, _, _ in self.pairs:
            names.setdefault(partial.parent, []).append(partial.name)
        for parent, prefixes in names.items():
            if parent.is_dir():
                for leftover in parent.iterdir():
                    if leftover.name.startswith(tuple(prefixes)):
                        leftover.unlink(missing_ok=True)


@contextmanager
def staged() -> Iterator[Stage]:
    """A new stage whose partials are removed on leaving; its owner calls ``publish``."""
    stage = Stage()
    try:
        yield stage
    finally:
        stage.clean()


@contextmanager
def within(stage: Stage | None) -> Iterator[Stage]:
    """``stage`` as given (its owner publishes), or a new one published on success.

    Lets one product's writer either publish on its own or join a larger product, such as
    a mask with its confidence raster and polygons, that is published as one.
    """
    if stage is not None:
        yield stage
        return
    with staged() as own:
        yield own
        own.publish()


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


def pixel_tags(pixels: np.ndarray, card: ModelCard) -> dict[str, str]:
    """Band metadata with the pixel count of every class code and of nodata (``pixels``: a
    count per code 0..255), so a summary of the mask (its STAC Item) need not read it again."""
    return {**{f"CLASS_{c.code}_PIXELS": str(int(pixels[c.code])) for c in card.classes},
            "NODATA_PIXELS": str(int(pixels[NODATA]))}


def stored_pixels(src: rasterio.DatasetReader) -> np.ndarray | None:
    """The count per code 0..255 that :func:`pixel_tags` stored in band 1, or None where the
    mask has none or they do not add up to its size (a mask written otherwise)."""
    tags = src.tags(1)
    try:
        codes = [int(code) for code in tags["CLASSES"].split(",")]
        counts = {code: int(tags[f"CLASS_{code}_PIXELS"]) for code in codes}
        counts[NODATA] = int(tags["NODATA_PIXELS"])
    except (KeyError, ValueError):
        return None
    pixels = np.zeros(256, np.int64)
    for code, count in counts.items():
        pixels[code] = count
    return pixels if pixels.sum() == src.width * src.height else None


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


def vrt_dataset(width: int, height: int, crs: CRS | None, transform: Affine | None,
                 tags: Mapping[str, str]) -> ET.Element:
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    if crs is not None:
        ET.SubElement(root, "SRS").text = crs.to_wkt()
    if transform is not None:
        ET.SubElement(root, "GeoTransform").text = ", ".join(repr(v) for v in transform.to_gdal())
    _metadata(root, tags)
    return root


def vrt_band(root: ET.Element, band: int, *, description: str, tags: Mapping[str, str],
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


def vrt_source(band_el: ET.Element, path: Path, band: int, *, relative_to: Path | None = None,
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


def vrt_overviews(band_el: ET.Element, paths: Sequence[Path], band: int) -> None:
    """The band's overviews, finest first: GDAL reads (and copies) these instead of computing its own."""
    for path in paths:
        el = ET.SubElement(band_el, "Overview")
        ET.SubElement(el, "SourceFilename", relativeToVRT="0").text = str(Path(path).resolve())
        ET.SubElement(el, "SourceBand").text = str(band)


def _num(value: float) -> str:
    """A window offset or size for VRT XML: an integer when it is one (to 1e-6 pixel)."""
    rounded = round(value)
    return str(rounded) if abs(value - rounded) < 1e-6 else f"{value:.10g}"


def vrt_text(root: ET.Element) -> str:
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def georeferencing(src: rasterio.DatasetReader) -> tuple[CRS | None, Affine | None]:
    """The source's CRS and transform; no transform when it has none (identity in rasterio)."""
    has_transform = src.crs is not None or src.transform != Affine.identity()
    return src.crs, (src.transform if has_transform else None)


def open_raster(path: Path | str, mode: str = "r", **profile: Any) -> Any:
    """``rasterio.open`` without its warning that a raster has no georeferencing: an input
    without any gets outputs without any, and every file tilepipe writes follows its input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, mode, **profile)


# --- Cloud-Optimized GeoTIFFs ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Levels:
    """The levels a codec takes, and the one GDAL uses when none is given."""

    lowest: int
    highest: int
    gdal_default: int


CODECS: dict[str, Levels | None] = {"deflate": Levels(1, 12, 6), "zstd": Levels(1, 22, 9), "lzw": None}
"""The codecs a COG may be written with (``output.compression``); LZW has no levels."""


@dataclasses.dataclass(frozen=True)
class Compression:
    """How every COG of a run is compressed: a codec of :data:`CODECS` and its level (None:
    GDAL's default; always None for LZW)."""

    codec: str = "deflate"
    level: int | None = None

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"compression must be one of {', '.join(CODECS)}, got {self.codec!r}")
        levels = CODECS[self.codec]
        if self.level is not None and (levels is None or not levels.lowest <= self.level <= levels.highest):
            which = "has no levels" if levels is None else f"levels are {levels.lowest}-{levels.highest}"
            raise ValueError(f"{self.codec} {which}, got {self.level}")

    @property
    def options(self) -> dict[str, str | int]:
        """GDAL's creation options for it (``COMPRESS`` and, with a level, ``LEVEL``)."""
        return {"COMPRESS": self.codec.upper(), **({} if self.level is None else {"LEVEL": self.level})}


def _write_cog(vrt: ET.Element, partial: Path, *, resampling: str, predictor: bool,
               compression: Compression = Compression()) -> None:
    """GDAL's COG driver: tiled, compressed on every core, the VRT's overviews (or, where it has
    none, overviews computed by ``resampling``); copies PAM items to aux.xml.

    The driver computes the overviews into a temporary file first, compressed by default and
    decompressed again to copy them: uncompressed (``COG_TMP_COMPRESSION``), the COG is the same
    byte for byte and about a quarter faster to write (that file takes a third of the raster's
    uncompressed size on disk while it exists).
    """
    with rasterio.Env(COG_TMP_COMPRESSION="NONE"), open_raster(vrt_text(vrt)) as src:
        rasterio.shutil.copy(src, partial, driver="COG", **cog_options(resampling, predictor, compression))


@contextmanager
def _mode_overviews(src: rasterio.DatasetReader, dest: Path) -> Iterator[list[Path]]:
    """The MODE overviews GDAL's COG driver would make of the class mask ``src``, computed in
    numpy (:mod:`pipeline.overviews`) into temporary GeoTIFFs beside ``dest``, finest first,
    each from the one before, a strip at a time; they are removed on exit."""
    paths = [temporary_name(dest, f"-overview{level}.tif")
             for level in range(1, overview_count(src.width, src.height, BLOCK) + 1)]
    try:
        with ExitStack() as written:
            source = src
            for level, path in enumerate(paths, start=1):
                _mode_overview(source, path, *overview_shape(src.width, src.height, level))
                source = written.enter_context(open_raster(path))
        yield paths
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def _mode_overview(source: rasterio.DatasetReader, path: Path, height: int, width: int) -> None:
    """One overview level of ``source``, ``BLOCK // 2`` rows (a block of source rows) at a time."""
    rows, cols = pair_starts(source.height, height), pair_starts(source.width, width)
    with open_raster(path, "w", driver="GTiff", width=width, height=height, count=source.count, dtype="uint8",
                     nodata=NODATA) as out:
        for top in range(0, height, BLOCK // 2):
            starts = rows[top : top + BLOCK // 2]
            first = int(starts[0])
            strip = source.read(window=Window(0, first, source.width, min(int(starts[-1]) + 2, source.height) - first))
            pixels = paired(paired(strip, starts - first, -2), cols, -1)
            out.write(mode_2x2(pixels, NODATA), window=Window(0, top, width, len(starts)))


def cog_options(resampling: str, predictor: bool, compression: Compression = Compression()) -> dict[str, str | int]:
    """Creation options of every COG tilepipe writes."""
    return {"BLOCKSIZE": BLOCK, **compression.options, "PREDICTOR": "YES" if predictor else "NO",
            "OVERVIEW_RESAMPLING": resampling, "OVERVIEWS": "AUTO", "BIGTIFF": "IF_SAFER", "NUM_THREADS": "ALL_CPUS"}


def _expect(src: rasterio.DatasetReader, path: Path, count: int, what: str) -> None:
    if src.count != count or any(d != "uint8" for d in src.dtypes):
        raise ValueError(f"{path}: a {what} must have {count} uint8 band(s), found {src.count} "
                         f"band(s) of {', '.join(sorted(set(src.dtypes)))}")


def _dataset_tags(provenance: Mapping[str, str], resampling: str) -> dict[str, str]:
    return {**{k: str(v) for k, v in provenance.items()}, "OVERVIEW_RESAMPLING": resampling}


def finalize_mask(tmp_mask: Path, dest: Path, card: ModelCard, provenance: dict[str, str], *,
                  pixels: np.ndarray | None = None, stage: Stage | None = None,
                  compression: Compression = Compression()) -> Path:
    """Write ``tmp_mask`` (uint8 codes, nodata 255) as a COG at ``dest`` with its sidecars, atomically.

    Sidecars: ``.aux.xml`` (category names, attribute table), ``.qml`` style and ``.png``
    quicklook. ``pixels`` (the mask's count per code, as its writer counted them) is kept in
    the band's tags (:func:`pixel_tags`). With ``stage`` the files join it (mask registered
    first) and its owner publishes.
    """
    files = MaskFiles(Path(dest))
    with within(stage) as stage:
        cog = stage.add(files.mask)
        stage.add(files.aux, cog.with_name(cog.name + ".aux.xml"))
        style = stage.add(files.style)
        png = stage.add(files.quicklook)
        with open_raster(tmp_mask) as src:
            _expect(src, Path(tmp_mask), 1, "class mask")
            root = vrt_dataset(src.width, src.height, *georeferencing(src), _dataset_tags(provenance, "MODE"))
            tags = class_tags(card) | (pixel_tags(pixels, card) if pixels is not None else {})
            band = vrt_band(root, 1, description=f"class ({card.name})", tags=tags, card=card)
            vrt_source(band, Path(tmp_mask).resolve(), 1)
            with _mode_overviews(src, files.mask) as levels:
                vrt_overviews(band, levels, 1)
                _write_cog(root, cog, resampling="MODE", predictor=False, compression=compression)
        style.write_text(qml_style(card), encoding="utf-8")
        _render_quicklook(cog, png, QUICKLOOK_SIZE)
    return files.mask


def finalize_confidence(tmp_conf: Path, dest: Path, provenance: dict[str, str], *,
                        stage: Stage | None = None, compression: Compression = Compression()) -> Path:
    """Write ``tmp_conf`` (max softmax probability, uint8 0-100, nodata 255) as a COG, atomically."""
    return _finalize_continuous(Path(tmp_conf), Path(dest), provenance, [("confidence", {})], "confidence raster",
                                stage, compression)


def finalize_probabilities(tmp: Path, dest: Path, card: ModelCard, provenance: dict[str, str], *,
                           stage: Stage | None = None, compression: Compression = Compression()) -> Path:
    """Write ``tmp`` (one uint8 0-100 band per class, in card order, nodata 255) as a COG, atomically."""
    bands = [(f"probability of {c.name}", {"CLASS_CODE": str(c.code), "CLASS_NAME": c.name}) for c in card.classes]
    return _finalize_continuous(Path(tmp), Path(dest), provenance, bands, "probability raster", stage, compression)


def _finalize_continuous(tmp: Path, dest: Path, provenance: Mapping[str, str],
                         bands: Sequence[tuple[str, dict[str, str]]], what: str, stage: Stage | None,
                         compression: Compression) -> Path:
    with within(stage) as stage:
        cog = stage.add(dest)
        stage.add(MaskFiles(dest).aux, cog.with_name(cog.name + ".aux.xml"), optional=True)
        with open_raster(tmp) as src:
            _expect(src, tmp, len(bands), what)
            root = vrt_dataset(src.width, src.height, *georeferencing(src), _dataset_tags(provenance, "AVERAGE"))
            for index, (description, tags) in enumerate(bands, start=1):
                band = vrt_band(root, index, description=description, tags=tags, unit="%")
                vrt_source(band, tmp.resolve(), index)
        _write_cog(root, cog, resampling="AVERAGE", predictor=True, compression=compression)
    return dest


# --- quicklook -------------------------------------------------------------------------------


def write_quicklook(mask: Path, dest: Path, max_size: int = QUICKLOOK_SIZE) -> Path:
    """An RGBA PNG of ``mask`` through its own colour table, at most ``max_size`` px on the long side."""
    with within(None) as stage:
        _render_quicklook(Path(mask), stage.add(Path(dest)), max_size)
    return Path(dest)


def quicklook_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    """Rows and columns of a quicklook: the raster's shape scaled down to fit ``max_size``."""
    scale = min(1.0, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _render_quicklook(mask: Path, dest: Path, max_size: int) -> None:
    with open_raster(mask) as src:
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
        tags = provenance_of(src)
    rgba = np.moveaxis(lut[codes], -1, 0)
    with open_raster(dest, "w", driver="PNG", width=rgba.shape[2], height=rgba.shape[1], count=4, dtype="uint8",
                     WRITE_METADATA_AS_TEXT="YES") as dst:
        dst.write(rgba)
        dst.update_tags(**tags)


def provenance_of(src: rasterio.DatasetReader) -> dict[str, str]:
    return {k: v for k, v in src.tags().items() if k.startswith(PROVENANCE_PREFIX)}
