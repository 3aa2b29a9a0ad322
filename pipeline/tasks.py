"""The unit of work a Dask worker runs: read a batch of tiles, predict, keep the cores.

A task carries paths and windows only; the worker opens the input itself and reuses its
process's compiled predictor, and sends back the small uint8 cores, joined into the
rectangles the driver writes (:func:`pipeline.windows.core_blocks`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
from collections.abc import Iterator

import numpy as np
from distributed import get_worker
from rasterio.windows import Window

from pipeline.chunks import ChunkUsers
from pipeline.infer import (
    configure_jax,
    device_description,
    get_predictor,
    resolve_readers,
)
from pipeline.io import Normaliser
from pipeline.reading import (
    BatchInputs,
    lend_elsewhere,
    read_elsewhere,
    read_tiles,
    reader_pool,
)
from pipeline.stitch import code_pixels, place
from pipeline.windows import Tile, TileSpec, core_blocks


@dataclasses.dataclass(frozen=True)
class BatchJob:
    """Everything a worker needs to predict one batch of tiles of one input."""

    input_path: str
    tiles: tuple[Tile, ...]
    bands: tuple[int, ...]
    normaliser: Normaliser
    """Applied on the device, to the values as read."""
    dtype: str
    """The dtype its values are read and sent in (:func:`pipeline.io.wire_dtype` of its bands)."""
    checkpoint: str
    checkpoint_sha256: str
    spec: TileSpec
    batch: int
    with_confidence: bool
    with_probabilities: bool
    compilation_cache: str | None
    precision: str = "auto"
    read_key: str | None = None
    """Names this planned input's chunks in the worker's chunk cache (None: keep none)."""
    readers: int | str = 0
    """Reader processes of the worker (``auto``: :func:`pipeline.infer.resolve_readers`)."""
    chunk_users: ChunkUsers | None = None
    """How many of its input's reads (each batch's ``parts``) read each chunk
    (:func:`pipeline.chunks.chunk_users`): where reader processes share the chunks read more
    than once (:mod:`pipeline.halos`)."""
    parts: int = 1
    """Reader processes read the batch in (at most) this many parts side by side
    (:func:`pipeline.windows.part_slices`; planned by :func:`pipeline.windows.parts_per_batch`)."""


@dataclasses.dataclass(frozen=True)
class BlockResult:
    """The written part of a rectangle of a batch's tile cores: class codes, optional
    confidence and per-class probabilities (bands first), nodata applied."""

    window: Window
    classes: np.ndarray
    confidence: np.ndarray | None = None
    probabilities: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """A batch's cores as rectangles, how many pixels of each class code (nodata included)
    they hold, and where and when (``perf_counter`` of ``worker``) the model ran it."""

    blocks: tuple[BlockResult, ...]
    tiles: int
    pixels: np.ndarray
    device: str
    worker: str
    model_span: tuple[float, float]


def read_batch(job: BatchJob) -> BatchInputs:
    """Read ``job.tiles``: the I/O half of a batch, for any worker; in one of the worker's
    reader processes where ``job.readers`` asks for them."""
    pool = reader_pool(resolve_readers(job.readers, _worker_threads()))
    if pool is None:
        return read_tiles(*_read_args(job), dtype=np.dtype(job.dtype))
    return read_elsewhere(pool, *_read_args(job), dtype=np.dtype(job.dtype), users=job.chunk_users, parts=job.parts)


@contextlib.contextmanager
def lent_batch(job: BatchJob) -> Iterator[BatchInputs]:
    """:func:`read_batch` for the with-block only: with readers, into a buffer of the worker's
    that is lent to this batch and then to the next (:data:`pipeline.reading.BUFFERS`)."""
    pool = reader_pool(resolve_readers(job.readers, _worker_threads()))
    if pool is None:
        yield read_tiles(*_read_args(job), dtype=np.dtype(job.dtype))
        return
    with lend_elsewhere(pool, *_read_args(job), dtype=np.dtype(job.dtype), users=job.chunk_users,
                        parts=job.parts) as inputs:
        yield inputs


def _read_args(job: BatchJob) -> tuple:
    """What :func:`~pipeline.reading.read_tiles` reads for ``job``: path, tiles, bands, read
    size and chunk key."""
    return job.input_path, job.tiles, job.bands, job.spec.read_size, job.read_key


def _worker_threads() -> int | None:
    """Threads of the Dask worker running this task (None outside one)."""
    try:
        return get_worker().state.nthreads
    except ValueError:
        return None


def predict_inputs(job: BatchJob, inputs: BatchInputs) -> BatchResult:
    """Predict a read batch and keep each tile's core: the device half of a batch."""
    configure_jax(job.compilation_cache)
    predictor = get_predictor(job.checkpoint, job.checkpoint_sha256, job.spec, job.batch, job.with_probabilities,
                              job.precision, confidence=job.with_confidence)
    extents = np.array([(t.core.height, t.core.width) for t in job.tiles], np.int32)
    prediction = predictor(inputs.x, inputs.valid, job.normaliser, extents)
    probabilities = None if prediction.probabilities is None else np.moveaxis(prediction.probabilities, -1, 1)
    blocks = []
    for window, members in core_blocks(job.tiles):
        placed = functools.partial(place, window, job.tiles, members, masks=inputs.masks)
        blocks.append(BlockResult(window, placed(prediction.classes),
                                  placed(prediction.confidence) if job.with_confidence else None,
                                  placed(probabilities) if job.with_probabilities else None))
    pixels = code_pixels(prediction.class_pixels, predictor.card.codes, int(extents.prod(axis=1).sum()))
    return BatchResult(tuple(blocks), len(job.tiles), pixels, device_description(),
                       f"{socket.gethostname()}/{os.getpid()}", prediction.span)


def predict_batch(job: BatchJob) -> BatchResult:
    """Read and predict ``job.tiles`` in one task; only the small cores travel back."""
    with lent_batch(job) as inputs:
        return predict_inputs(job, inputs)
