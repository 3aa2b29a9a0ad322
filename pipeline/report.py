"""The run report: one entry per input, a summary, JSON on disk and a line on the terminal."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

Status = Literal["ok", "skipped", "failed"]


@dataclasses.dataclass(frozen=True)
class FileRecord:
    input: str
    status: Status
    output: str | None = None
    pixels: int = 0
    seconds: float = 0.0
    error: str | None = None
    warnings: tuple[str, ...] = ()


def busy_seconds(spans: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: time during which at least one was
    open, so intervals that overlap (batches from several threads on one device) count once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


@dataclasses.dataclass(frozen=True)
class RunReport:
    run_id: str
    workflow: str
    started: str
    seconds: float
    device: str | None
    files: tuple[FileRecord, ...]
    model_busy_s: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds each worker process (``host/pid``) had a batch on its device(s)."""
    model_batch_s: dict[str, float] = dataclasses.field(default_factory=dict)
    """Median seconds a batch took on each worker process's device(s), from its transfer to its
    results' return: against a batch timed alone, what running beside the rest of the run costs."""
    publish_wait_s: float = 0.0
    """Seconds the driver held batches back while more finished files waited for publication
    than it keeps waiting: near 0 unless publishing (``runtime.finishers``) is what bounds the run."""
    publish_tail_s: float = 0.0
    """Seconds from the last batch's result to the end of the last file's publication."""
    checksum_wait_s: float = 0.0
    """Seconds finished files waited for their inputs' checksums (their provenance), summed over
    the files: near 0 unless checksumming, on its one thread, is what bounds the run."""

    @property
    def model_busy_share(self) -> float | None:
        """How much of the run the model was the cost: its busy seconds over the run's, averaged
        over the processes that ran it. Near 1 when reading and writing hide behind the model;
        low when they are the cost (an accelerator waiting for the host)."""
        if not self.model_busy_s or self.seconds <= 0:
            return None
        return sum(self.model_busy_s.values()) / (len(self.model_busy_s) * self.seconds)

    def count(self, status: Status) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def exit_code(self) -> int:
        """0 when nothing failed, 1 when some input failed."""
        return 1 if self.count("failed") else 0

    def summary(self) -> str:
        pixels = sum(f.pixels for f in self.files if f.status == "ok")
        share = self.model_busy_share
        return (f"{self.count('ok')} ok, {self.count('skipped')} skipped, {self.count('failed')} failed "
                f"of {len(self.files)} input(s); {pixels / 1e6:.2f} Mpx in {self.seconds:.1f} s"
                + (f", model busy {100 * share:.0f}% of it" if share is not None else ""))

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["summary"] = {s: self.count(s) for s in ("ok", "skipped", "failed")}
        data["model_busy_share"] = self.model_busy_share
        return data


def write_report(report: RunReport, path: Path) -> Path:
    """Write the report as JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def format_status(status: dict) -> str:
    """``tilepipe status`` as a table of runs and the failures of the newest run."""
    runs = status["runs"]
    if not runs:
        return f"no runs recorded in {status['ledger']}"
    header = ("run", "started", "seconds", "status", "ok", "skipped", "failed")
    rows = [(r["run_id"], r["started"], "" if r["seconds"] is None else f"{r['seconds']:.1f}", r["status"],
             str(r["ok"]), str(r["skipped"]), str(r["failed"])) for r in runs]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = {2, 4, 5, 6}

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [line(header), *map(line, rows)]
    if runs[0].get("error"):
        lines.append(f"\nrun {runs[0]['run_id']} {runs[0]['status']}: {runs[0]['error']}")
    failed = status["last_run_failed"]
    if failed:
        lines.append(f"\nfailed in run {runs[0]['run_id']} ({len(failed)}); retried next run:")
        lines.extend(f"  {Path(f['input']).name}: {_reason(f)}" for f in failed)
    return "\n".join(lines)


def _reason(failure: dict) -> str:
    error = failure["error"] or "unknown error"
    name = Path(failure["input"]).name
    return error[len(name) + 2:] if error.startswith(f"{name}: ") else error
