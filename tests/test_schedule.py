"""`tilepipe schedule`: cron expressions, the crontab line, systemd units, idempotent installs.

Nothing is installed on this machine: ``crontab`` is a stand-in script on PATH that keeps
its table in a file, and systemd units go to a fake ``XDG_CONFIG_HOME``.
"""

from __future__ import annotations

import shlex
import stat
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.schedule import ScheduleError, on_calendar, parse_cron


@pytest.mark.parametrize("cron, calendar", [
    ("0 2 * * *", "*-*-* 02:00:00"),
    ("@daily", "*-*-* 00:00:00"),
    ("*/15 * * * *", "*-*-* *:00/15:00"),
    ("30 1 * * 1-5", "Mon,Tue,Wed,Thu,Fri *-*-* 01:30:00"),
    ("0 3 * * sat,sun", "Sat,Sun *-*-* 03:00:00"),
    ("0 3 * * 0,6", "Sun,Sat *-*-* 03:00:00"),
    ("15 4 1 * *", "*-*-01 04:15:00"),
    ("0 0 1 jan-mar *", "*-01..03-01 00:00:00"),
    ("0 1-10/3 * * *", "*-*-* 01,04,07,10:00:00"),
])
def test_cron_becomes_on_calendar(cron, calendar):
    assert on_calendar(cron) == calendar


@pytest.mark.parametrize("cron, message", [
    ("0 2 * *", "5 fields"),
    ("61 2 * * *", "minute '61' is not a number from 0 to 59"),
    ("0 25 * * *", "hour '25'"),
    ("0 2 * * funday", "day of week 'funday'"),
    ("0 5-2 * * *", "runs backwards"),
])
def test_bad_cron_expressions_say_why(cron, message):
    with pytest.raises(ScheduleError, match=message):
        parse_cron(cron)


def test_forms_systemd_cannot_express_are_rejected():
    with pytest.raises(ScheduleError, match="OR the weekday"):
        on_calendar("0 2 1 * 1")
    with pytest.raises(ScheduleError, match="stepped weekday"):
        on_calendar("0 2 * * */2")


def test_the_crontab_line_runs_the_workflow_with_absolute_paths_and_json_logs(tmp_path, make_workflow, capsys):
    wf = make_workflow(tmp_path / "in")
    assert main(["schedule", str(wf), "--at", "0 2 * * *"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert line.startswith("0 2 * * * cd ")
    words = shlex.split(line.split(" # tilepipe-schedule:")[0])
    tilepipe = Path(sys.executable).with_name("tilepipe")
    command = [str(tilepipe), "run", str(wf.resolve()), "--no-progress", "--log-format", "json"]
    assert words[words.index(str(tilepipe)):][:len(command)] == command
    log = tmp_path / "out" / ".tilepipe" / "tilepipe.log"
    assert line.split(" # ")[0].endswith(f">> {log} 2>&1")
    assert line.endswith(f"# tilepipe-schedule: {wf.resolve()}")


def test_systemd_units_use_on_calendar_and_append_to_the_log(tmp_path, make_workflow, capsys):
    wf = make_workflow(tmp_path / "in")
    log = tmp_path / "logs" / "nightly.log"
    assert main(["schedule", str(wf), "--at", "30 1 * * 1-5", "--systemd", "--log", str(log)]) == 0
    text = capsys.readouterr().out
    assert "OnCalendar=Mon,Tue,Wed,Thu,Fri *-*-* 01:30:00" in text
    assert "Persistent=true" in text and "Type=oneshot" in text
    assert f"StandardOutput=append:{log}" in text and f"StandardError=append:{log}" in text
    assert f"run {wf.resolve()} --no-progress --log-format json" in text
    assert main(["schedule", str(wf), "--at", "0 2 1 * 1", "--systemd"]) == 2
    assert "OR the weekday" in capsys.readouterr().err


def fake_crontab(tmp_path: Path, monkeypatch) -> Path:
    """A `crontab` on PATH that keeps the table in a file: -l prints it (exit 1 if none), - replaces it."""
    table = tmp_path / "crontab.txt"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "crontab"
    script.write_text(f"#!/bin/sh\nif [ \"$1\" = -l ]; then [ -f {table} ] || {{ echo 'no crontab' >&2; exit 1; }}; "
                      f"cat {table}; else cat > {table}; fi\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    return table


def test_install_merges_into_the_crontab_once(tmp_path, make_workflow, monkeypatch, capsys):
    table = fake_crontab(tmp_path, monkeypatch)
    wf = make_workflow(tmp_path / "in")
    assert main(["schedule", str(wf), "--at", "0 2 * * *", "--install"]) == 0
    table.write_text("MAILTO=ops@example.org\n" + table.read_text())
    assert main(["schedule", str(wf), "--at", "0 3 * * *", "--install"]) == 0
    lines = table.read_text().splitlines()
    assert lines[0] == "MAILTO=ops@example.org"
    assert len(lines) == 2 and lines[1].startswith("0 3 * * * ")
    assert "installed in the crontab" in capsys.readouterr().out


def test_install_writes_systemd_user_units(tmp_path, make_workflow, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    wf = make_workflow(tmp_path / "in")
    assert main(["schedule", str(wf), "--at", "@daily", "--systemd", "--install"]) == 0
    units = sorted((tmp_path / "config" / "systemd" / "user").iterdir())
    assert [u.suffix for u in units] == [".service", ".timer"]
    assert units[0].stem.startswith("tilepipe-test-")
    assert "OnCalendar=*-*-* 00:00:00" in units[1].read_text()
    assert f"Unit={units[0].name}" in units[1].read_text()
    assert "systemctl --user enable --now" in capsys.readouterr().out
