"""The ``tilepipe`` command: thin argument parsing over functions users can import.

Exit codes: 0 everything succeeded, 1 some input failed (the others completed),
2 usage or workflow error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import WorkflowError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _run(args: argparse.Namespace) -> int:
    from pipeline.config import load_workflow
    from pipeline.report import write_report
    from pipeline.runner import run_workflow

    overrides = list(args.set)
    for flag, key in (("input", "input.dir"), ("output", "output.dir"), ("tile", "tiling.tile"),
                      ("halo", "tiling.halo"), ("batch", "tiling.batch"), ("scheduler", "dask.scheduler"),
                      ("report", "report")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    wf = load_workflow(args.workflow, overrides)
    report = run_workflow(wf, progress=not args.no_progress, echo=lambda line: print(line, file=sys.stderr))
    paths = [wf.output.dir / "tilepipe-report.json"] + ([wf.report] if wf.report else [])
    for path in paths:
        write_report(report, path)
    for record in report.files:
        if record.status == "failed":
            print(f"FAILED {record.error}", file=sys.stderr)
    print(f"{report.summary()}; report: {paths[-1]}")
    return report.exit_code


def _train(args: argparse.Namespace) -> int:
    from unet_flax.train import load_train_workflow, train

    cfg = load_train_workflow(args.workflow, list(args.set))
    result = train(cfg, progress=not args.no_progress, resume=args.resume)
    print(f"checkpoint: {result.checkpoint}\nmetrics: {result.metrics}")
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.outputs import describe_mask, format_description

    print(format_description(describe_mask(Path(args.path))))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilepipe", description="Land-cover maps from directories of GeoTIFFs.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a workflow over its input directory")
    run.add_argument("workflow", type=Path)
    run.add_argument("--input", type=Path, help="input directory (overrides input.dir)")
    run.add_argument("--output", type=Path, help="output directory (overrides output.dir)")
    run.add_argument("--tile", type=int, help="core tile size in pixels")
    run.add_argument("--halo", type=int, help="context pixels on every side of a tile")
    run.add_argument("--batch", type=int, help="tiles per compiled batch")
    run.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://host:8786")
    run.add_argument("--report", type=Path, help="also write the JSON run report here")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override any workflow field (repeatable)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)

    train = sub.add_parser("train", help="train a U-Net from a training workflow")
    train.add_argument("workflow", type=Path)
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    train.add_argument("--resume", type=Path, help="checkpoint to resume from")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_train)

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
