"""A bench report as a table for people, and the issue's targets it meets."""

from __future__ import annotations

from typing import Any

import numpy as np


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
                       f"batch of model only), peak RSS {e['peak_rss_mb']:.0f} MB, {_dask_threads(e['dask_threads'])}"
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


def format_host_table(report: dict[str, Any]) -> str:
    """A :func:`~pipeline.bench.measure.run_host_only` report as an aligned two-column table, a row per run."""
    sc, runs = report["scene"], report["runs"]
    rows = [("device", _device(report)),
            ("tiles", f"{report['tiling']['tile']} + halo {report['tiling']['halo']} (read "
                      f"{report['tiling']['read_size']}), batch {report['batch']['value']}, "
                      f"{report['model']['precision']}, model depth {report['model']['depth']} with "
                      f"{report['model']['in_bands']} bands"),
            ("scenes", f"{report['scenes']} x {sc['size']}^2 x {sc['bands']} {sc['dtype']}, blocks {sc['block']}^2, "
                       f"{sc['compress']}"),
            ("settings", f"{_dask_threads(report['threads'])}, "
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
        rows.append(("memory", f"{memory_line(report['memory'])}, the model's cost taken out"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def memory_line(memory: dict[str, Any]) -> str:
    """A :func:`~pipeline.bench.runs.measure_memory` result in words: each size's peak RSS, and their ratio."""
    small, large = memory["small"], memory["large"]
    return (f"peak RSS {small['size']}^2 {small['peak_rss_mb']:.0f} MB, {large['size']}^2 "
            f"{large['peak_rss_mb']:.0f} MB: x{memory['large_over_small']:.2f}")


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


def _dask_threads(n: int) -> str:
    return f"{n} Dask thread{'' if n == 1 else 's'}"


def _device(report: dict[str, Any]) -> str:
    return report["device"] + (f"; host CPU has {', '.join(report['cpu_features'])}" if report.get("cpu_features")
                               else "")
