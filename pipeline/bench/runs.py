"""The measurements that run in a child process of their own (``python -m pipeline.bench compile``
or ``e2e``), so that a compile starts cold and a run's memory is its own; and the figures the
report derives from an end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.options import BenchOptions
from pipeline.bench.rss import RssSampler
from pipeline.bench.scene import SCENE_DTYPE, make_checkpoint, scene_batch, write_scene
from pipeline.bench.timing import wall_times


def run_child(args: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, Any], tuple[int, int], float]:
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


def run_e2e(work: Path, name: str, scene_dir: Path, checkpoint: Path, spec: Any, batch: int, cache: Path,
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
    result, (rss, pss), wall = run_child(["e2e", str(path), *([] if model else ["--no-model"])])
    return {**result, "peak_rss": rss, "peak_pss": pss, "wall": wall}


def child_compile(checkpoint: str, cache: str, tile: int, halo: int, batch: int, precision: str) -> dict:
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


def child_e2e(workflow_json: str, model: bool = True) -> dict:
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
              "device": report.device, "model_busy_share": report.model_busy_share, "dask_threads": wf.dask.threads,
              "readers": readers,
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
    x = predictor.put(*scene_batch(scene, spec, predictor.batch, card))
    jax.block_until_ready(predictor.forward(x))
    return lambda: wall_times(lambda: jax.block_until_ready(predictor.forward(x)), 0.0, runs)


def host_summary(run: dict[str, Any], scene: dict[str, Any], opts: BenchOptions) -> dict[str, Any]:
    """A host-ceiling run (:func:`run_e2e` without the model) as the report gives it: its rate,
    what held it back, and what the host spent per megapixel written: on an accelerator, where
    every core is busy, that CPU sets the ceiling, and a thread busy all the time caps the run
    however many cores are idle."""
    from unet_flax.xla_flags import usable_cores

    cpu, cores = per_mpx(run), usable_cores()
    return {"mpx_per_s": run["pixels"] / run["seconds"] / 1e6, "seconds": run["seconds"],
            "publish_wait_s": run["publish_wait_s"], "publish_tail_s": run["publish_tail_s"],
            "checksum_wait_s": run["checksum_wait_s"], "decodes_per_chunk": decodes_per_chunk(run, scene, opts),
            "cpu_ms_per_mpx": cpu, "threads": thread_figures(run), "busy_share": busy_shares(run), "cores": cores,
            # every core busy with nothing but this host work: a bound no arrangement of processes passes
            "cpu_bound_mpx_per_s": 1000 * cores / sum(cpu.values()),
            "peak_rss_mb": run["peak_rss"] / 2**20}


def per_mpx(run: dict[str, Any]) -> dict[str, float]:
    """A run's CPU milliseconds per megapixel written: its process's (the driver and the local
    cluster's worker), its readers', its finishers' and any other child's."""
    return {who: 1000 * seconds / (run["pixels"] / 1e6) for who, seconds in run["cpu_s"].items()}


def thread_figures(run: dict[str, Any]) -> dict[str, Any]:
    """The run's process's CPU per megapixel written by thread role (:mod:`pipeline.thread_cpu`),
    and its busiest thread with the share of the run it was busy."""
    t, mpx = run["threads"], run["pixels"] / 1e6
    return {"ms_per_mpx": {role: 1000 * s / mpx for role, s in sorted(t["roles"].items(), key=lambda r: -r[1])},
            "threads": t["threads"], "busiest": t["busiest"], "busiest_share": t["busiest_s"] / t["seconds"]}


def busy_shares(run: dict[str, Any]) -> dict[str, float]:
    """How busy the run kept each kind of process, on average: its CPU seconds over its
    processes times the run's seconds (1 for each core it could use all the time)."""
    counts = {"readers": run.get("readers") or 0, "finishers": run.get("finishers") or 0}
    return {who: run["cpu_s"][who] / (n * run["seconds"]) for who, n in counts.items() if n}


def paired_figures(e2e: dict[str, Any]) -> dict[str, Any]:
    """End to end against model-only batches timed in the same process just before and after
    the run: a ratio that the machine's slower and faster minutes move less."""
    times = [*e2e["model_only_before_s"], *e2e["model_only_after_s"]]
    best, mean = e2e["batch_pixels"] / min(times) / 1e6, e2e["batch_pixels"] / float(np.mean(times)) / 1e6
    e2e_mpx = e2e["pixels"] / e2e["seconds"] / 1e6
    return {"model_only_mpx_per_s": best, "model_only_mean_mpx_per_s": mean, "ratio": e2e_mpx / best,
            "ratio_to_mean": e2e_mpx / mean, "before_s": e2e["model_only_before_s"],
            "after_s": e2e["model_only_after_s"], "run_batch_median_s": e2e["model_batch_s"]}


def decodes_per_chunk(run: dict[str, Any], scene: dict[str, Any], opts: BenchOptions) -> float:
    """Chunks a run decoded per chunk of its scenes: 1 when each is decoded once, more where
    neighbouring batches decode the blocks of the halo they share again (past the budget of the
    store a worker's readers share them through, :mod:`pipeline.halos`, or of the cache its
    threads share, :mod:`pipeline.chunks`)."""
    return run["chunks_decoded"] / (scene["chunks"] * opts.scenes)


def measure_memory(work: Path, opts: BenchOptions, cfg: Any, spec: Any, batch: int, cache: Path,
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
        run = run_e2e(work, f"memory-{size}", scene_dir, checkpoint, spec, batch, cache, precision, opts, model)
        results[label] = {"size": size, "peak_rss_mb": run["peak_rss"] / 2**20,
                          "peak_pss_mb": run["peak_pss"] / 2**20, "seconds": run["seconds"],
                          "mpx_per_s": run["pixels"] / run["seconds"] / 1e6}
        (scene_dir / "scene.tif").unlink()
    return {"arch": {"depth": arch[0], "base_width": arch[1], "in_bands": arch[2], "num_classes": arch[3]},
            "note": "a narrower model than the one benchmarked, so the large scene runs in minutes",
            **results, "large_over_small": results["large"]["peak_rss_mb"] / results["small"]["peak_rss_mb"],
            "large_over_small_pss": results["large"]["peak_pss_mb"] / results["small"]["peak_pss_mb"]}
