"""The run report: one entry per input, a summary, JSON on disk and a line on the terminal."""

from __future__ import annotations

import dataclasses
import json
import os
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


@dataclasses.dataclass(frozen=True)
class RunReport:
    run_id: str
    workflow: str
    started: str
    seconds: float
    device: str | None
    files: tuple[FileRecord, ...]

    def count(self, status: Status) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def exit_code(self) -> int:
        """0 when nothing failed, 1 when some input failed."""
        return 1 if self.count("failed") else 0

    def summary(self) -> str:
        pixels = sum(f.pixels for f in self.files if f.status == "ok")
        return (f"{self.count('ok')} ok, {self.count('skipped')} skipped, {self.count('failed')} failed "
                f"of {len(self.files)} input(s); {pixels / 1e6:.2f} Mpx in {self.seconds:.1f} s")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["summary"] = {s: self.count(s) for s in ("ok", "skipped", "failed")}
        return data


def write_report(report: RunReport, path: Path) -> Path:
    """Write the report as JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    os.replace(tmp, path)
    return path
