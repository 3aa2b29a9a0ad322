"""What a run tells its operator: one line per file, notes, and a summary.

``text`` lines are for a terminal; ``json`` lines (one object per line, an ``event`` key
first) are for log files and log shippers. Lines go through ``tqdm.write`` so they never
tear a progress bar.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TextIO

from tqdm import tqdm

from pipeline.report import FileRecord, RunReport

LogFormat = Literal["text", "json"]


def _time() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class RunLog:
    """Writes a run's events in ``fmt`` to ``stream`` (stderr by default); ``notes``, when
    given, receives the notes instead (a library caller's own logger)."""

    def __init__(self, fmt: LogFormat = "text", stream: TextIO | None = None,
                 notes: Callable[[str], None] | None = None):
        self.fmt = fmt
        self.stream = stream
        self.notes = notes

    def _line(self, text: str) -> None:
        tqdm.write(text, file=self.stream or sys.stderr)

    def _event(self, event: str, **fields: object) -> None:
        self._line(json.dumps({"event": event, "time": _time(), **fields}, default=str))

    def note(self, message: str) -> None:
        """A warning or remark that belongs to the run, not to one file's result."""
        if self.notes is not None:
            self.notes(message)
        elif self.fmt == "json":
            self._event("note", message=message)
        else:
            self._line(message)

    def error(self, message: str, exit_code: int) -> None:
        """Why the run ended without a report (locked, interrupted)."""
        if self.fmt == "json":
            self._event("error", message=message, exit_code=exit_code)
        else:
            self._line(f"error: {message}")

    def file(self, record: FileRecord) -> None:
        """One input's outcome, as soon as it is known."""
        name = Path(record.input).name
        if self.fmt == "json":
            self._event("file", input=record.input, status=record.status, output=record.output,
                        seconds=record.seconds, error=record.error)
        elif record.status == "failed":
            self._line(f"failed   {record.error}")
        else:
            self._line(f"{record.status:<8} {name} ({record.seconds:.2f} s)")

    def summary(self, report: RunReport, report_path: Path | None, stream: TextIO | None = None) -> None:
        """The run's last line: counts, time, where the report is."""
        out = stream or sys.stdout
        if self.fmt == "json":
            print(json.dumps({"event": "summary", "time": _time(), "run_id": report.run_id,
                              "workflow": report.workflow, **report.to_json()["summary"],
                              "seconds": report.seconds, "model_busy_share": report.model_busy_share,
                              "exit_code": report.exit_code,
                              "report": str(report_path) if report_path else None}), file=out, flush=True)
        else:
            print(f"{report.summary()}; report: {report_path}", file=out, flush=True)
