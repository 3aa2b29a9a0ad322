"""Child processes beside a busy process (the worker's readers, the driver's finishers): what
they keep between tasks."""

import concurrent.futures
import multiprocessing
import resource

import numpy as np
import pytest

from pipeline import children

glibc = pytest.mark.skipif(not children.glibc(), reason="heap thresholds are glibc's")


def heap_faults(rounds: int = 4, arrays: int = 40, size: int = 2**19) -> int:
    """Page faults over ``rounds`` of making, filling and freeing ``arrays`` arrays of ``size``
    bytes, after one round to warm up: what a reader does with a batch's chunks."""

    def one_round():
        chunks = [np.ones(size, np.uint8) for _ in range(arrays)]
        del chunks

    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        one_round()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def faults_in(pool: concurrent.futures.ProcessPoolExecutor) -> int:
    with pool:
        return pool.submit(heap_faults).result()


@glibc
def test_a_child_reuses_the_heap_it_freed_instead_of_faulting_it_in_again():
    pool = children.pool("test-heap", 1)
    children.drop(pool)
    kept = faults_in(pool)
    adaptive = faults_in(concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")))
    assert kept < 100
    assert adaptive > 1000  # a fresh process with glibc's own thresholds


def huge_pages_allowed() -> bool | None:
    """Whether the kernel may give this process transparent huge pages (Linux's ``THP_enabled``;
    None where it does not say)."""
    try:
        with open("/proc/self/status") as status:
            return next(line for line in status if line.startswith("THP_enabled:")).split()[1] == "1"
    except (OSError, StopIteration):
        return None


@pytest.mark.skipif(not huge_pages_allowed(), reason="no transparent huge pages to refuse here")
def test_children_take_small_pages_whatever_the_command_asked_for():
    # the command's glibc.malloc.hugetlb=1 (for XLA's scratch) reaches every child, which runs no XLA
    pool = children.pool("test-pages", 1)
    children.drop(pool)
    plain = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    with pool, plain:
        assert pool.submit(huge_pages_allowed).result() is False
        assert plain.submit(huge_pages_allowed).result() is True  # a process left alone may have them
