"""The ``tilepipe`` command: thin argument parsing over functions users can import.

Exit codes:

* 0 everything succeeded (or was already up to date and skipped);
* 1 some input failed (the others completed; failed inputs are retried next run);
* 2 usage or workflow error;
* 3 another run of the same workflow holds its lock (this run did nothing);
* 130 interrupted by SIGINT, 143 by SIGTERM (128 + the signal): temporaries removed,
  the run marked ``interrupted`` in the ledger, finished outputs kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import bench
from pipeline.errors import WorkflowError
from pipeline.interrupts import Interrupted, interruptible

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3


def _workflow(args: argparse.Namespace):
    from pipeline.config import load_workflow

    overrides = list(getattr(args, "set", []))
    for flag, key in (("input", "input.dir"), ("output", "output.dir"), ("tile", "tiling.tile"),
                      ("halo", "tiling.halo"), ("batch", "tiling.batch"), ("scheduler", "dask.scheduler"),
                      ("report", "report"), ("state", "state.dir")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_workflow(args.workflow, overrides)


def _run(args: argparse.Namespace) -> int:
    from pipeline.lock import LockHeld
    from pipeline.logs import RunLog
    from pipeline.report import write_report
    from pipeline.runner import run_workflow

    wf = _workflow(args)
    log = RunLog(args.log_format)
    try:
        with interruptible():
            report = run_workflow(wf, progress=not args.no_progress and args.log_format == "text",
                                  force=args.force, log=log)
    except LockHeld as exc:
        log.error(str(exc), EXIT_LOCKED)
        return EXIT_LOCKED
    except Interrupted as exc:
        log.error(f"interrupted by {exc}; temporaries removed, finished outputs kept, the next run does the rest",
                  exc.exit_code)
        return exc.exit_code
    paths = [wf.output.dir / "tilepipe-report.json"] + ([wf.report] if wf.report else [])
    for path in paths:
        write_report(report, path)
    if args.log_format == "text":
        for record in report.files:
            if record.status == "failed":
                print(f"FAILED {record.error}", file=sys.stderr)
    log.summary(report, paths[-1])
    return report.exit_code


def _status(args: argparse.Namespace) -> int:
    from pipeline.ledger import LEDGER_NAME, run_status
    from pipeline.report import format_status

    if args.workflow is not None:
        wf = _workflow(args)
        ledger, output_dir = wf.state_dir / LEDGER_NAME, wf.output.dir
    elif args.ledger is not None:
        ledger, output_dir = args.ledger, None
    else:
        raise WorkflowError("status: give a WORKFLOW file or --ledger PATH")
    if not ledger.is_file():
        raise WorkflowError(f"status: no ledger at {ledger} (has the workflow run yet?)")
    status = run_status(ledger, output_dir, args.runs)
    if args.json:
        import json

        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return EXIT_OK


def _schedule(args: argparse.Namespace) -> int:
    from pipeline.schedule import (
        ScheduleError,
        install_crontab,
        install_systemd,
        plan_schedule,
    )

    wf = _workflow(args)
    try:
        plan = plan_schedule(wf, Path(args.workflow), args.at, log=args.log, systemd=args.systemd)
        if not args.install:
            print(plan.text())
            return EXIT_OK
        written = install_systemd(plan) if args.systemd else install_crontab(plan)
    except ScheduleError as exc:
        raise WorkflowError(str(exc)) from exc
    print(written)
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from unet_flax.train import load_train_workflow, train

    cfg = load_train_workflow(args.workflow, list(args.set))
    result = train(cfg, progress=not args.no_progress, resume=args.resume)
    print(f"checkpoint: {result.checkpoint}\nmetrics: {result.metrics}")
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.describe import describe_mask, format_description

    print(format_description(describe_mask(Path(args.path))))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilepipe", description="Land-cover maps from directories of GeoTIFFs.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a workflow over its input directory (only new work)")
    run.add_argument("workflow", type=Path)
    run.add_argument("--input", help="input directory or GDAL virtual folder (overrides input.dir)")
    run.add_argument("--output", type=Path, help="output directory (overrides output.dir)")
    run.add_argument("--tile", type=int, help="core tile size in pixels")
    run.add_argument("--halo", type=bench.count_or_auto,
                     help="context pixels on every side of a tile, or auto (the model's receptive radius)")
    run.add_argument("--batch", type=bench.batch_size, help="tiles per compiled batch, or auto")
    run.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://host:8786")
    run.add_argument("--report", type=Path, help="also write the JSON run report here")
    run.add_argument("--state", type=Path, help="ledger and lock directory (overrides state.dir)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override any workflow field (repeatable)")
    run.add_argument("--force", action="store_true", help="redo every input, even those with current outputs")
    run.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="one line per file and a summary, as text or JSON lines (json turns the bar off)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)

    status = sub.add_parser("status", help="the last runs of a workflow and what failed, from its ledger")
    status.add_argument("workflow", type=Path, nargs="?")
    status.add_argument("--ledger", type=Path, help="a ledger file, instead of a workflow's")
    status.add_argument("--state", type=Path, help="ledger and lock directory (overrides state.dir)")
    status.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    status.add_argument("--runs", type=int, default=5, help="how many runs to list (default 5)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=_status)

    schedule = sub.add_parser("schedule", help="print or install a crontab entry or systemd timer for a workflow")
    schedule.add_argument("workflow", type=Path)
    schedule.add_argument("--at", required=True, metavar="CRON",
                          help='when, as a cron expression, e.g. "0 2 * * *" (or @daily, @hourly, ...)')
    schedule.add_argument("--systemd", action="store_true", help="a systemd user service + timer, not a crontab line")
    schedule.add_argument("--install", action="store_true",
                          help="install it (crontab of this user, or ~/.config/systemd/user/)")
    schedule.add_argument("--log", type=Path, help="log file (default <state dir>/tilepipe.log)")
    schedule.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    schedule.set_defaults(func=_schedule)

    train = sub.add_parser("train", help="train a U-Net from a training workflow")
    train.add_argument("workflow", type=Path)
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    train.add_argument("--resume", type=Path, help="checkpoint to resume from")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_train)

    bench.add_parser(sub)

    inspect = sub.add_parser("inspect", help="class areas, georeferencing and provenance of a mask")
    inspect.add_argument("path")
    inspect.set_defaults(func=_inspect)
    return parser


def main(args: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(args)
    try:
        return ns.func(ns)
    except WorkflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
