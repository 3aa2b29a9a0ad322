"""Dask orchestration: inputs -> batches of tiles -> worker predictions -> one writer per file.

The driver plans tiles, submits a bounded number of batches (memory is set by the tiles in
flight, never by the raster's size), and writes each finished batch into its file's
temporary GeoTIFF as it arrives. A file becomes a finished output only when all its tiles
are written; a failure of one file fails that file alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import rasterio
from distributed import Client, Future, LocalCluster, as_completed
from tqdm import tqdm

import pipeline
from pipeline.config import DaskSection, OutputSection, Workflow
from pipeline.errors import InputError, WorkflowError
from pipeline.io import Normaliser, RasterInfo, file_sha256, inspect_raster
from pipeline import outputs
from pipeline.outputs import temporary_name
from pipeline.report import FileRecord, RunReport
from pipeline.stitch import NODATA
from pipeline.tasks import BatchJob, BatchResult, predict_batch
from pipeline.windows import TileSpec, batches, plan_tiles, tile_spec
from unet_flax.checkpoint import CheckpointError, ModelCard, file_sha256 as checkpoint_sha256, read_card


def discover_inputs(directory: Path, pattern: str) -> list[Path]:
    """Files in ``directory`` matching ``pattern``, sorted; hidden (temporary) files skipped."""
    if not directory.is_dir():
        raise WorkflowError(f"input.dir: {directory} is not a directory")
    return sorted(p for p in directory.glob(pattern) if p.is_file() and not p.name.startswith("."))


@contextlib.contextmanager
def open_client(cfg: DaskSection) -> Iterator[Client]:
    """A client of ``cfg.scheduler``, or of a local cluster on this machine."""
    if cfg.scheduler:
        with Client(cfg.scheduler, timeout="30s") as client:
            yield client
        return
    with LocalCluster(n_workers=cfg.workers, threads_per_worker=cfg.threads, processes=cfg.processes,
                      dashboard_address=None, silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
        yield client


class MaskSink:
    """The temporary GeoTIFFs of one output; the runner is their only writer."""

    def __init__(self, info: RasterInfo, dest: Path, section: OutputSection, num_classes: int):
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
        block = 256 if min(info.width, info.height) >= 256 else 16
        profile = dict(driver="GTiff", width=info.width, height=info.height, dtype="uint8", crs=info.crs,
                       transform=info.transform, nodata=NODATA, tiled=True, blockxsize=block, blockysize=block)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.datasets = {}
        try:
            for name, path in self.paths.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                    self.datasets[name] = rasterio.open(path, "w", count=bands[name], **profile)
        except Exception:
            self.discard()
            raise

    def write(self, result: BatchResult) -> None:
        for tile_result in result.tiles:
            window = tile_result.tile.core
            self.datasets["classes"].write(tile_result.classes, 1, window=window)
            if "confidence" in self.datasets:
                self.datasets["confidence"].write(tile_result.confidence, 1, window=window)
            if "probabilities" in self.datasets:
                self.datasets["probabilities"].write(tile_result.probabilities, window=window)

    def close(self) -> None:
        for dataset in self.datasets.values():
            dataset.close()

    def discard(self) -> None:
        self.close()
        for path in self.paths.values():
            path.unlink(missing_ok=True)

    def finalize(self, card: ModelCard, provenance: dict[str, str]) -> Path:
        """Publish the finished COGs (companions first, the mask last) and remove temporaries."""
        files = outputs.MaskFiles(self.dest)
        try:
            self.close()
            if "confidence" in self.paths:
                outputs.finalize_confidence(self.paths["confidence"], files.confidence, provenance)
            if "probabilities" in self.paths:
                outputs.finalize_probabilities(self.paths["probabilities"], files.probabilities, card, provenance)
            outputs.finalize_mask(self.paths["classes"], self.dest, card, provenance)
            if self.section.polygons:
                outputs.write_polygons(self.dest, files.polygons, card, self.section.simplify)
            return self.dest
        finally:
            self.discard()


@dataclasses.dataclass
class FileJob:
    """Driver-side state of one input while its batches are in flight."""

    info: RasterInfo
    output: Path
    jobs: list[BatchJob]
    warnings: tuple[str, ...]
    started: float = dataclasses.field(default_factory=time.perf_counter)
    remaining: int = 0
    sink: MaskSink | None = None
    error: str | None = None

    def record(self, status: str, output: Path | None = None) -> FileRecord:
        return FileRecord(input=str(self.info.path), status=status, output=str(output) if output else None,
                          pixels=self.info.pixels, seconds=round(time.perf_counter() - self.started, 3),
                          error=self.error, warnings=self.warnings)


@dataclasses.dataclass(frozen=True)
class ModelRef:
    path: Path
    sha256: str
    card: ModelCard


def load_model_ref(wf: Workflow) -> ModelRef:
    try:
        card = read_card(wf.model.checkpoint)
    except CheckpointError as exc:
        raise WorkflowError(f"model.checkpoint: {exc}") from exc
    except OSError as exc:
        raise WorkflowError(f"model.checkpoint: cannot read {wf.model.checkpoint} ({exc})") from exc
    if len(wf.bands) != card.unet.in_bands:
        raise WorkflowError(f"bands: the workflow selects {len(wf.bands)} band(s), model {card.name!r} takes "
                            f"{card.unet.in_bands} ({', '.join(card.band_names)})")
    return ModelRef(wf.model.checkpoint, checkpoint_sha256(wf.model.checkpoint), card)


def plan_file(path: Path, wf: Workflow, model: ModelRef, spec: TileSpec) -> FileJob:
    """Inspect one input and cut it into batch jobs; :class:`InputError` if it cannot run."""
    info = inspect_raster(path, wf.bands)
    notes = () if info.crs else (f"{path.name}: no CRS; output written without one",)
    scale, offset = wf.normalise.per_band(len(wf.bands))
    normaliser = Normaliser(scale, offset, model.card.mean, model.card.std)
    cache = str(wf.runtime.compilation_cache) if wf.runtime.compilation_cache else None
    jobs = [BatchJob(str(path), tuple(group), tuple(wf.bands), normaliser, str(model.path), model.sha256,
                     spec, wf.tiling.batch, wf.output.confidence, wf.output.probabilities, cache)
            for group in batches(plan_tiles(info.width, info.height, spec), wf.tiling.batch)]
    return FileJob(info, wf.output.dir / f"{path.stem}.tif", jobs, notes, remaining=len(jobs))


def provenance(wf: Workflow, model: ModelRef, job: FileJob, run_id: str) -> dict[str, str]:
    return {
        "TILEPIPE_MODEL": model.card.name,
        "TILEPIPE_MODEL_SHA256": model.sha256,
        "TILEPIPE_WORKFLOW_SHA256": wf.digest(),
        "TILEPIPE_VERSION": pipeline.__version__,
        "TILEPIPE_INPUT": job.info.path.name,
        "TILEPIPE_INPUT_SHA256": file_sha256(job.info.path),
        "TILEPIPE_RUN_ID": run_id,
        "TILEPIPE_TIME": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_workflow(wf: Workflow, *, progress: bool = True, echo: Callable[[str], None] = print) -> RunReport:
    """Run ``wf`` over its input directory; per-file failures are recorded, not raised."""
    started_at = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    run_id = started_at.strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    model = load_model_ref(wf)
    try:
        spec = tile_spec(wf.tiling.tile, wf.tiling.halo, model.card.unet.factor)
    except ValueError as exc:
        raise WorkflowError(str(exc)) from exc
    if wf.output.dir.resolve() == wf.input.dir.resolve():
        raise WorkflowError("output.dir: must differ from input.dir (outputs would be read as inputs next run)")
    if spec.halo < model.card.unet.receptive_radius:
        echo(f"note: halo {spec.halo} < receptive radius {model.card.unet.receptive_radius} px of the model; "
             "tile seams may differ slightly from whole-image inference")

    records: list[FileRecord] = []
    files: list[FileJob] = []
    for path in discover_inputs(wf.input.dir, wf.input.pattern):
        try:
            files.append(plan_file(path, wf, model, spec))
        except InputError as exc:
            records.append(FileRecord(input=str(path), status="failed", error=str(exc)))
    for job in files:
        for note in job.warnings:
            echo(f"warning: {note}")
    if not files and not records:
        echo(f"warning: no input matched {wf.input.pattern!r} in {wf.input.dir}")

    device = None
    if files:
        with open_client(wf.dask) as client:
            device = _execute(client, files, wf, model, run_id, progress, echo)
    records.extend(job.record("ok" if job.error is None else "failed",
                              job.output if job.error is None else None) for job in files)
    finished = [job.output for job in files if job.error is None]
    if finished and wf.output.run_products:
        outputs.write_run_products(wf.output.dir, finished, model.card, run_id)
    records.sort(key=lambda r: r.input)
    return RunReport(run_id=run_id, workflow=wf.name, started=started_at.isoformat(timespec="seconds"),
                     seconds=round(time.perf_counter() - t0, 3), device=device, files=tuple(records))


def _execute(client: Client, files: list[FileJob], wf: Workflow, model: ModelRef, run_id: str,
             progress: bool, echo: Callable[[str], None]) -> str | None:
    """Submit batches with a bounded number in flight and write results as they arrive."""
    queue = iter([(f, job) for f in files for job in f.jobs])
    owner: dict[Future, FileJob] = {}
    in_flight = max(wf.dask.max_tasks_in_flight, 2 * sum(client.nthreads().values()))
    completed = as_completed()
    device = None
    bar = tqdm(total=sum(len(j.tiles) for f in files for j in f.jobs), unit="tile", disable=not progress,
               desc=f"0/{len(files)} files", dynamic_ncols=True)

    def submit_next() -> None:
        for file, job in queue:
            if file.error is None:
                future = client.submit(predict_batch, job, pure=False, retries=wf.dask.retries)
                owner[future] = file
                completed.add(future)
                return

    def fail(file: FileJob, reason: str) -> None:
        file.error = f"{file.info.path.name}: {reason}"
        if file.sink is not None:
            file.sink.discard()
        for future, other in list(owner.items()):
            if other is file:
                future.cancel()
        echo(f"failed: {file.error}")

    for _ in range(in_flight):
        submit_next()
    done = 0
    with bar:
        for future in completed:
            file = owner.pop(future)
            if file.error is None:
                try:
                    result = future.result()
                    if file.sink is None:
                        file.sink = MaskSink(file.info, file.output, wf.output, model.card.unet.num_classes)
                    file.sink.write(result)
                    file.remaining -= 1
                    if device is None:
                        device = result.device
                        bar.write(f"model {model.card.name} on {device}")
                    bar.update(len(result.tiles))
                    if file.remaining == 0:
                        file.sink.finalize(model.card, provenance(wf, model, file, run_id))
                        done += 1
                        bar.set_description(f"{done}/{len(files)} files")
                except Exception as exc:  # a file's failure must not sink the run
                    fail(file, _one_line(exc))
            submit_next()
    return device


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__
