"""The writer side of one output: temporary GeoTIFFs filled tile by tile, then verified
COGs published atomically (companions first, the mask last).

A killed run leaves only hidden ``.*.<pid>.partial*`` names, which :func:`clean_partials`
removes on the next run while it holds the workflow's lock.
"""

from __future__ import annotations

import re
import resource
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import outputs
from pipeline.config import OutputSection
from pipeline.errors import TilepipeError
from pipeline.io import RasterInfo
from pipeline.outputs import temporary_name
from pipeline.stitch import NODATA
from unet_flax.card import ModelCard

if TYPE_CHECKING:  # the finishers import this module, and no JAX
    from pipeline.tasks import BatchResult


class MaskSink:
    """The temporary GeoTIFFs of one output; the runner is their only writer."""

    def __init__(self, info: RasterInfo, dest: Path, section: OutputSection, num_classes: int):
        self.info = info
        self.dest = dest
        self.section = section
        self.paths = {"classes": temporary_name(dest, "-classes.tif")}
        bands = {"classes": 1}
        if section.confidence:
            self.paths["confidence"] = temporary_name(dest, "-confidence.tif")
            bands["confidence"] = 1
        if section.probabilities:
            self.paths["probabilities"] = temporary_name(dest, "-probabilities.tif")
            bands["probabilities"] = num_classes
        self.bands = bands
        self.pixels = np.zeros(256, np.int64)  # of each class code, nodata included, as written
        block = 256 if min(info.width, info.height) >= 256 else 16
        profile = {"driver": "GTiff", "width": info.width, "height": info.height, "dtype": "uint8", "crs": info.crs,
                   "transform": info.transform, "nodata": NODATA, "tiled": True, "blockxsize": block,
                   "blockysize": block}
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.datasets = {}
        try:
            for name, path in self.paths.items():
                self.datasets[name] = outputs.open_raster(path, "w", count=bands[name], **profile)
        except Exception:
            self.discard()
            raise

    def write(self, result: BatchResult) -> None:
        try:
            for block in result.blocks:
                self.datasets["classes"].write(block.classes, 1, window=block.window)
                if "confidence" in self.datasets:
                    self.datasets["confidence"].write(block.confidence, 1, window=block.window)
                if "probabilities" in self.datasets:
                    self.datasets["probabilities"].write(block.probabilities, window=block.window)
            self.pixels += result.pixels
        except Exception as exc:
            raise explain_write_failure(exc, list(self.paths.values())) from exc

    def close(self) -> None:
        for dataset in self.datasets.values():
            dataset.close()

    def discard(self) -> None:
        self.close()
        for path in self.paths.values():
            path.unlink(missing_ok=True)

    def finalize(self, card: ModelCard, provenance: dict[str, str]) -> Path:
        """Publish the finished, verified COGs and remove temporaries.

        Every product is written under a partial name beside its destination and checked
        there (the input's grid, every block readable); then all are renamed into place as one
        stage: companions first, the mask last, and companions this workflow does not produce
        (confidence, probabilities, polygons) removed, so no stale one is left beside a new
        mask. Any failure leaves the previous outputs as they were.
        """
        files = outputs.MaskFiles(self.dest)
        continuous = (("confidence", files.confidence, outputs.finalize_confidence, ()),
                      ("probabilities", files.probabilities, outputs.finalize_probabilities, (card,)))
        try:
            self.close()
            with outputs.staged() as stage:
                try:
                    outputs.finalize_mask(self.paths["classes"], files.mask, card, provenance, pixels=self.pixels,
                                          stage=stage)
                    for name, dest, finalize, args in continuous:
                        if name in self.paths:
                            finalize(self.paths[name], dest, *args, provenance, stage=stage)
                        else:
                            stage.add(dest, optional=True)
                            stage.add(outputs.MaskFiles(dest).aux, optional=True)
                    if self.section.polygons:
                        from pipeline.vectors import write_polygons  # fiona loads only for polygons

                        write_polygons(stage.partial(files.mask), files.polygons, card, self.section.simplify,
                                       stage=stage)
                    else:
                        stage.add(files.polygons, optional=True)
                    verify_raster(stage.partial(files.mask), self.info, 1)
                    for name, dest, _, _ in continuous:
                        if name in self.paths:
                            verify_raster(stage.partial(dest), self.info, self.bands[name])
                    stage.publish()
                except Exception as exc:
                    raise explain_write_failure(exc, [*self.paths.values(), *(p for p, _, _ in stage.pairs)]) from exc
            return self.dest
        finally:
            self.discard()


def verify_raster(path: Path, info: RasterInfo, count: int) -> None:
    """Reopen ``path`` and check it: the input's grid, ``count`` bands, every block readable."""
    with outputs.open_raster(path) as src:
        if (src.width, src.height) != (info.width, info.height) or src.count != count:
            raise OutputError(f"{path.name}: written {src.count} band(s) of {src.width}x{src.height}, "
                              f"expected {count} of {info.width}x{info.height}")
        if src.crs != info.crs or (info.crs is not None and src.transform != info.transform):
            raise OutputError(f"{path.name}: written with a different CRS or transform than the input")
        for _, window in src.block_windows(1):
            src.read(window=window)


class OutputError(TilepipeError, OSError):
    """An output that could not be written completely; the message says why in one line."""


def explain_write_failure(exc: Exception, paths: list[Path]) -> Exception:
    """``exc`` with its cause named when a file-size limit or a full disk explains it."""
    if isinstance(exc, OutputError):
        return exc
    reason = one_line(exc)
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    sizes = [_size(p) for p in paths]
    if soft != resource.RLIM_INFINITY and any(s >= soft for s in sizes):
        return OutputError(f"output not written: file-size limit (ulimit -f) of {soft} bytes reached ({reason})")
    try:
        free = shutil.disk_usage(paths[0].parent).free
    except OSError:
        free = None
    if "No space left" in reason or (free is not None and free < 1 << 20):
        return OutputError(f"output not written: disk full ({free} bytes free in {paths[0].parent}) ({reason})")
    return exc


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


PARTIAL = re.compile(r"^\..+\.\d+\.partial")


def clean_partials(directory: Path) -> list[Path]:
    """Remove temporaries that killed runs left in ``directory`` (call only while holding its lock)."""
    removed = []
    if directory.is_dir():
        for path in directory.iterdir():
            if PARTIAL.match(path.name) and not path.is_dir():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def one_line(exc: BaseException) -> str:
    """An exception as one line: our own errors as they are, others with their type and cause."""
    if isinstance(exc, TilepipeError):
        text = str(exc).strip().splitlines()
        return text[0] if text else exc.__class__.__name__
    text = str(exc).strip().splitlines()
    cause = exc.__cause__ or exc.__context__
    if text and cause is not None and "See previous exception" in text[0] and str(cause).strip():
        # rasterio's "Write failed. See previous exception for details.": say what GDAL said
        text[0] = text[0].split(" See previous exception")[0] + f" ({str(cause).strip().splitlines()[0]})"
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__
