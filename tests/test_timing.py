"""flexgen_long.timing, the benchmarks' one timer: the warm-up call is never timed, repetitions follow the budget."""

import time

import pytest

from flexgen_long.timing import measure


def test_warmup_is_not_timed_and_reps_follow_the_budget():
    calls = []

    def fn():
        time.sleep(0.5 if not calls else 0.002)  # a slow first call, as a compile would be
        calls.append(1)

    r = measure(fn, "cpu", budget_ms=20, min_reps=3, max_reps=100)
    assert r["warmup_calls"] == 1 and len(calls) == 1 + r["reps"]
    assert 3 <= r["reps"] <= 10 and r["max_ms"] < 400  # each call >= 2 ms: 10 fill the budget; the 500 ms warm-up
    # is in no timing
    assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["min_ms"] >= 2
    calls.clear()
    assert measure(fn, "cpu", budget_ms=0, min_reps=5, max_reps=5)["reps"] == 5 and len(calls) == 6
    with pytest.raises(ValueError, match="warmup >= 1"):
        measure(fn, "cpu", warmup=0)
