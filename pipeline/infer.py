"""Fixed-shape batches to the compiled U-Net and back.

One :class:`Predictor` per process and checkpoint: parameters, with batch norm folded into
the convolutions, are put on the device once, the forward pass is compiled once for
``(batch, bands, S, S)`` (bands first, as read), and a short batch is padded to that shape
rather than compiled again. The output is only the core of each tile, as uint8 class codes
(with confidences and probabilities only when asked for: the softmax is computed only
then), so little crosses back from the device, and how many of the written pixels each class
has, counted there (:func:`class_pixels`), so the host's threads need not go over them again.

With several devices visible the batch is sharded across them along its first axis
(``NamedSharding(Mesh(devices, ("data",)), P("data"))``, parameters replicated); the batch
is rounded up to a multiple of the device count, and a batch smaller than the device count
uses only as many devices as it has tiles. ``precision`` picks the compute dtype (``auto``:
bfloat16 on GPU/TPU, float32 on CPU). XLA's CPU convolutions gain nothing from bfloat16, even
on cores with bfloat16 matrix units (on an AVX-512 machine with AMX, XLA multiplied bfloat16
matrices 6x faster than float32 ones, and ran the U-Net's convolutions at the same speed in
either), so on CPU ``bfloat16`` (opt-in) is the matrix multiplies of the Winograd blocks
only, everything else float32. A batch
arrives as read: the input's own values (uint16 as uint16: no more bytes than bfloat16) and
where they are valid, as bits; the compiled pass normalises them (:func:`normalise`), so the host does
no arithmetic on them, and the normaliser's gain and bias are arguments, not constants. On CPU each
device runs its share of the batch one tile after another (``shard_map`` of a ``lax.map``):
one tile's activations stay in the CPU's caches, which measured faster than the batched
pass on the development machine, and tilepipe starts one CPU device per core
(:mod:`unet_flax.xla_flags`) so each core works on its own tile, and the wide blocks compute
their convolutions by Winograd's F(2x2, 3x3) (:mod:`unet_flax.winograd`).
Accelerators take the batch at once.
:func:`auto_batch` finds the largest batch that still speeds the forward pass up and
remembers it next to the compilation cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pipeline.io import packed_shape
from pipeline.windows import MOST_PARTS, TileSpec
from unet_flax.checkpoint import Checkpoint, load_checkpoint
from unet_flax.model import fold_batch_norm, winograd_copy
from unet_flax.winograd import inference_width

PRECISIONS = ("float32", "bfloat16", "auto")
AUTO_BATCH_FILE = "tilepipe-auto-batch.json"
FORWARD_VERSION = 7  # bump when the compiled forward changes in a way that moves the best batch

_configured: set[str] = set()
_lock = threading.Lock()


def configure_jax(cache_dir: str | None) -> None:
    """Turn on the persistent compilation cache (once per process)."""
    with _lock:
        if cache_dir is None or cache_dir in _configured:
            return
        path = Path(cache_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        _configured.add(cache_dir)


def resolve_precision(precision: str, backend: str | None = None) -> str:
    """``float32``/``bfloat16`` as given; ``auto`` is bfloat16 on accelerators, float32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


def unpack_valid(packed: jax.Array, size: int) -> jax.Array:
    """Validity (..., ``size``) from its bits (:func:`pipeline.io.pack_valid`)."""
    return jnp.unpackbits(packed, axis=-1, count=size).astype(bool)


def normalise(x: jax.Array, valid: jax.Array, gain: jax.Array, bias: jax.Array) -> jax.Array:
    """Model inputs (n, bands, S, S) in float32 from a batch as read: ``x * gain + bias`` per
    band (:class:`pipeline.io.Normaliser`), 0 (the mean) where ``valid`` (n, S, S) is not set."""
    z = x.astype(jnp.float32) * gain[:, None, None] + bias[:, None, None]
    return jnp.where(valid[:, None], z, jnp.float32(0))


def class_pixels(index: jax.Array, valid: jax.Array, extents: jax.Array, classes: int) -> jax.Array:
    """Pixels of each of ``classes`` (int32, (n, classes)) in the cores of ``n`` tiles as they
    are written: ``index`` (n, T, T) the class of each core pixel, ``valid`` (n, T, T) where
    the input has data, ``extents`` (n, 2) the rows and columns of each core inside the raster
    (0 for a padding tile). The device counts them beside the forward pass, so the host's
    threads need not go over every written pixel again."""
    inside = (jnp.arange(index.shape[-2])[:, None] < extents[:, 0, None, None]) \
        & (jnp.arange(index.shape[-1]) < extents[:, 1, None, None])
    written = (valid & inside)[..., None] & (index[..., None] == jnp.arange(classes))
    return jnp.sum(written, axis=(1, 2), dtype=jnp.int32)


def resolve_readers(readers: int | str, threads: int | None = None, backend: str | None = None) -> int:
    """Reader processes: a count as given; ``auto`` is none on CPU, where the model is the cost,
    and on accelerators, where reading in one process is (:mod:`pipeline.reading`), one per core
    up to as many as the worker's ``threads`` read at once: each thread waits for its own
    batch's read, in at most :data:`~pipeline.windows.MOST_PARTS` parts side by side
    (:func:`~pipeline.windows.parts_per_batch`)."""
    if readers != "auto":
        return int(readers)
    if (backend or jax.default_backend()) == "cpu":
        return 0
    cores = os.cpu_count() or 1
    return min(cores, threads * MOST_PARTS) if threads else cores


def device_description() -> str:
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"{jax.default_backend()} ({len(devices)} x {', '.join(kinds)})"


def backend_of(description: str) -> str:
    """The backend (cpu, gpu, tpu) named by a :func:`device_description`."""
    return description.split(" ", 1)[0]


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Class codes, and the confidence and probabilities (0-100) asked for, of the core of
    each tile in a batch; how many of the cores' written pixels (inside the raster, where the
    input has data) each class (model output index) has, over the batch; ``span`` is when the
    batch was on the device (``perf_counter``: put, forward and fetch)."""

    classes: np.ndarray
    class_pixels: np.ndarray
    span: tuple[float, float]
    confidence: np.ndarray | None = None
    probabilities: np.ndarray | None = None


class Predictor:
    """The compiled forward pass of one checkpoint at one batch shape.

    ``batch`` is rounded up to a multiple of the number of ``devices`` used (default: all
    visible devices of the default backend, at most ``batch`` of them); with more than one
    device the batch is sharded along its first axis and the parameters are replicated.
    ``sequential`` (default: on CPU) runs each device's tiles one after another.
    """

    def __init__(self, checkpoint: Checkpoint, spec: TileSpec, batch: int, probabilities: bool = False, *,
                 confidence: bool = True, precision: str = "float32", devices: Sequence[jax.Device] | None = None,
                 sequential: bool | None = None):
        self.card = checkpoint.card
        self.spec = spec
        self.confidence, self.probabilities = confidence, probabilities
        self.devices = tuple(devices if devices is not None else jax.devices())[:max(batch, 1)]
        backend = self.devices[0].platform
        self.precision = resolve_precision(precision, backend)
        n = len(self.devices)
        self.sequential = backend == "cpu" if sequential is None else sequential
        self.batch = -(-batch // n) * n
        self.input_shape = (self.batch, checkpoint.card.unet.in_bands, spec.read_size, spec.read_size)
        mesh = Mesh(np.array(self.devices), ("data",))
        self.input_sharding = NamedSharding(mesh, PartitionSpec("data"))
        self._replicated = replicated = NamedSharding(mesh, PartitionSpec())
        bands = checkpoint.card.unet.in_bands
        self._identity = (np.ones(bands, np.float32), np.zeros(bands, np.float32))
        self._scales: dict[Any, tuple[jax.Array, jax.Array]] = {}
        model = fold_batch_norm(checkpoint.model)
        self.winograd_width = wide = inference_width(backend)
        graphdef, state = nnx.split(model if wide is None else winograd_copy(model, wide, self.precision))
        self._state = jax.device_put(state, replicated)
        codes = jnp.asarray(checkpoint.card.codes)
        # On CPU, with Winograd's blocks, the precision is that of their products alone (their matrices').
        dtype = jnp.dtype(self.precision if wide is None else jnp.float32)
        sequential_tiles = self.sequential

        classes, ((top, bottom), (left, right)) = len(codes), spec.core

        def predict(model: nnx.Module, x: jax.Array, valid: jax.Array, extents: jax.Array, gain: jax.Array,
                    bias: jax.Array) -> tuple[jax.Array, ...]:
            """Codes, then confidence and probabilities where asked for (the softmax only then),
            then each class's pixels in the cores (:func:`class_pixels`)."""
            valid = unpack_valid(valid, x.shape[-1])
            x = jnp.moveaxis(normalise(x, valid, gain, bias), 1, -1)  # bands arrive first, as read; the model takes them last
            logits = model(x, dtype=dtype, core=spec.core)  # the decoder works for the cores only
            index = jnp.argmax(logits, axis=-1)
            outputs = (codes[index],)
            if confidence or probabilities:
                probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
                if confidence:
                    outputs += (jnp.round(100 * jnp.max(probs, axis=-1)).astype(jnp.uint8),)
                if probabilities:
                    outputs += (jnp.round(100 * probs).astype(jnp.uint8),)
            return (*outputs, class_pixels(index, valid[:, top:bottom, left:right], extents, classes))

        def tile_by_tile(state: nnx.State, x: jax.Array, valid: jax.Array, extents: jax.Array, gain: jax.Array,
                         bias: jax.Array) -> tuple[jax.Array, ...]:
            """One device's share of the batch, one tile after another."""
            model = nnx.merge(graphdef, state)
            return jax.lax.map(lambda tile: tuple(out[0] for out in predict(model, *(part[None] for part in tile),
                                                                            gain, bias)), (x, valid, extents))

        batched, shared = self.input_sharding, replicated

        @functools.partial(jax.jit, in_shardings=(shared, batched, batched, batched, shared, shared),
                           out_shardings=batched)
        def forward(state: nnx.State, x: jax.Array, valid: jax.Array, extents: jax.Array, gain: jax.Array,
                    bias: jax.Array) -> tuple[jax.Array, ...]:
            if sequential_tiles:
                split, whole = PartitionSpec("data"), PartitionSpec()
                return jax.shard_map(tile_by_tile, mesh=mesh, in_specs=(whole, split, split, split, whole, whole),
                                     out_specs=split, check_vma=False)(state, x, valid, extents, gain, bias)
            return predict(nnx.merge(graphdef, state), x, valid, extents, gain, bias)

        self._forward = forward
        # On CPU one batch already keeps every core busy: a second one at the same time (from
        # another Dask thread) would only share the cores and the caches, so batches take
        # turns. Accelerators queue batches on the device anyway and keep the overlap.
        self._turns = threading.Lock() if backend == "cpu" else contextlib.nullcontext()

    def pad(self, x: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``n <= batch`` tiles (n, bands, S, S) and where they are valid, as bits (n, S, S / 8:
        :func:`pipeline.io.pack_valid`; None: everywhere), padded with invalid zeros to the
        compiled shape."""
        n = x.shape[0]
        packed = packed_shape(n, self.input_shape[-1])
        if n > self.batch or x.shape[1:] != self.input_shape[1:]:
            raise ValueError(f"expected at most {self.input_shape} tiles, got {x.shape}")
        valid = np.full(packed, 255, np.uint8) if valid is None else valid
        if valid.shape != packed or valid.dtype != np.uint8:
            raise ValueError(f"expected validity bits of {packed} (io.pack_valid), got {valid.dtype} {valid.shape}")
        if n < self.batch:
            x = np.concatenate([x, np.zeros((self.batch - n, *x.shape[1:]), x.dtype)])
            valid = np.concatenate([valid, np.zeros((self.batch - n, *packed[1:]), np.uint8)])
        return x, valid

    def put(self, x: np.ndarray, valid: np.ndarray | None = None, normaliser: Any = None,
            extents: np.ndarray | None = None) -> tuple[jax.Array, ...]:
        """A padded batch as read on the device(s), sharded as the forward pass expects, with the
        rows and columns of each core inside the raster (``extents``, (n, 2); None: whole
        cores) and the gain and bias of ``normaliser`` (a :class:`pipeline.io.Normaliser`;
        None: ``x`` is normalised already)."""
        n = x.shape[0]
        x, valid = self.pad(x, valid)
        sizes = np.zeros((self.batch, 2), np.int32)  # a padding tile writes nothing
        sizes[:n] = self.spec.tile if extents is None else extents
        return (jax.device_put(x, self.input_sharding), jax.device_put(valid, self.input_sharding),
                jax.device_put(sizes, self.input_sharding), *self._scale(normaliser))

    def _scale(self, normaliser: Any) -> tuple[jax.Array, jax.Array]:
        """``normaliser``'s gain and bias on the device(s), put there once."""
        scale = self._scales.get(normaliser)
        if scale is None:
            gain_bias = self._identity if normaliser is None else normaliser.gain_bias
            scale = self._scales[normaliser] = tuple(jax.device_put(gain_bias, self._replicated))
        return scale

    def forward(self, batch: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        """The compiled forward pass on a full batch from :meth:`put`; returns without waiting
        (async dispatch)."""
        return self._forward(self._state, *batch)

    def __call__(self, x: np.ndarray, valid: np.ndarray | None = None, normaliser: Any = None,
                 extents: np.ndarray | None = None) -> Prediction:
        """Predict ``n <= batch`` tiles of shape (n, bands, S, S), as :meth:`put` takes them; the
        batch is padded."""
        n = x.shape[0]
        with self._turns:
            start = time.perf_counter()
            outputs = [np.asarray(out)[:n] for out in self.forward(self.put(x, valid, normaliser, extents))]
            span = (start, time.perf_counter())
        *maps, pixels = outputs
        maps = iter(maps)
        return Prediction(next(maps), pixels.sum(axis=0, dtype=np.int64), span,
                          next(maps) if self.confidence else None, next(maps) if self.probabilities else None)

    def lower(self, dtype: Any = np.float32) -> Any:
        """Trace and lower the forward pass for the batch shape, its values in ``dtype`` (Python
        work no cache keeps)."""
        bands = self.input_shape[1]
        x = jax.ShapeDtypeStruct(self.input_shape, np.dtype(dtype), sharding=self.input_sharding)
        valid = jax.ShapeDtypeStruct(packed_shape(self.batch, self.input_shape[-1]), np.dtype(np.uint8),
                                     sharding=self.input_sharding)
        extents = jax.ShapeDtypeStruct((self.batch, 2), np.dtype(np.int32), sharding=self.input_sharding)
        scale = jax.ShapeDtypeStruct((bands,), np.dtype(np.float32), sharding=self._replicated)
        return self._forward.lower(self._state, x, valid, extents, scale, scale)

    def compile(self, dtype: Any = np.float32) -> Any:
        """Lower and compile the forward pass for the batch shape, its values in ``dtype`` (uses
        the persistent cache)."""
        return self.lower(dtype).compile()

    def compiled_count(self) -> int:
        """How many shapes the forward pass has been compiled for (1 after any use)."""
        return self._forward._cache_size()


@functools.lru_cache(maxsize=4)
def _cached_predictor(path: str, sha256: str, spec: TileSpec, batch: int, probabilities: bool,
                      precision: str, confidence: bool) -> Predictor:
    checkpoint = load_checkpoint(path)
    if checkpoint.sha256 != sha256:
        raise ValueError(f"{Path(path).name}: checkpoint changed during the run (hash {checkpoint.sha256[:12]})")
    return Predictor(checkpoint, spec, batch, probabilities, confidence=confidence, precision=precision)


def get_predictor(path: str | os.PathLike[str], sha256: str, spec: TileSpec, batch: int,
                  probabilities: bool = False, precision: str = "auto", confidence: bool = True) -> Predictor:
    """This process's predictor for a checkpoint, loaded and compiled on first use only.

    Keyed by the checkpoint's hash, so Dask workers load weights once per process, not
    once per task, and tasks carry only the path.
    """
    precision = resolve_precision(precision)  # "auto" shares the resolved entry
    with _lock:
        return _cached_predictor(str(path), sha256, spec, batch, probabilities, precision, confidence)


# --- automatic batch size -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchProbe:
    """One tried batch size: tiles per second of the forward pass and its compiled memory."""

    batch: int
    tiles_per_second: float
    memory_bytes: int | None


def memory_budget(device: jax.Device, fraction: float = 0.5) -> int:
    """Bytes a compiled forward pass may use: ``fraction`` of the device's memory limit, or
    of the host's available memory on CPU."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        stats = {}
    if "bytes_limit" in stats:
        return int(fraction * stats["bytes_limit"])
    import psutil

    return int(fraction * psutil.virtual_memory().available)


def _compiled_bytes(compiled: Any) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # memory_analysis is optional in the PJRT API
        return None


def auto_batch_key(sha256: str, spec: TileSpec, precision: str, devices: Sequence[jax.Device]) -> str:
    """What an automatic batch choice depends on: model, tile shape, precision, hardware and
    the way the forward pass is written (``FORWARD_VERSION``)."""
    kinds = ",".join(sorted({d.device_kind for d in devices}))
    text = json.dumps([sha256, spec.tile, spec.halo, precision, FORWARD_VERSION, devices[0].platform, kinds, len(devices),
                       os.cpu_count(), jax.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def probe_batches(checkpoint: Checkpoint, spec: TileSpec, *, precision: str = "auto",
                  cap: int = 64, min_gain: float = 0.05, budget_bytes: int | None = None,
                  devices: Sequence[jax.Device] | None = None, repeats: int = 2) -> list[BatchProbe]:
    """Forward-pass throughput at batch 1, 2, 4, ... up to ``cap``; stops when the gain over
    the previous size is below ``min_gain`` or the compiled pass would exceed the budget."""
    devices = tuple(devices if devices is not None else jax.devices())
    budget = budget_bytes if budget_bytes is not None else memory_budget(devices[0])
    probes: list[BatchProbe] = []
    batch = len(devices)
    rng = np.random.default_rng(0)
    while batch <= max(cap, len(devices)):
        predictor = Predictor(checkpoint, spec, batch, precision=precision, devices=devices)
        used = _compiled_bytes(predictor.compile())
        if used is not None and used > budget and probes:
            break
        x = predictor.put(rng.standard_normal(predictor.input_shape).astype(np.float32))
        jax.block_until_ready(predictor.forward(x))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(predictor.forward(x))
            best = min(best, time.perf_counter() - t0)
        probes.append(BatchProbe(predictor.batch, predictor.batch / best, used))
        if len(probes) > 1 and probes[-1].tiles_per_second < (1 + min_gain) * probes[-2].tiles_per_second:
            break
        batch *= 2
    return probes


def choose_batch(probes: Sequence[BatchProbe], min_gain: float = 0.05) -> int:
    """The largest probed batch that was at least ``min_gain`` faster than the one before."""
    best = probes[0]
    for previous, probe in zip(probes, probes[1:]):
        if probe.tiles_per_second >= (1 + min_gain) * previous.tiles_per_second:
            best = probe
        else:
            break
    return best.batch


def auto_batch(checkpoint: Checkpoint, spec: TileSpec, *, precision: str = "auto",
               cap: int = 64, cache_dir: str | os.PathLike[str] | None = None, min_gain: float = 0.05,
               budget_bytes: int | None = None, devices: Sequence[jax.Device] | None = None) -> int:
    """The automatic batch size: a power of two (times the device count) <= ``cap``.

    The choice is stored as JSON in ``cache_dir`` (the compilation cache), keyed by the
    model's hash, the tile shape, precision and hardware, so later runs do not probe again.
    """
    devices = tuple(devices if devices is not None else jax.devices())
    key = auto_batch_key(checkpoint.sha256, spec, resolve_precision(precision, devices[0].platform), devices)
    store = Path(cache_dir).expanduser() / AUTO_BATCH_FILE if cache_dir else None
    known: dict[str, Any] = {}
    if store is not None and store.is_file():
        try:
            known = json.loads(store.read_text())
        except (OSError, ValueError):
            known = {}
        if isinstance(known.get(key), dict) and isinstance(known[key].get("batch"), int):
            return min(known[key]["batch"], max(cap, len(devices)))
    probes = probe_batches(checkpoint, spec, precision=precision, cap=cap, min_gain=min_gain,
                           budget_bytes=budget_bytes, devices=devices)
    batch = choose_batch(probes, min_gain)
    if store is not None:
        known[key] = {"batch": batch, "probes": [dataclasses.asdict(p) for p in probes],
                      "device": device_description()}
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".{store.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, store)
    return batch


def resolve_batch(wf: Any, spec: TileSpec) -> Any:
    """``wf`` with ``tiling.batch: auto`` replaced by the probed (or remembered) batch size.

    For the runner to call once, after validating the workflow and before planning batches;
    a fixed batch is returned as is.
    """
    if wf.tiling.batch != "auto":
        return wf
    cache = wf.runtime.compilation_cache
    configure_jax(str(cache) if cache else None)
    batch = auto_batch(load_checkpoint(wf.model.checkpoint), spec, precision=wf.runtime.precision, cache_dir=cache)
    return wf.model_copy(update={"tiling": wf.tiling.model_copy(update={"batch": batch})})
