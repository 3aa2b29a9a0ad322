"""Throughput of one workflow on a loopback cluster of 1 and of 2 single-threaded worker processes.

Run with ``make bench`` (or ``pytest -s -m benchmark tests/test_cluster_benchmark.py``). The
numbers are printed and written as JSON to ``$TILEPIPE_BENCH_JSON`` (default: the test's
tmp_path). Each cluster runs the workflow once to load and compile the model on every worker,
then once timed; the load average is recorded because a shared machine skews the ratio.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import scene, write_raster
from test_cluster import start_cluster

from pipeline.config import load_workflow
from pipeline.runner import run_workflow

FILES, HEIGHT, WIDTH = 6, 256, 320


@pytest.mark.benchmark
def test_throughput_with_one_and_two_worker_processes(tmp_path, make_workflow):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(FILES):
        write_raster(inputs / f"s{i}.tif", scene(HEIGHT, WIDTH, seed=i))
    megapixels = FILES * HEIGHT * WIDTH / 1e6
    results = {"files": FILES, "megapixels": megapixels, "cpu_count": os.cpu_count(),
               "tiling": {"tile": 64, "halo": 28, "batch": 4}, "runs": {}}

    for workers in (1, 2):
        cluster = start_cluster(tmp_path / f"cluster{workers}", {f"w{i}": None for i in range(1, workers + 1)})
        try:
            def workflow(name: str, address: str = cluster.address):
                return load_workflow(make_workflow(
                    inputs, output={"dir": str(tmp_path / name), "run_products": False},
                    tiling={"tile": 64, "halo": 28, "batch": 4}, dask={"scheduler": address}))

            run_workflow(workflow(f"warm{workers}"), progress=False, echo=lambda line: None)  # load, compile
            timed = workflow(f"out{workers}")  # a fresh output folder: nothing is skipped as done
            load_before = os.getloadavg()[0]
            t0 = time.perf_counter()
            report = run_workflow(timed, progress=False, echo=lambda line: None)
            seconds = time.perf_counter() - t0
            assert [f.status for f in report.files] == ["ok"] * FILES
        finally:
            cluster.close()
        results["runs"][str(workers)] = {"seconds": round(seconds, 3), "mpx_per_s": round(megapixels / seconds, 4),
                                         "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0]}

    one, two = results["runs"]["1"]["mpx_per_s"], results["runs"]["2"]["mpx_per_s"]
    results["speedup_2_over_1"] = round(two / one, 3)
    path = Path(os.environ.get("TILEPIPE_BENCH_JSON", tmp_path / "cluster-benchmark.json"))
    path.write_text(json.dumps(results, indent=2))
    print(f"\ncluster throughput, {megapixels:.2f} Mpx: 1 worker {one:.3f} Mpx/s, 2 workers {two:.3f} Mpx/s, "
          f"ratio {two / one:.2f} (load {results['runs']['2']['load_1min_before']:.1f} on "
          f"{os.cpu_count()} CPUs); {path}")
