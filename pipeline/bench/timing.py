"""Wall times on a shared machine (the best of several runs, and two functions taking turns), and
the matrix multiply the model's rate is measured against."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np


def square() -> Any:
    """``a @ a`` compiled, summed and returned in float32 whatever ``a``'s dtype: as the model's
    bfloat16 products are summed, and the only bfloat16 products a CPU's AMX takes."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))


def matmul_rates(n: int = 2048, min_seconds: float = 2.0, dtype: str = "float32") -> dict[str, Any]:
    """Best ``n x n @ n x n`` rates in GFLOP/s in ``dtype`` (:func:`square`): XLA's on the
    default device and, on CPU in float32, NumPy's BLAS; ``gflops`` is the faster, the
    reference the model is measured against."""
    import jax

    host = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a = jax.device_put(host).astype(dtype)
    f = square()
    f(a).block_until_ready()
    rates = {"xla_gflops": 2 * n**3 / best_time(lambda: f(a).block_until_ready(), min_seconds) / 1e9,
             "numpy_gflops": None}
    if jax.default_backend() == "cpu" and dtype == "float32":
        rates["numpy_gflops"] = 2 * n**3 / best_time(lambda: host @ host, min_seconds) / 1e9
    return {"n": n, "dtype": dtype, "gflops": max(rates["xla_gflops"], rates["numpy_gflops"] or 0.0), **rates}


def best_sample(*samples: dict[str, Any]) -> dict[str, Any]:
    """The fastest of several :func:`matmul_rates` samples, with every sample's rate."""
    best = max(samples, key=lambda r: r["gflops"])
    return {**best, "samples_gflops": [r["gflops"] for r in samples]}


def wall_times(fn: Any, min_seconds: float, min_runs: int = 3) -> list[float]:
    """Wall times of ``fn`` over at least ``min_runs`` runs and ``min_seconds``."""
    times: list[float] = []
    while len(times) < min_runs or sum(times) < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def best_time(fn: Any, min_seconds: float, min_runs: int = 3) -> float:
    """Best wall time of ``fn`` over at least ``min_runs`` runs and ``min_seconds``."""
    return min(wall_times(fn, min_seconds, min_runs))


def median_round(rounds: Sequence[Any], ratio: Any) -> Any:
    """The round whose ``ratio`` is the median (the higher of the middle two of an even count)."""
    return sorted(rounds, key=ratio)[len(rounds) // 2]


def paired_times(first: Any, second: Any, rounds: int = 6, runs: int = 2) -> tuple[list[float], list[float]]:
    """Best-of-``runs`` wall times of ``first`` and ``second`` in ``rounds`` rounds, taking turns
    at going first (AB BA AB...): the machine's slower and faster minutes, and what one leaves
    behind for the other (a library's threads still spinning), fall on both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[i].append(best_time((first, second)[i], 0.0, runs))
    return times
