"""flexgen_long.generation.sample against the distribution it must draw from, worked out here by hand: softmax of the
logits over the temperature, restricted to the k most likely ids (the k-th included) and / or to the smallest set
of most likely ids whose probability reaches top_p. Many draws at once (one row per draw), compared with the
expected frequencies within 5 standard errors; ids outside the allowed set must never be drawn."""

import math

import pytest
import torch

from flexgen_long.generation import sample

LOGITS = torch.tensor([0.6, -0.5, 2.0, 0.0, 1.5, -1.5, 1.0, 0.3])  # distinct (the top-k set is unambiguous), unsorted
DRAWS = 40_000


def expected(logits: list[float], temperature: float, top_k: int | None = None, top_p: float | None = None):
    """The target distribution, from its definition (plain Python, no torch)."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    allowed = set(order[:top_k] if top_k is not None else order)
    scaled = {i: math.exp(logits[i] / temperature) for i in allowed}
    total = sum(scaled.values())
    probs = {i: v / total for i, v in scaled.items()}
    if top_p is not None:
        kept, mass = set(), 0.0
        for i in sorted(probs, key=lambda i: -probs[i]):
            if mass >= top_p:  # the mass of the ids before this one already reaches top_p
                break
            kept.add(i)
            mass += probs[i]
        total = sum(probs[i] for i in kept)
        probs = {i: probs[i] / total for i in kept}
    return [probs.get(i, 0.0) for i in range(len(logits))]


def draw(temperature, top_k=None, top_p=None, seed=0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    ids = sample(LOGITS.expand(DRAWS, -1), temperature, top_k, top_p, generator=g)
    assert ids.shape == (DRAWS,) and ids.dtype == torch.int64
    return (torch.bincount(ids, minlength=len(LOGITS)).double() / DRAWS).tolist()


def assert_matches(freq, want):
    for i, (f, p) in enumerate(zip(freq, want)):
        if p == 0:
            assert f == 0, f"id {i} is outside the allowed set but was drawn ({f:.4f})"
        else:
            se = math.sqrt(p * (1 - p) / DRAWS)
            assert abs(f - p) <= 5 * se + 1e-12, f"id {i}: drawn {f:.4f}, expected {p:.4f} (se {se:.4f})"


@pytest.mark.parametrize("temperature", [0.25, 0.7, 1.0, 1.6, 4.0])
def test_temperature_scales_the_logits(temperature):
    assert_matches(draw(temperature), expected(LOGITS.tolist(), temperature))


def test_temperature_changes_the_distribution():
    """A sampler that ignored the temperature would draw the same frequencies at 0.5 and 2.0."""
    cold, hot = draw(0.5), draw(2.0)
    assert cold[2] > expected(LOGITS.tolist(), 1.0)[2] + 0.1 > hot[2] + 0.2


@pytest.mark.parametrize("top_k", [1, 2, 3, 7, 8, 50])
def test_top_k_keeps_exactly_the_k_most_likely_ids(top_k):
    freq = draw(1.0, top_k=top_k)
    assert_matches(freq, expected(LOGITS.tolist(), 1.0, top_k=top_k))
    assert sum(f > 0 for f in freq) == min(top_k, len(LOGITS))  # the k-th id is drawn too, the (k+1)-th never


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.95, 1.0])
def test_top_p_keeps_the_smallest_set_that_reaches_p(top_p):
    assert_matches(draw(1.0, top_p=top_p), expected(LOGITS.tolist(), 1.0, top_p=top_p))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 4, 0.9), (2.0, 5, 0.6), (1.3, 3, 1.0)])
def test_temperature_top_k_and_top_p_together(temperature, top_k, top_p):
    assert_matches(draw(temperature, top_k, top_p), expected(LOGITS.tolist(), temperature, top_k, top_p))


def test_greedy_is_the_argmax_of_each_row():
    logits = torch.randn(64, 50)
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))
    assert torch.equal(sample(logits, 0.0, top_k=5, top_p=0.5), logits.argmax(-1))


def test_rows_are_sampled_from_their_own_logits():
    """Two rows of a batch with different logits: each row's draws follow its own distribution."""
    other = LOGITS.flip(0)
    g = torch.Generator().manual_seed(1)
    ids = sample(torch.stack([LOGITS, other]).repeat(DRAWS // 2, 1), 1.0, generator=g).view(-1, 2)
    for row, logits in enumerate((LOGITS, other)):
        freq = (torch.bincount(ids[:, row], minlength=len(LOGITS)).double() / ids.shape[0]).tolist()
        want = expected(logits.tolist(), 1.0)
        for f, p in zip(freq, want):
            assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / ids.shape[0])


@pytest.mark.parametrize("top_p,kept", [(0.5, {0}), (0.5001, {0, 1}), (0.75, {0, 1})])
def test_top_p_at_its_boundary(top_p, kept):
    """Probabilities 1/2, 1/4, 1/8, 1/8 (exact in floating point): at top_p = 0.5 the first id alone reaches it, and
    the second id is out; a hair above, the second is in; at 0.75 the first two reach it exactly."""
    logits = torch.tensor([0.0, -math.log(2), -2 * math.log(2), -2 * math.log(2)])
    g = torch.Generator().manual_seed(2)
    ids = sample(logits.expand(4000, -1), 1.0, top_p=top_p, generator=g)
    assert set(ids.tolist()) == kept
