"""What one bench run measures (:class:`BenchOptions`), and the keys every report has."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

CPU_FEATURES = frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"})
"""The host CPU's features the report names: those that decide the convolution library
(:func:`unet_flax.xla_flags.convolutions_flag`) and whether it has bfloat16 units."""


SCHEMA_KEYS = (
    "device", "model", "tiling", "batch", "matmul", "model_only", "scene", "end_to_end", "memory", "compile",
    "precision", "halo", "torch", "targets",
)


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What one bench run measures; :func:`quick_options` is the seconds-long variant."""

    model: Path | None = None
    arch: tuple[int, int, int, int] = (4, 32, 4, 8)  # depth, base width, bands, classes
    size: int = 4096
    tile: int = 256
    halo: int = 64
    batch: int | str = 8
    precision: str = "auto"  # bfloat16 on accelerators, float32 on CPU
    threads: int | None = None  # dask threads of the end-to-end runs; None: the workflow default
    scenes: int = 1  # copies of the scene the end-to-end runs go through (a night's folder, not one file)
    block: int = 256  # the generated scenes' blocks (tiles of the GeoTIFF), pixels on a side
    compress: str = "deflate"  # and their compression (SCENE_COMPRESSIONS)
    readers: int | str = "auto"  # runtime.readers of the end-to-end runs
    finishers: int | str = "auto"  # runtime.finishers of the end-to-end runs
    output_compression: str = "deflate"  # output.compression of the end-to-end runs
    output_level: int | str = "auto"  # and output.level
    torch: bool = False
    memory_sizes: tuple[int, int] = (2048, 8192)
    memory_arch: tuple[int, int, int, int] | None = None  # None: (depth, 4, bands, classes) of the model
    min_seconds: float = 3.0  # per timed measurement
    compile_rounds: int = 3  # cold and warm compile pairs, each over a cache of its own
    host_only: bool = False  # only the host's ceiling, host_runs times (run_host_only)
    host_runs: int = 3
    host_memory: bool = False  # and, with host_only, peak memory at memory_sizes without the model's cost
    workdir: Path | None = None
    quick: bool = False


def quick_options(**overrides: Any) -> BenchOptions:
    """A tiny model and scene: every field of the report, in well under a minute."""
    base = dict(arch=(2, 8, 4, 3), size=512, tile=64, halo=16, batch=4, memory_sizes=(256, 512),
                memory_arch=(2, 4, 4, 3), min_seconds=0.2, compile_rounds=2, quick=True)
    base.update(overrides)
    return BenchOptions(**base)
