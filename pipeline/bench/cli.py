"""``tilepipe bench``'s command line, and ``python -m pipeline.bench``, which also runs the child
measurements of :mod:`pipeline.bench.runs`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.bench.measure import run_bench, run_host_only
from pipeline.bench.options import BenchOptions, quick_options
from pipeline.bench.report import format_host_table, format_table
from pipeline.bench.rss import own_peak_rss
from pipeline.bench.runs import child_compile, child_e2e
from pipeline.bench.scene import SCENE_COMPRESSIONS


def _arch(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(v) for v in text.split(","))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError("--arch is depth,width,bands,classes, e.g. 4,32,4,8")
    return parts  # type: ignore[return-value]


def batch_size(text: str) -> int | str:
    """A --batch value (argparse type): a positive integer or auto."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("--batch is a positive integer or auto")
    return int(text)


def block_side(text: str) -> int:
    """A --block value (argparse type): a GeoTIFF's tile side, a positive multiple of 16."""
    if not text.isdigit() or int(text) < 16 or int(text) % 16:
        raise argparse.ArgumentTypeError("--block is a positive multiple of 16 (a GeoTIFF's tile side), e.g. 512")
    return int(text)


def positive(text: str) -> int:
    """A --compile-rounds value (argparse type): a whole number, at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("a whole number, at least 1")
    return int(text)


def count_or_auto(text: str) -> int | str:
    """A --readers, --finishers, --halo or --output-level value (argparse type): a whole number, 0
    included, or auto."""
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError("a whole number (0 included) or auto")
    return int(text)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``tilepipe`` sub-command parsers."""
    p = subparsers.add_parser("bench", help="measure model and end-to-end throughput on this machine")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="checkpoint to benchmark (default: a random U-Net of --arch)")
    src.add_argument("--arch", type=_arch, help="depth,width,bands,classes (default 4,32,4,8; --quick: 2,8,4,3)")
    p.add_argument("--size", type=int, help="side of the generated scene in pixels (default 4096; --quick: 512)")
    p.add_argument("--block", type=block_side, default=256,
                   help="the generated scenes' GeoTIFF blocks, pixels on a side, a multiple of 16 (default 256; "
                        "archives' COGs often have 512)")
    p.add_argument("--compress", choices=SCENE_COMPRESSIONS, default="deflate",
                   help="the generated scenes' compression (default deflate)")
    p.add_argument("--tile", type=int, help="tile side, pixels written (default 256; --quick: 64)")
    p.add_argument("--halo", type=int, help="halo, pixels on each side (default 64; --quick: 16)")
    p.add_argument("--batch", type=batch_size, help="tiles per batch, or auto (default 8; --quick: 4)")
    p.add_argument("--precision", choices=("float32", "bfloat16", "auto"), default="auto",
                   help="compute dtype (default auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--threads", type=int, help="dask threads of the end-to-end runs (default: the workflow's)")
    p.add_argument("--scenes", type=int, default=1,
                   help="end-to-end runs go through this many copies of the scene (default 1): a folder's "
                        "throughput, with more batches in flight than one scene has")
    p.add_argument("--readers", type=count_or_auto, default="auto",
                   help="reader processes of the end-to-end runs (runtime.readers; default auto: none on CPU, "
                        "one per core up to 8 per thread on GPU/TPU)")
    p.add_argument("--finishers", type=count_or_auto, default="auto",
                   help="finisher processes of the end-to-end runs (runtime.finishers; default auto: none "
                        "on CPU, a third of the cores and at least 2 on GPU/TPU)")
    p.add_argument("--output-compression", choices=("deflate", "zstd", "lzw"), default="deflate",
                   help="the end-to-end runs' COGs (output.compression; default deflate)")
    p.add_argument("--output-level", type=count_or_auto, default="auto",
                   help="and their level (output.level; default auto: GDAL's own on CPU, a cheaper one on "
                        "GPU/TPU, so give 5 for DEFLATE or 1 for ZSTD to emulate an accelerator host here)")
    p.add_argument("--host-only", action="store_true",
                   help="only the host's ceiling (the end-to-end run without the model's cost), --runs times: "
                        "an accelerator host's settings emulated on this machine's cores")
    p.add_argument("--runs", type=positive, default=3, help="host-ceiling runs of --host-only (default 3)")
    p.add_argument("--memory", action="store_true",
                   help="with --host-only, also peak memory on one scene of each of --memory-sizes at the same "
                        "settings, the model's cost taken out (the memory goal, emulated)")
    p.add_argument("--compile-rounds", type=positive,
                   help="cold and warm compile pairs, each over a cache of its own; the median counts "
                        "(default 3, 2 with --quick; 1 where each process start is dear, as on an accelerator)")
    p.add_argument("--memory-sizes", type=lambda s: tuple(int(v) for v in s.split(",")),
                   help="small,large scene sides for the peak-RSS comparison (default 2048,8192; --quick: 256,512)")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.add_argument("--torch", action="store_true", help="compare with the same U-Net in PyTorch (if installed)")
    p.add_argument("--quick", action="store_true", help="tiny model and scene: a smoke test in seconds")
    p.add_argument("--workdir", type=Path, help="keep generated files here (default: a temporary directory)")
    p.set_defaults(func=main_bench)
    return p


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The bench's options from its command line; a combination that cannot run is a
    :class:`~pipeline.errors.WorkflowError` that names the option."""
    from pipeline.errors import WorkflowError
    from pipeline.outputs import Compression

    if args.output_level != "auto":
        try:
            Compression(args.output_compression, args.output_level)
        except ValueError as exc:
            raise WorkflowError(f"--output-level: {exc}") from None
    if args.host_only and args.batch == "auto":
        raise WorkflowError("--host-only needs a fixed --batch (auto probes the model)")
    if args.memory and not args.host_only:
        raise WorkflowError("--memory goes with --host-only (a whole bench measures memory anyway)")
    common = dict(model=args.model, precision=args.precision, threads=args.threads, scenes=args.scenes,
                  block=args.block, compress=args.compress,
                  readers=args.readers, finishers=args.finishers, output_compression=args.output_compression,
                  output_level=args.output_level,
                  torch=args.torch, workdir=args.workdir, host_only=args.host_only, host_runs=args.runs,
                  host_memory=args.memory)
    given = dict(compile_rounds=args.compile_rounds, arch=args.arch, size=args.size, tile=args.tile,
                 halo=args.halo, batch=args.batch, memory_sizes=args.memory_sizes)
    common.update((name, value) for name, value in given.items() if value is not None)  # the rest: quick's or the defaults
    return quick_options(**common) if args.quick else BenchOptions(**common)


def main_bench(args: argparse.Namespace) -> int:
    """``tilepipe bench``: run, print the table, optionally write the JSON."""
    opts, echo = options_from_args(args), (lambda line: print(line, file=sys.stderr))
    report = run_host_only(opts, echo) if opts.host_only else run_bench(opts, echo)
    print(format_host_table(report) if opts.host_only else format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.bench`` runs the bench, or one of its child measurements."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["compile"], ["e2e"]):
        a = argv[1:]
        if argv[0] == "compile":
            result = child_compile(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), a[5])
        else:
            result = child_e2e(a[0], model="--no-model" not in a[1:])
        print(json.dumps({**result, "own_peak_rss": own_peak_rss()}))
        return 0
    parser = argparse.ArgumentParser(prog="tilepipe")
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv if argv[:1] == ["bench"] else ["bench", *argv])
    return ns.func(ns)
