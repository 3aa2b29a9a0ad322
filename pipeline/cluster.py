"""What a Dask cluster's workers are and what they hold: helpers for an existing cluster.

tilepipe runs on a local cluster and on one a user already runs (started by hand, by
dask-jobqueue or dask-kubernetes) through the same code path; these helpers only look.
Each function that runs on a worker lives here, in an importable module, so it pickles by
reference and the worker needs nothing but tilepipe installed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from distributed import Client


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """One worker process as the scheduler sees it."""

    address: str
    name: str
    nthreads: int
    resources: dict[str, float]
    memory_limit: int


def describe_workers(client: Client) -> list[WorkerInfo]:
    """The workers connected to ``client``'s scheduler, sorted by name.

    Asked of the scheduler each time: ``Client.scheduler_info`` returns the client's cached
    copy, which its periodic refresh (without the workers' details) can replace between the
    fetch and the return, and then connected workers were missing."""
    workers = client.sync(client.scheduler.identity, n_workers=-1)["workers"]
    infos = [WorkerInfo(address, str(w.get("name", address)), int(w.get("nthreads", 0)),
                        dict(w.get("resources") or {}), int(w.get("memory_limit") or 0))
             for address, w in workers.items()]
    return sorted(infos, key=lambda w: w.name)


def predictor_cache_stats() -> dict[str, int]:
    """This process's predictor cache: ``misses`` counts checkpoint loads and compilations."""
    from pipeline.infer import _cached_predictor

    info = _cached_predictor.cache_info()
    return {"hits": info.hits, "misses": info.misses, "loaded": info.currsize}


def predictor_cache_by_worker(client: Client) -> dict[str, dict[str, int]]:
    """:func:`predictor_cache_stats` of every worker, keyed by worker name."""
    names = {w.address: w.name for w in describe_workers(client)}
    stats: dict[str, Any] = client.run(predictor_cache_stats)
    return {names.get(address, address): value for address, value in stats.items()}


def tasks_processing(client: Client) -> dict[str, int]:
    """How many tasks each worker is processing now, keyed by worker name."""
    return client.run_on_scheduler(_tasks_processing)


def _tasks_processing(dask_scheduler: Any) -> dict[str, int]:
    return {str(ws.name): len(ws.processing) for ws in dask_scheduler.workers.values()}
