"""The run ledger: an SQLite file recording every run and every input it saw.

Three tables: ``runs`` (one row per run, counts filled in as it ends), ``files`` (one row
per input per run: checksum, size, status, output, error, timing) and ``outputs`` (the
newest verified output of each input, which decides whether the next run may skip it).
Rows are committed as each file ends, so a killed run keeps what it finished.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any, Self

from pipeline.checksums import file_checksum, raster_checksum
from pipeline.config import Workflow
from pipeline.errors import InputError
from pipeline.io import GdalPath, InputPath
from pipeline.report import FileRecord

LEDGER_NAME = "ledger.sqlite"

# Workflow fields that change what a file's outputs contain. Everything else (input.dir and
# pattern, model.checkpoint's *path* (its sha256 counts instead), tiling.batch, dask, runtime,
# state, report, name, output.run_products) only changes how or where a run goes.
RESULT_FIELDS = {
    "bands": None,
    "normalise": None,
    "tiling": ("tile", "halo"),
    "output": ("confidence", "probabilities", "polygons", "simplify"),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, workflow TEXT, output_dir TEXT, workflow_sha256 TEXT, result_key TEXT,
    model_sha256 TEXT, started TEXT, finished TEXT, seconds REAL, status TEXT,
    ok INTEGER DEFAULT 0, skipped INTEGER DEFAULT 0, failed INTEGER DEFAULT 0,
    forced INTEGER DEFAULT 0, pid INTEGER, host TEXT, error TEXT
);
CREATE TABLE IF NOT EXISTS files (
    run_id TEXT, input TEXT, size INTEGER, mtime_ns INTEGER, checksum TEXT, status TEXT, output TEXT,
    error TEXT, pixels INTEGER, seconds REAL, finished TEXT, PRIMARY KEY (run_id, input)
);
CREATE TABLE IF NOT EXISTS outputs (
    input TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, checksum TEXT, result_key TEXT,
    output TEXT, run_id TEXT, finished TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_output ON runs (output_dir, started);
"""


def result_key(wf: Workflow, model_sha256: str) -> str:
    """Hash of everything that decides a file's outputs, other than the file itself."""
    dumped = wf.model_dump(mode="json")
    picked: dict[str, Any] = {"model_sha256": model_sha256}
    for section, keys in RESULT_FIELDS.items():
        value = dumped[section]
        picked[section] = value if keys is None else {k: value[k] for k in keys}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What identifies an input's content: size and mtime for a quick look, its checksum
    (:mod:`pipeline.checksums`) to be sure."""

    size: int
    mtime_ns: int
    checksum: str


@dataclasses.dataclass(frozen=True)
class KnownOutput:
    """The newest verified output of an input, as the ledger remembers it."""

    input: str
    fingerprint: Fingerprint
    result_key: str
    output: str
    run_id: str


class Ledger:
    """The SQLite ledger of one state directory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.executescript(SCHEMA)
        with self.db:  # earlier ledgers, brought up to date once, by whichever process opens one first
            self.db.execute("BEGIN IMMEDIATE")
            if "error" not in self._columns("runs"):
                self.db.execute("ALTER TABLE runs ADD COLUMN error TEXT")
            for table in ("files", "outputs"):  # SHA-256 checksums, in a column of that name
                if "checksum" not in self._columns(table):
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN checksum TEXT")
                    self.db.execute(f"UPDATE {table} SET checksum = 'sha256:' || sha256 WHERE sha256 IS NOT NULL")

    def _columns(self, table: str) -> set[str]:
        return {row["name"] for row in self.db.execute(f"PRAGMA table_info({table})")}

    @classmethod
    def of(cls, wf: Workflow) -> Ledger:
        return cls(wf.state_dir / LEDGER_NAME)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, sql: str, params: tuple | dict) -> None:
        with self.db:  # one transaction, committed before returning
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(sql, params)

    # --- runs -----------------------------------------------------------------------------

    def start_run(self, run_id: str, wf: Workflow, key: str, model_sha256: str, started: str, forced: bool) -> None:
        output_dir = str(wf.output.dir.resolve())
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            # We hold the lock, so a run of this output still marked running was killed.
            self.db.execute("UPDATE runs SET status = 'killed' WHERE status = 'running' AND output_dir = ?",
                            (output_dir,))
            self.db.execute(
                "INSERT INTO runs (run_id, workflow, output_dir, workflow_sha256, result_key, model_sha256, "
                "started, status, forced, pid, host) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)",
                (run_id, wf.name, output_dir, wf.digest(), key, model_sha256, started, int(forced),
                 os.getpid(), socket.gethostname()))

    def finish_run(self, run_id: str, status: str, seconds: float, error: str | None = None) -> None:
        counts = {s: n for s, n in self.db.execute(
            "SELECT status, COUNT(*) FROM files WHERE run_id = ? GROUP BY status", (run_id,))}
        self._write("UPDATE runs SET finished = ?, seconds = ?, status = ?, ok = ?, skipped = ?, failed = ?, "
                    "error = ? WHERE run_id = ?", (now(), seconds, status, counts.get("ok", 0),
                                                   counts.get("skipped", 0), counts.get("failed", 0), error, run_id))

    def runs(self, output_dir: Path | None = None, limit: int = 10) -> list[dict]:
        """The newest ``limit`` runs, newest first (of ``output_dir`` when given)."""
        if output_dir is None:
            rows = self.db.execute("SELECT * FROM runs ORDER BY started DESC, rowid DESC LIMIT ?", (limit,))
        else:
            rows = self.db.execute("SELECT * FROM runs WHERE output_dir = ? ORDER BY started DESC, rowid DESC "
                                   "LIMIT ?", (str(Path(output_dir).resolve()), limit))
        return [dict(r) for r in rows]

    def files(self, run_id: str, status: str | None = None) -> list[dict]:
        sql, params = "SELECT * FROM files WHERE run_id = ?", (run_id,)
        if status:
            sql, params = sql + " AND status = ?", (run_id, status)
        return [dict(r) for r in self.db.execute(sql + " ORDER BY input", params)]

    # --- files ----------------------------------------------------------------------------

    def record(self, run_id: str, record: FileRecord, fp: Fingerprint | None) -> None:
        self._write("INSERT OR REPLACE INTO files (run_id, input, size, mtime_ns, checksum, status, output, error, "
                    "pixels, seconds, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, record.input, fp.size if fp else None, fp.mtime_ns if fp else None,
                     fp.checksum if fp else None, record.status, record.output, record.error, record.pixels,
                     record.seconds, now()))

    def remember_output(self, run_id: str, input: str, fp: Fingerprint, key: str, output: str) -> None:
        """``output`` is complete and verified for this content of ``input`` under ``key``."""
        self._write("INSERT OR REPLACE INTO outputs (input, size, mtime_ns, checksum, result_key, output, run_id, "
                    "finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (input, fp.size, fp.mtime_ns, fp.checksum, key, output, run_id, now()))

    def known_output(self, input: str) -> KnownOutput | None:
        row = self.db.execute("SELECT * FROM outputs WHERE input = ?", (input,)).fetchone()
        if row is None:
            return None
        return KnownOutput(row["input"], Fingerprint(row["size"], row["mtime_ns"], row["checksum"]),
                           row["result_key"], row["output"], row["run_id"])


def fingerprint(path: InputPath, known: KnownOutput | None) -> Fingerprint:
    """Size, mtime and checksum of ``path``; the checksum is reused when size and mtime are unchanged.
    :class:`InputError` (one line, naming the file) if it cannot be read.

    An input only GDAL can read has no size or mtime here: its checksum is of its content
    (georeferencing and pixels), computed every run.
    """
    if isinstance(path, GdalPath):
        return Fingerprint(0, 0, raster_checksum(path))
    try:
        st = path.stat()
        if known and (known.fingerprint.size, known.fingerprint.mtime_ns) == (st.st_size, st.st_mtime_ns):
            return Fingerprint(st.st_size, st.st_mtime_ns, known.fingerprint.checksum)
        return Fingerprint(st.st_size, st.st_mtime_ns, file_checksum(path))
    except OSError as exc:
        raise InputError(f"{path.name}: cannot read ({exc.strerror or exc})") from exc


def run_status(path: Path, output_dir: Path | None = None, runs: int = 5) -> dict:
    """The newest ``runs`` runs (of ``output_dir`` when given) and the failed inputs of the newest."""
    with Ledger(path) as ledger:
        rows = ledger.runs(output_dir, runs)
        for row in rows:
            if row["finished"] is None:  # running, or killed: count what it recorded
                statuses = [f["status"] for f in ledger.files(row["run_id"])]
                row.update({s: statuses.count(s) for s in ("ok", "skipped", "failed")})
        failed = ledger.files(rows[0]["run_id"], "failed") if rows else []
    keep = ("run_id", "workflow", "status", "started", "finished", "seconds", "ok", "skipped", "failed", "forced",
            "error")
    return {
        "ledger": str(path),
        "runs": [{k: r[k] for k in keep} for r in rows],
        "last_run_failed": [{"input": f["input"], "error": f["error"], "checksum": f["checksum"]} for f in failed],
    }
