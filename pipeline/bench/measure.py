"""The bench itself: :func:`run_bench` measures everything the package's docstring lists, and
:func:`run_host_only` the host's ceiling alone."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.options import CPU_FEATURES, BenchOptions
from pipeline.bench.report import memory_line, targets
from pipeline.bench.runs import (
    busy_shares,
    decodes_per_chunk,
    host_summary,
    measure_memory,
    paired_figures,
    per_mpx,
    run_child,
    run_e2e,
    thread_figures,
)
from pipeline.bench.scene import checksum_rate, make_checkpoint, make_scenes, scene_batch, scene_layout
from pipeline.bench.timing import best_sample, best_time, matmul_rates, median_round, paired_times, wall_times


@contextlib.contextmanager
def _workdir(opts: BenchOptions) -> Iterator[Path]:
    """Where a bench writes its files: ``opts.workdir``, kept, or a temporary folder removed after."""
    if opts.workdir is not None:
        Path(opts.workdir).mkdir(parents=True, exist_ok=True)
        yield Path(opts.workdir)
        return
    with tempfile.TemporaryDirectory(prefix="tilepipe-bench-") as tmp:
        yield Path(tmp)


def run_bench(opts: BenchOptions, echo: Any = print) -> dict[str, Any]:
    """Measure everything :mod:`pipeline.bench`'s docstring lists; returns the JSON report."""
    import jax

    from pipeline.infer import Predictor, auto_batch, configure_jax, resolve_precision
    from pipeline.windows import tile_spec
    from unet_flax.checkpoint import load_checkpoint
    from unet_flax.model import flops_per_pixel, forward_flops
    from unet_flax.xla_flags import ynn_convolutions

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
        report = _header(cfg, spec, precision)
        report.update(jax=jax.__version__, cpu_count=os.cpu_count(), load_average=list(os.getloadavg()),
                      quick=opts.quick)
        report["model"].update(checkpoint=str(opts.model) if opts.model else None, flops_per_pixel=fpp,
                               flops_per_tile=tile_flops,
                               cpu_convolutions="ynnpack" if ynn_convolutions() else "eigen")
        echo(f"bench on {report['device']}: U-Net depth {cfg.depth} width {cfg.base_width}, "
             f"tile {spec.tile} + halo {spec.halo}")

        cache = _compile(report, work, checkpoint, spec, precision, opts, echo)
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

        # The scene, and real tiles of it, as read, for the model-only and precision runs.
        scene_dir, scene = make_scenes(work, opts, cfg.in_bands)
        report["scene"] = {**scene_layout(scene, cfg.in_bands, opts), **checksum_rate(scene, opts.size**2)}
        inputs = scene_batch(scene, spec, batch, ckpt.card)
        predictor = Predictor(ckpt, spec, batch, precision=precision)
        batch = predictor.batch  # rounded up to the device count
        report["model"]["winograd_width"] = predictor.winograd_width  # as the predictor chose it
        x, reference = _model_only(report, predictor, ckpt, inputs, tile_flops, opts, echo)

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
        report["halo"] = _halo(spec, opts.size, tile_flops, fpp)

        run = functools.partial(run_e2e, work, scene_dir=scene_dir, checkpoint=checkpoint, spec=spec, batch=batch,
                                cache=cache, precision=precision, opts=opts)
        _end_to_end(report, run("e2e"), cfg.in_bands, opts, echo)
        _host_ceiling(report, run("host", model=False), opts, echo)
        report["memory"] = measure_memory(work, opts, cfg, spec, batch, cache, precision)
        echo(memory_line(report["memory"]))
        report["targets"] = targets(report)
        report["load_average_end"] = list(os.getloadavg())
        return report


def _header(cfg: Any, spec: Any, precision: str) -> dict[str, Any]:
    """What every report starts with: the device, the host CPU's features, the model and the tiles."""
    import jax

    from pipeline.infer import device_description
    from unet_flax.xla_flags import cpu_features

    return {"device": device_description(), "backend": jax.default_backend(),
            "cpu_features": sorted(cpu_features() & CPU_FEATURES),
            "model": {"depth": cfg.depth, "base_width": cfg.base_width, "in_bands": cfg.in_bands,
                      "num_classes": cfg.num_classes, "precision": precision},
            "tiling": {"tile": spec.tile, "halo": spec.halo, "read_size": spec.read_size}}


def _compile(report: dict[str, Any], work: Path, checkpoint: Path, spec: Any, precision: str, opts: BenchOptions,
             echo: Any) -> Path:
    """Compilation: a cold process, then a second process over the cache it filled, in rounds,
    each with a cache of its own; the median round counts (one pair is the machine's minute).
    Fills ``report["compile"]``; returns the median round's cache, warm for the rest of the bench."""
    batch0 = opts.batch if isinstance(opts.batch, int) else 1
    rounds = []
    for _ in range(opts.compile_rounds):
        cache = work / f"jax-cache-{os.getpid()}-{time.time_ns()}"  # empty: the first compile is cold
        child_args = [str(checkpoint), str(cache), str(spec.tile), str(spec.halo), str(batch0), precision]
        rounds.append((cache, run_child(["compile", *child_args]), run_child(["compile", *child_args])))
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
    return cache


def _model_only(report: dict[str, Any], predictor: Any, ckpt: Any, inputs: tuple, tile_flops: int,
                opts: BenchOptions, echo: Any) -> tuple[Any, np.ndarray]:
    """The compiled forward pass on a batch already on the device, against a matrix multiply
    timed before and after it (``report["matmul"]``, ``report["model_only"]``); returns the batch
    on the device and its classes, which the other precision and PyTorch are compared with."""
    import jax

    from pipeline.infer import Predictor

    spec, batch, precision = predictor.spec, predictor.batch, report["model"]["precision"]
    # The reference in the compute dtype; an accelerator needs a larger product to be busy.
    n = 2048 if jax.default_backend() == "cpu" else 8192
    mm = matmul_rates(n, min(2.0, opts.min_seconds), precision)
    echo(f"matmul {precision} {n}^3: XLA {mm['xla_gflops']:.1f} GFLOP/s"
         + (f", NumPy {mm['numpy_gflops']:.1f} GFLOP/s" if mm["numpy_gflops"] else ""))
    x = predictor.put(*inputs)
    reference = np.asarray(predictor.forward(x)[0])
    times = wall_times(lambda: jax.block_until_ready(predictor.forward(x)), opts.min_seconds)
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
        tb = best_time(lambda: jax.block_until_ready(batched.forward(xb)), opts.min_seconds)
        report["model_only"]["batched_mpx_per_s"] = out_px / tb / 1e6
        report["model_only"]["batched_class_agreement"] = float(
            (np.asarray(batched.forward(xb)[0]) == reference).mean())
        echo(f"model only, whole batch at once: {out_px / tb / 1e6:.3f} Mpx/s")
    return x, reference


def _halo(spec: Any, size: int, tile_flops: int, flops_per_pixel: int) -> dict[str, float]:
    """What the halo costs: pixels read per pixel written, nominally and on a ``size``^2 scene,
    and FLOPs computed per FLOP of the cores alone (the decoder computes little of the halo)."""
    from pipeline.windows import plan_tiles

    tiles = plan_tiles(size, size, spec)
    return {"nominal": spec.read_size**2 / spec.tile**2, "measured": len(tiles) * spec.read_size**2 / size**2,
            "flops": tile_flops / (flops_per_pixel * spec.tile**2)}


def _end_to_end(report: dict[str, Any], e2e: dict[str, Any], bands: int, opts: BenchOptions, echo: Any) -> None:
    """``report["end_to_end"]`` from the run ``e2e`` (:func:`~pipeline.bench.runs.run_e2e`, in a
    child process whose tree's memory was sampled), against model only."""
    e2e_mpx = e2e["pixels"] / e2e["seconds"] / 1e6
    model_only = report["model_only"]
    report["end_to_end"] = {"size": opts.size, "scenes": opts.scenes, "pixels": e2e["pixels"],
                            "bands": bands, "dask_threads": e2e["dask_threads"],
                            "readers": e2e["readers"], "read_parts": e2e["read_parts"],
                            "finishers": e2e["finishers"], "seconds": e2e["seconds"],
                            "compression": e2e["compression"],
                            "startup_s": e2e["startup_s"], "mpx_per_s": e2e_mpx,
                            "ratio_to_model_only": e2e_mpx / model_only["mpx_per_s"],
                            # a whole run is many batches, some slower: against the median batch too
                            "ratio_to_median_model_only": e2e_mpx / model_only["median_mpx_per_s"],
                            "peak_rss_mb": e2e["peak_rss"] / 2**20, "peak_pss_mb": e2e["peak_pss"] / 2**20,
                            "process_wall_s": e2e["wall"],
                            # how much of the run the model was the cost: host work that hides
                            # behind it leaves this near 1 whatever the machine's speed did
                            "model_busy_share": e2e["model_busy_share"],
                            # batches held back for publication, and publishing after the last batch
                            "publish_wait_s": e2e["publish_wait_s"], "publish_tail_s": e2e["publish_tail_s"],
                            # finished files waiting for their inputs' checksums (one thread)
                            "checksum_wait_s": e2e["checksum_wait_s"],
                            "decodes_per_chunk": decodes_per_chunk(e2e, report["scene"], opts),
                            "paired": paired_figures(e2e), "cpu_ms_per_mpx": per_mpx(e2e),
                            "threads": thread_figures(e2e), "busy_share": busy_shares(e2e)}
    echo(f"end to end {opts.scenes} x {opts.size}^2 ({e2e['seconds']:.1f} s): {e2e_mpx:.3f} Mpx/s, ratio "
         f"{report['end_to_end']['ratio_to_model_only']:.2f}; {report['end_to_end']['paired']['ratio']:.2f} to "
         f"model-only batches timed in its process just before and after it; model busy "
         f"{100 * report['end_to_end']['model_busy_share']:.1f}% of the run")


def _host_ceiling(report: dict[str, Any], host: dict[str, Any], opts: BenchOptions, echo: Any) -> None:
    """The host's ceiling into ``report["end_to_end"]``: the same run with the model's cost taken
    out (``host``) goes as fast as reading, stitching and writing can here. End to end cannot
    beat it on any device."""
    h = host_summary(host, report["scene"], opts)
    report["end_to_end"].update(host_mpx_per_s=h["mpx_per_s"], host_seconds=h["seconds"],
                                host_publish_wait_s=h["publish_wait_s"], host_publish_tail_s=h["publish_tail_s"],
                                host_checksum_wait_s=h["checksum_wait_s"],
                                host_decodes_per_chunk=h["decodes_per_chunk"],
                                host_over_model_only=h["mpx_per_s"] / report["model_only"]["mpx_per_s"],
                                host_cpu_ms_per_mpx=h["cpu_ms_per_mpx"], host_threads=h["threads"],
                                host_busy_share=h["busy_share"], cores=h["cores"],
                                host_cpu_bound_mpx_per_s=h["cpu_bound_mpx_per_s"])
    echo(f"host ceiling {opts.size}^2 ({host['seconds']:.1f} s): {h['mpx_per_s']:.3f} Mpx/s, "
         f"{report['end_to_end']['host_over_model_only']:.2f}x model only")


def run_host_only(opts: BenchOptions, echo: Any = print) -> dict[str, Any]:
    """``tilepipe bench --host-only``: the host's ceiling alone, ``opts.host_runs`` times over the
    same scenes: the end-to-end run with the model's cost taken out, as a host with the given
    settings (``--threads``, ``--readers``, ``--finishers``, ``--batch``, ``--precision``,
    ``--output-compression``) would run it on this machine's cores. An accelerator host's
    settings emulated on any machine; no model-only or compile measurements, and memory only
    with ``opts.host_memory`` (``--memory``), the model's cost taken out as well."""
    from pipeline.infer import resolve_precision
    from pipeline.windows import tile_spec
    from unet_flax.checkpoint import load_checkpoint

    with _workdir(opts) as work:
        checkpoint = opts.model or make_checkpoint(work / "bench-model.safetensors", opts.arch)
        cfg = load_checkpoint(checkpoint).card.unet
        spec, precision = tile_spec(opts.tile, opts.halo, cfg.factor), resolve_precision(opts.precision)
        scene_dir, scene = make_scenes(work, opts, cfg.in_bands)
        report = _header(cfg, spec, precision)
        report.update(host_only=True, batch={"value": opts.batch, "auto": False}, scenes=opts.scenes,
                      scene=scene_layout(scene, cfg.in_bands, opts), runs=[])
        echo(f"host ceiling on {report['device']}: {opts.scenes} x {opts.size}^2, batch {opts.batch}, {precision}")
        for i in range(opts.host_runs):
            run = run_e2e(work, f"host-{i}", scene_dir, checkpoint, spec, opts.batch, work / "jax-cache", precision,
                           opts, model=False)
            report.update(threads=run["dask_threads"], readers=run["readers"], read_parts=run["read_parts"],
                          finishers=run["finishers"], compression=run["compression"])
            report["runs"].append(host_summary(run, report["scene"], opts))
            echo(f"run {i + 1}: {report['runs'][-1]['mpx_per_s']:.1f} Mpx/s ({run['seconds']:.1f} s)")
        if opts.host_memory:
            report["memory"] = measure_memory(work, opts, cfg, spec, opts.batch, work / "jax-cache", precision, model=False)
            echo(memory_line(report["memory"]))
        return report


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
    seconds = best_time(lambda: jax.block_until_ready(p.forward(x)), opts.min_seconds / 2, min_runs=2)
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

    batch_t, tile_t = best_time(whole, opts.min_seconds), best_time(by_tile, opts.min_seconds)
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
