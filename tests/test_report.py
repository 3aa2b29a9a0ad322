"""The run report's arithmetic: how long the model was busy."""

from hypothesis import given
from hypothesis import strategies as st

from pipeline.report import FileRecord, RunReport, busy_seconds

spans = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 10)).map(lambda s: (s[0], s[0] + s[1])), max_size=12)


@given(spans)
def test_busy_time_is_the_time_covered_by_at_least_one_span(intervals):
    covered = {t for start, end in intervals for t in range(start, end)}  # unit steps [t, t + 1)
    assert busy_seconds(intervals) == len(covered)


def test_overlapping_batches_count_once_and_idle_gaps_not_at_all():
    # two threads' batches on one device overlap from 1 to 3; nothing runs from 5 to 7
    assert busy_seconds([(7.0, 8.0), (0.0, 3.0), (1.0, 5.0)]) == 6.0
    assert busy_seconds([]) == 0.0


def report(seconds, busy):
    return RunReport("r", "wf", "2026-11-27T00:00:00+00:00", seconds, "cpu",
                     (FileRecord("a.tif", "ok", "out/a.tif", pixels=10**6),), busy)


def test_the_busy_share_averages_the_processes_that_ran_the_model():
    both = report(10.0, {"host/1": 9.0, "host/2": 5.0})
    assert both.model_busy_share == 0.7
    assert both.summary().endswith("1.00 Mpx in 10.0 s, model busy 70% of it")
    assert both.to_json()["model_busy_share"] == 0.7


def test_a_run_that_predicted_nothing_has_no_busy_share():
    idle = report(2.0, {})
    assert idle.model_busy_share is None
    assert "busy" not in idle.summary()
