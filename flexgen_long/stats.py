"""Confidence intervals for accuracies: an exact-match rate over n prompts is a binomial proportion.

``wilson_interval(k, n)`` is Wilson's score interval (Wilson 1927; method 3 of Newcombe 1998): the proportions p whose
score test ``|k/n - p| <= z * sqrt(p (1 - p) / n)`` does not reject. Unlike the textbook ``p +- z*sqrt(p(1-p)/n)`` it
stays inside [0, 1] and does not collapse to a point at 0/n or n/n -- where long-context accuracies often sit.

``difference_interval(k1, n1, k2, n2)`` is Newcombe's hybrid score interval for ``k1/n1 - k2/n2`` (method 10 of
Newcombe 1998, "Interval estimation for the difference between independent proportions"), built from the two Wilson
intervals. It treats the two samples as independent; when both models answered the same prompts a paired interval
would be narrower, so this one errs on the side of calling a difference not significant.
"""

from __future__ import annotations

import math

__all__ = ["Z95", "wilson_interval", "difference_interval", "format_rate"]

#: The standard normal quantile of 0.975: two-sided 95% intervals.
Z95 = 1.959963984540054


def _check(k, n) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (k, n)) or n < 1 or not 0 <= k <= n:
        raise ValueError(f"need ints 0 <= successes <= trials and trials >= 1, got successes={k!r}, trials={n!r}")


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of Wilson's score interval for ``successes / trials`` (95% at the default ``z``)."""
    _check(successes, trials)
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0/n and n/n the bound is exactly 0 or 1 (the formula gives it up to rounding)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def difference_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of Newcombe's hybrid score interval for ``k1/n1 - k2/n2`` (see the module docstring)."""
    _check(k1, n1)
    _check(k2, n2)
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def format_rate(successes: int, trials: int) -> str:
    """``"0.95 [0.89, 0.98]"``: the rate and its 95% Wilson interval, two decimals."""
    low, high = wilson_interval(successes, trials)
    return f"{successes / trials:.2f} [{low:.2f}, {high:.2f}]"
