"""Unattended nightly runs: only new work, nothing broken left behind, an exact account.

Runs are driven in-process through ``main`` where nothing about the process matters, and as
``python -m pipeline.cli`` subprocesses where it does: SIGKILL, SIGTERM, two runs at once, a
file-size limit.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import blake3
import numpy as np
import pytest
import rasterio
from conftest import SignalledInFinaliser, scene, write_raster
from rio_cogeo.cogeo import cog_validate

import pipeline.outputs
import pipeline.runner
from pipeline.cli import EXIT_LOCKED, Interrupted, main
from pipeline.config import OutputSection, load_workflow
from pipeline.errors import InputError
from pipeline.interrupts import interruptible
from pipeline.io import inspect_raster
from pipeline.ledger import fingerprint
from pipeline.lock import hold_lock, lock_path
from pipeline.runner import run_workflow
from pipeline.sink import MaskSink

REPO = Path(__file__).resolve().parents[1]


def run(workflow, *extra):
    return main(["run", str(workflow), "--no-progress", *extra])


def outdir(tmp_path: Path) -> Path:
    return tmp_path / "out"


def statuses(tmp_path: Path) -> dict[str, str]:
    report = json.loads((outdir(tmp_path) / "tilepipe-report.json").read_text())
    return {Path(f["input"]).name: f["status"] for f in report["files"]}


def partials(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial" in p.name)


def assert_complete(mask: Path, src: Path) -> None:
    """``mask`` is a valid COG on ``src``'s grid and every block of it reads."""
    ok, errors, _ = cog_validate(str(mask), quiet=True)
    assert ok, (mask, errors)
    with rasterio.open(mask) as out, rasterio.open(src) as inp:
        assert (out.width, out.height, out.crs, out.transform) == (inp.width, inp.height, inp.crs, inp.transform)
        assert set(np.unique(out.read(1))) <= {0, 1, 2, 255}


def mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir() if p.is_file()}


def make_inputs(tmp_path: Path, n: int = 3, shape=(40, 48)) -> Path:
    inputs = tmp_path / "in"
    inputs.mkdir(exist_ok=True)
    for i in range(n):
        write_raster(inputs / f"s{i}.tif", scene(*shape, seed=i))
    return inputs


# --- incremental runs ------------------------------------------------------------------------


def test_unchanged_inputs_are_skipped_and_changed_ones_redone(tmp_path, make_workflow, capsys):
    inputs = make_inputs(tmp_path)
    wf = make_workflow(inputs)
    assert run(wf) == 0
    assert set(statuses(tmp_path).values()) == {"ok"}
    masks = {p: p.stat().st_mtime_ns for p in outdir(tmp_path).glob("s*.tif")}

    t0 = time.perf_counter()
    assert run(wf) == 0
    assert time.perf_counter() - t0 < 5
    assert set(statuses(tmp_path).values()) == {"skipped"}
    assert {p: p.stat().st_mtime_ns for p in masks} == masks, "a skipped run touched an output"

    os.utime(inputs / "s0.tif", ns=(1, 1))  # same content, new mtime: hashed again, still skipped
    write_raster(inputs / "s1.tif", scene(40, 48, seed=99))  # new content
    (outdir(tmp_path) / "s2.tif").unlink()  # an output a user deleted
    assert run(wf) == 0
    assert statuses(tmp_path) == {"s0.tif": "skipped", "s1.tif": "ok", "s2.tif": "ok"}
    assert_complete(outdir(tmp_path) / "s2.tif", inputs / "s2.tif")

    assert run(wf, "--force") == 0
    assert set(statuses(tmp_path).values()) == {"ok"}
    assert "3 ok, 0 skipped, 0 failed" in capsys.readouterr().out


def test_only_fields_that_change_results_trigger_a_redo(tmp_path, make_workflow):
    inputs = make_inputs(tmp_path, n=1)
    wf = make_workflow(inputs)
    assert run(wf) == 0
    for unchanged in (["--batch", "2"], ["--set", "dask.threads=1"], ["--report", str(tmp_path / "r.json")],
                      ["--set", "runtime.compilation_cache=null"]):
        assert run(wf, *unchanged) == 0
        assert statuses(tmp_path) == {"s0.tif": "skipped"}, unchanged
    assert run(wf, "--halo", "32") == 0
    assert statuses(tmp_path) == {"s0.tif": "ok"}
    assert run(wf, "--halo", "32", "--set", "output.confidence=true") == 0
    assert statuses(tmp_path) == {"s0.tif": "ok"}
    assert (outdir(tmp_path) / "s0.confidence.tif").exists()
    (outdir(tmp_path) / "s0.confidence.tif").unlink()  # a missing companion is redone too
    assert run(wf, "--halo", "32", "--set", "output.confidence=true") == 0
    assert statuses(tmp_path) == {"s0.tif": "ok"}


def test_only_a_checksum_that_decides_a_skip_delays_the_run(tmp_path, make_workflow, monkeypatch):
    """New inputs are checksummed on a background thread while their tiles are predicted (the
    outputs' provenance names the checksum); an input with a current output before planning."""
    inputs = make_inputs(tmp_path, n=2)
    wf = make_workflow(inputs)
    calls = []

    def spy(path, known):
        calls.append((path.name, threading.current_thread().name))
        return fingerprint(path, known)

    monkeypatch.setattr(pipeline.runner, "fingerprint", spy)
    assert run(wf) == 0
    assert sorted(calls) == [("s0.tif", "tilepipe-hash_0"), ("s1.tif", "tilepipe-hash_0")]
    for name in ("s0.tif", "s1.tif"):
        with rasterio.open(outdir(tmp_path) / name) as out:
            assert out.tags()["TILEPIPE_INPUT_CHECKSUM"] == "blake3:" + blake3.blake3((inputs / name).read_bytes()).hexdigest()

    calls.clear()
    os.utime(inputs / "s0.tif", ns=(1, 1))  # hashed again before planning: same content, skipped
    assert run(wf) == 0
    assert sorted(calls) == [("s0.tif", "MainThread"), ("s1.tif", "MainThread")]
    assert statuses(tmp_path) == {"s0.tif": "skipped", "s1.tif": "skipped"}


def test_the_report_says_how_long_finished_files_waited_for_their_checksums(tmp_path, make_workflow, monkeypatch):
    """A file's outputs carry its input's checksum, so a finished file whose checksum is still
    being computed waits for it; the report sums those waits, which say whether checksumming
    (one thread) is what bounds the run."""
    inputs = make_inputs(tmp_path, n=2)
    publishing = threading.Event()
    real_fingerprinted = pipeline.runner.FileJob.fingerprinted

    def fingerprinted(self, wait=True):
        if wait and self.info.path.name == "s1.tif" and threading.current_thread().name.startswith("tilepipe-cog"):
            publishing.set()
        return real_fingerprinted(self, wait)

    def slow(path, known):  # s1's checksum ends 0.5 s after its publication began waiting for it
        if path.name == "s1.tif":
            assert publishing.wait(timeout=60)
            time.sleep(0.5)
        return fingerprint(path, known)

    monkeypatch.setattr(pipeline.runner.FileJob, "fingerprinted", fingerprinted)
    monkeypatch.setattr(pipeline.runner, "fingerprint", slow)
    wf = load_workflow(make_workflow(inputs))
    report = run_workflow(wf, progress=False)
    assert report.count("ok") == 2
    assert 0.5 <= report.checksum_wait_s < 30
    assert report.to_json()["checksum_wait_s"] == report.checksum_wait_s


def test_a_ledger_of_sha256_checksums_still_skips_what_it_finished(tmp_path, make_workflow):
    """After an upgrade from SHA-256 checksums, an input whose size and mtime held is skipped
    on the checksum recorded; one touched since is checksummed anew in BLAKE3, which cannot
    equal a SHA-256, so it is run once more, and its BLAKE3 checksum recorded."""
    inputs = make_inputs(tmp_path, n=2)
    wf = make_workflow(inputs)
    assert run(wf) == 0
    path = outdir(tmp_path) / ".tilepipe" / "ledger.sqlite"
    with sqlite3.connect(path) as db:  # as an earlier tilepipe kept it
        for table in ("files", "outputs"):
            db.execute(f"ALTER TABLE {table} RENAME COLUMN checksum TO sha256")
            for name in ("s0.tif", "s1.tif"):
                db.execute(f"UPDATE {table} SET sha256 = ? WHERE input = ?",
                           (hashlib.sha256((inputs / name).read_bytes()).hexdigest(), str(inputs / name)))
    db.close()
    os.utime(inputs / "s1.tif", ns=(1, 1))
    assert run(wf) == 0
    assert statuses(tmp_path) == {"s0.tif": "skipped", "s1.tif": "ok"}
    with sqlite3.connect(path) as db:
        recorded = dict(db.execute("SELECT input, checksum FROM outputs").fetchall())
    db.close()
    assert recorded == {str(inputs / "s0.tif"): "sha256:" + hashlib.sha256((inputs / "s0.tif").read_bytes()).hexdigest(),
                        str(inputs / "s1.tif"): "blake3:" + blake3.blake3((inputs / "s1.tif").read_bytes()).hexdigest()}
    assert run(wf) == 0
    assert statuses(tmp_path) == {"s0.tif": "skipped", "s1.tif": "skipped"}


def test_a_checksum_that_fails_beside_the_inference_fails_its_input_alone(tmp_path, make_workflow, monkeypatch):
    inputs = make_inputs(tmp_path, n=2)

    def flaky(path, known):
        if path.name == "s1.tif":
            raise InputError("s1.tif: cannot read (Input/output error)")
        return fingerprint(path, known)

    monkeypatch.setattr(pipeline.runner, "fingerprint", flaky)
    report = tmp_path / "report.json"
    assert run(make_workflow(inputs), "--report", str(report)) == 1
    files = {Path(f["input"]).name: f for f in json.loads(report.read_text())["files"]}
    assert (files["s0.tif"]["status"], files["s1.tif"]["status"]) == ("ok", "failed")
    assert files["s1.tif"]["error"] == "s1.tif: cannot read (Input/output error)"
    assert sorted(p.name for p in outdir(tmp_path).glob("s1*")) == [] and partials(outdir(tmp_path)) == []


# --- failure isolation -------------------------------------------------------------------------


def write_bad_and_good(inputs: Path) -> tuple[list[str], list[str]]:
    """A directory of the inputs a nightly run meets; returns (good, bad) names."""
    inputs.mkdir(exist_ok=True)
    write_raster(inputs / "good.tif", scene(40, 40))
    write_raster(inputs / "striped.tif", scene(37, 45, seed=2), tiled=False)
    write_raster(inputs / "tiny.tif", scene(3, 2, seed=3))
    write_raster(inputs / "nocrs.tif", scene(20, 24, seed=4), crs=None)
    write_raster(inputs / "allnodata.tif", np.zeros((4, 20, 20), np.uint16), nodata=0)
    (inputs / "corrupt.tif").write_bytes(b"II*\x00" + b"\x13" * 300)
    (inputs / "empty.tif").write_bytes(b"")
    (inputs / "random.tif").write_bytes(np.random.default_rng(0).bytes(5000))
    full = write_raster(inputs / "truncated.tif", scene(64, 64, seed=5), tiled=False).read_bytes()
    (inputs / "truncated.tif").write_bytes(full[: len(full) // 2])
    write_raster(inputs / "short.tif", scene(20, 20, bands=2))
    (inputs / "mislabelled.tif").write_text("x,y,value\n1,2,3\n")
    good = ["allnodata.tif", "good.tif", "nocrs.tif", "striped.tif", "tiny.tif"]
    bad = ["corrupt.tif", "empty.tif", "mislabelled.tif", "random.tif", "short.tif", "truncated.tif"]
    return good, bad


def test_bad_files_fail_alone_with_reasons_in_report_and_ledger(tmp_path, make_workflow, capsys):
    inputs = tmp_path / "in"
    good, bad = write_bad_and_good(inputs)
    wf = make_workflow(inputs)
    assert run(wf) == 1
    assert statuses(tmp_path) == {**{g: "ok" for g in good}, **{b: "failed" for b in bad}}
    for name in good:
        assert_complete(outdir(tmp_path) / name, inputs / name)
    for name in bad:
        assert not (outdir(tmp_path) / name).exists()
    assert partials(outdir(tmp_path)) == []
    with rasterio.open(outdir(tmp_path) / "allnodata.tif") as out:
        assert (out.read(1) == 255).all()

    ledger = sqlite3.connect(outdir(tmp_path) / ".tilepipe" / "ledger.sqlite")
    rows = dict(ledger.execute("SELECT input, error FROM files WHERE status = 'failed'").fetchall())
    assert sorted(Path(p).name for p in rows) == bad
    for path, error in rows.items():
        assert error.startswith(Path(path).name + ": ") and "\n" not in error
    capsys.readouterr()

    assert run(wf) == 1  # failed inputs are retried, good ones skipped
    assert statuses(tmp_path) == {**{g: "skipped" for g in good}, **{b: "failed" for b in bad}}
    assert main(["status", str(wf)]) == 0
    table = capsys.readouterr().out
    assert "failed in run" in table and "short.tif: has 2 band(s)" in table
    assert main(["status", str(wf), "--json", "--runs", "1"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [(r["ok"], r["skipped"], r["failed"], r["status"]) for r in status["runs"]] == [(0, 5, 6, "finished")]
    assert sorted(Path(f["input"]).name for f in status["last_run_failed"]) == bad


def corrupt_block(path: Path, row: int, col: int) -> None:
    """Overwrite the compressed bytes of one internal tile so only that tile fails to decode."""
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1))
        size = int(src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)


def test_a_file_with_an_unreadable_block_fails_alone(tmp_path, make_workflow):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_raster(inputs / "good.tif", scene(64, 64))
    bad = inputs / "badblock.tif"
    with rasterio.open(bad, "w", driver="GTiff", width=64, height=64, count=4, dtype="uint16", tiled=True,
                       blockxsize=16, blockysize=16, compress="deflate", interleave="pixel") as dst:
        dst.write(scene(64, 64, seed=1))
    corrupt_block(bad, 1, 1)  # the last pixel, which inspection reads, stays readable
    wf = make_workflow(inputs, dask={"retries": 1})
    assert run(wf, "--report", str(tmp_path / "r.json")) == 1
    report = {Path(f["input"]).name: f for f in json.loads((tmp_path / "r.json").read_text())["files"]}
    assert report["good.tif"]["status"] == "ok"
    assert report["badblock.tif"]["status"] == "failed"
    assert report["badblock.tif"]["error"].startswith("badblock.tif: ")
    assert not (outdir(tmp_path) / "badblock.tif").exists()
    assert partials(outdir(tmp_path)) == []


# --- logs --------------------------------------------------------------------------------------


def test_json_logs_have_one_line_per_file_and_a_summary(tmp_path, make_workflow, capsys):
    inputs = make_inputs(tmp_path, n=2)
    (inputs / "empty.tif").write_bytes(b"")
    assert run(make_workflow(inputs), "--log-format", "json") == 1
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]
    files = {Path(e["input"]).name: e for e in events if e["event"] == "file"}
    assert {k: v["status"] for k, v in files.items()} == {"s0.tif": "ok", "s1.tif": "ok", "empty.tif": "failed"}
    assert files["empty.tif"]["error"] == "empty.tif: empty file (0 bytes)"
    assert all(isinstance(e["seconds"], float) for e in files.values())
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["event"] == "summary" and (summary["ok"], summary["failed"], summary["exit_code"]) == (2, 1, 1)
    assert 0 < summary["model_busy_share"] < 1
    assert "FAILED" not in captured.err


# --- the lock ------------------------------------------------------------------------------------


def test_a_run_while_another_holds_the_lock_exits_3_at_once(tmp_path, make_workflow, capsys):
    inputs = make_inputs(tmp_path, n=1)
    wf = make_workflow(inputs)
    state = outdir(tmp_path) / ".tilepipe"
    with hold_lock(lock_path(state, outdir(tmp_path))):
        assert run(wf) == EXIT_LOCKED
    err = capsys.readouterr().err
    assert "another run of workflow 'test'" in err and f"pid {os.getpid()}" in err
    assert not (outdir(tmp_path) / "s0.tif").exists()
    assert run(wf) == 0


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path, make_workflow, capsys):
    inputs = make_inputs(tmp_path, n=1)
    wf = make_workflow(inputs)
    lock = lock_path(outdir(tmp_path) / ".tilepipe", outdir(tmp_path))
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": 999999, "host": "gone", "started": "2026-01-01T02:00:00+00:00"}))
    (outdir(tmp_path) / ".s0.tif.999999.partial-classes.tif").write_bytes(b"half a file")
    assert run(wf) == 0
    err = capsys.readouterr().err
    assert "took over the lock" in err and "pid 999999" in err
    assert partials(outdir(tmp_path)) == []
    assert lock.read_text() == ""


# --- processes: SIGKILL, SIGTERM, two at once, a file-size limit --------------------------------


# Sets a file-size limit, ignores SIGXFSZ (so writes fail with EFBIG instead of killing the
# process), then becomes the command: no preexec_fn, which would fork this threaded process.
LIMITED = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
           "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


def cli(workflow: Path, *extra: str, log: Path, file_size_limit: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    command = ["-m", "pipeline.cli", "run", str(workflow), "--no-progress", "--log-format", "json", *extra]
    if file_size_limit is not None:
        command = ["-c", LIMITED, str(file_size_limit), *command]
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, *command], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def file_events(log: Path) -> list[dict]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [e for e in (json.loads(x) for x in lines if x.startswith('{"event": "file"')) if e["status"] == "ok"]


def assert_no_partial_outputs(inputs: Path, out: Path) -> None:
    """Whatever a killed run left: every mask present is complete; temporaries may remain."""
    for mask in out.glob("s*.tif"):
        if "." not in mask.stem:
            assert_complete(mask, inputs / mask.name)


def finish_and_skip(tmp_path: Path, wf: Path, inputs: Path, n: int) -> None:
    """After kills: a normal run completes everything, a third skips everything and touches nothing."""
    out = outdir(tmp_path)
    assert run(wf) == 0
    assert partials(out) == []
    for i in range(n):
        assert_complete(out / f"s{i}.tif", inputs / f"s{i}.tif")
    before = mtimes(out)
    assert run(wf) == 0
    assert set(statuses(tmp_path).values()) == {"skipped"}
    after = mtimes(out)
    after.pop("tilepipe-report.json"), before.pop("tilepipe-report.json")
    assert after == before


def started_until_a_file_finished(tmp_path, make_workflow, name):
    """Six inputs, their workflow, its log and the CLI running it, once a file has finished."""
    inputs = make_inputs(tmp_path, n=6, shape=(96, 128))
    wf = make_workflow(inputs)
    log = tmp_path / f"{name}.log"
    proc = cli(wf, log=log)
    try:
        wait_for(lambda: file_events(log) or proc.poll() is not None, 180, "no file finished")
    except BaseException:
        proc.kill()
        raise
    return inputs, wf, log, proc


def test_sigkill_mid_run_then_a_normal_run_finishes_the_job(tmp_path, make_workflow):
    inputs, wf, _, proc = started_until_a_file_finished(tmp_path, make_workflow, "killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(list(outdir(tmp_path).glob("s?.tif"))) < 6, "the kill came after the run had finished"
    assert_no_partial_outputs(inputs, outdir(tmp_path))
    finish_and_skip(tmp_path, wf, inputs, 6)


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path, make_workflow):
    inputs = make_inputs(tmp_path, n=6, shape=(96, 128))
    wf = make_workflow(inputs)
    t0 = time.monotonic()
    baseline = cli(wf, "--output", str(tmp_path / "baseline"), log=tmp_path / "baseline.log")
    assert baseline.wait(timeout=300) == 0
    duration = time.monotonic() - t0
    rng = random.Random(5)
    for attempt in range(5):
        proc = cli(wf, *(["--force"] if attempt % 2 else []), log=tmp_path / f"kill{attempt}.log")
        try:
            proc.wait(timeout=rng.uniform(0.3, 1.0) * duration)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert_no_partial_outputs(inputs, outdir(tmp_path))
    finish_and_skip(tmp_path, wf, inputs, 6)


def test_an_interrupt_while_a_sinks_temporaries_are_created_leaves_none(tmp_path, monkeypatch):
    """GDAL has created the second temporary when the interrupt lands, before the sink holds it."""
    write_raster(tmp_path / "s.tif", scene(40, 48))
    real_open = pipeline.outputs.open_raster
    opened = []

    def interrupted_at_the_second(path, mode="r", **profile):
        dataset = real_open(path, mode, **profile)
        opened.append(path)
        if len(opened) == 2:
            raise Interrupted(signal.SIGTERM)
        return dataset

    monkeypatch.setattr(pipeline.outputs, "open_raster", interrupted_at_the_second)
    with pytest.raises(Interrupted):
        MaskSink(inspect_raster(tmp_path / "s.tif", [1, 2, 3, 4]), tmp_path / "out" / "s.tif",
                 OutputSection(dir=str(tmp_path / "out"), confidence=True), 3)
    assert len(opened) == 2 and partials(tmp_path / "out") == []


def test_an_interrupt_before_the_runner_holds_a_new_sink_leaves_no_temporary(tmp_path, make_workflow,
                                                                              monkeypatch):
    """The interrupt lands after a file's temporaries exist but before the runner has recorded
    its sink: the run still ends without them, and is recorded as interrupted."""
    inputs = make_inputs(tmp_path, n=2, shape=(96, 128))
    wf = load_workflow(make_workflow(inputs, output={"dir": str(outdir(tmp_path)), "run_products": False}))
    real_sink = pipeline.runner.MaskSink

    def interrupted_once_made(*args, **kwargs):
        real_sink(*args, **kwargs)
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(pipeline.runner, "MaskSink", interrupted_once_made)
    with pytest.raises(Interrupted):
        run_workflow(wf, progress=False)
    assert partials(outdir(tmp_path)) == []
    ledger = sqlite3.connect(outdir(tmp_path) / ".tilepipe" / "ledger.sqlite")
    assert ledger.execute("SELECT status FROM runs").fetchall() == [("interrupted",)]


def test_an_interrupt_dropped_mid_run_stops_the_run_at_its_next_batch(tmp_path, make_workflow, monkeypatch,
                                                                       dropped):
    """SIGTERM's handler runs in a finaliser while the runner writes the first batch, and its
    exception is dropped there (as in a Dask future's ``__del__``): the run stops anyway, at
    the next batch it takes, and is recorded as interrupted."""
    inputs = make_inputs(tmp_path, n=4, shape=(96, 128))
    wf = load_workflow(make_workflow(inputs, output={"dir": str(outdir(tmp_path)), "run_products": False}))
    real_write, writes = MaskSink.write, []

    def write_then_signalled(self, result):
        real_write(self, result)
        writes.append(result)
        if len(writes) == 1:
            SignalledInFinaliser(signal.SIGTERM)

    monkeypatch.setattr(MaskSink, "write", write_then_signalled)
    with pytest.raises(Interrupted), interruptible():
        run_workflow(wf, progress=False)
    assert [type(d.exc_value) for d in dropped] == [Interrupted]  # the first raising was lost
    assert len(writes) == 1  # of the four inputs' batches
    assert partials(outdir(tmp_path)) == []
    ledger = sqlite3.connect(outdir(tmp_path) / ".tilepipe" / "ledger.sqlite")
    assert ledger.execute("SELECT status FROM runs").fetchall() == [("interrupted",)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_sigterm_and_sigint_stop_cleanly_with_128_plus_the_signal(tmp_path, make_workflow, signum):
    inputs, wf, log, proc = started_until_a_file_finished(tmp_path, make_workflow, "term")
    try:
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 128 + signum, log.read_text()
    finally:
        proc.kill()
    assert f"interrupted by {signal.Signals(signum).name}" in log.read_text()
    assert partials(outdir(tmp_path)) == []
    ledger = sqlite3.connect(outdir(tmp_path) / ".tilepipe" / "ledger.sqlite")
    assert ledger.execute("SELECT status FROM runs").fetchall() == [("interrupted",)]
    assert_no_partial_outputs(inputs, outdir(tmp_path))
    assert run(wf) == 0
    assert "skipped" in statuses(tmp_path).values()


def test_two_runs_started_together_one_works_one_exits_3(tmp_path, make_workflow):
    inputs = make_inputs(tmp_path, n=6, shape=(96, 128))
    wf = make_workflow(inputs)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [cli(wf, log=log) for log in logs]
    codes = sorted(p.wait(timeout=300) for p in procs)
    assert codes == [0, EXIT_LOCKED], [log.read_text()[-2000:] for log in logs]
    loser = next(log for log, p in zip(logs, procs) if p.returncode == EXIT_LOCKED).read_text()
    assert "another run of workflow 'test'" in loser


def test_a_file_size_limit_fails_the_big_file_clearly_and_leaves_nothing(tmp_path, make_workflow):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_raster(inputs / "small.tif", scene(40, 40))
    write_raster(inputs / "big.tif", scene(512, 512, seed=1))
    wf = make_workflow(inputs, runtime={"compilation_cache": None}, tiling={"tile": 128, "batch": 2})
    log = tmp_path / "fsize.log"  # 200 kB: the big file's temporary mask needs 262 144 bytes
    assert cli(wf, log=log, file_size_limit=200_000).wait(timeout=300) == 1, log.read_text()
    events = {Path(e["input"]).name: e for e in (json.loads(x) for x in log.read_text().splitlines()
                                                 if x.startswith('{"event": "file"'))}
    assert events["small.tif"]["status"] == "ok"
    assert events["big.tif"]["status"] == "failed"
    assert events["big.tif"]["error"].startswith("big.tif: output not written: file-size limit (ulimit -f)")
    assert not (outdir(tmp_path) / "big.tif").exists()
    assert partials(outdir(tmp_path)) == []
    assert_complete(outdir(tmp_path) / "small.tif", inputs / "small.tif")


def test_a_rerun_without_companions_removes_the_old_ones(tmp_path, make_workflow):
    inputs = make_inputs(tmp_path, n=1)
    wf = make_workflow(inputs, output={"confidence": True, "probabilities": True, "polygons": True})
    assert run(wf) == 0
    out = outdir(tmp_path)
    companions = ["s0.confidence.tif", "s0.probabilities.tif", "s0.gpkg"]
    assert all((out / name).exists() for name in companions)
    wf = make_workflow(inputs)  # the same inputs, no companions asked for
    assert run(wf) == 0
    assert [name for name in companions if (out / name).exists()] == []
    assert sorted(p.name for p in out.glob("s0*.aux.xml")) == ["s0.tif.aux.xml"]
    item = json.loads((out / "s0.item.json").read_text())
    assert not any(a["href"].endswith(tuple(companions)) for a in item["assets"].values())
    assert partials(out) == []
