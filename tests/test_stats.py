"""flexgen_long.stats against published values and against the definitions solved numerically.

Published: the worked examples of Newcombe (1998), "Two-sided confidence intervals for the single proportion:
comparison of seven methods", Statistics in Medicine 17:857-872, method 3 (Wilson score, no continuity correction); and
of Newcombe (1998), "Interval estimation for the difference between independent proportions: comparison of eleven
methods", Statistics in Medicine 17:873-890, method 10 (hybrid score). Both print 4 decimals."""

import math

import pytest

from flexgen_long.stats import Z95, difference_interval, format_rate, wilson_interval


@pytest.mark.parametrize("k, n, low, high", [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombe_1998(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert (round(lo, 4), round(hi, 4)) == (low, high)


@pytest.mark.parametrize("k1, n1, k2, n2, low, high", [
    (56, 70, 48, 80, 0.0524, 0.3339),
    (9, 10, 3, 10, 0.1705, 0.8090),
    (5, 56, 0, 29, -0.0381, 0.1926),
    (0, 10, 0, 20, -0.1611, 0.2775),
    (10, 10, 0, 20, 0.6791, 1.0000),
])
def test_difference_matches_newcombe_1998(k1, n1, k2, n2, low, high):
    lo, hi = difference_interval(k1, n1, k2, n2)
    assert (round(lo, 4), round(hi, 4)) == (low, high)


def _score_test_bounds(k, n, z=Z95):
    """The Wilson interval by its definition: the p in [0, 1] where |k/n - p| = z sqrt(p (1 - p) / n), found by
    bisection on each side of k/n."""
    phat = k / n

    def f(p):
        return abs(phat - p) - z * math.sqrt(p * (1 - p) / n)

    def solve(a, b):  # f(a) > 0 >= f(b) or the reverse; 200 halvings
        for _ in range(200):
            m = (a + b) / 2
            if (f(m) > 0) == (f(a) > 0):
                a = m
            else:
                b = m
        return (a + b) / 2

    low = 0.0 if k == 0 else solve(0.0, phat)
    high = 1.0 if k == n else solve(1.0, phat)
    return low, high


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (0, 100), (55, 100), (60, 100), (100, 100), (3, 7), (199, 200)])
def test_wilson_is_the_score_test_inversion(k, n):
    assert wilson_interval(k, n) == pytest.approx(_score_test_bounds(k, n), abs=1e-12)


def test_bad_counts_and_the_printed_form():
    for args in ((5, 4), (-1, 4), (1, 0), (1.0, 4), (True, 4)):
        with pytest.raises(ValueError, match="successes"):
            wilson_interval(*args)
    assert format_rate(55, 100) == "0.55 [0.45, 0.64]"
    assert format_rate(0, 20) == "0.00 [0.00, 0.16]"
