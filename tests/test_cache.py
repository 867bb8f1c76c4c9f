"""flexgen_long.cache: slot layouts against a brute-force reference (which positions a later query may still need),
the memory plan against what is allocated, and the fail-before-allocation check."""

import pytest
import torch

from flexgen_long.cache import (PREFILL_SLACK_BYTES, LayerCache, ModelCache, check_fits, choose_prefill_chunk,
                                plan_cache, prefill_activation_bytes)
from flexgen_long.models import longgen_llama, longgen_llama2_7b, longgen_llama3_1_8b, longgen_tiny
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
    assert c.slots == pattern.bind_heads(H).cache_slots(max_len)
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
    from flexgen_long.engine import Engine
    from flexgen_long.policy import Policy
    torch.manual_seed(0)
    model = {"tiny": lambda: longgen_tiny(vocab_size=259),
             "gqa": lambda: longgen_llama(300, 3, 8, 2, 128, 352, 4096, sparse_pattern=BlockSparse(64, 2, 4, True)),
             "mha": lambda: longgen_llama(300, 3, 4, 4, 64, 200, 4096, sparse_pattern=AttnSink(16, 240))}[name]()
    engine = Engine(model.eval(), Policy(prefill_chunk=chunk))
    engine.reserve(1, prompt_len + 8)
    prompt = torch.randint(0, 259, (prompt_len,))
    measured = _cpu_peak_bytes(lambda: engine.prefill(prompt, 0))
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


# ---- a sparse layer's later prefill chunk: the BlockMask over [cache slots ; chunk] ----------------------------------

# AttnSink(16, 240) is LongGen's AttnSink(128, 1920) scaled down 8x (block-aligned sink, with mask blocks of 16);
# AttnSink(4, 60) and AttnSink(3, 45) have sinks and windows that cut blocks.
CHUNK_PATTERNS = [AttnSink(4, 60), AttnSink(16, 240), AttnSink(3, 45), BlockSparse(16, 2, 3),
                  BlockSparse(16, 2, 3, per_head=True), BlockSparse(32, 1, 4, per_head=True)]
# (offset, chunk): the ring not yet full, just full and wrapped many times; block-multiples and not
CHUNK_GEOMETRY = [(1, 37), (45, 23), (77, 64), (301, 37), (555, 16), (640, 1)]


def _filled(pattern, kv_heads, o, chunk, max_len):
    """A cache row after a chunked prefill of positions 0..o-1 (K/V zeros: only the positions matter here)."""
    c = LayerCache(pattern, 1, kv_heads, 2, max_len, torch.float32, "cpu")
    for s in range(0, o, chunk):
        m = min(chunk, o - s)
        c.write_prefill(0, torch.zeros(1, kv_heads, m, 2), torch.zeros(1, kv_heads, m, 2), s)
    return c


@pytest.mark.parametrize("pattern", CHUNK_PATTERNS, ids=repr)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_cached_block_mask_equals_the_slots_token_rule(pattern, heads, kv_heads):
    """build_cached_block_mask expanded to tokens (full blocks all visible, partial ones through its mask_mod) equals
    LayerCache.visible on the [slots ; chunk] layout for every real query; no visible pair lies in a block it omits,
    no full block holds an invisible pair, padding query blocks list nothing, and full blocks do occur (on the chunk's
    own keys and on slot blocks). The slots past cache_slots(o) are empty, so the prefix is all a chunk needs."""
    from torch.nn.attention.flex_attention import _transpose_ordered
    from torch.nn.functional import pad

    import reference as ref
    from flexgen_long.masks import build_cached_block_mask

    fulls = [0, 0]  # full blocks on slots, on the chunk's keys
    for o, C in CHUNK_GEOMETRY:
        c = _filled(pattern, kv_heads, o, C, o + C + 40)
        n = c.pattern.cache_slots(o)  # the slots positions 0..o-1 can occupy: a prefix of the layout
        assert n <= c.slots and (c.pos[0, :, n:] == -1).all()
        for bs, padded in [(16, None), (32, None), (16, (-(-n // 16) * 16 + 32, 128))]:
            bm = build_cached_block_mask(pattern, c.pos[0, :, :n], C, q_offset=o, num_heads=heads,
                                         num_kv_heads=kv_heads, block_size=bs, padded_lengths=padded)
            pq, K = bm.seq_lengths
            ps = K - pq
            assert ps % bs == 0 and pq % bs == 0 and ps >= n and pq >= C
            kpos = torch.cat([pad(c.pos[0, :, :n], (0, ps - n), value=-1),
                              pad(torch.arange(o, o + C, dtype=torch.int32).expand(c.pos.shape[1], C), (0, pq - C),
                                  value=-1)], dim=1)
            want = c.visible(torch.arange(o, o + C)[None], kpos[None])  # [1, Hp, C, K]
            want = want.repeat_interleave(heads // want.shape[1], 1) if want.shape[1] > 1 else want.expand(
                1, heads, C, K)
            got, full_t, part_t = (x.expand(1, heads, C, K) for x in ref.expand_block_mask(bm, C, K))
            assert torch.equal(got, want), (o, C, bs)
            assert not (want & ~(full_t | part_t)).any(), "a visible pair in an omitted block"
            assert not (full_t & ~want).any(), "an invisible pair in a full block"
            nq = -(-C // bs)
            assert (bm.kv_num_blocks[..., nq:] == 0).all() and (bm.full_kv_num_blocks[..., nq:] == 0).all()
            for num, idx, qnum, qidx in [(bm.kv_num_blocks, bm.kv_indices, bm.q_num_blocks, bm.q_indices),
                                         (bm.full_kv_num_blocks, bm.full_kv_indices, bm.full_q_num_blocks,
                                          bm.full_q_indices)]:  # the key-major view, as torch would derive it
                tnum, tidx = _transpose_ordered(num, idx)
                listed = torch.arange(tidx.shape[-1]) < tnum[..., None]
                assert torch.equal(qnum, tnum) and torch.equal(qidx[listed], tidx[listed])
            listed = torch.arange(bm.full_kv_indices.shape[-1]) < bm.full_kv_num_blocks[..., None]
            full_cols = bm.full_kv_indices[listed]
            fulls[0] += int((full_cols < ps // bs).sum())
            fulls[1] += int((full_cols >= ps // bs).sum())
    assert fulls[0] > 0 and fulls[1] > 0


def test_cached_block_mask_bad_arguments():
    from flexgen_long.masks import build_cached_block_mask

    pos = torch.zeros(1, 10, dtype=torch.int32)
    p = BlockSparse(16, 2, 3, per_head=True)
    with pytest.raises(ValueError, match=r"slot_pos must be an int32 tensor \[2, slots\]"):
        build_cached_block_mask(p, pos, 5, q_offset=10, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="slot_pos must be an int32"):
        build_cached_block_mask(AttnSink(1, 4), pos.long(), 5, q_offset=10)
    with pytest.raises(ValueError, match="padded slot length"):
        build_cached_block_mask(AttnSink(1, 4), pos, 5, q_offset=10, block_size=16, padded_lengths=(8, 16))
    with pytest.raises(ValueError, match="padded chunk length"):
        build_cached_block_mask(AttnSink(1, 4), pos, 17, q_offset=10, block_size=16, padded_lengths=(16, 16))
    with pytest.raises(ValueError, match="q_offset"):
        build_cached_block_mask(AttnSink(1, 4), pos, 5, q_offset=-1)


def test_serving_capacity_is_the_largest_batch_that_fits():
    """serving_capacity's batch fits the budget and one more row does not; the hybrid 8B at 128K holds more rows than
    the dense one (its trimmed caches); a budget below the weights gives 0; bad arguments name the field."""
    from flexgen_long.cache import decode_activation_bytes, serving_capacity
    GiB = 2**30
    with torch.device("meta"):
        hyb = longgen_llama3_1_8b(max_seq_len=131072 + 128)
        dense = longgen_llama3_1_8b(max_seq_len=131072 + 128, full_layers="all")
    weights = sum(t.numel() for t in (*hyb.parameters(), *hyb.buffers())) * 2  # bf16 weights and RoPE table
    for model in (hyb, dense):
        r = serving_capacity(model, 131072, 128, 79 * GiB)
        b = r["batch"]
        assert b >= 1 and r["total_bytes"] <= 79 * GiB and r["weights_bytes"] == weights

        def need(n):
            return weights + plan_cache(model, n, 131072 + 128).total_bytes + max(
                r["prefill_activation_bytes"], decode_activation_bytes(model, n, 131072 + 128))
        assert need(b) == r["total_bytes"] <= 79 * GiB < need(b + 1)
    assert serving_capacity(hyb, 131072, 128, 79 * GiB)["batch"] >= 2.5 * serving_capacity(
        dense, 131072, 128, 79 * GiB)["batch"]
    assert serving_capacity(hyb, 131072, 128, weights // 2)["batch"] == 0
    with pytest.raises(ValueError, match="budget_bytes must be an int >= 1"):
        serving_capacity(hyb, 131072, 128, 0)
    with pytest.raises(ValueError, match="prefill_chunk must be an int >= 1"):
        serving_capacity(hyb, 131072, 128, GiB, prefill_chunk=0)
