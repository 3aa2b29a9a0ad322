"""The run ledger: what decides a skip, and what it remembers of each run and input."""

from __future__ import annotations

import os

from pipeline.config import load_workflow
from pipeline.ledger import Fingerprint, Ledger, fingerprint, result_key, run_status
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


def test_the_hash_is_reused_only_while_size_and_mtime_hold(tmp_path):
    path = tmp_path / "a.tif"
    path.write_bytes(b"abc")
    fp = fingerprint(path, None)
    assert len(fp.sha256) == 64
    from pipeline.ledger import KnownOutput

    known = KnownOutput(str(path), Fingerprint(fp.size, fp.mtime_ns, "cached"), "k", "o", "r")
    assert fingerprint(path, known).sha256 == "cached"
    os.utime(path, ns=(1, 1))
    assert fingerprint(path, known).sha256 == fp.sha256


def test_runs_and_files_are_recorded_and_summarised(tmp_path, make_workflow):
    wf = load_workflow(make_workflow(tmp_path))
    fp = Fingerprint(3, 1, "ab" * 32)
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
    assert status["last_run_failed"] == [{"input": "/in/b.tif", "error": "b.tif: empty file (0 bytes)", "sha256": None}]
    table = format_status(status)
    assert table.splitlines()[0].split() == ["run", "started", "seconds", "status", "ok", "skipped", "failed"]
    assert "  b.tif: empty file (0 bytes)" in table
    assert run_status(wf.state_dir / "ledger.sqlite", tmp_path / "other")["runs"] == []
