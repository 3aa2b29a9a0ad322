"""``tilepipe bench``: how fast the model runs here, and how close a whole run comes to it.

One run measures, on one model and one tile setting:

* **model only**: the jitted forward pass on batches already on the device, in megapixels
  of output (tile cores) per second at the best timed batch (and at the median one), and
  GFLOP/s against the faster of two float32 matrix multiplies timed in the same process,
  XLA's and NumPy's BLAS, before and after the model (the better sample counts; FLOPs
  counted analytically as the pass computes them, its decoder for the tiles' cores only,
  :func:`unet_flax.model.forward_flops`); on CPU also the batch
  taken at once instead of tile by tile, and which library XLA gave the convolutions;
* **end to end**: ``run_workflow`` over a generated GeoTIFF (uint16 bands, in blocks of 256,
  deflate: ``--block``, ``--compress`` store it as an archive's files are; ``--scenes N``: a
  folder of N copies) in a child process, so the peak resident memory of its whole process
  tree is measured alone; the ratio end-to-end / model-only; how many times each chunk of the
  scene was decoded (:func:`pipeline.reading.chunks_decoded`); and the host's
  ceiling, the same run with the compiled forward pass swapped for one that thresholds band 1
  (every batch still goes to the device and back; reading, stitching and writing are all that
  is left), with the CPU it cost per megapixel written in the run's process, its readers and
  its finishers, and the rate at which all the host's cores could do that work;
* **memory scaling**: peak RSS of the same run on a small and a 4x-wider scene;
* **compilation**: a cold compile in a fresh process with an empty persistent cache, then a
  second process with the cache the first one filled, in three rounds (the median counts);
* **precision**: bfloat16 against float32 class agreement (and bfloat16 speed);
* **halo overhead**: pixels read per pixel written, and FLOPs computed per FLOP of the cores alone;
* **PyTorch** (``--torch``, when installed): the same U-Net, eager, channels-last,
  inference mode, timed in the same process on the same batch, both as one batch and tile
  by tile; the faster of the two is what Flax is compared with, once as each one's best
  time, and once paired: rounds in which the two take turns (:func:`paired_times`), so that
  a shared machine's changing load does not decide the ratio.

:func:`run_bench` is the tool; :func:`main_bench` parses nothing and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CPU_FEATURES = frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"})
"""The host CPU's features the report names: those that decide the convolution library
(:func:`unet_flax.xla_flags.convolutions_flag`) and whether it has bfloat16 units."""

SCHEMA_KEYS = (
    "device", "model", "tiling", "batch", "matmul", "model_only", "scene", "end_to_end", "memory", "compile",
    "precision", "halo", "torch", "targets",
)


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What one bench run measures; :func:`quick_options` is the seconds-long variant."""

    model: Path | None = None
    arch: tuple[int, int, int, int] = (4, 32, 4, 8)  # depth, base width, bands, classes
    size: int = 4096
    tile: int = 256
    halo: int = 64
    batch: int | str = 8
    precision: str = "auto"  # bfloat16 on accelerators, float32 on CPU
    threads: int | None = None  # dask threads of the end-to-end runs; None: the workflow default
    scenes: int = 1  # copies of the scene the end-to-end runs go through (a night's folder, not one file)
    block: int = 256  # the generated scenes' blocks (tiles of the GeoTIFF), pixels on a side
    compress: str = "deflate"  # and their compression (SCENE_COMPRESSIONS)
    readers: int | str = "auto"  # runtime.readers of the end-to-end runs
    finishers: int | str = "auto"  # runtime.finishers of the end-to-end runs
    output_compression: str = "deflate"  # output.compression of the end-to-end runs
    output_level: int | str = "auto"  # and output.level
    torch: bool = False
    memory_sizes: tuple[int, int] = (2048, 8192)
    memory_arch: tuple[int, int, int, int] | None = None  # None: (depth, 4, bands, classes) of the model
    min_seconds: float = 3.0  # per timed measurement
    compile_rounds: int = 3  # cold and warm compile pairs, each over a cache of its own
    host_only: bool = False  # only the host's ceiling, host_runs times (run_host_only)
    host_runs: int = 3
    host_memory: bool = False  # and, with host_only, peak memory at memory_sizes without the model's cost
    workdir: Path | None = None
    quick: bool = False


def quick_options(**overrides: Any) -> BenchOptions:
    """A tiny model and scene: every field of the report, in well under a minute."""
    base = dict(arch=(2, 8, 4, 3), size=512, tile=64, halo=16, batch=4, memory_sizes=(256, 512),
                memory_arch=(2, 4, 4, 3), min_seconds=0.2, compile_rounds=2, quick=True)
    base.update(overrides)
    return BenchOptions(**base)


# --- pieces -----------------------------------------------------------------------------------


def make_checkpoint(path: Path, arch: tuple[int, int, int, int], seed: int = 0) -> Path:
    """A randomly initialised U-Net of ``arch`` with a full model card."""
    from unet_flax.card import ClassInfo, ModelCard
    from unet_flax.checkpoint import save_checkpoint
    from unet_flax.model import UNetConfig, create_unet

    depth, width, bands, classes = arch
    config = UNetConfig(in_bands=bands, num_classes=classes, depth=depth, base_width=width)
    model = create_unet(config, seed=seed)
    model.eval()
    palette = [f"#{(37 * i) % 256:02x}{(91 * i) % 256:02x}{(173 * i) % 256:02x}" for i in range(classes)]
    card = ModelCard(name=f"bench-{depth}x{width}", unet=config, band_names=tuple(f"b{i + 1}" for i in range(bands)),
                     classes=tuple(ClassInfo(i, f"class{i}", palette[i]) for i in range(classes)),
                     mean=(0.5,) * bands, std=(0.25,) * bands)
    save_checkpoint(path, model, card)
    return path


SCENE_DTYPE = "uint16"
"""The dtype of :func:`write_scene`'s bands, which batches of it are sent in."""


SCENE_COMPRESSIONS = ("deflate", "lzw", "zstd", "none")
"""Compressions :func:`write_scene` offers (``--compress``): what archives commonly hold."""


def write_scene(path: Path, size: int, bands: int, seed: int = 0, block: int = 256,
                compress: str = "deflate") -> Path:
    """A ``size`` x ``size`` uint16 GeoTIFF, tiled in ``block`` x ``block`` blocks and
    ``compress``-ed, written a row of blocks (at least 512 rows) at a time, so the whole scene is
    never in memory."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if block <= 0 or block % 16:
        raise ValueError(f"block must be a positive multiple of 16 (a GeoTIFF's tiles), got {block}")
    if compress not in SCENE_COMPRESSIONS:
        raise ValueError(f"compress must be one of {', '.join(SCENE_COMPRESSIONS)}, got {compress!r}")
    rng = np.random.default_rng(seed)
    freqs = rng.uniform(0.005, 0.05, (bands, 2))
    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype=SCENE_DTYPE, tiled=True,
                   blockxsize=block, blockysize=block, crs=CRS.from_epsg(32633),
                   transform=from_origin(500000.0, 4650000.0, 10.0, 10.0),
                   **({} if compress == "none" else {"compress": compress}))
    strip = -(-512 // block) * block
    xx = np.arange(size, dtype=np.float32)[None, :]
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, strip):
            h = min(strip, size - row)
            yy = np.arange(row, row + h, dtype=np.float32)[:, None]
            data = np.empty((bands, h, size), np.uint16)
            for b in range(bands):
                wave = np.sin(xx * freqs[b, 0]) * np.cos(yy * freqs[b, 1])
                noise = rng.normal(0, 0.15, (h, size)).astype(np.float32)
                data[b] = np.clip(4000 + 3000 * (wave + noise), 0, 65535).astype(np.uint16)
            dst.write(data, window=Window(0, row, size, h))
    return path


def square() -> Any:
    """``a @ a`` compiled, summed and returned in float32 whatever ``a``'s dtype: as the model's
    bfloat16 products are summed, and the only bfloat16 products a CPU's AMX takes."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))


def matmul_rates(n: int = 2048, min_seconds: float = 2.0, dtype: str = "float32") -> dict[str, Any]:
    """Best ``n x n @ n x n`` rates in GFLOP/s in ``dtype`` (:func:`square`): XLA's on the
    default device and, on CPU in float32, NumPy's BLAS; ``gflops`` is the faster, the
    reference the model is measured against."""
    import jax

    host = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a = jax.device_put(host).astype(dtype)
    f = square()
    f(a).block_until_ready()
    rates = {"xla_gflops": 2 * n**3 / _best_time(lambda: f(a).block_until_ready(), min_seconds) / 1e9,
             "numpy_gflops": None}
    if jax.default_backend() == "cpu" and dtype == "float32":
        rates["numpy_gflops"] = 2 * n**3 / _best_time(lambda: host @ host, min_seconds) / 1e9
    return {"n": n, "dtype": dtype, "gflops": max(rates["xla_gflops"], rates["numpy_gflops"] or 0.0), **rates}


def best_sample(*samples: dict[str, Any]) -> dict[str, Any]:
    """The fastest of several :func:`matmul_rates` samples, with every sample's rate."""
    best = max(samples, key=lambda r: r["gflops"])
    return {**best, "samples_gflops": [r["gflops"] for r in samples]}


def _times(fn: Any, min_seconds: float, min_runs: int = 3) -> list[float]:
    """Wall times of ``fn`` over at least ``min_runs`` runs and ``min_seconds``."""
    times: list[float] = []
    while len(times) < min_runs or sum(times) < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _best_time(fn: Any, min_seconds: float, min_runs: int = 3) -> float:
    """Best wall time of ``fn`` over at least ``min_runs`` runs and ``min_seconds``."""
    return min(_times(fn, min_seconds, min_runs))


def median_round(rounds: Sequence[Any], ratio: Any) -> Any:
    """The round whose ``ratio`` is the median (the higher of the middle two of an even count)."""
    return sorted(rounds, key=ratio)[len(rounds) // 2]


def paired_times(first: Any, second: Any, rounds: int = 6, runs: int = 2) -> tuple[list[float], list[float]]:
    """Best-of-``runs`` wall times of ``first`` and ``second`` in ``rounds`` rounds, taking turns
    at going first (AB BA AB...): the machine's slower and faster minutes, and what one leaves
    behind for the other (a library's threads still spinning), fall on both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[i].append(_best_time((first, second)[i], 0.0, runs))
    return times


class RssSampler:
    """Peak resident memory of a process and all its children, sampled in a thread every
    ``interval`` s: the sum of their RSS (:attr:`peak`), and of their PSS (:attr:`peak_pss`),
    which counts a page that several of them map once (a batch in shared memory, mapped by a
    worker and the reader writing it, and the libraries of spawned children; Linux only, else
    RSS). The children are listed again only every ``relist`` s: listing them scans every
    process on the machine, and doing it at each sample took 7% of a core here, taken from the
    run being measured. Both include the stores of chunks the readers share
    (:mod:`pipeline.halos`): memory no process maps, so in no RSS."""

    def __init__(self, pid: int, interval: float = 0.2, relist: float = 1.0):
        import psutil

        self._root = psutil.Process(pid)
        self._interval, self._relist = interval, relist
        self.peak = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        procs: list[Any] = []
        listed = float("-inf")
        while not self._stop.is_set():
            if time.monotonic() - listed >= self._relist:
                try:
                    procs = [self._root, *self._root.children(recursive=True)]
                except psutil.Error:
                    return
                listed = time.monotonic()
            rss = pss = 0
            for proc in procs:
                try:
                    resident = proc.memory_info().rss
                except psutil.Error:
                    continue
                rss += resident
                pss += _pss(proc.pid, resident)
            stored = _chunk_stores(proc.pid for proc in procs)
            self.peak, self.peak_pss = max(self.peak, rss + stored), max(self.peak_pss, pss + stored)
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _chunk_stores(pids: Iterable[int]) -> int:
    """Bytes held by the stores of shared chunks (:mod:`pipeline.halos`) that ``pids`` have
    open, each store once (Linux; 0 elsewhere)."""
    held: dict[int, int] = {}
    for pid in pids:
        try:
            entries = list(os.scandir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        for entry in entries:
            try:
                if os.readlink(entry.path).startswith("/memfd:tilepipe-chunks"):
                    st = os.stat(entry.path)
                    held[st.st_ino] = st.st_blocks * 512
            except OSError:  # closed meanwhile
                continue
    return sum(held.values())


def _pss(pid: int, rss: int) -> int:
    """A process's proportional set size in bytes (``/proc/<pid>/smaps_rollup``: about a
    millisecond for 2 GB); ``rss`` where that cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss


def own_peak_rss() -> int:
    """This process's peak resident memory in bytes, as the kernel keeps it (Linux ``VmHWM``);
    0 where unknown. Not ``ru_maxrss``: a child started from a large process inherits its
    parent's figure there."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else 0


def _child(args: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, Any], tuple[int, int], float]:
    """Run ``python -m pipeline.bench <args>`` and return its JSON, the tree's peak RSS and PSS,
    and wall time.

    The RSS peak is the larger of the sampled tree's and the child's own high-water mark, which
    the kernel keeps exactly (the whole tree when, as in a local cluster of threads, the child
    is one process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.bench", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    with RssSampler(proc.pid) as sampler:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {args[0]} failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    own = result.pop("own_peak_rss", 0)
    return result, (max(sampler.peak, own), sampler.peak_pss), time.perf_counter() - t0


def bench_workflow(scene_dir: Path, out_dir: Path, checkpoint: Path, tile: int, halo: int, batch: int,
                   cache: Path, precision: str, threads: int | None = None,
                   readers: int | str = "auto", finishers: int | str = "auto",
                   compression: str = "deflate", level: int | str = "auto") -> dict[str, Any]:
    """The workflow an end-to-end measurement runs, as plain data (``threads``: dask threads;
    the runner keeps twice as many batches in flight; ``readers`` and ``finishers``: the
    ``runtime`` settings; ``compression`` and ``level``: its COGs')."""
    from pipeline.infer import resolve_precision
    from unet_flax.checkpoint import read_card

    bands = read_card(checkpoint).unet.in_bands
    return {"name": "bench", "input": {"dir": str(scene_dir)},
            "output": {"dir": str(out_dir), "run_products": False, "compression": compression,
                       "level": level},
            "model": {"checkpoint": str(checkpoint)},
            "bands": list(range(1, bands + 1)), "normalise": {"scale": 1 / 10000},
            "tiling": {"tile": tile, "halo": halo, "batch": batch},
            "runtime": {"compilation_cache": str(cache), "precision": resolve_precision(precision),
                        "readers": readers, "finishers": finishers},
            **({"dask": {"threads": threads}} if threads else {})}


# --- children ---------------------------------------------------------------------------------


def _child_compile(checkpoint: str, cache: str, tile: int, halo: int, batch: int, precision: str) -> dict:
    """Compile the predictor once in this (fresh) process, with the persistent cache at ``cache``."""
    from pipeline.infer import Predictor, configure_jax
    from pipeline.windows import tile_spec
    from unet_flax.checkpoint import load_checkpoint

    configure_jax(cache)
    ckpt = load_checkpoint(checkpoint)
    predictor = Predictor(ckpt, tile_spec(tile, halo, ckpt.card.unet.factor), batch, precision=precision)
    t0 = time.perf_counter()
    lowered = predictor.lower(SCENE_DTYPE)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops")) if cost and cost.get("flops") else None
    except Exception:  # cost analysis is optional
        pass
    return {"compile_s": seconds, "lower_s": t1 - t0, "xla_compile_s": seconds - (t1 - t0), "xla_flops": flops,
            "cache_files": len(list(Path(cache).glob("*")))}


def _no_model(predictor: Any) -> Any:
    """A stand-in for ``predictor``'s compiled forward pass that costs next to nothing: band 1
    above its mean is the second class, and the confidence is 100; same shapes and dtypes."""
    import jax
    import jax.numpy as jnp

    from pipeline.infer import class_pixels, normalise, unpack_valid

    lo, hi = predictor.spec.halo, predictor.spec.halo + predictor.spec.tile
    classes, codes = predictor.card.unet.num_classes, jnp.asarray(predictor.card.codes)
    two = min(classes, 2)  # the stand-in's classes

    @jax.jit
    def forward(state: Any, x: jax.Array, valid: jax.Array, extents: jax.Array, gain: jax.Array,
                bias: jax.Array) -> tuple[jax.Array, ...]:
        x, valid = x[:, :1, lo:hi, lo:hi], unpack_valid(valid, x.shape[-1])[:, lo:hi, lo:hi]
        index = (normalise(x, valid, gain[:1], bias[:1])[:, 0] > 0).astype(jnp.int32) * (two - 1)
        outputs = (codes[index],)
        if predictor.confidence:
            outputs += (jnp.full(index.shape, 100, jnp.uint8),)
        if predictor.probabilities:
            outputs += (jnp.full((*index.shape, classes), 50, jnp.uint8),)
        counts = class_pixels(index, valid, extents, two)  # as the model counts its classes, the others none
        return (*outputs, jnp.pad(counts, ((0, 0), (0, classes - two))))

    return forward


def _child_e2e(workflow_json: str, model: bool = True) -> dict:
    """Run one workflow in this process: warm the predictor, the readers and the finishers, then
    time ``run_workflow``. Without ``model`` the predictor's forward pass is
    :func:`_no_model` (the host's ceiling)."""
    import jax

    from pipeline.config import Workflow
    from pipeline.infer import configure_jax, get_predictor, resolve_readers
    from pipeline.reading import chunks_decoded, start_readers
    from pipeline.runner import batch_parts, resolve_tiling, run_workflow
    from pipeline.sink import resolve_compression, resolve_finishers, start_finishers
    from pipeline.thread_cpu import ThreadCpu, starting
    from pipeline.windows import part_slices
    from unet_flax.checkpoint import file_sha256, read_card

    wf = Workflow.model_validate(json.loads(Path(workflow_json).read_text()))
    card = read_card(wf.model.checkpoint)
    t0 = time.perf_counter()
    with starting("xla"):  # JAX's devices and first compile start XLA's threads, most of them unnamed
        configure_jax(str(wf.runtime.compilation_cache))
        wf, spec = resolve_tiling(wf, card)
        predictor = get_predictor(str(wf.model.checkpoint), file_sha256(wf.model.checkpoint), spec, wf.tiling.batch,
                                  wf.output.probabilities, wf.runtime.precision, confidence=wf.output.confidence)
        predictor.compile(SCENE_DTYPE)
    readers = resolve_readers(wf.runtime.readers, wf.dask.threads)  # as the local cluster's one worker will
    finishers = resolve_finishers(wf.runtime.finishers, jax.default_backend())
    roles = {"readers": start_readers(readers),  # started before the run, like the model
             "finishers": start_finishers(finishers)}  # as the run will at its first batch
    if not model:  # the tasks of this process share this predictor (threads of a local cluster)
        predictor._forward = _no_model(predictor)
        predictor(np.zeros(predictor.input_shape, SCENE_DTYPE))
    warm = time.perf_counter() - t0
    nearby = _model_batches(predictor, wf, card, spec) if model else None
    cpu0, decoded, t0 = _cpu_seconds(roles), chunks_decoded(), time.perf_counter()
    with ThreadCpu() as threads:
        report = run_workflow(wf, progress=False, echo=lambda line: None)
    seconds, cpu1, decoded = time.perf_counter() - t0, _cpu_seconds(roles), chunks_decoded() - decoded
    failed = [f.error for f in report.files if f.status != "ok"]
    if failed:
        raise RuntimeError(f"bench run failed: {failed}")
    result = {"seconds": seconds, "startup_s": warm, "pixels": sum(f.pixels or 0 for f in report.files),
              "device": report.device, "model_busy_share": report.model_busy_share, "readers": readers,
              "read_parts": len(part_slices(wf.tiling.batch, batch_parts(wf))) if readers else 1,
              "finishers": finishers, "model_batch_s": max(report.model_batch_s.values(), default=None),
              "publish_wait_s": report.publish_wait_s, "publish_tail_s": report.publish_tail_s,
              "checksum_wait_s": report.checksum_wait_s,
              "compression": dataclasses.asdict(resolve_compression(wf.output, jax.default_backend())),
              "cpu_s": {who: cpu1[who] - cpu0[who] for who in cpu1}, "chunks_decoded": decoded,
              "threads": threads.result.as_dict()}
    if nearby is not None:
        result["model_only_before_s"], result["model_only_after_s"] = nearby(), nearby()
        result["batch_pixels"] = predictor.batch * spec.tile**2
    return result


def _cpu_seconds(roles: dict[str, frozenset[int]]) -> dict[str, float]:
    """CPU seconds (user and system) used so far by this process and by its live children,
    summed by role: each of ``roles`` names its children's process ids (readers and finishers,
    started before a timed run and alive after it); any other child is ``other``."""
    import psutil

    me = psutil.Process()
    seconds = {"process": sum(me.cpu_times()[:2]), **dict.fromkeys(roles, 0.0), "other": 0.0}
    for child in me.children(recursive=True):
        role = next((name for name, pids in roles.items() if child.pid in pids), "other")
        try:
            seconds[role] += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return seconds


def _model_batches(predictor: Any, wf: Any, card: Any, spec: Any, runs: int = 3) -> Any:
    """A function timing ``runs`` model-only batches of the run's own predictor on tiles of its
    scene: called just before and just after the run, it measures model only at the same moment."""
    import jax

    scene = sorted(Path(wf.input.dir).glob("*.tif"))[0]
    x = predictor.put(*_scene_batch(scene, spec, predictor.batch, card))
    jax.block_until_ready(predictor.forward(x))
    return lambda: _times(lambda: jax.block_until_ready(predictor.forward(x)), 0.0, runs)


# --- the tool ---------------------------------------------------------------------------------


def run_bench(opts: BenchOptions, echo: Any = print) -> dict[str, Any]:
    """Measure everything described in the module docstring; returns the JSON report."""
    import jax

    from pipeline.infer import (
        Predictor,
        auto_batch,
        configure_jax,
        device_description,
        resolve_precision,
    )
    from pipeline.windows import plan_tiles, tile_spec
    from unet_flax.checkpoint import load_checkpoint
    from unet_flax.model import flops_per_pixel, forward_flops
    from unet_flax.xla_flags import cpu_features, ynn_convolutions

    # The children and PyTorch share one accelerator with this process: JAX allocates on
    # demand instead of taking 75% of the device's memory at start.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    with _workdir(opts) as work:
        checkpoint = opts.model or make_checkpoint(work / "bench-model.safetensors", opts.arch)
        ckpt = load_checkpoint(checkpoint)
        cfg = ckpt.card.unet
        spec = tile_spec(opts.tile, opts.halo, cfg.factor)
        fpp = flops_per_pixel(cfg)
        tile_flops = forward_flops(cfg, (spec.read_size,) * 2, spec.core)  # what the predictor computes
        precision = resolve_precision(opts.precision)
        report: dict[str, Any] = {
            "device": device_description(), "backend": jax.default_backend(), "jax": jax.__version__,
            "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()), "quick": opts.quick,
            "cpu_features": sorted(cpu_features() & CPU_FEATURES),
            "model": {"checkpoint": str(opts.model) if opts.model else None, "depth": cfg.depth,
                      "base_width": cfg.base_width, "in_bands": cfg.in_bands, "num_classes": cfg.num_classes,
                      "flops_per_pixel": fpp, "flops_per_tile": tile_flops, "precision": precision,
                      "cpu_convolutions": "ynnpack" if ynn_convolutions() else "eigen"},
            "tiling": {"tile": spec.tile, "halo": spec.halo, "read_size": spec.read_size},
        }
        echo(f"bench on {report['device']}: U-Net depth {cfg.depth} width {cfg.base_width}, "
             f"tile {spec.tile} + halo {spec.halo}")

        # Compilation: a cold process, then a second process over the cache it filled, in rounds,
        # each with a cache of its own; the median round counts (one pair is the machine's minute).
        batch0 = opts.batch if isinstance(opts.batch, int) else 1
        rounds = []
        for _ in range(opts.compile_rounds):
            cache = work / f"jax-cache-{os.getpid()}-{time.time_ns()}"  # empty: the first compile is cold
            child_args = [str(checkpoint), str(cache), str(spec.tile), str(spec.halo), str(batch0), precision]
            rounds.append((cache, _child(["compile", *child_args]), _child(["compile", *child_args])))
        cache, (cold, _, cold_wall), (warm, _, warm_wall) = median_round(
            rounds, lambda r: r[2][0]["compile_s"] / r[1][0]["compile_s"])
        report["compile"] = {"batch": batch0, "cold_s": cold["compile_s"], "warm_s": warm["compile_s"],
                             "warm_over_cold": warm["compile_s"] / cold["compile_s"],
                             "cold_lower_s": cold["lower_s"], "warm_lower_s": warm["lower_s"],
                             "cold_xla_s": cold["xla_compile_s"], "warm_xla_s": warm["xla_compile_s"],
                             "cold_process_s": cold_wall, "warm_process_s": warm_wall,
                             "cache_dir": str(cache), "cache_files": warm["cache_files"],
                             "rounds": [{"cold_s": c[0]["compile_s"], "warm_s": w[0]["compile_s"]}
                                        for _, c, w in rounds]}
        xla_fpp = cold["xla_flops"] / (batch0 * spec.read_size**2) if cold["xla_flops"] else None
        report["model"]["xla_cost_analysis_flops_per_pixel"] = xla_fpp
        echo(f"compile: cold {cold['compile_s']:.2f} s, warm (second process) {warm['compile_s']:.2f} s"
             f" (median of {len(rounds)} rounds)")

        configure_jax(str(cache))
        if opts.batch == "auto":
            t0 = time.perf_counter()
            batch = auto_batch(ckpt, spec, precision=precision, cache_dir=cache,
                               cap=16 if opts.quick else 64)
            report["batch"] = {"value": batch, "auto": True, "probe_s": time.perf_counter() - t0}
        else:
            batch = int(opts.batch)
            report["batch"] = {"value": batch, "auto": False}
        echo(f"batch: {batch}{' (auto)' if opts.batch == 'auto' else ''}")

        # The reference in the compute dtype; an accelerator needs a larger product to be busy.
        n = 2048 if jax.default_backend() == "cpu" else 8192
        mm = report["matmul"] = matmul_rates(n, min(2.0, opts.min_seconds), precision)
        echo(f"matmul {precision} {n}^3: XLA {mm['xla_gflops']:.1f} GFLOP/s"
             + (f", NumPy {mm['numpy_gflops']:.1f} GFLOP/s" if mm["numpy_gflops"] else ""))

        # The scene, and real tiles of it, as read, for the model-only and precision runs.
        scene_dir, scene = _scenes(work, opts, cfg.in_bands)
        report["scene"] = {**_scene_layout(scene, cfg.in_bands, opts), **_checksum_rate(scene, opts.size**2)}
        inputs = _scene_batch(scene, spec, batch, ckpt.card)

        predictor = Predictor(ckpt, spec, batch, precision=precision)
        batch = predictor.batch  # rounded up to the device count
        report["model"]["winograd_width"] = predictor.winograd_width  # as the predictor chose it
        x = predictor.put(*inputs)
        reference = np.asarray(predictor.forward(x)[0])
        times = _times(lambda: jax.block_until_ready(predictor.forward(x)), opts.min_seconds)
        t = min(times)
        # The reference once more, right after the model: the better of the two samples is
        # the rate of these cores, not of a moment when something else was running.
        report["matmul"] = best_sample(mm, matmul_rates(n, min(2.0, opts.min_seconds), precision))
        out_px, in_px = batch * spec.tile**2, batch * spec.read_size**2
        gflops = batch * tile_flops / t / 1e9
        report["model_only"] = {"seconds_per_batch": t, "mpx_per_s": out_px / t / 1e6,
                                "computed_mpx_per_s": in_px / t / 1e6, "gflops": gflops,
                                "fraction_of_matmul": gflops / report["matmul"]["gflops"],
                                "timed_batches": len(times),
                                "median_mpx_per_s": out_px / float(np.median(times)) / 1e6,
                                "tile_by_tile": predictor.sequential}
        echo(f"model only: {out_px / t / 1e6:.3f} Mpx/s written, {gflops:.1f} GFLOP/s "
             f"({100 * gflops / report['matmul']['gflops']:.0f}% of matmul)"
             + (" tile by tile" if predictor.sequential else ""))
        if predictor.sequential:  # what the batch taken at once gives, for comparison
            batched = Predictor(ckpt, spec, batch, precision=precision, sequential=False)
            xb = batched.put(*inputs)
            tb = _best_time(lambda: jax.block_until_ready(batched.forward(xb)), opts.min_seconds)
            report["model_only"]["batched_mpx_per_s"] = out_px / tb / 1e6
            report["model_only"]["batched_class_agreement"] = float(
                (np.asarray(batched.forward(xb)[0]) == reference).mean())
            echo(f"model only, whole batch at once: {out_px / tb / 1e6:.3f} Mpx/s")
            del batched, xb

        report["precision"] = _precision(ckpt, spec, batch, inputs, reference, precision, opts, tile_flops)
        echo(f"precision: {report['precision']['other']} vs {precision}: class agreement "
             f"{100 * report['precision']['class_agreement']:.3f}%")

        report["torch"] = (_torch(ckpt, inputs, reference, spec, opts, tile_flops, precision,
                                  flax=lambda: jax.block_until_ready(predictor.forward(x)))
                           if opts.torch else {"available": None})
        if opts.torch and report["torch"].get("available"):
            echo(f"torch eager channels-last: {report['torch']['mpx_per_s']:.3f} Mpx/s "
                 f"(batch {report['torch']['batch_mpx_per_s']:.3f}, "
                 f"tile by tile {report['torch']['tile_by_tile_mpx_per_s']:.3f})")

        tiles = plan_tiles(opts.size, opts.size, spec)
        report["halo"] = {"nominal": spec.read_size**2 / spec.tile**2,
                          "measured": len(tiles) * spec.read_size**2 / opts.size**2,
                          # what the halo costs in FLOPs: the decoder computes little of it
                          "flops": tile_flops / (fpp * spec.tile**2)}

        # End to end, in a child process whose tree's memory is sampled.
        e2e = _run_e2e(work, "e2e", scene_dir, checkpoint, spec, batch, cache, precision, opts)
        e2e_mpx = e2e["pixels"] / e2e["seconds"] / 1e6
        report["end_to_end"] = {"size": opts.size, "scenes": opts.scenes, "pixels": e2e["pixels"],
                                "bands": cfg.in_bands, "threads": opts.threads,
                                "readers": e2e["readers"], "read_parts": e2e["read_parts"],
                                "finishers": e2e["finishers"], "seconds": e2e["seconds"],
                                "compression": e2e["compression"],
                                "startup_s": e2e["startup_s"], "mpx_per_s": e2e_mpx,
                                "ratio_to_model_only": e2e_mpx / report["model_only"]["mpx_per_s"],
                                # a whole run is many batches, some slower: against the median batch too
                                "ratio_to_median_model_only": e2e_mpx / report["model_only"]["median_mpx_per_s"],
                                "peak_rss_mb": e2e["peak_rss"] / 2**20, "peak_pss_mb": e2e["peak_pss"] / 2**20,
                                "process_wall_s": e2e["wall"],
                                # how much of the run the model was the cost: host work that hides
                                # behind it leaves this near 1 whatever the machine's speed did
                                "model_busy_share": e2e["model_busy_share"],
                                # batches held back for publication, and publishing after the last batch
                                "publish_wait_s": e2e["publish_wait_s"], "publish_tail_s": e2e["publish_tail_s"],
                                # finished files waiting for their inputs' checksums (one thread)
                                "checksum_wait_s": e2e["checksum_wait_s"],
                                "decodes_per_chunk": _decodes_per_chunk(e2e, report["scene"], opts)}
        report["end_to_end"]["paired"] = paired = _paired(e2e)
        echo(f"end to end {opts.scenes} x {opts.size}^2 ({e2e['seconds']:.1f} s): {e2e_mpx:.3f} Mpx/s, ratio {report['end_to_end']['ratio_to_model_only']:.2f}"
             f"; {paired['ratio']:.2f} to model-only batches timed in its process just before and after it; "
             f"model busy {100 * report['end_to_end']['model_busy_share']:.1f}% of the run")

        # The host's ceiling: the same run with the model's cost taken out goes as fast as
        # reading, stitching and writing can here. End to end cannot beat it on any device.
        host = _run_e2e(work, "host", scene_dir, checkpoint, spec, batch, cache, precision, opts,
                        model=False)
        h = _host_summary(host, report["scene"], opts)
        host_mpx = h["mpx_per_s"]
        report["end_to_end"].update(host_mpx_per_s=host_mpx, host_seconds=h["seconds"],
                                    host_publish_wait_s=h["publish_wait_s"], host_publish_tail_s=h["publish_tail_s"],
                                    host_checksum_wait_s=h["checksum_wait_s"],
                                    host_decodes_per_chunk=h["decodes_per_chunk"],
                                    host_over_model_only=host_mpx / report["model_only"]["mpx_per_s"],
                                    cpu_ms_per_mpx=_per_mpx(e2e), host_cpu_ms_per_mpx=h["cpu_ms_per_mpx"],
                                    threads=_threads(e2e), host_threads=h["threads"],
                                    busy_share=_busy_shares(e2e), host_busy_share=h["busy_share"],
                                    cores=h["cores"], host_cpu_bound_mpx_per_s=h["cpu_bound_mpx_per_s"])
        echo(f"host ceiling {opts.size}^2 ({host['seconds']:.1f} s): {host_mpx:.3f} Mpx/s, "
             f"{report['end_to_end']['host_over_model_only']:.2f}x model only")

        report["memory"] = _memory(work, opts, cfg, spec, batch, cache, precision)
        echo(_memory_line(report["memory"]))
        report["targets"] = targets(report)
        report["load_average_end"] = list(os.getloadavg())
        return report


def _host_summary(run: dict[str, Any], scene: dict[str, Any], opts: BenchOptions) -> dict[str, Any]:
    """A host-ceiling run (:func:`_run_e2e` without the model) as the report gives it: its rate,
    what held it back, and what the host spent per megapixel written: on an accelerator, where
    every core is busy, that CPU sets the ceiling, and a thread busy all the time caps the run
    however many cores are idle."""
    from unet_flax.xla_flags import usable_cores

    cpu, cores = _per_mpx(run), usable_cores()
    return {"mpx_per_s": run["pixels"] / run["seconds"] / 1e6, "seconds": run["seconds"],
            "publish_wait_s": run["publish_wait_s"], "publish_tail_s": run["publish_tail_s"],
            "checksum_wait_s": run["checksum_wait_s"], "decodes_per_chunk": _decodes_per_chunk(run, scene, opts),
            "cpu_ms_per_mpx": cpu, "threads": _threads(run), "busy_share": _busy_shares(run), "cores": cores,
            # every core busy with nothing but this host work: a bound no arrangement of processes passes
            "cpu_bound_mpx_per_s": 1000 * cores / sum(cpu.values()),
            "peak_rss_mb": run["peak_rss"] / 2**20}


def run_host_only(opts: BenchOptions, echo: Any = print) -> dict[str, Any]:
    """``tilepipe bench --host-only``: the host's ceiling alone, ``opts.host_runs`` times over the
    same scenes: the end-to-end run with the model's cost taken out, as a host with the given
    settings (``--threads``, ``--readers``, ``--finishers``, ``--batch``, ``--precision``,
    ``--output-compression``) would run it on this machine's cores. An accelerator host's
    settings emulated on any machine; no model-only or compile measurements, and memory only
    with ``opts.host_memory`` (``--memory``), the model's cost taken out as well."""
    import jax

    from pipeline.infer import device_description, resolve_precision
    from pipeline.windows import tile_spec
    from unet_flax.checkpoint import load_checkpoint
    from unet_flax.xla_flags import cpu_features

    with _workdir(opts) as work:
        checkpoint = opts.model or make_checkpoint(work / "bench-model.safetensors", opts.arch)
        cfg = load_checkpoint(checkpoint).card.unet
        spec, precision = tile_spec(opts.tile, opts.halo, cfg.factor), resolve_precision(opts.precision)
        scene_dir, scene = _scenes(work, opts, cfg.in_bands)
        report: dict[str, Any] = {
            "device": device_description(), "backend": jax.default_backend(), "host_only": True,
            "cpu_features": sorted(cpu_features() & CPU_FEATURES),
            "model": {"depth": cfg.depth, "base_width": cfg.base_width, "in_bands": cfg.in_bands,
                      "num_classes": cfg.num_classes, "precision": precision},
            "tiling": {"tile": spec.tile, "halo": spec.halo, "read_size": spec.read_size},
            "batch": {"value": opts.batch, "auto": False}, "scenes": opts.scenes, "threads": opts.threads,
            "scene": _scene_layout(scene, cfg.in_bands, opts), "runs": []}
        echo(f"host ceiling on {report['device']}: {opts.scenes} x {opts.size}^2, batch {opts.batch}, {precision}")
        for i in range(opts.host_runs):
            run = _run_e2e(work, f"host-{i}", scene_dir, checkpoint, spec, opts.batch, work / "jax-cache", precision,
                           opts, model=False)
            report.update(readers=run["readers"], read_parts=run["read_parts"], finishers=run["finishers"],
                          compression=run["compression"])
            report["runs"].append(_host_summary(run, report["scene"], opts))
            echo(f"run {i + 1}: {report['runs'][-1]['mpx_per_s']:.1f} Mpx/s ({run['seconds']:.1f} s)")
        if opts.host_memory:
            report["memory"] = _memory(work, opts, cfg, spec, opts.batch, work / "jax-cache", precision, model=False)
            echo(_memory_line(report["memory"]))
        return report


def format_host_table(report: dict[str, Any]) -> str:
    """A :func:`run_host_only` report as an aligned two-column table, a row per run."""
    sc, runs = report["scene"], report["runs"]
    rows = [("device", _device(report)),
            ("tiles", f"{report['tiling']['tile']} + halo {report['tiling']['halo']} (read "
                      f"{report['tiling']['read_size']}), batch {report['batch']['value']}, "
                      f"{report['model']['precision']}, model depth {report['model']['depth']} with "
                      f"{report['model']['in_bands']} bands"),
            ("scenes", f"{report['scenes']} x {sc['size']}^2 x {sc['bands']} {sc['dtype']}, blocks {sc['block']}^2, "
                       f"{sc['compress']}"),
            ("settings", f"{report['threads'] or 'the workflow default'} Dask threads, "
                         f"{report['readers']} readers{_parts(report)}; publishing: {_publishing(report)}")]
    rates = [run["mpx_per_s"] for run in runs]
    costs = [sum(run["cpu_ms_per_mpx"].values()) for run in runs]
    for i, (run, cost) in enumerate(zip(runs, costs), start=1):
        rows.append((f"run {i}", f"{run['mpx_per_s']:.1f} Mpx/s; CPU per Mpx written "
                                 f"{_cpu_split(run['cpu_ms_per_mpx'], report)} ({cost:.1f} ms in all; "
                                 f"{run['cores']} cores all busy with it: {run['cpu_bound_mpx_per_s']:.1f} Mpx/s); "
                                 f"by thread {_thread_roles(run['threads'])}; readers and finishers busy: "
                                 f"{_shares(run['busy_share'])}; batches held back for publishing "
                                 f"{run['publish_wait_s']:.2f} s, files for checksums {run['checksum_wait_s']:.2f} s; "
                                 f"{run['decodes_per_chunk']:.2f} decodes per chunk; "
                                 f"peak RSS {run['peak_rss_mb']:.0f} MB"))
    rows.append(("host ceiling", f"{min(rates):.1f}-{max(rates):.1f} Mpx/s (median {float(np.median(rates)):.1f}) "
                                 f"at {min(costs):.1f}-{max(costs):.1f} ms of CPU per Mpx written, "
                                 f"over {len(runs)} runs"))
    if "memory" in report:
        rows.append(("memory", f"{_memory_line(report['memory'])}, the model's cost taken out"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _scene_batch(scene: Path, spec: Any, batch: int, card: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    """The first ``batch`` tiles of ``scene`` as a worker reads them (values and validity), and
    the normaliser the device applies to them: :meth:`pipeline.infer.Predictor.put`'s arguments."""
    import rasterio

    from pipeline.io import Normaliser
    from pipeline.reading import read_tiles
    from pipeline.windows import plan_tiles

    bands = range(1, card.unet.in_bands + 1)
    normaliser = Normaliser((1 / 10000,) * len(bands), (0.0,) * len(bands), card.mean, card.std)
    with rasterio.open(scene) as src:
        tiles = plan_tiles(src.width, src.height, spec)
    read = read_tiles(str(scene), [tiles[i % len(tiles)] for i in range(batch)], bands, spec.read_size)
    return read.x, read.valid, normaliser


def _precision(ckpt: Any, spec: Any, batch: int, inputs: tuple, reference: np.ndarray, precision: str,
               opts: BenchOptions, tile_flops: int) -> dict[str, Any]:
    """The other precision on the same batch: class agreement with ``reference`` (the classes
    at ``precision``, already computed) and its speed."""
    import jax

    from pipeline.infer import Predictor

    other = "bfloat16" if precision == "float32" else "float32"
    p = Predictor(ckpt, spec, batch, precision=other)
    x = p.put(*inputs)
    agreement = float((np.asarray(p.forward(x)[0]) == reference).mean())
    seconds = _best_time(lambda: jax.block_until_ready(p.forward(x)), opts.min_seconds / 2, min_runs=2)
    return {"compute": precision, "other": other, "class_agreement": agreement,
            "other_mpx_per_s": batch * spec.tile**2 / seconds / 1e6,
            "other_gflops": batch * tile_flops / seconds / 1e9}


def _torch(ckpt: Any, inputs: tuple, reference: np.ndarray, spec: Any, opts: BenchOptions,
           tile_flops: int, precision: str, flax: Any) -> dict[str, Any]:
    """The PyTorch twin on the same batch: eager, channels-last, inference mode, in the same
    precision, on the GPU when JAX runs on one; timed as one batch and tile by tile, the
    faster being its figure; then in that way in rounds paired with ``flax`` (the Flax batch's
    timed call)."""
    import jax

    from pipeline.infer import normalise, unpack_valid
    from pipeline.torch_unet import torch_available, torch_classes, torch_input, torch_unet_from_flax

    if not torch_available():
        return {"available": False, "note": "torch is not installed (pip install torch)"}
    import torch

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    net = torch_unet_from_flax(ckpt.model).to(device=device, dtype=getattr(torch, precision))
    values, valid, normaliser = inputs
    x = torch_input(net, np.array(normalise(values, unpack_valid(valid, values.shape[-1]), *normaliser.gain_bias)))
    tiles = [x[i:i + 1] for i in range(len(x))]
    codes = ckpt.card.codes[torch_classes(net, x, spec.core).cpu().numpy()]

    def whole() -> Any:
        return torch_classes(net, x, spec.core)

    def by_tile() -> Any:
        return [torch_classes(net, tile, spec.core) for tile in tiles]

    batch_t, tile_t = _best_time(whole, opts.min_seconds), _best_time(by_tile, opts.min_seconds)
    t = min(batch_t, tile_t)
    n = len(values)
    flax_s, torch_s = paired_times(flax, whole if batch_t <= tile_t else by_tile)
    ratios = [b / a for a, b in zip(flax_s, torch_s)]
    paired = {"rounds": len(ratios), "flax_s": flax_s, "torch_s": torch_s, "flax_over_torch": float(np.median(ratios)),
              "flax_mpx_per_s": n * spec.tile**2 / float(np.median(flax_s)) / 1e6,
              "torch_mpx_per_s": n * spec.tile**2 / float(np.median(torch_s)) / 1e6}
    return {"available": True, "version": torch.__version__, "device": device, "dtype": precision,
            "threads": torch.get_num_threads(),
            "seconds_per_batch": t, "mpx_per_s": n * spec.tile**2 / t / 1e6,
            "batch_mpx_per_s": n * spec.tile**2 / batch_t / 1e6,
            "tile_by_tile_mpx_per_s": n * spec.tile**2 / tile_t / 1e6,
            "gflops": n * tile_flops / t / 1e9,
            "class_agreement_with_flax": float((codes == reference[:n]).mean()), "paired": paired}


def _scene_layout(scene: Path, bands: int, opts: BenchOptions) -> dict[str, Any]:
    """How the generated scene is stored, and the chunks it is decoded in (:mod:`pipeline.chunks`)."""
    import rasterio

    from pipeline.chunks import ChunkReader

    with rasterio.open(scene) as src:
        grid = ChunkReader.of(src, range(1, bands + 1)).grid
    return {"size": opts.size, "bands": bands, "dtype": SCENE_DTYPE, "block": opts.block,
            "compress": opts.compress, "chunk": [grid.rows, grid.cols],
            "chunks": grid.count}


def _checksum_rate(scene: Path, pixels: int, repeats: int = 3) -> dict[str, Any]:
    """How fast the scene file is checksummed (:func:`pipeline.checksums.file_checksum`, on the
    run's one checksum thread, beside the inference): in bytes, and in pixels of output a
    second, which no run of such files can outpace."""
    from pipeline.checksums import ALGORITHM, file_checksum

    seconds = _best_time(lambda: file_checksum(scene), 0.0, repeats)
    return {"checksum": ALGORITHM, "checksum_gb_per_s": scene.stat().st_size / seconds / 1e9,
            "checksum_mpx_per_s": pixels / seconds / 1e6}


def _decodes_per_chunk(run: dict[str, Any], scene: dict[str, Any], opts: BenchOptions) -> float:
    """Chunks a run decoded per chunk of its scenes: 1 when each is decoded once, more where
    neighbouring batches decode the blocks of the halo they share again (past the budget of the
    store a worker's readers share them through, :mod:`pipeline.halos`, or of the cache its
    threads share, :mod:`pipeline.chunks`)."""
    return run["chunks_decoded"] / (scene["chunks"] * opts.scenes)


@contextlib.contextmanager
def _workdir(opts: BenchOptions) -> Iterator[Path]:
    """Where a bench writes its files: ``opts.workdir``, kept, or a temporary folder removed after."""
    if opts.workdir is not None:
        Path(opts.workdir).mkdir(parents=True, exist_ok=True)
        yield Path(opts.workdir)
        return
    with tempfile.TemporaryDirectory(prefix="tilepipe-bench-") as tmp:
        yield Path(tmp)


def _scenes(work: Path, opts: BenchOptions, bands: int) -> tuple[Path, Path]:
    """The folder the end-to-end runs read, and the scene in it (``opts.size``, stored as
    ``opts.block`` and ``opts.compress`` say), with ``opts.scenes - 1`` more names of it."""
    scene_dir = work / "scene"
    scene_dir.mkdir(exist_ok=True)
    scene = write_scene(scene_dir / "scene.tif", opts.size, bands, block=opts.block, compress=opts.compress)
    for i in range(2, opts.scenes + 1):
        _link_or_copy(scene, scene_dir / f"scene-{i}.tif")
    return scene_dir, scene


def _link_or_copy(source: Path, dest: Path) -> None:
    """``dest`` as another name of ``source`` where the file system allows, else a copy."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def _run_e2e(work: Path, name: str, scene_dir: Path, checkpoint: Path, spec: Any, batch: int, cache: Path,
             precision: str, opts: BenchOptions, model: bool = True) -> dict[str, Any]:
    """One end-to-end run of the scenes in a child process, into an output folder that starts
    empty: the outputs of an earlier bench in the same ``--workdir`` would have it skip every file."""
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    wf = bench_workflow(scene_dir, out, checkpoint, spec.tile, spec.halo, batch, cache, precision,
                        opts.threads, opts.readers, opts.finishers, opts.output_compression,
                        opts.output_level)
    path = work / f"{name}-workflow.json"
    path.write_text(json.dumps(wf))
    result, (rss, pss), wall = _child(["e2e", str(path), *([] if model else ["--no-model"])])
    return {**result, "peak_rss": rss, "peak_pss": pss, "wall": wall}


def _per_mpx(run: dict[str, Any]) -> dict[str, float]:
    """A run's CPU milliseconds per megapixel written: its process's (the driver and the local
    cluster's worker), its readers', its finishers' and any other child's."""
    return {who: 1000 * seconds / (run["pixels"] / 1e6) for who, seconds in run["cpu_s"].items()}


def _threads(run: dict[str, Any]) -> dict[str, Any]:
    """The run's process's CPU per megapixel written by thread role (:mod:`pipeline.thread_cpu`),
    and its busiest thread with the share of the run it was busy."""
    t, mpx = run["threads"], run["pixels"] / 1e6
    return {"ms_per_mpx": {role: 1000 * s / mpx for role, s in sorted(t["roles"].items(), key=lambda r: -r[1])},
            "threads": t["threads"], "busiest": t["busiest"], "busiest_share": t["busiest_s"] / t["seconds"]}


def _busy_shares(run: dict[str, Any]) -> dict[str, float]:
    """How busy the run kept each kind of process, on average: its CPU seconds over its
    processes times the run's seconds (1 for each core it could use all the time)."""
    counts = {"readers": run.get("readers") or 0, "finishers": run.get("finishers") or 0}
    return {who: run["cpu_s"][who] / (n * run["seconds"]) for who, n in counts.items() if n}


def _paired(e2e: dict[str, Any]) -> dict[str, Any]:
    """End to end against model-only batches timed in the same process just before and after
    the run: a ratio that the machine's slower and faster minutes move less."""
    times = [*e2e["model_only_before_s"], *e2e["model_only_after_s"]]
    best, mean = e2e["batch_pixels"] / min(times) / 1e6, e2e["batch_pixels"] / float(np.mean(times)) / 1e6
    e2e_mpx = e2e["pixels"] / e2e["seconds"] / 1e6
    return {"model_only_mpx_per_s": best, "model_only_mean_mpx_per_s": mean, "ratio": e2e_mpx / best,
            "ratio_to_mean": e2e_mpx / mean, "before_s": e2e["model_only_before_s"],
            "after_s": e2e["model_only_after_s"], "run_batch_median_s": e2e["model_batch_s"]}


def _memory(work: Path, opts: BenchOptions, cfg: Any, spec: Any, batch: int, cache: Path,
            precision: str, model: bool = True) -> dict[str, Any]:
    """Peak RSS of whole runs on a small and a large scene (same tiles, batch and model family;
    without ``model``, its cost taken out, as in the host's ceiling)."""
    arch = opts.memory_arch or (cfg.depth, min(4, cfg.base_width), cfg.in_bands, cfg.num_classes)
    checkpoint = make_checkpoint(work / "memory-model.safetensors", arch)
    results = {}
    for label, size in zip(("small", "large"), opts.memory_sizes):
        scene_dir = work / f"memory-{size}"
        scene_dir.mkdir(exist_ok=True)
        write_scene(scene_dir / "scene.tif", size, arch[2], seed=1, block=opts.block, compress=opts.compress)
        run = _run_e2e(work, f"memory-{size}", scene_dir, checkpoint, spec, batch, cache, precision, opts, model)
        results[label] = {"size": size, "peak_rss_mb": run["peak_rss"] / 2**20,
                          "peak_pss_mb": run["peak_pss"] / 2**20, "seconds": run["seconds"],
                          "mpx_per_s": run["pixels"] / run["seconds"] / 1e6}
        (scene_dir / "scene.tif").unlink()
    return {"arch": {"depth": arch[0], "base_width": arch[1], "in_bands": arch[2], "num_classes": arch[3]},
            "note": "a narrower model than the one benchmarked, so the large scene runs in minutes",
            **results, "large_over_small": results["large"]["peak_rss_mb"] / results["small"]["peak_rss_mb"],
            "large_over_small_pss": results["large"]["peak_pss_mb"] / results["small"]["peak_pss_mb"]}


def _memory_line(memory: dict[str, Any]) -> str:
    """A :func:`_memory` result in words: each size's peak RSS, and their ratio."""
    small, large = memory["small"], memory["large"]
    return (f"peak RSS {small['size']}^2 {small['peak_rss_mb']:.0f} MB, {large['size']}^2 "
            f"{large['peak_rss_mb']:.0f} MB: x{memory['large_over_small']:.2f}")


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the measured value and whether it is met."""
    t: dict[str, Any] = {
        "e2e_ratio_ge_0.9": report["end_to_end"]["ratio_to_model_only"] >= 0.9,
        "e2e_ratio_ge_0.9_paired": report["end_to_end"]["paired"]["ratio"] >= 0.9,
        "rss_large_over_small_le_1.25": report["memory"]["large_over_small"] <= 1.25,
        "model_ge_0.7_matmul": (report["model_only"]["fraction_of_matmul"] >= 0.7
                                if report["model"]["precision"] == "float32" else
                                f"a float32 goal; this run is {report['model']['precision']} "
                                f"({100 * report['model_only']['fraction_of_matmul']:.0f}% of its matmul)"),
        "warm_compile_le_0.2_cold": report["compile"]["warm_over_cold"] <= 0.2,
    }
    if report["torch"].get("available"):
        t["flax_ge_torch"] = report["model_only"]["mpx_per_s"] >= report["torch"]["mpx_per_s"]
        t["flax_ge_torch_paired"] = report["torch"]["paired"]["flax_over_torch"] >= 1.0
    if report["backend"] != "gpu":
        t["gpu"] = "no GPU visible: throughput and fraction of peak on GPU not measured"
    return t


def _cpu_split(ms: dict[str, float], run: dict[str, Any]) -> str:
    """CPU per megapixel written by the run's process, its readers and finishers (as many as
    ``run`` says it had) and any other children."""
    counts = {"readers": run.get("readers"), "finishers": run.get("finishers")}
    parts = [f"{ms['process']:.1f} ms in the run's process"]
    parts += [f"{ms[role]:.1f} ms in {counts[role]} {role if counts[role] > 1 else role[:-1]}"
              for role in ("readers", "finishers") if counts[role]]
    if ms.get("other", 0) >= 0.5:
        parts.append(f"{ms['other']:.1f} ms in other children")
    return ", ".join(parts)


def _thread_roles(threads: dict[str, Any]) -> str:
    """A run's process thread by thread: each role's CPU per Mpx, then the busiest thread."""
    roles = ", ".join(f"{role} {ms:.1f}" + (f" ({threads['threads'][role]} threads)"
                                            if threads["threads"].get(role, 0) > 1 else "")
                      for role, ms in threads["ms_per_mpx"].items() if ms >= 0.05)
    return f"{roles} ms; busiest {threads['busiest']}, {100 * threads['busiest_share']:.0f}% of the run"


def _shares(shares: dict[str, float]) -> str:
    return ", ".join(f"{who} {100 * share:.0f}%" for who, share in shares.items()) or "(none)"


def _publishing(e2e: dict[str, Any]) -> str:
    """Where and how the end-to-end runs published: finishers, and the COGs' codec and level."""
    codec = e2e["compression"]["codec"] + (f" {e2e['compression']['level']}" if e2e["compression"]["level"] else "")
    finishers = e2e.get("finishers") or 0
    return (f"{finishers} finisher{'s' if finishers > 1 else ''}, " if finishers else "") + codec


def _parts(settings: dict[str, Any]) -> str:
    """How many parts readers read each batch in, where more than one (:mod:`pipeline.reading`)."""
    parts = settings.get("read_parts", 1)
    return f" (each batch in {parts} parts)" if settings.get("readers") and parts > 1 else ""


def _device(report: dict[str, Any]) -> str:
    return report["device"] + (f"; host CPU has {', '.join(report['cpu_features'])}" if report.get("cpu_features")
                               else "")


def format_table(report: dict[str, Any]) -> str:
    """The report as an aligned two-column table."""
    m, e, c, mem, p = report["model_only"], report["end_to_end"], report["compile"], report["memory"], report["precision"]
    sc = report["scene"]
    rows = [
        ("device", _device(report)),
        ("model", f"depth {report['model']['depth']}, width {report['model']['base_width']}, "
                  f"{report['model']['in_bands']} bands, {report['model']['num_classes']} classes, "
                  f"{report['model']['flops_per_pixel']:,} FLOP/px ({report['model']['flops_per_tile'] / 1e9:.1f} GFLOP "
                  f"a tile, the decoder on its core), {report['model']['precision']}"
                  + (f", CPU convolutions by {report['model']['cpu_convolutions']}"
                     + (f" (by Winograd F(2x2, 3x3) from {report['model']['winograd_width']} channels"
                        + (", their products in bfloat16, the rest float32" if report["model"]["precision"] == "bfloat16"
                           else "")
                        + "; GFLOP/s below count a direct convolution's FLOPs)"
                        if report["model"].get("winograd_width") else "")
                     if report["backend"] == "cpu" else "")),
        ("tiles", f"{report['tiling']['tile']} + halo {report['tiling']['halo']} "
                  f"(read {report['tiling']['read_size']}), batch {report['batch']['value']}"
                  f"{' (auto)' if report['batch']['auto'] else ''}"),
        (f"matmul {report['matmul']['dtype']}", f"{report['matmul']['gflops']:.1f} GFLOP/s (XLA {report['matmul']['xla_gflops']:.1f}"
                           + (f", NumPy {report['matmul']['numpy_gflops']:.1f}" if report['matmul']['numpy_gflops']
                              else "") + ")"),
        ("model only", f"{m['mpx_per_s']:.3f} Mpx/s written ({m['computed_mpx_per_s']:.3f} computed), "
                       f"{m['gflops']:.1f} GFLOP/s = {100 * m['fraction_of_matmul']:.0f}% of matmul"
                       + (f"; tile by tile (whole batch at once: {m['batched_mpx_per_s']:.3f} Mpx/s)"
                          if "batched_mpx_per_s" in m else "")),
        ("scene", f"{sc['size']}^2 x {sc['bands']} {sc['dtype']}, blocks {sc['block']}^2, {sc['compress']}; "
                  f"decoded in chunks of {sc['chunk'][0]} x {sc['chunk'][1]}, each "
                  f"{e['decodes_per_chunk']:.2f} times end to end, {e['host_decodes_per_chunk']:.2f} in the "
                  f"host ceiling's run; checksummed ({sc['checksum']}) at {sc['checksum_gb_per_s']:.2f} GB/s, "
                  f"{sc['checksum_mpx_per_s']:.0f} Mpx/s ({sc['checksum_mpx_per_s'] / m['mpx_per_s']:.0f}x model only)"),
        ("end to end", f"{e['mpx_per_s']:.3f} Mpx/s on {e['scenes']} x {e['size']}^2 x {e['bands']} uint16, "
                       f"ratio {e['ratio_to_model_only']:.2f} ({e['ratio_to_median_model_only']:.2f} to the median "
                       f"batch of model only), peak RSS {e['peak_rss_mb']:.0f} MB"
                       + (f", {e['readers']} reader processes{_parts(e)}" if e.get("readers") else "")),
        ("end to end, paired", f"ratio {e['paired']['ratio']:.2f} ({e['paired']['ratio_to_mean']:.2f} to their mean) "
                               f"to {len(e['paired']['before_s']) + len(e['paired']['after_s'])} model-only "
                               f"batches timed in the run's process just before and after it "
                               f"({e['paired']['model_only_mpx_per_s']:.3f} Mpx/s, best "
                               f"{min(e['paired']['before_s'] + e['paired']['after_s']):.3f} s a batch; the run's "
                               f"own batches {e['paired']['run_batch_median_s']:.3f} s, median); the model busy "
                               f"{100 * e['model_busy_share']:.1f}% of the run's wall time"),
        ("host ceiling", f"{e['host_mpx_per_s']:.3f} Mpx/s: the same run without the model's cost, "
                         f"{e['host_over_model_only']:.2f}x model only (end to end cannot beat it); CPU per Mpx "
                         f"written {_cpu_split(e['host_cpu_ms_per_mpx'], e)}; its {e['cores']} cores all busy with it: "
                         f"{e['host_cpu_bound_mpx_per_s']:.1f} Mpx/s"),
        ("threads", f"the run's process by thread, CPU per Mpx written: {_thread_roles(e['threads'])}; in the "
                    f"host ceiling's run: {_thread_roles(e['host_threads'])}; each reader and finisher busy on "
                    f"average {_shares(e['busy_share'])} of the run ({_shares(e['host_busy_share'])} of the host "
                    f"ceiling's): a thread near 100%, or processes near it, cap the run"),
        ("publishing", f"batches held back for it {e['publish_wait_s']:.2f} s of the run, "
                       f"{e['host_publish_wait_s']:.2f} s of the host ceiling's; after the last batch "
                       f"{e['publish_tail_s']:.2f} and {e['host_publish_tail_s']:.2f} s"
                       + f" ({_publishing(e)})"
                       + f"; finished files waited for their checksums {e['checksum_wait_s']:.2f} and "
                         f"{e['host_checksum_wait_s']:.2f} s"),
        ("memory", f"peak RSS {mem['small']['size']}^2 {mem['small']['peak_rss_mb']:.0f} MB, "
                   f"{mem['large']['size']}^2 {mem['large']['peak_rss_mb']:.0f} MB "
                   f"(x{mem['large_over_small']:.2f}; width-{mem['arch']['base_width']} model); shared pages "
                   f"counted once (PSS) {mem['small']['peak_pss_mb']:.0f} and {mem['large']['peak_pss_mb']:.0f} MB "
                   f"(x{mem['large_over_small_pss']:.2f})"),
        ("compile", f"cold {c['cold_s']:.2f} s, warm cache (2nd process) {c['warm_s']:.2f} s "
                    f"(x{c['warm_over_cold']:.2f}, the median of {len(c['rounds'])} rounds: "
                    + ", ".join(f"x{r['warm_s'] / r['cold_s']:.2f}" for r in c["rounds"])
                    + f"; of which tracing and lowering {c['cold_lower_s']:.2f} / "
                    f"{c['warm_lower_s']:.2f} s, XLA {c['cold_xla_s']:.2f} / {c['warm_xla_s']:.2f} s)"),
        ("halo", f"{report['halo']['nominal']:.2f} px read per px written "
                 f"({report['halo']['measured']:.2f} on this scene); {report['halo']['flops']:.2f}x the FLOPs "
                 "of the cores alone (the decoder computes little of the halo)"),
        ("precision", f"{p['other']} vs {p['compute']}: {100 * p['class_agreement']:.3f}% classes agree; "
                      f"{p['other']} {p['other_mpx_per_s']:.3f} Mpx/s"
                      + (" (bfloat16 on CPU: the Winograd blocks' products only)"
                         if report["backend"] == "cpu" and report["model"].get("winograd_width") else "")),
    ]
    tr = report["torch"]
    if tr.get("available"):
        rows.append(("torch", f"{tr['mpx_per_s']:.3f} Mpx/s eager channels-last ({tr['gflops']:.1f} GFLOP/s; "
                              f"batch {tr['batch_mpx_per_s']:.3f}, tile by tile {tr['tile_by_tile_mpx_per_s']:.3f}), "
                              f"{100 * tr['class_agreement_with_flax']:.3f}% classes agree with Flax"))
        pr = tr["paired"]
        rows.append(("torch, paired", f"Flax / PyTorch {pr['flax_over_torch']:.2f} (median of {pr['rounds']} rounds "
                                      f"taking turns; Flax {pr['flax_mpx_per_s']:.3f}, PyTorch "
                                      f"{pr['torch_mpx_per_s']:.3f} Mpx/s at their median rounds)"))
    elif tr.get("available") is False:
        rows.append(("torch", tr["note"]))
    for name, value in report["targets"].items():
        rows.append((f"target {name}", "met" if value is True else "NOT met" if value is False else value))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --- command line -----------------------------------------------------------------------------


def _arch(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(v) for v in text.split(","))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError("--arch is depth,width,bands,classes, e.g. 4,32,4,8")
    return parts  # type: ignore[return-value]


def batch_size(text: str) -> int | str:
    """A --batch value (argparse type): a positive integer or auto."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("--batch is a positive integer or auto")
    return int(text)


def block_side(text: str) -> int:
    """A --block value (argparse type): a GeoTIFF's tile side, a positive multiple of 16."""
    if not text.isdigit() or int(text) < 16 or int(text) % 16:
        raise argparse.ArgumentTypeError("--block is a positive multiple of 16 (a GeoTIFF's tile side), e.g. 512")
    return int(text)


def positive(text: str) -> int:
    """A --compile-rounds value (argparse type): a whole number, at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("a whole number, at least 1")
    return int(text)


def count_or_auto(text: str) -> int | str:
    """A --readers, --finishers, --halo or --output-level value (argparse type): a whole number, 0
    included, or auto."""
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError("a whole number (0 included) or auto")
    return int(text)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``tilepipe`` sub-command parsers."""
    p = subparsers.add_parser("bench", help="measure model and end-to-end throughput on this machine")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="checkpoint to benchmark (default: a random U-Net of --arch)")
    src.add_argument("--arch", type=_arch, help="depth,width,bands,classes (default 4,32,4,8; --quick: 2,8,4,3)")
    p.add_argument("--size", type=int, help="side of the generated scene in pixels (default 4096; --quick: 512)")
    p.add_argument("--block", type=block_side, default=256,
                   help="the generated scenes' GeoTIFF blocks, pixels on a side, a multiple of 16 (default 256; "
                        "archives' COGs often have 512)")
    p.add_argument("--compress", choices=SCENE_COMPRESSIONS, default="deflate",
                   help="the generated scenes' compression (default deflate)")
    p.add_argument("--tile", type=int, help="tile side, pixels written (default 256; --quick: 64)")
    p.add_argument("--halo", type=int, help="halo, pixels on each side (default 64; --quick: 16)")
    p.add_argument("--batch", type=batch_size, help="tiles per batch, or auto (default 8; --quick: 4)")
    p.add_argument("--precision", choices=("float32", "bfloat16", "auto"), default="auto",
                   help="compute dtype (default auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--threads", type=int, help="dask threads of the end-to-end runs (default: the workflow's)")
    p.add_argument("--scenes", type=int, default=1,
                   help="end-to-end runs go through this many copies of the scene (default 1): a folder's "
                        "throughput, with more batches in flight than one scene has")
    p.add_argument("--readers", type=count_or_auto, default="auto",
                   help="reader processes of the end-to-end runs (runtime.readers; default auto: none on CPU, "
                        "one per core up to 8 per thread on GPU/TPU)")
    p.add_argument("--finishers", type=count_or_auto, default="auto",
                   help="finisher processes of the end-to-end runs (runtime.finishers; default auto: none "
                        "on CPU, a third of the cores and at least 2 on GPU/TPU)")
    p.add_argument("--output-compression", choices=("deflate", "zstd", "lzw"), default="deflate",
                   help="the end-to-end runs' COGs (output.compression; default deflate)")
    p.add_argument("--output-level", type=count_or_auto, default="auto",
                   help="and their level (output.level; default auto: GDAL's own on CPU, a cheaper one on "
                        "GPU/TPU, so give 5 for DEFLATE or 1 for ZSTD to emulate an accelerator host here)")
    p.add_argument("--host-only", action="store_true",
                   help="only the host's ceiling (the end-to-end run without the model's cost), --runs times: "
                        "an accelerator host's settings emulated on this machine's cores")
    p.add_argument("--runs", type=positive, default=3, help="host-ceiling runs of --host-only (default 3)")
    p.add_argument("--memory", action="store_true",
                   help="with --host-only, also peak memory on one scene of each of --memory-sizes at the same "
                        "settings, the model's cost taken out (the memory goal, emulated)")
    p.add_argument("--compile-rounds", type=positive,
                   help="cold and warm compile pairs, each over a cache of its own; the median counts "
                        "(default 3, 2 with --quick; 1 where each process start is dear, as on an accelerator)")
    p.add_argument("--memory-sizes", type=lambda s: tuple(int(v) for v in s.split(",")),
                   help="small,large scene sides for the peak-RSS comparison (default 2048,8192; --quick: 256,512)")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.add_argument("--torch", action="store_true", help="compare with the same U-Net in PyTorch (if installed)")
    p.add_argument("--quick", action="store_true", help="tiny model and scene: a smoke test in seconds")
    p.add_argument("--workdir", type=Path, help="keep generated files here (default: a temporary directory)")
    p.set_defaults(func=main_bench)
    return p


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The bench's options from its command line; a combination that cannot run is a
    :class:`~pipeline.errors.WorkflowError` that names the option."""
    from pipeline.errors import WorkflowError
    from pipeline.outputs import Compression

    if args.output_level != "auto":
        try:
            Compression(args.output_compression, args.output_level)
        except ValueError as exc:
            raise WorkflowError(f"--output-level: {exc}") from None
    if args.host_only and args.batch == "auto":
        raise WorkflowError("--host-only needs a fixed --batch (auto probes the model)")
    if args.memory and not args.host_only:
        raise WorkflowError("--memory goes with --host-only (a whole bench measures memory anyway)")
    common = dict(model=args.model, precision=args.precision, threads=args.threads, scenes=args.scenes,
                  block=args.block, compress=args.compress,
                  readers=args.readers, finishers=args.finishers, output_compression=args.output_compression,
                  output_level=args.output_level,
                  torch=args.torch, workdir=args.workdir, host_only=args.host_only, host_runs=args.runs,
                  host_memory=args.memory)
    given = dict(compile_rounds=args.compile_rounds, arch=args.arch, size=args.size, tile=args.tile,
                 halo=args.halo, batch=args.batch, memory_sizes=args.memory_sizes)
    common.update((name, value) for name, value in given.items() if value is not None)  # the rest: quick's or the defaults
    return quick_options(**common) if args.quick else BenchOptions(**common)


def main_bench(args: argparse.Namespace) -> int:
    """``tilepipe bench``: run, print the table, optionally write the JSON."""
    opts, echo = options_from_args(args), (lambda line: print(line, file=sys.stderr))
    report = run_host_only(opts, echo) if opts.host_only else run_bench(opts, echo)
    print(format_host_table(report) if opts.host_only else format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.bench`` runs the bench, or one of its child measurements."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["compile"], ["e2e"]):
        a = argv[1:]
        if argv[0] == "compile":
            result = _child_compile(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), a[5])
        else:
            result = _child_e2e(a[0], model="--no-model" not in a[1:])
        print(json.dumps({**result, "own_peak_rss": own_peak_rss()}))
        return 0
    parser = argparse.ArgumentParser(prog="tilepipe")
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv if argv[:1] == ["bench"] else ["bench", *argv])
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
