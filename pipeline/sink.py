"""The writer side of one output: temporary GeoTIFFs filled a batch at a time, then verified
COGs published atomically (companions first, the mask last).

Where the workers run on an accelerator, publishing (the COG, its overviews, reading every
block back) runs in a finisher process: in the driver it queued for the GIL that the run's
threads share (a 4096² mask's publication took 28-30 s instead of 2 s beside four Python
threads on a 2-core machine). On CPU the model is the cost, publishing on a thread hides
behind it, and finishers would only take cores and memory (``runtime.finishers``).

A killed run leaves only hidden ``.*.<pid>.partial*`` names, which :func:`clean_partials`
removes on the next run while it holds the workflow's lock.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import resource
import shutil
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from rasterio.windows import Window

from pipeline import children, outputs
from pipeline.config import OutputSection
from pipeline.errors import TilepipeError, one_line
from pipeline.io import RasterInfo
from pipeline.outputs import temporary_name
from pipeline.stitch import NODATA
from unet_flax.card import ModelCard
from unet_flax.xla_flags import usable_cores

if TYPE_CHECKING:  # the finishers import this module, and no JAX
    from pipeline.tasks import BatchResult

FINISHERS = 2
"""Files published at once while inference goes on: at least this many, in finisher processes
on accelerators (:func:`resolve_finishers`), in threads of the driver on CPU."""

VERIFY_BYTES = 16 * 2**20
"""Decoded bytes of a published COG that :func:`verify_raster` reads through one handle, which
GDAL's cache may hold until it closes: a 4096^2 class mask in one open rather than 16 (each
about 1 ms), and no more than this held however large the scene."""

LEVELS_ON_ACCELERATORS = {"deflate": 5, "zstd": 1}
"""``output.level: auto`` of each codec where the workers run on GPU/TPU (:func:`resolve_compression`)."""


@dataclasses.dataclass(frozen=True)
class Temporaries:
    """A sink's temporary GeoTIFFs (one per product, with its band count) and the class counts
    written into them: all that publishing them needs."""

    info: RasterInfo
    dest: Path
    section: OutputSection
    compression: outputs.Compression
    """How its COGs are compressed, ``section.compression`` and ``level`` resolved (:func:`resolve_compression`)."""
    paths: dict[str, Path]
    bands: dict[str, int]
    pixels: np.ndarray
    """Pixels of each class code (256 counts, nodata included), added to as batches are written."""


class MaskSink:
    """The temporary GeoTIFFs of one output; the runner is their only writer."""

    def __init__(self, info: RasterInfo, dest: Path, section: OutputSection, num_classes: int,
                 backend: str = "cpu"):
        """The temporaries of ``dest``, to be published as ``section`` says for workers on ``backend``."""
        bands = {"classes": 1}
        if section.confidence:
            bands["confidence"] = 1
        if section.probabilities:
            bands["probabilities"] = num_classes
        paths = {name: temporary_name(dest, f"-{name}.tif") for name in bands}
        self.files = Temporaries(info, dest, section, resolve_compression(section, backend), paths,
                                 bands, np.zeros(256, np.int64))
        block = 256 if min(info.width, info.height) >= 256 else 16
        profile = {"driver": "GTiff", "width": info.width, "height": info.height, "dtype": "uint8", "crs": info.crs,
                   "transform": info.transform, "nodata": NODATA, "tiled": True, "blockxsize": block,
                   "blockysize": block}
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.datasets = {}
        try:
            for name, path in paths.items():
                self.datasets[name] = outputs.open_raster(path, "w", count=bands[name], **profile)
        except BaseException:  # an interrupt too: a file GDAL had just created is not in datasets yet
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
            self.files.pixels[:] += result.pixels  # in place: the record is frozen
        except Exception as exc:
            raise explain_write_failure(exc, list(self.files.paths.values())) from exc

    def close(self) -> None:
        for dataset in self.datasets.values():
            dataset.close()

    def discard(self) -> None:
        self.close()
        for path in self.files.paths.values():
            path.unlink(missing_ok=True)

    def finalize(self, card: ModelCard, provenance: dict[str, str], finishers: int = 0) -> Path:
        """Publish the finished outputs (:func:`publish`): in one of ``finishers`` finisher
        processes where there are any and this process may have children, else here; then
        remove the temporaries."""
        try:
            self.close()
            pool = finisher_pool(finishers)
            if pool is None:
                return publish(self.files, card, provenance)
            try:
                try:
                    future = pool.submit(_publish_here, self.files, card, provenance)
                except BrokenProcessPool:  # finishers that died idle: new ones publish this file
                    children.drop(pool)
                    pool = finisher_pool(finishers)
                    future = pool.submit(_publish_here, self.files, card, provenance)
                return future.result()
            except BrokenProcessPool:  # killed while publishing: its partials go with the next run
                children.drop(pool)
                raise
        finally:
            self.discard()


def publish(done: Temporaries, card: ModelCard, provenance: dict[str, str]) -> Path:
    """Publish the finished, verified COGs of ``done``.

    Every product is written under a partial name beside its destination and checked there
    (the input's grid, every block readable); then all are renamed into place as one stage:
    companions first, the mask last, and companions this workflow does not produce
    (confidence, probabilities, polygons) removed, so no stale one is left beside a new mask.
    Any failure leaves the previous outputs as they were.

    The temporaries (uncompressed GeoTIFFs, each block read once) are read around GDAL's
    block cache (``GTIFF_DIRECT_IO``, this thread only): it kept every block read, up to 5% of
    the host's memory, so publication's memory grew with the scene (an 8192² mask and its
    confidence: 527-539 MB before, 425-428 MB after).
    """
    files = outputs.MaskFiles(done.dest)
    continuous = (("confidence", files.confidence, outputs.finalize_confidence, ()),
                  ("probabilities", files.probabilities, outputs.finalize_probabilities, (card,)))
    with rasterio.Env(GTIFF_DIRECT_IO=True), outputs.staged() as stage:
        try:
            compression = done.compression
            outputs.finalize_mask(done.paths["classes"], files.mask, card, provenance, pixels=done.pixels,
                                  stage=stage, compression=compression)
            for name, dest, finalize, args in continuous:
                if name in done.paths:
                    finalize(done.paths[name], dest, *args, provenance, stage=stage, compression=compression)
                else:
                    stage.add(dest, optional=True)
                    stage.add(outputs.MaskFiles(dest).aux, optional=True)
            if done.section.polygons:
                from pipeline.vectors import write_polygons  # fiona loads only for polygons

                write_polygons(stage.partial(files.mask), files.polygons, card, done.section.simplify,
                               stage=stage)
            else:
                stage.add(files.polygons, optional=True)
            verify_raster(stage.partial(files.mask), done.info, 1)
            for name, dest, _, _ in continuous:
                if name in done.paths:
                    verify_raster(stage.partial(dest), done.info, done.bands[name])
            stage.publish()
        except Exception as exc:
            raise explain_write_failure(exc, [*done.paths.values(), *(p for p, _, _ in stage.pairs)]) from exc
    return done.dest


def _publish_here(done: Temporaries, card: ModelCard, provenance: dict[str, str]) -> Path:
    """A finisher's task: :func:`publish`, any failure sent back as one line (as the driver
    records it), since not every library's exception can be rebuilt on the other side."""
    try:
        return publish(done, card, provenance)
    except Exception as exc:  # noqa: BLE001
        raise OutputError(one_line(exc)) from None


def resolve_finishers(finishers: int | str, backend: str, cores: int | None = None) -> int:
    """Finisher processes: a count as given; ``auto`` is none where the workers run on CPU
    (the model is the cost there, and publishing on a thread hides behind it) and, on
    accelerators, where the host's CPU is the cost, a third of the host's ``cores`` (at least
    :data:`FINISHERS`): publishing took a quarter to a third of that CPU with a GPU host's
    settings, and files that wait for a finisher hold back the batches behind them."""
    if finishers != "auto":
        return int(finishers)
    return 0 if backend == "cpu" else max(FINISHERS, (cores or usable_cores()) // 3)


def resolve_compression(section: OutputSection, backend: str) -> outputs.Compression:
    """How a run's COGs are compressed: ``section.compression`` at ``section.level``; ``auto`` is
    GDAL's own level where the workers run on CPU (publishing hides behind the model) and
    :data:`LEVELS_ON_ACCELERATORS` on accelerators, where publishing is the host's cost: a whole
    publication of real-texture class maps (mask and confidence) took 51-58% of DEFLATE 6's CPU
    at DEFLATE 5, and 27% at ZSTD 1, in 1-4% fewer bytes than DEFLATE 6."""
    codec, level, levels = section.compression, section.level, outputs.CODECS[section.compression]
    if level != "auto":
        return outputs.Compression(codec, level)
    if levels is None:  # a codec without levels
        return outputs.Compression(codec)
    return outputs.Compression(codec, levels.gdal_default if backend == "cpu" else LEVELS_ON_ACCELERATORS[codec])


def finisher_pool(processes: int) -> concurrent.futures.ProcessPoolExecutor | None:
    """This process's ``processes`` finishers; None for 0, or in a daemonic process, which
    publishes in its own threads."""
    return children.pool("finishers", processes) if processes > 0 else None


def start_finishers(processes: int) -> frozenset[int]:
    """Start ``processes`` finishers now, so that the first file's publication does not wait
    for them; return their process ids."""
    pool = finisher_pool(processes)
    if pool is not None:
        try:
            return frozenset(children.start(pool, processes, __name__))
        except BrokenProcessPool:  # the first file starts new ones
            children.drop(pool)
    return frozenset()


def verify_raster(path: Path, info: RasterInfo, count: int) -> None:
    """Reopen ``path`` and check it: the input's grid, ``count`` bands, every block readable."""
    with outputs.open_raster(path) as src:
        if (src.width, src.height) != (info.width, info.height) or src.count != count:
            raise OutputError(f"{path.name}: written {src.count} band(s) of {src.width}x{src.height}, "
                              f"expected {count} of {info.width}x{info.height}")
        if src.crs != info.crs or (info.crs is not None and src.transform != info.transform):
            raise OutputError(f"{path.name}: written with a different CRS or transform than the input")
        rows = src.block_shapes[0][0]
    # GDAL keeps the blocks a handle read until it closes: a handle for each VERIFY_BYTES of them
    step = max(1, VERIFY_BYTES // (rows * info.width * count)) * rows
    for first in range(0, info.height, step):
        with outputs.open_raster(path) as src:
            for top in range(first, min(first + step, info.height), rows):
                src.read(window=Window(0, top, info.width, min(rows, info.height - top)))


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
