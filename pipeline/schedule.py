"""Nightly runs: a crontab line or a systemd service + timer pair for one workflow.

Both run ``tilepipe run WORKFLOW --no-progress --log-format json`` with absolute paths and
append its output to a log file. Overlaps are prevented by the workflow's lock: a run that
starts while the previous one is still going exits at once with code 3.

A cron expression is converted to systemd's ``OnCalendar=`` for the forms both share (numbers,
lists, ranges, ``*/step`` and ``a/step``); forms that do not translate, such as a day of the
month *and* a day of the week together (cron runs when either matches, systemd when both do),
are rejected with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.config import Workflow
from pipeline.errors import TilepipeError

MACROS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0",
          "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *"}
FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
SYSTEMD_DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
MARKER = "# tilepipe-schedule:"


class ScheduleError(TilepipeError, ValueError):
    """A schedule that cannot be written or installed; the message says what to change."""


# --- cron expressions (pure) -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CronField:
    """One field of a cron expression: ``*`` or comma-separated items ``a``, ``a-b``, ``*/s``, ``a-b/s``, ``a/s``."""

    name: str
    items: tuple[tuple[int | None, int | None, int | None], ...]  # (start, end, step); None start = *

    @property
    def any(self) -> bool:
        return self.items == ((None, None, None),)


def parse_cron(expr: str) -> tuple[CronField, ...]:
    """The five fields of ``expr`` (macros such as ``@daily`` expanded); :class:`ScheduleError` if invalid."""
    text = MACROS.get(expr.strip().lower(), expr.strip())
    parts = text.split()
    if len(parts) != 5:
        raise ScheduleError(f"--at {expr!r}: a cron expression has 5 fields (minute hour day month weekday), "
                            f"e.g. \"0 2 * * *\", or one of {', '.join(MACROS)}")
    return tuple(_parse_field(part, name, lo, hi, expr) for part, (name, lo, hi) in zip(parts, FIELDS))


def _parse_field(text: str, name: str, lo: int, hi: int, expr: str) -> CronField:
    names = MONTHS if name == "month" else DAYS if name == "day of week" else []
    base = 1 if name == "month" else 0

    def value(token: str) -> int:
        if token.lower() in names:
            return names.index(token.lower()) + base
        if not token.isdigit() or not lo <= int(token) <= hi:
            raise ScheduleError(f"--at {expr!r}: {name} {token!r} is not a number from {lo} to {hi}")
        return int(token)

    items = []
    for item in text.split(","):
        match = re.fullmatch(r"(\*|[0-9A-Za-z]+)(?:-([0-9A-Za-z]+))?(?:/([0-9]+))?", item)
        if not match:
            raise ScheduleError(f"--at {expr!r}: cannot read the {name} field {text!r}")
        first, last, step = match.groups()
        if first == "*" and last:
            raise ScheduleError(f"--at {expr!r}: cannot read the {name} field {text!r}")
        start = None if first == "*" else value(first)
        end = value(last) if last else None
        if start is not None and end is not None and end < start:
            raise ScheduleError(f"--at {expr!r}: {name} range {item!r} runs backwards")
        if step is not None and int(step) < 1:
            raise ScheduleError(f"--at {expr!r}: {name} step must be at least 1")
        items.append((start, end, int(step) if step else None))
    return CronField(name, tuple(items))


def on_calendar(expr: str) -> str:
    """systemd's ``OnCalendar=`` for the cron expression ``expr``."""
    minute, hour, dom, month, dow = parse_cron(expr)
    if not dom.any and not dow.any:
        raise ScheduleError(f"--at {expr!r}: cron runs when the day of month OR the weekday matches, systemd "
                            "only when both do; give one of them as * (or use a crontab, without --systemd)")
    days = "" if dow.any else ",".join(_weekday(item, expr) for item in dow.items) + " "
    date = f"*-{_calendar(month)}-{_calendar(dom)}"
    return f"{days}{date} {_calendar(hour)}:{_calendar(minute)}:00"


def _calendar(field: CronField) -> str:
    """One cron field as a systemd OnCalendar component (two-digit values)."""
    parts = []
    for start, end, step in field.items:
        if start is None:
            parts.append("*" if step is None else f"{0 if field.name in ('minute', 'hour') else 1:02d}/{step}")
        elif end is None:
            parts.append(f"{start:02d}" + (f"/{step}" if step else ""))
        elif step is None:
            parts.append(f"{start:02d}..{end:02d}")
        else:  # a-b/s: systemd has no stepped range; list the values
            parts.append(",".join(f"{v:02d}" for v in range(start, end + 1, step)))
    return ",".join(parts)


def _weekday(item: tuple[int | None, int | None, int | None], expr: str) -> str:
    start, end, step = item
    if step is not None:
        raise ScheduleError(f"--at {expr!r}: a stepped weekday has no systemd form; list the days instead")
    days = sorted({d % 7 for d in range(start, (start if end is None else end) + 1)}, key=lambda d: (d + 6) % 7)
    return ",".join(SYSTEMD_DAYS[d] for d in days)


# --- what to install -------------------------------------------------------------------------


def tilepipe_executable() -> Path:
    """The absolute path of the ``tilepipe`` that belongs to this Python."""
    beside = Path(sys.executable).with_name("tilepipe")
    if beside.is_file():
        return beside
    found = shutil.which("tilepipe")
    if found is None:
        raise ScheduleError("cannot find the tilepipe executable; install the package (pip install -e .)")
    return Path(found).resolve()


def unit_name(wf: Workflow, workflow_file: Path) -> str:
    """``tilepipe-<name>-<hash>``: one unit per workflow file, readable and unique."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", wf.name).strip("-") or "workflow"
    key = hashlib.sha256(str(workflow_file.resolve()).encode()).hexdigest()[:6]
    return f"tilepipe-{slug}-{key}"


@dataclasses.dataclass(frozen=True)
class SchedulePlan:
    """Everything a schedule writes, as text; nothing is touched until an install function runs."""

    name: str
    cron: str
    command: tuple[str, ...]
    workdir: Path
    log: Path
    marker: str
    systemd: bool
    calendar: str | None = None

    def crontab_line(self) -> str:
        # cron hands the line to /bin/sh; % is special to cron and must be escaped.
        run = " ".join(shlex.quote(part) for part in self.command)
        line = (f"{self.cron} cd {shlex.quote(str(self.workdir))} && mkdir -p {shlex.quote(str(self.log.parent))} "
                f"&& {run} >> {shlex.quote(str(self.log))} 2>&1 {self.marker}")
        return line.replace("%", "\\%")

    def service(self) -> str:
        return "\n".join([
            "[Unit]",
            f"Description=tilepipe run {self.command[2]}",
            "",
            "[Service]",
            "Type=oneshot",
            f"WorkingDirectory={self.workdir}",
            f"ExecStartPre=/bin/mkdir -p {self.log.parent}",
            "ExecStart=" + " ".join(_systemd_quote(part) for part in self.command),
            f"StandardOutput=append:{self.log}",
            f"StandardError=append:{self.log}",
            "# 1: some inputs failed (the rest completed); 3: a previous run still holds the lock",
            "SuccessExitStatus=3",
            "",
        ])

    def timer(self) -> str:
        return "\n".join([
            "[Unit]",
            f"Description=tilepipe run {self.command[2]} at {self.cron}",
            "",
            "[Timer]",
            f"OnCalendar={self.calendar}",
            "Persistent=true",
            f"Unit={self.name}.service",
            "",
            "[Install]",
            "WantedBy=timers.target",
            "",
        ])

    def text(self) -> str:
        if not self.systemd:
            return self.crontab_line()
        return (f"# ~/.config/systemd/user/{self.name}.service\n{self.service()}\n"
                f"# ~/.config/systemd/user/{self.name}.timer\n{self.timer()}\n"
                f"# then: systemctl --user daemon-reload && systemctl --user enable --now {self.name}.timer")


def _systemd_quote(part: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", part):
        return part.replace("%", "%%")
    return '"' + part.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def plan_schedule(wf: Workflow, workflow_file: Path, cron: str, *, log: Path | None = None,
                  systemd: bool = False) -> SchedulePlan:
    """The schedule of ``workflow_file`` at ``cron``; validates the expression for either target."""
    parse_cron(cron)
    workflow_file = workflow_file.resolve()
    calendar = on_calendar(cron) if systemd else None
    log = (log or wf.state_dir / "tilepipe.log").expanduser().resolve()
    command = (str(tilepipe_executable()), "run", str(workflow_file), "--no-progress", "--log-format", "json")
    name = unit_name(wf, workflow_file)
    return SchedulePlan(name, " ".join(MACROS.get(cron.strip().lower(), cron).split()), command,
                        workflow_file.parent, log, f"{MARKER} {workflow_file}", systemd, calendar)


def merge_crontab(existing: str, plan: SchedulePlan) -> str:
    """``existing`` with this workflow's line replaced (or added): installing twice changes nothing."""
    kept = [line for line in existing.splitlines() if not line.rstrip().endswith(plan.marker)]
    return "\n".join([*kept, plan.crontab_line()]) + "\n"


def install_crontab(plan: SchedulePlan) -> str:
    """Merge the plan into this user's crontab with ``crontab -l`` / ``crontab -``."""
    crontab = shutil.which("crontab")
    if crontab is None:
        raise ScheduleError("no crontab command on this machine; use --systemd or install cron")
    current = subprocess.run([crontab, "-l"], capture_output=True, text=True, check=False)
    existing = current.stdout if current.returncode == 0 else ""  # 'no crontab for user' exits 1
    done = subprocess.run([crontab, "-"], input=merge_crontab(existing, plan), capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise ScheduleError(f"crontab - failed: {done.stderr.strip() or done.returncode}")
    return f"installed in the crontab of {os.environ.get('USER', 'this user')}:\n{plan.crontab_line()}"


def install_systemd(plan: SchedulePlan) -> str:
    """Write the service and timer into ``~/.config/systemd/user``; say how to enable them."""
    unit_dir = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user"
    unit_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".service", plan.service()), (".timer", plan.timer())):
        path = unit_dir / f"{plan.name}{suffix}"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(text)
        os.replace(tmp, path)
    return (f"wrote {unit_dir / plan.name}.service and .timer; enable with:\n"
            f"systemctl --user daemon-reload && systemctl --user enable --now {plan.name}.timer")
