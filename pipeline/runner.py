"""Dask orchestration: inputs -> batches of tiles -> worker predictions -> one writer per file.

The driver plans tiles, submits a bounded number of batches (memory is set by the tiles in
flight, never by the raster's size), and writes each finished batch into its file's
temporary GeoTIFF as it arrives. A file becomes a finished output only when all its tiles
are written; its Cloud-Optimized GeoTIFF is then written on a background thread, or in a
finisher process where the workers run on an accelerator (:mod:`pipeline.sink`), while the
workers go on with the next file. A failure of one file fails that file alone.

A run holds its workflow's lock (:mod:`pipeline.lock`), removes the temporaries a killed run
left, skips inputs whose content, result-changing settings and model are unchanged since a
verified output (:mod:`pipeline.ledger`), and records every input as it ends. An input's
checksum is computed before the run only when it decides a skip; otherwise it is computed on
a background thread while the input's tiles are predicted, and awaited when the output is
written (its provenance names it). Outputs are written as hidden partial files beside their
destinations, reopened and checked, then renamed into place
(:class:`pipeline.outputs.Stage`), so a run killed at any moment leaves the previous complete
output or none.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import fnmatch
import logging
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import dask
from distributed import Client, Future, LocalCluster, as_completed
from tqdm import tqdm

import pipeline
from pipeline import interrupts, outputs, reading
from pipeline.chunks import ChunkGrid, chunk_users
from pipeline.config import DaskSection, Workflow
from pipeline.errors import InputError, WorkflowError, one_line
from pipeline.infer import backend_of, resolve_batch, resolve_precision, resolve_readers
from pipeline.io import (
    GdalPath,
    InputPath,
    Normaliser,
    RasterInfo,
    inspect_raster,
    wire_dtype,
)
from pipeline.ledger import Fingerprint, Ledger, fingerprint, result_key
from pipeline.lock import describe, hold_lock, lock_path
from pipeline.logs import RunLog
from pipeline.products import write_run_products
from pipeline.report import FileRecord, RunReport, busy_seconds
from pipeline.sink import (
    FINISHERS,
    MaskSink,
    clean_partials,
    resolve_finishers,
    start_finishers,
)
from pipeline.tasks import BatchJob, predict_batch, predict_inputs, read_batch
from pipeline.windows import TileSpec, parts_per_batch, read_parts, seamless_halo, tile_batches, tile_spec
from unet_flax.card import ModelCard
from unet_flax.checkpoint import CheckpointError, file_sha256, read_card


def discover_inputs(directory: InputPath, pattern: str) -> list[InputPath]:
    """Files in ``directory`` matching ``pattern``, sorted; hidden (temporary) files skipped.

    A GDAL virtual folder (a zip archive, a bucket prefix) is listed through GDAL.
    """
    if isinstance(directory, GdalPath):
        import fiona  # only here: GDAL's folder listing

        try:
            names = fiona.listdir(directory)
        except Exception as exc:  # fiona raises DriverError and others for unreachable paths
            raise WorkflowError(f"input.dir: GDAL cannot list {directory} ({one_line(exc)})") from exc
        return sorted(directory.child(n) for n in names if fnmatch.fnmatch(n, pattern) and not n.startswith("."))
    if not directory.is_dir():
        raise WorkflowError(f"input.dir: {directory} is not a directory")
    return sorted(p for p in directory.glob(pattern) if p.is_file() and not p.name.startswith("."))


LOCAL_HOUSEKEEPING = {
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
}
"""How often a local cluster's servers check their event loop's health (every 20 ms by
default; 500 ms is what Dask's own tests use), sample the system (500 ms) and the workers'
memory (100 ms). On the cores the model runs on, the defaults cost an idle cluster 34-49 ms
of CPU a second, these 28-31 (docs/performance.md)."""


@contextlib.contextmanager
def open_client(cfg: DaskSection) -> Iterator[Client]:
    """A client of ``cfg.scheduler``, or of a local cluster on this machine."""
    if cfg.scheduler:
        with Client(cfg.scheduler, timeout="30s") as client:
            yield client
        return
    resources = {name: amount * cfg.threads for name, amount in cfg.resources.items()} or None
    # ":0": the scheduler's HTTP endpoint takes any free port instead of contending for 8787.
    # Workers read these settings as they start (a nanny passes its config on).
    with dask.config.set({**LOCAL_HOUSEKEEPING, "distributed.worker.profile.enabled": cfg.profile}):
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=cfg.threads, processes=cfg.processes,
                               resources=resources, dashboard_address=":0", silence_logs=logging.WARNING)
    with cluster, Client(cluster) as client:
        yield client


def submit_batch(client: Client, job: BatchJob, cfg: DaskSection) -> Future:
    """One batch as Dask work. Without resources it is one task that reads and predicts, so
    only the small cores travel; with ``dask.resources`` (e.g. ``{GPU: 1}``) reading runs on
    any worker and only inference needs a worker that has the resources."""
    if not cfg.resources:
        return client.submit(predict_batch, job, pure=False, retries=cfg.retries)
    inputs = client.submit(read_batch, job, pure=False, retries=cfg.retries)
    return client.submit(predict_inputs, job, inputs, pure=False, retries=cfg.retries, resources=dict(cfg.resources))


@dataclasses.dataclass
class FileJob:
    """Driver-side state of one input while its batches are in flight."""

    info: RasterInfo
    output: Path
    jobs: list[BatchJob]
    warnings: tuple[str, ...]
    fingerprint: Fingerprint | concurrent.futures.Future | None = None
    """Known before planning, or still being computed beside the inference (a future)."""
    started: float = dataclasses.field(default_factory=time.perf_counter)
    remaining: int = 0
    sink: MaskSink | None = None
    error: str | None = None
    done: bool = False
    checksum_wait_s: float = 0.0
    """How long its publication waited for the fingerprint."""

    def fingerprinted(self, wait: bool = True) -> Fingerprint | None:
        """The input's fingerprint; ``wait=False`` gives None while it is still computed or
        if computing it failed (a file that failed anyway records no checksum then)."""
        fp = self.fingerprint
        if not isinstance(fp, concurrent.futures.Future):
            return fp
        if not wait and not (fp.done() and fp.exception() is None):
            return None
        return fp.result()

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
    return ModelRef(wf.model.checkpoint, file_sha256(wf.model.checkpoint), card)


def output_path(wf: Workflow, path: InputPath) -> Path:
    return wf.output.dir / f"{path.stem}.tif"


def expected_outputs(wf: Workflow, dest: Path) -> list[Path]:
    """The files a finished output of ``dest`` has under this workflow."""
    files = outputs.MaskFiles(dest)
    wanted = [(True, files.mask), (wf.output.confidence, files.confidence),
              (wf.output.probabilities, files.probabilities), (wf.output.polygons, files.polygons)]
    return [path for on, path in wanted if on]


def resolve_tiling(wf: Workflow, card: ModelCard) -> tuple[Workflow, TileSpec]:
    """``wf`` with ``tiling.halo: auto`` replaced by the model's seamless halo
    (:func:`~pipeline.windows.seamless_halo`), and its tiles checked against the model."""
    halo = wf.tiling.halo
    if halo == "auto":
        halo = seamless_halo(card.unet.receptive_radius, card.unet.factor)
    try:
        spec = tile_spec(wf.tiling.tile, halo, card.unet.factor)
    except ValueError as exc:
        raise WorkflowError(str(exc)) from exc
    return wf.model_copy(update={"tiling": wf.tiling.model_copy(update={"halo": halo})}), spec


def plan_file(path: Path, wf: Workflow, model: ModelRef, spec: TileSpec) -> FileJob:
    """Inspect one input and cut it into batch jobs; :class:`InputError` if it cannot run."""
    info = inspect_raster(path, wf.bands)
    notes = () if info.crs else (f"{path.name}: no CRS; output written without one",)
    scale, offset = wf.normalise.per_band(len(wf.bands))
    normaliser = Normaliser(scale, offset, model.card.mean, model.card.std)
    cache = str(wf.runtime.compilation_cache) if wf.runtime.compilation_cache else None
    read_key = uuid.uuid4().hex  # this plan's chunks in the workers' caches; never those of an earlier read
    dtype = wire_dtype([info.dtypes[b - 1] for b in wf.bands]).name
    groups = tile_batches(info.width, info.height, spec, wf.tiling.batch, info.striped)
    parts = batch_parts(wf)
    users = chunk_users(ChunkGrid.of(info.width, info.height, *info.block_shape), read_parts(groups, parts))
    jobs = [BatchJob(str(path), tuple(group), tuple(wf.bands), normaliser, dtype, str(model.path), model.sha256,
                     spec, wf.tiling.batch, wf.output.confidence, wf.output.probabilities, cache,
                     wf.runtime.precision, read_key, wf.runtime.readers, users, parts)
            for group in groups]
    return FileJob(info, output_path(wf, path), jobs, notes, remaining=len(jobs))


def batch_parts(wf: Workflow) -> int:
    """Parts reader processes read each batch of ``wf`` in (:func:`~pipeline.windows.parts_per_batch`),
    its readers ``auto`` taken as on an accelerator (:func:`~pipeline.infer.resolve_readers`): on
    CPU there are none, and the parts do not matter. On an existing cluster this machine's cores and
    ``dask.threads`` stand for the workers' (a wrong guess costs speed, never a pixel)."""
    return parts_per_batch(resolve_readers(wf.runtime.readers, wf.dask.threads, backend="gpu"), wf.dask.threads)


def provenance(wf: Workflow, model: ModelRef, job: FileJob, run_id: str, device: str) -> dict[str, str]:
    """The tags every output of ``job`` carries: what made it, from what, and how (the workers'
    ``device`` and the precision the model ran in there: bfloat16 changes a few classes)."""
    return {
        "TILEPIPE_MODEL": model.card.name,
        "TILEPIPE_MODEL_SHA256": model.sha256,
        "TILEPIPE_WORKFLOW_SHA256": wf.digest(),
        "TILEPIPE_DEVICE": device,
        "TILEPIPE_PRECISION": resolve_precision(wf.runtime.precision, backend_of(device)),
        "TILEPIPE_VERSION": pipeline.__version__,
        "TILEPIPE_INPUT": job.info.path.name,
        "TILEPIPE_INPUT_CHECKSUM": job.fingerprinted().checksum,  # set for every planned job (_plan_or_skip)
        "TILEPIPE_RUN_ID": run_id,
        "TILEPIPE_TIME": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


@dataclasses.dataclass
class RunContext:
    """What every step of one run shares: the workflow, the model, the ledger and the log."""

    wf: Workflow
    model: ModelRef
    spec: TileSpec
    run_id: str
    key: str
    ledger: Ledger
    log: RunLog
    records: list[FileRecord] = dataclasses.field(default_factory=list)
    model_spans: dict[str, list[tuple[float, float]]] = dataclasses.field(default_factory=dict)
    """When each worker process had a batch on its device(s), for the report's busy share."""
    publish_wait_s: float = 0.0
    """Seconds the driver held batches back, waiting for a file's publication (too many waited)."""
    publish_tail_s: float = 0.0
    """Seconds from the last batch's result to the last file's publication."""
    checksum_wait_s: float = 0.0
    """Seconds finished files waited for their inputs' checksums, summed over the files."""

    def finish(self, record: FileRecord, fp: Fingerprint | None) -> None:
        """Record one input's outcome in the report, the ledger and the log."""
        self.records.append(record)
        self.ledger.record(self.run_id, record, fp)
        if record.status == "ok" and fp is not None and record.output:
            self.ledger.remember_output(self.run_id, record.input, fp, self.key, record.output)
        self.log.file(record)


def run_workflow(wf: Workflow, *, progress: bool = True, echo: Callable[[str], None] | None = None,
                 force: bool = False, log: RunLog | None = None) -> RunReport:
    """Run ``wf`` over its input directory; per-file failures are recorded, not raised.

    Holds the workflow's lock for the whole run (:class:`~pipeline.lock.LockHeld` if another
    run has it), skips inputs whose outputs are current unless ``force``, and records the run
    and every input in the ledger. An exception (an interrupt included) leaves no temporary
    file behind and marks the run ``interrupted`` in the ledger before it propagates.
    """
    log = log or RunLog(notes=echo)
    started_at = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    run_id = started_at.strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    model = load_model_ref(wf)
    wf, spec = resolve_tiling(wf, model.card)
    if isinstance(wf.input.dir, Path) and wf.output.dir.resolve() == wf.input.dir.resolve():
        raise WorkflowError("output.dir: must differ from input.dir (outputs would be read as inputs next run)")
    wf = resolve_batch(wf, spec)  # after the workflow is known to be valid: probing compiles the model
    inputs = discover_inputs(wf.input.source, wf.input.pattern)
    if spec.halo < model.card.unet.receptive_radius:
        log.note(f"note: halo {spec.halo} < receptive radius {model.card.unet.receptive_radius} px of the model; "
                 "tile seams may differ slightly from whole-image inference")

    wf.output.dir.mkdir(parents=True, exist_ok=True)
    with hold_lock(lock_path(wf.state_dir, wf.output.dir), what=f"workflow {wf.name!r} ({wf.output.dir})") as stale, \
            Ledger.of(wf) as ledger:
        if stale:
            log.note(f"note: took over the lock of a run that died ({describe(stale)})")
        removed = clean_partials(wf.output.dir)
        if removed:
            log.note(f"note: removed {len(removed)} temporary file(s) left by an interrupted run")
        key = result_key(wf, model.sha256)
        ledger.start_run(run_id, wf, key, model.sha256, started_at.isoformat(timespec="seconds"), force)
        ctx = RunContext(wf, model, spec, run_id, key, ledger, log)
        try:
            device = _run_inputs(ctx, inputs, force, progress)
        except BaseException as exc:  # SIGINT/SIGTERM arrive as BaseExceptions; anything else is a crash
            # Every thread of the run has ended and the lock is still ours: a temporary left here
            # now is one an interrupt caught between its creation and its owner's record of it.
            with contextlib.suppress(OSError):
                clean_partials(wf.output.dir)
            status, error = ("crashed", one_line(exc)) if isinstance(exc, Exception) else ("interrupted", None)
            ledger.finish_run(run_id, status, round(time.perf_counter() - t0, 3), error)
            raise
        seconds = round(time.perf_counter() - t0, 3)
        ledger.finish_run(run_id, "finished", seconds)
    records = sorted(ctx.records, key=lambda r: r.input)
    return RunReport(run_id=run_id, workflow=wf.name, started=started_at.isoformat(timespec="seconds"),
                     seconds=seconds, device=device, files=tuple(records),
                     model_busy_s={w: round(busy_seconds(s), 3) for w, s in ctx.model_spans.items()},
                     model_batch_s={w: round(statistics.median(end - start for start, end in s), 3)
                                    for w, s in ctx.model_spans.items()},
                     publish_wait_s=round(ctx.publish_wait_s, 3), publish_tail_s=round(ctx.publish_tail_s, 3),
                     checksum_wait_s=round(ctx.checksum_wait_s, 3))


def _run_inputs(ctx: RunContext, inputs: list[Path], force: bool, progress: bool) -> str | None:
    wf = ctx.wf
    files: list[FileJob] = []
    # Checksums not needed to decide a skip are computed here, in input order, while the
    # workers predict; an interrupt drops those not started.
    hashing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tilepipe-hash")
    try:
        for path in inputs:
            interrupts.check()
            job = _plan_or_skip(ctx, path, force, hashing)
            if job is not None:
                files.append(job)
        for job in files:
            for note in job.warnings:
                ctx.log.note(f"warning: {note}")
        if not inputs:
            ctx.log.note(f"warning: no input matched {wf.input.pattern!r} in {wf.input.dir}")

        device = None
        if files:
            with open_client(wf.dask) as client:
                try:
                    device = _execute(client, files, ctx, progress)
                finally:
                    for job in files:  # an interrupt or a bug: no temporary survives
                        if job.sink is not None and not job.done:
                            job.sink.discard()
    finally:
        hashing.shutdown(wait=False, cancel_futures=True)
    finished = [Path(r.output) for r in ctx.records if r.status in ("ok", "skipped") and r.output]
    if wf.output.run_products and any(r.status == "ok" for r in ctx.records):
        try:
            write_run_products(wf.output.dir, sorted(finished), ctx.model.card, ctx.run_id)
        except Exception as exc:  # noqa: BLE001  # the masks are done; say what is missing
            ctx.log.note(f"error: run products (mosaics, STAC) not written: {one_line(exc)}")
    return device


def _plan_or_skip(ctx: RunContext, path: InputPath, force: bool,
                  hashing: concurrent.futures.Executor) -> FileJob | None:
    """A job for ``path``, or None when it was skipped or failed already (and recorded).

    Only an input with a current output is checksummed here, since the checksum decides
    whether it is skipped; any other input's is left to ``hashing``.
    """
    t0 = time.perf_counter()
    dest = output_path(ctx.wf, path)
    known = ctx.ledger.known_output(str(path))
    fp = None
    if (not force and known is not None and known.result_key == ctx.key and known.output == str(dest)
            and all(p.exists() for p in expected_outputs(ctx.wf, dest))):
        try:
            fp = fingerprint(path, known)
        except InputError as exc:
            ctx.finish(FileRecord(input=str(path), status="failed", error=str(exc)), None)
            return None
        if fp.checksum == known.fingerprint.checksum:
            ctx.finish(FileRecord(input=str(path), status="skipped", output=str(dest),
                                  seconds=round(time.perf_counter() - t0, 3)), fp)
            return None
    try:
        job = plan_file(path, ctx.wf, ctx.model, ctx.spec)
    except InputError as exc:
        ctx.finish(FileRecord(input=str(path), status="failed", error=str(exc),
                              seconds=round(time.perf_counter() - t0, 3)), fp)
        return None
    job.fingerprint = fp or hashing.submit(fingerprint, path, known)
    job.started = t0
    return job


def _execute(client: Client, files: list[FileJob], ctx: RunContext, progress: bool) -> str | None:
    """Submit batches with a bounded number in flight and write results as they arrive.

    A finished file's COG is written from a publishing thread (at most
    :data:`~pipeline.sink.FINISHERS` at once, or as many as there are finisher processes if
    more, and twice as many finished files waiting), in a finisher process on accelerators,
    while this loop keeps the workers fed; its outcome is recorded here, on the thread that
    owns the ledger. How files are published (finishers, compression level) follows the workers'
    device, known from the first result.
    """
    wf, model = ctx.wf, ctx.model
    queue = iter([(f, job) for f in files for job in f.jobs])
    owner: dict[Future, FileJob] = {}
    in_flight = max(wf.dask.max_tasks_in_flight, 2 * sum(client.nthreads().values()))
    completed = as_completed()
    finishing: dict[concurrent.futures.Future, FileJob] = {}
    device = None
    done = 0
    bar = tqdm(total=sum(len(j.tiles) for f in files for j in f.jobs), unit="tile", disable=not progress,
               desc=f"0/{len(files)} files", dynamic_ncols=True)

    def submit_next() -> None:
        for file, job in queue:
            if file.error is None:
                future = submit_batch(client, job, wf.dask)
                owner[future] = file
                completed.add(future)
                return

    def publish(file: FileJob) -> Path:
        """The file's COGs, on a publishing thread (which waits for a finisher where there are
        any, and for the file's checksum, which may still be computed)."""
        t0 = time.perf_counter()
        file.fingerprinted()
        file.checksum_wait_s = time.perf_counter() - t0
        return file.sink.finalize(model.card, provenance(wf, model, file, ctx.run_id, device), finishers)

    def forget_chunks(file: FileJob) -> None:
        """Every worker frees its decoded chunks of ``file``: none of its tiles will be read again."""
        if file.jobs:
            client.run(reading.forget_chunks, file.jobs[0].read_key, wait=False)

    def fail(file: FileJob, reason: str) -> None:
        file.error = reason if reason.startswith(f"{file.info.path.name}: ") else f"{file.info.path.name}: {reason}"
        forget_chunks(file)
        if file.sink is not None:
            file.sink.discard()
        for future, other in list(owner.items()):
            if other is file:
                future.cancel()
        file.done = True
        ctx.finish(file.record("failed"), file.fingerprinted(wait=False))

    def collect(wait: bool) -> None:
        """Record finished COGs: those done, or (``wait``) the oldest one too."""
        nonlocal done
        for future in list(finishing):
            if not (future.done() or wait):
                continue
            wait = False
            file = finishing.pop(future)
            try:
                if owner and not future.done():  # batches in flight wait meanwhile, and those behind them
                    t0 = time.perf_counter()
                    concurrent.futures.wait([future])
                    ctx.publish_wait_s += time.perf_counter() - t0
                future.result()
            except Exception as exc:  # noqa: BLE001  # a file's failure must not sink the run
                fail(file, one_line(exc))
                continue
            file.done = True
            ctx.checksum_wait_s += file.checksum_wait_s
            ctx.finish(file.record("ok", file.output), file.fingerprinted())
            done += 1
            bar.set_description(f"{done}/{len(files)} files")

    for _ in range(in_flight):
        submit_next()
    finishers, publishing, backend = 0, FINISHERS, "cpu"  # as the workers' device decides, below
    cogs: concurrent.futures.ThreadPoolExecutor | None = None
    try:
        with bar:
            for future in completed:
                interrupts.check()
                file = owner.pop(future)
                if file.error is None:
                    try:
                        result = future.result()
                        ctx.model_spans.setdefault(result.worker, []).append(result.model_span)
                        if device is None:
                            device, backend = result.device, backend_of(result.device)
                            ctx.log.note(f"model {model.card.name} on {device}")
                            finishers = resolve_finishers(wf.runtime.finishers, backend)
                            publishing = max(FINISHERS, finishers)
                            cogs = concurrent.futures.ThreadPoolExecutor(publishing, thread_name_prefix="tilepipe-cog")
                            if finishers:
                                cogs.submit(start_finishers, finishers)  # before the first file is done
                        if file.sink is None:
                            file.sink = MaskSink(file.info, file.output, wf.output, model.card.unet.num_classes, backend)
                        file.sink.write(result)
                        file.remaining -= 1
                        bar.update(result.tiles)
                        if file.remaining == 0:
                            forget_chunks(file)
                            finishing[cogs.submit(publish, file)] = file
                    except Exception as exc:  # noqa: BLE001  # a file's failure must not sink the run
                        fail(file, one_line(exc))
                submit_next()
                collect(wait=len(finishing) > 2 * publishing)
            # Every batch is done: the workers' batch buffers go while the last files are published.
            tail = time.perf_counter()
            client.run(reading.drop_buffers, on_error="ignore")
            while finishing:
                interrupts.check()
                collect(wait=True)
            ctx.publish_tail_s = time.perf_counter() - tail
    finally:  # on an interrupt: COGs not started are dropped, the one being written ends first
        if cogs is not None:
            cogs.shutdown(wait=True, cancel_futures=True)
        for future in owner:
            future.cancel()
    return device
