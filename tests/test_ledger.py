"""The run ledger: what decides a skip, and what it remembers of each run and input."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sqlite3

import blake3

from pipeline.config import load_workflow
from pipeline.ledger import Fingerprint, KnownOutput, Ledger, fingerprint, result_key, run_status
from pipeline.report import FileRecord, format_status


def test_only_result_fields_change_the_result_key(tmp_path, make_workflow):
    wf = make_workflow(tmp_path)
    base = result_key(load_workflow(wf), "m1")
    same = [["dask.threads=1"], ["tiling.batch=2"], ["report=r.json"], ["name=other"], ["state.dir=/tmp/s"],
            ["runtime.compilation_cache=null"], ['input.pattern="*.TIF"'], ["output.run_products=false"]]
    for overrides in same:
        assert result_key(load_workflow(wf, overrides), "m1") == base, overrides
    changed = [["tiling.tile=64"], ["tiling.halo=32"], ["bands=[4,3,2,1]"], ["normalise.scale=0.001"],
               ["output.confidence=true"], ["output.polygons=true"]]
    for overrides in changed:
        assert result_key(load_workflow(wf, overrides), "m1") != base, overrides
    assert result_key(load_workflow(wf), "m2") != base


def test_the_state_dir_defaults_beside_the_outputs(tmp_path, make_workflow):
    wf = load_workflow(make_workflow(tmp_path))
    assert wf.state_dir == wf.output.dir / ".tilepipe"
    assert load_workflow(make_workflow(tmp_path), ["state.dir=elsewhere"]).state_dir == tmp_path.cwd() / "elsewhere"


def test_the_checksum_is_reused_only_while_size_and_mtime_hold(tmp_path):
    path = tmp_path / "a.tif"
    path.write_bytes(b"abc")
    fp = fingerprint(path, None)
    assert (fp.size, fp.checksum) == (3, "blake3:" + blake3.blake3(b"abc").hexdigest())
    known = KnownOutput(str(path), Fingerprint(fp.size, fp.mtime_ns, "cached"), "k", "o", "r")
    assert fingerprint(path, known).checksum == "cached"
    os.utime(path, ns=(1, 1))
    assert fingerprint(path, known).checksum == fp.checksum


def test_runs_and_files_are_recorded_and_summarised(tmp_path, make_workflow):
    wf = load_workflow(make_workflow(tmp_path))
    fp = Fingerprint(3, 1, "blake3:" + "ab" * 32)
    with Ledger.of(wf) as ledger:
        ledger.start_run("r1", wf, "k", "m", "2026-01-01T02:00:00+00:00", False)
        ledger.start_run("r2", wf, "k", "m", "2026-01-02T02:00:00+00:00", True)  # r1 was killed
        ledger.record("r2", FileRecord("/in/a.tif", "ok", "/out/a.tif", 10, 1.5), fp)
        ledger.remember_output("r2", "/in/a.tif", fp, "k", "/out/a.tif")
        ledger.record("r2", FileRecord("/in/b.tif", "failed", error="b.tif: empty file (0 bytes)"), None)
        ledger.finish_run("r2", "finished", 2.0)
        assert ledger.known_output("/in/a.tif").fingerprint == fp
        assert ledger.known_output("/in/b.tif") is None
    status = run_status(wf.state_dir / "ledger.sqlite", wf.output.dir)
    assert [(r["run_id"], r["status"], r["ok"], r["failed"], r["forced"]) for r in status["runs"]] == [
        ("r2", "finished", 1, 1, 1), ("r1", "killed", 0, 0, 0)]
    assert status["last_run_failed"] == [{"input": "/in/b.tif", "error": "b.tif: empty file (0 bytes)", "checksum": None}]
    table = format_status(status)
    assert table.splitlines()[0].split() == ["run", "started", "seconds", "status", "ok", "skipped", "failed"]
    assert "  b.tif: empty file (0 bytes)" in table
    assert run_status(wf.state_dir / "ledger.sqlite", tmp_path / "other")["runs"] == []


EARLIER_SCHEMA = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, workflow TEXT, output_dir TEXT, workflow_sha256 TEXT, result_key TEXT,
    model_sha256 TEXT, started TEXT, finished TEXT, seconds REAL, status TEXT,
    ok INTEGER DEFAULT 0, skipped INTEGER DEFAULT 0, failed INTEGER DEFAULT 0,
    forced INTEGER DEFAULT 0, pid INTEGER, host TEXT
);
CREATE TABLE files (
    run_id TEXT, input TEXT, size INTEGER, mtime_ns INTEGER, sha256 TEXT, status TEXT, output TEXT,
    error TEXT, pixels INTEGER, seconds REAL, finished TEXT, PRIMARY KEY (run_id, input)
);
CREATE TABLE outputs (
    input TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT, result_key TEXT,
    output TEXT, run_id TEXT, finished TEXT
);
"""


def test_a_ledger_of_sha256_checksums_is_read_with_their_algorithm_named(tmp_path, make_workflow):
    """A ledger an earlier tilepipe wrote (SHA-256 in a ``sha256`` column, runs without an
    error column) opens as it is: its checksums read as ``sha256:<hex>``, new ones go beside."""
    wf = load_workflow(make_workflow(tmp_path))
    path = wf.state_dir / "ledger.sqlite"
    path.parent.mkdir(parents=True)
    digest = hashlib.sha256(b"abc").hexdigest()
    with sqlite3.connect(path) as db:
        db.executescript(EARLIER_SCHEMA)
        db.execute("INSERT INTO runs (run_id, status) VALUES ('r0', 'finished')")
        db.execute("INSERT INTO files (run_id, input, size, mtime_ns, sha256, status, error) "
                   "VALUES ('r0', '/in/b.tif', 4, 2, ?, 'failed', 'b.tif: bad')", (digest,))
        db.execute("INSERT INTO outputs VALUES ('/in/a.tif', 3, 1, ?, 'k', '/out/a.tif', 'r0', 'then')", (digest,))
    db.close()
    for _ in range(2):  # brought up to date once; opening it again changes nothing
        with Ledger(path) as ledger:
            assert ledger.known_output("/in/a.tif").fingerprint == Fingerprint(3, 1, f"sha256:{digest}")
            assert ledger.files("r0")[0]["checksum"] == f"sha256:{digest}"
    fp = Fingerprint(5, 6, "blake3:" + "cd" * 32)
    with Ledger(path) as ledger:
        ledger.start_run("r1", wf, "k", "m", "2026-01-01T02:00:00+00:00", False)
        ledger.remember_output("r1", "/in/a.tif", fp, "k", "/out/a.tif")
        ledger.record("r1", FileRecord("/in/b.tif", "failed", error="b.tif: bad"), fp)
        ledger.finish_run("r1", "finished", 1.0, error="one failed")
        assert ledger.known_output("/in/a.tif").fingerprint == fp
    status = run_status(path)
    assert status["runs"][0]["error"] == "one failed"
    assert status["last_run_failed"] == [{"input": "/in/b.tif", "error": "b.tif: bad", "checksum": fp.checksum}]


def test_processes_opening_an_earlier_ledger_at_once_bring_it_up_to_date_once(tmp_path):
    """Runs of different outputs may share a state directory: the first to open an earlier
    ledger adds its columns, the others wait for it (one transaction) and find them there."""
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(EARLIER_SCHEMA)
        db.execute("INSERT INTO outputs VALUES ('/in/a.tif', 3, 1, 'ab', 'k', '/out/a.tif', 'r0', 'then')")
    db.close()
    ctx = multiprocessing.get_context("spawn")
    start, found = ctx.Barrier(6), ctx.Queue()
    processes = [ctx.Process(target=_open_at_once, args=(path, start, found)) for _ in range(6)]
    for p in processes:
        p.start()
    results = sorted(found.get(timeout=120) for _ in processes)
    for p in processes:
        p.join(timeout=60)
    assert results == ["sha256:ab"] * 6
    with sqlite3.connect(path) as db:
        assert [r[1] for r in db.execute("PRAGMA table_info(outputs)")].count("checksum") == 1
    db.close()


def _open_at_once(path, start, found):
    start.wait(timeout=60)  # every process imported, then all open the ledger together
    try:
        with Ledger(path) as ledger:
            found.put(ledger.known_output("/in/a.tif").fingerprint.checksum)
    except Exception as exc:  # noqa: BLE001  # reported to the test, which fails on it
        found.put(f"{type(exc).__name__}: {exc}")
