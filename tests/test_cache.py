"""flexgen_long.cache: slot layouts against a brute-force reference (which positions a later query may still need),
the memory plan against what is allocated, and the fail-before-allocation check."""

import pytest
import torch

from flexgen_long.cache import (PREFILL_SLACK_BYTES, LayerCache, ModelCache, cache_slots, check_fits,
                                choose_prefill_chunk, plan_cache, prefill_activation_bytes)
from flexgen_long.models import longgen_llama, longgen_llama2_7b, longgen_tiny
from flexgen_long.patterns import AttnSink, BlockSparse, Full

PATTERNS = [Full(), AttnSink(3, 10), AttnSink(0, 7), BlockSparse(16, 2, 3, per_head=True),
            BlockSparse(16, 3, 4, per_head=False), BlockSparse(16, 2, 1)]


def _needed(pattern, written: int, max_len: int, h: int) -> set[int]:
    """Positions < written that some query in [written - 1, max_len) may see (the token rule, brute force)."""
    q = torch.arange(max(written - 1, 0), max_len)[:, None]
    k = torch.arange(written)[None, :]
    return set(torch.nonzero(pattern.visible(q, k, h).any(0)).flatten().tolist())


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("chunk", [1, 5, 23])
def test_slots_hold_every_needed_key(pattern, chunk):
    """After writing 0..n-1 in chunks (prefill) or one at a time (decode), every key a later query may see is in a slot,
    with its own K/V (each key's values encode its position), however often the ring wrapped or blocks were dropped."""
    H, D, max_len = 2, 4, 150
    c = LayerCache(pattern, 1, H, D, max_len, torch.float32, "cpu")
    assert c.slots == cache_slots(pattern.bind_heads(H), max_len)
    kv = torch.arange(max_len, dtype=torch.float32).view(1, 1, -1, 1).expand(1, H, max_len, D) \
        + 1000 * torch.arange(H).view(1, H, 1, 1)
    n = 0
    while n < max_len:
        if chunk == 1 and n > 40:  # decode writes
            c.write_step(kv[:, :, n:n + 1], -kv[:, :, n:n + 1], torch.tensor([n]))
            n += 1
        else:
            m = min(chunk, max_len - n)
            c.write_prefill(0, kv[:, :, n:n + m], -kv[:, :, n:n + m], n)
            n += m
        pat = c.pattern
        for h in range(H):
            hp = h if c.pos.shape[1] > 1 else 0
            held = {int(p): s for s, p in enumerate(c.pos[0, hp].tolist()) if p >= 0}
            need = _needed(pat, n, max_len, h)
            assert need <= set(held), (n, h, sorted(need - set(held)))
            for p in need:
                assert c.k[0, h, held[p], 0] == p + 1000 * h and c.v[0, h, held[p], 0] == -(p + 1000 * h)


def test_ring_is_exactly_the_window_when_full():
    c = LayerCache(AttnSink(2, 5), 1, 1, 1, 100, torch.float32, "cpu")
    for t in range(40):
        c.write_step(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([t]))
    assert sorted(c.pos[0, 0].tolist()) == [0, 1, 35, 36, 37, 38, 39]
    assert c.slots == 7


def test_stride_store_size_and_drop():
    """BlockSparse(block 16, 2 local, stride 4) over 256 tokens: 2 local blocks + 4 on-stride blocks per head."""
    p = BlockSparse(16, 2, 4, per_head=True)
    c = LayerCache(p, 1, 2, 1, 256, torch.float32, "cpu")
    assert c.slots == (2 + 4) * 16
    x = torch.zeros(1, 2, 256, 1)
    c.write_prefill(0, x, x, 0)
    for h in range(2):
        blocks = sorted({q // 16 for q in c.pos[0, h].tolist() if q >= 0})
        shift = h * (4 // 2)
        assert blocks == sorted({kb for kb in range(16) if (kb + shift) % 4 == 0} | {14, 15})


@pytest.mark.parametrize("pattern", [AttnSink(4, 60), BlockSparse(16, 2, 3, per_head=True)], ids=repr)
def test_planned_bytes_equal_allocated(pattern):
    m = longgen_llama(64, 4, 4, 2, 32, 64, 512, sparse_pattern=pattern)
    for dtype in (torch.float32, torch.bfloat16):
        plan = plan_cache(m, 3, 300, dtype)
        cache = ModelCache(m, 3, 300, dtype, "cpu")
        assert plan.total_bytes == cache.nbytes
        assert [lp.bytes for lp in plan.layers] == [c.nbytes for c in cache.layers.values()]
        assert "total" in str(plan)


def test_plan_of_llama2_7b_at_128k_on_meta():
    """The plan needs no memory: the 7B model on the meta device. 11 full layers of 32, AttnSink(64, 1984) elsewhere:
    KV (k + v) 64.6% below the all-full model."""
    with torch.device("meta"):
        hyb = longgen_llama2_7b(max_seq_len=131072)
        dense = longgen_llama2_7b(max_seq_len=131072, full_layers="all")
    kv = lambda plan: sum(lp.bytes - lp.slots * 4 for lp in plan.layers)  # noqa: E731  (minus the pos index)
    h, d = kv(plan_cache(hyb, 1, 131072)), kv(plan_cache(dense, 1, 131072))
    assert d == 32 * 131072 * 2 * 4096 * 2  # 64 GiB
    assert h == 11 * 131072 * 2 * 4096 * 2 + 21 * 2048 * 2 * 4096 * 2
    assert 1 - h / d > 0.63


def test_request_that_cannot_fit_fails_before_allocation():
    with torch.device("meta"):
        m = longgen_llama2_7b(max_seq_len=1 << 20, full_layers="all")
    plan = plan_cache(m, 64, 1 << 20)  # 32 TiB
    with pytest.raises(MemoryError, match=r"KV caches need \d+ bytes .* only \d+ bytes .* free"):
        check_fits(plan, "cpu")
    with pytest.raises(MemoryError, match="free"):
        ModelCache(m, 64, 1 << 20, torch.bfloat16, "cpu")  # raises before allocating 32 TiB


@pytest.mark.parametrize("kw, msg", [(dict(batch_size=0), "batch_size"), (dict(max_len=-1), "max_len"),
                                     (dict(dtype="bf16"), "dtype")])
def test_plan_bad_arguments(kw, msg):
    m = longgen_llama(64, 2, 2, 2, 16, 32, 64)
    args = dict(batch_size=1, max_len=16, dtype=torch.float32) | kw
    with pytest.raises(ValueError, match=msg):
        plan_cache(m, **args)


def _cpu_peak_bytes(fn) -> int:
    """Peak bytes the CPU allocator held during ``fn()`` beyond what it held before (the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("name, prompt_len, chunk", [("tiny", 1000, None), ("tiny", 1000, 384), ("gqa", 1000, 128),
                                                     ("gqa", 3000, None), ("mha", 2000, 512), ("mha", 3000, 1024)])
def test_prefill_activation_estimate_bounds_the_measured_peak(name, prompt_len, chunk):
    """The estimate (before its fixed slack) is at least the CPU allocator's peak during a real prefill, whole or in
    chunks, full and sparse layers (dense masks, later chunks over cached slots, lower-right full chunks), and not
    absurdly above it."""
    from flexgen_long.generation import prefill
    torch.manual_seed(0)
    model = {"tiny": lambda: longgen_tiny(vocab_size=259),
             "gqa": lambda: longgen_llama(300, 3, 8, 2, 128, 352, 4096, sparse_pattern=BlockSparse(64, 2, 4, True)),
             "mha": lambda: longgen_llama(300, 3, 4, 4, 64, 200, 4096, sparse_pattern=AttnSink(16, 240))}[name]()
    cache = ModelCache(model.eval(), 1, prompt_len + 8, torch.float32, "cpu")
    prompt = torch.randint(0, 259, (prompt_len,))
    with torch.inference_mode():
        measured = _cpu_peak_bytes(lambda: prefill(model, cache, prompt, 0, chunk))
    est = prefill_activation_bytes(model, chunk or prompt_len, torch.float32, prompt_len, prompt_len + 8, "cpu")
    assert measured <= est - PREFILL_SLACK_BYTES <= 6 * measured


def test_choose_prefill_chunk_whole_chunked_or_memory_error():
    with torch.device("meta"):
        m = longgen_llama2_7b(max_seq_len=131072)
    P, GiB = 131072, 2**30
    assert choose_prefill_chunk(m, P, 100 * GiB, torch.bfloat16, device="cuda") is None  # ample: whole prompt
    for free in (20 * GiB, 8 * GiB, 4 * GiB):
        c = choose_prefill_chunk(m, P, free, torch.bfloat16, device="cuda")
        assert c is not None and c % 128 == 0 and 128 <= c < P
        assert prefill_activation_bytes(m, c, torch.bfloat16, P, device="cuda") <= free  # it fits ...
        assert prefill_activation_bytes(m, c + 128, torch.bfloat16, P, device="cuda") > free  # ... and is the largest
    assert choose_prefill_chunk(m, P, 8 * GiB, torch.bfloat16, device="cuda") < \
        choose_prefill_chunk(m, P, 20 * GiB, torch.bfloat16, device="cuda")
    with pytest.raises(MemoryError, match=r"131072-token prompt does not fit: .* \d+ bytes .* in chunks of 128 tokens, "
                                          r"but only 2147483648 bytes \(2.00 GiB\) are free after the KV caches"):
        choose_prefill_chunk(m, P, 2 * GiB, torch.bfloat16, device="cuda")
    with pytest.raises(MemoryError, match="100-token prompt does not fit"):  # a prompt of <= 128 tokens: whole or none
        choose_prefill_chunk(m, 100, 1, torch.bfloat16)
    with pytest.raises(ValueError, match="prompt_len must be an int >= 1"):
        choose_prefill_chunk(m, 0, GiB)
