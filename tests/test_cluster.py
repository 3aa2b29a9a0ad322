"""tilepipe on an existing Dask cluster: a real `dask scheduler` and `dask worker` processes on
127.0.0.1, driven through the same code path as a local run.

The cluster here is what a user starts by hand; each test compares the cluster's outputs with
a local run pixel for pixel.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import dask
import numpy as np
import pytest
import rasterio
from conftest import scene, write_raster
from distributed import Client, get_task_stream

from pipeline.cli import main
from pipeline.cluster import (
    describe_workers,
    predictor_cache_by_worker,
    predictor_cache_stats,
    tasks_processing,
)
from pipeline.config import DaskSection, load_workflow
from pipeline.runner import load_model_ref, open_client, plan_file, run_workflow
from pipeline.windows import tile_spec

DASK = Path(sys.executable).with_name("dask")
START_TIMEOUT = 120  # seconds; the machine may be shared and slow


class LoopbackCluster:
    """`dask scheduler` and `dask worker` processes on 127.0.0.1, each in its own process group,
    as a user starts them by hand; :meth:`close` kills every group, whatever happened."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.scheduler_file = directory / "scheduler.json"
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.directory / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen([str(DASK), *args], stdout=log, stderr=subprocess.STDOUT,
                                                    env=self.env, cwd=self.directory, start_new_session=True)

    def start_scheduler(self) -> str:
        self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                  "--scheduler-file", str(self.scheduler_file)])
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.processes["scheduler"].poll() is not None:
                raise RuntimeError(f"dask scheduler exited: {self.log('scheduler')}")
            try:
                return json.loads(self.scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.2)
        raise TimeoutError(f"dask scheduler did not write {self.scheduler_file}")

    def start_worker(self, name: str, resources: str | None = None) -> None:
        args = ["worker", "--scheduler-file", str(self.scheduler_file), "--host", "127.0.0.1",
                "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--name", name, "--memory-limit", "0"]
        self._spawn(name, args + (["--resources", resources] if resources else []))

    @property
    def address(self) -> str:
        return json.loads(self.scheduler_file.read_text())["address"]

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")[-2000:]

    def kill(self, name: str) -> None:
        """SIGKILL a process group: the worker and its nanny die without a goodbye."""
        process = self.processes.pop(name)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def close(self) -> None:
        for name in [n for n in self.processes if n != "scheduler"] + ["scheduler"]:
            if name in self.processes:
                self.kill(name)


def start_cluster(directory: Path, workers: dict[str, str | None]) -> LoopbackCluster:
    """A scheduler and ``workers`` (name -> ``--resources`` or None), all connected."""
    cluster = LoopbackCluster(directory)
    try:
        cluster.start_scheduler()
        for name, resources in workers.items():
            cluster.start_worker(name, resources)
        with Client(cluster.address, timeout="60s") as client:
            client.wait_for_workers(len(workers), timeout=START_TIMEOUT)
    except BaseException:
        cluster.close()
        raise
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two single-threaded workers; only ``gpu`` advertises ``GPU=1`` (as on a GPU node)."""
    cluster = start_cluster(tmp_path_factory.mktemp("cluster"), {"gpu": "GPU=1", "cpu": None})
    yield cluster
    cluster.close()


@pytest.fixture
def client(cluster):
    with Client(cluster.address, timeout="30s") as client:
        yield client


@pytest.fixture
def inputs(tmp_path):
    """Scenes with edge tiles, another CRS, and nodata: enough batches for both workers."""
    directory = tmp_path / "in"
    directory.mkdir()
    write_raster(directory / "a.tif", scene(96, 130, seed=1))
    write_raster(directory / "b.tif", scene(45, 71, dtype="uint16", seed=2), crs="geographic", tiled=False)
    data = scene(70, 64, dtype="float32", seed=3)
    data[:, :12, :9] = -9999.0
    write_raster(directory / "c.tif", data, nodata=-9999.0)
    return directory


def run_to(make_workflow, tmp_path, inputs, name, *cli, **dask):
    """Run the workflow into ``tmp_path/name`` through the CLI; returns the output folder."""
    out = tmp_path / name
    workflow = make_workflow(inputs, output={"dir": str(out), "run_products": False},
                             normalise={"scale": 1 / 10000}, **({"dask": dask} if dask else {}))
    assert main(["run", str(workflow), "--no-progress", *cli]) == 0
    return out


def assert_identical_outputs(inputs: Path, expected: Path, actual: Path) -> None:
    """Every output has the same class raster, grid and nodata as the reference run's."""
    names = sorted(p.name for p in inputs.glob("*.tif"))
    assert sorted(p.name for p in actual.glob("*.tif")) == names
    for name in names:
        with rasterio.open(expected / name) as ref, rasterio.open(actual / name) as out:
            assert (out.crs, out.transform, out.nodata, out.shape) == (ref.crs, ref.transform, ref.nodata, ref.shape)
            np.testing.assert_array_equal(out.read(), ref.read(), err_msg=name)


def test_the_loopback_cluster_has_the_workers_a_user_started(client):
    workers = {w.name: w for w in describe_workers(client)}
    assert set(workers) == {"gpu", "cpu"}
    assert workers["gpu"].resources == {"GPU": 1}
    assert workers["cpu"].resources == {}
    assert all(w.nthreads == 1 and w.address.startswith("tcp://127.0.0.1:") for w in workers.values())


def test_a_run_on_the_cluster_equals_a_local_run_pixel_for_pixel(tmp_path, make_workflow, inputs, cluster, client):
    local = run_to(make_workflow, tmp_path, inputs, "local")
    before = predictor_cache_by_worker(client)
    with get_task_stream(client) as stream:
        remote = run_to(make_workflow, tmp_path, inputs, "remote", "--scheduler", cluster.address)
    assert_identical_outputs(inputs, local, remote)

    batches = [t for t in stream.data if t["key"].startswith("predict_batch")]
    ran_on = {t["worker"] for t in batches}
    names = {w.address: w.name for w in describe_workers(client)}
    assert {names[a] for a in ran_on} == {"gpu", "cpu"}, "both workers should have taken tiles"
    # Each worker loaded and compiled the model once, not once per task.
    after = predictor_cache_by_worker(client)
    for name in ("gpu", "cpu"):
        assert after[name]["loaded"] == 1
        assert after[name]["misses"] == 1
    calls = sum(after[n]["hits"] + after[n]["misses"] - before[n]["hits"] - before[n]["misses"] for n in after)
    assert calls == len(batches) > 2


def test_the_workflow_file_names_the_scheduler_too(tmp_path, make_workflow, inputs, cluster):
    local = run_to(make_workflow, tmp_path, inputs, "local")
    remote = run_to(make_workflow, tmp_path, inputs, "remote", scheduler=cluster.address)
    assert_identical_outputs(inputs, local, remote)
    report = json.loads((remote / "tilepipe-report.json").read_text())
    assert [f["status"] for f in report["files"]] == ["ok"] * 3


def test_the_cluster_example_runs_as_the_readme_says(tmp_path, inputs, tiny_checkpoint, cluster):
    """`tilepipe run workflows/cluster-example.yaml --scheduler ...` in a fresh process, with the
    tiny model and test scenes swapped in, equals the same workflow run locally."""
    example = Path(__file__).parents[1] / "workflows" / "cluster-example.yaml"
    common = ["--input", str(inputs), "--tile", "32", "--halo", "28", "--no-progress",
              "--set", f"model.checkpoint={tiny_checkpoint}", "--set", "normalise.scale=0.0001",
              "--set", "output.run_products=false", "--set", f"runtime.compilation_cache={tmp_path / 'jax'}"]
    assert main(["run", str(example), "--output", str(tmp_path / "local"), "--set", "dask.scheduler=null",
                 *common]) == 0
    tilepipe = Path(sys.executable).with_name("tilepipe")
    done = subprocess.run([str(tilepipe), "run", str(example), "--output", str(tmp_path / "remote"),
                           "--scheduler", cluster.address, *common],
                          check=False, capture_output=True, text=True, timeout=600,
                          env=cluster.env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_identical_outputs(inputs, tmp_path / "local", tmp_path / "remote")


def test_a_task_carries_paths_and_windows_not_weights(tmp_path, make_workflow, inputs, tiny_checkpoint):
    wf = load_workflow(make_workflow(inputs))
    model = load_model_ref(wf)
    spec = tile_spec(wf.tiling.tile, wf.tiling.halo, model.card.unet.factor)
    job = plan_file(inputs / "a.tif", wf, model, spec).jobs[0]
    payload = len(cloudpickle.dumps(job))
    assert payload < 10_000 < tiny_checkpoint.stat().st_size
    assert job.checkpoint == str(tiny_checkpoint) and len(job.checkpoint_sha256) == 64


needs_resources = pytest.mark.skipif(
    "resources" not in DaskSection.model_fields,
    reason="needs dask.resources in the config and resources= on submit (the runner diff of issue 7)")


@needs_resources
def test_inference_goes_only_to_workers_with_the_resource(tmp_path, make_workflow, inputs, cluster, client):
    local = run_to(make_workflow, tmp_path, inputs, "local")
    before = predictor_cache_by_worker(client)
    with get_task_stream(client) as stream:
        remote = run_to(make_workflow, tmp_path, inputs, "remote", scheduler=cluster.address,
                        resources={"GPU": 1})
    assert_identical_outputs(inputs, local, remote)
    names = {w.address: w.name for w in describe_workers(client)}
    batches = [t for t in stream.data if t["key"].startswith("predict_inputs")]
    reads = [t for t in stream.data if t["key"].startswith("read_batch")]
    assert len(batches) > 2 and len(reads) == len(batches)  # reading is a task of its own, for any worker
    assert {names[t["worker"]] for t in batches} == {"gpu"}
    after = predictor_cache_by_worker(client)
    assert after["cpu"]["hits"] + after["cpu"]["misses"] == before["cpu"]["hits"] + before["cpu"]["misses"]


@needs_resources
def test_resources_on_a_local_cluster_do_not_starve_it(tmp_path, make_workflow, inputs):
    local = run_to(make_workflow, tmp_path, inputs, "local")
    annotated = run_to(make_workflow, tmp_path, inputs, "annotated", resources={"GPU": 1})
    assert_identical_outputs(inputs, local, annotated)


@pytest.mark.parametrize("processes", [False, True])
def test_a_local_clusters_workers_profile_only_when_asked(processes):
    """Dask's profiler samples every thread's stack 100 times a second: off unless the workflow
    asks (``dask.profile``), in threads and in worker processes alike."""
    for profile in (False, True):
        with open_client(DaskSection(threads=1, processes=processes, profile=profile)) as client:
            sampling = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
        assert list(sampling.values()) == [profile]


@pytest.mark.parametrize("processes", [False, True])
def test_a_local_clusters_housekeeping_is_slower_than_dasks_defaults(processes):
    """The event loop's health check, the system and the memory monitors run on the cores the
    model uses: a local cluster's scheduler and workers run them at ``LOCAL_HOUSEKEEPING``'s
    intervals, in threads and in worker processes alike."""

    def intervals(dask_worker=None, dask_scheduler=None):
        server = dask_worker or dask_scheduler
        return {name: pc.callback_time for name, pc in server.periodic_callbacks.items()
                if name in ("tick", "monitor", "memory_monitor")}

    with open_client(DaskSection(threads=1, processes=processes)) as client:
        workers = list(client.run(intervals).values())
        scheduler = client.run_on_scheduler(intervals)
    assert workers == [{"tick": 500, "monitor": 2000, "memory_monitor": 500}]
    assert scheduler == {"tick": 500, "monitor": 2000}
    assert dask.config.get("distributed.admin.tick.interval") == "20ms"  # the driver's own config is left as it was


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_a_worker_killed_mid_run_loses_nothing(tmp_path, make_workflow, tiny_checkpoint):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        write_raster(inputs / f"s{i}.tif", scene(192, 224, seed=10 + i))
    local = run_to(make_workflow, tmp_path, inputs, "local")

    cluster = start_cluster(tmp_path / "cluster", {"w1": None, "w2": None})
    try:
        with Client(cluster.address, timeout="30s") as client:
            victim = next(w.address for w in describe_workers(client) if w.name == "w1")
            workflow = make_workflow(inputs, output={"dir": str(tmp_path / "remote"), "run_products": False},
                                     dask={"scheduler": cluster.address})
            wf = load_workflow(workflow)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                running = pool.submit(run_workflow, wf, progress=False, echo=lambda line: None)

                def victim_is_busy() -> bool:
                    if running.done():
                        running.result()
                        raise AssertionError("the run finished before a worker could be killed")
                    stats = client.run(predictor_cache_stats, workers=[victim])[victim]
                    return stats["hits"] >= 1 and tasks_processing(client).get("w1", 0) > 0

                wait_until(victim_is_busy, START_TIMEOUT, "the victim worker never took tiles")
                cluster.kill("w1")
                assert not running.done()
                report = running.result(timeout=300)
            assert [w.name for w in describe_workers(client)] == ["w2"]
        assert [f.status for f in report.files] == ["ok"] * 3, report.files
        assert_identical_outputs(inputs, local, tmp_path / "remote")
    finally:
        cluster.close()



def test_workers_read_inputs_from_a_gdal_virtual_folder(tmp_path, make_workflow, inputs, cluster):
    """Workers open ``/vsizip/`` paths themselves: the same outputs as a local run of the files."""
    import zipfile

    archive = tmp_path / "scenes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(inputs.glob("*.tif")):
            zf.write(path, path.name)
    local = run_to(make_workflow, tmp_path, inputs, "local")
    remote = run_to(make_workflow, tmp_path, inputs, "remote", "--input", f"/vsizip/{archive}",
                    "--scheduler", cluster.address)
    assert_identical_outputs(inputs, local, remote)
