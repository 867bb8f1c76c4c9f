"""The route table (flexgen_long.routes): which kernel each (pattern, phase, device, lengths, policy) gets, that the
attention runs exactly that kernel, and that the memory plan and the warm-up follow when a route changes."""

import pytest
import torch

import flexgen_long.attention as A
from flexgen_long.cache import prefill_activation_bytes
from flexgen_long.engine import Engine
from flexgen_long.models import longgen_llama
from flexgen_long.patterns import AttnSink, BlockSparse, Full
from flexgen_long.policy import Policy
from flexgen_long.routes import MASK_BUILD_BYTES, route
from flexgen_long.shapes import BLOCK, buckets, padded_len

CPU, CUDA = Policy().on("cpu"), Policy().on("cuda")
SINK, STRIDE = AttnSink(4, 60), BlockSparse(16, 2, 3, per_head=True, num_kv_heads=2)


def kernel(pattern, phase, device, policy=None, **kw):
    return route(pattern, phase, device=device, policy=policy or Policy().on(device), **kw).kernel


def test_the_table():
    """Every row of the module docstring's table."""
    # train / first: causal SDPA for full unpacked layers anywhere; dense masks on a CPU (always with a gradient,
    # up to 2048 tokens without one); compiled flex otherwise
    for dev in ("cpu", "cuda"):
        assert kernel(Full(), "first", dev, q_len=100_000) == kernel(Full(), "train", dev, q_len=9) == "sdpa_causal"
    assert kernel(Full(), "train", "cpu", q_len=9, packed=True) == "sdpa_dense_mask"
    assert kernel(Full(), "train", "cuda", q_len=9, packed=True) == "flex"
    assert kernel(SINK, "train", "cpu", q_len=100_000) == "sdpa_dense_mask"
    assert kernel(SINK, "first", "cpu", q_len=2048) == "sdpa_dense_mask"
    assert kernel(SINK, "first", "cpu", q_len=2049) == "flex"
    assert kernel(STRIDE, "first", "cuda", q_len=5) == kernel(STRIDE, "train", "cuda", q_len=5) == "flex"
    # later chunks: flex on CUDA (over the buffer for full layers, over [slots ; chunk] for sparse ones), exact SDPA
    # on a CPU
    later = dict(q_len=300, offset=700, chunk=300, slots=1200)
    assert kernel(Full(), "later", "cuda", **later) == "flex_full_chunk"
    assert kernel(Full(), "later", "cpu", **later) == "sdpa_lower_right"
    assert kernel(SINK, "later", "cuda", **later) == "flex_over_slots"
    assert kernel(SINK, "later", "cpu", **later) == "sdpa_over_slots"
    assert kernel(SINK, "later", "cpu", Policy(chunk_flex=True).on("cpu"), **later) == "flex_over_slots"
    # decode: no mask once the cache holds exactly what the query sees (a full ring, a buffer filled to its end)
    assert kernel(SINK, "decode", "cuda", q_len=1, slots=64, lo=62) == "sdpa_masked"
    assert kernel(SINK, "decode", "cuda", q_len=1, slots=64, lo=63) == "sdpa_exact"
    assert kernel(Full(), "decode", "cpu", q_len=1, slots=500, lo=498) == "sdpa_masked"
    assert kernel(Full(), "decode", "cpu", q_len=1, slots=500, lo=499) == "sdpa_exact"
    assert kernel(STRIDE, "decode", "cuda", q_len=1, slots=160, lo=10_000) == "sdpa_masked"  # stale stride slots
    with pytest.raises(ValueError, match="phase must be one of"):
        route(SINK, "prefill", device="cpu", policy=CPU, q_len=1)


def test_compiled_shapes_are_buckets_and_a_ring_has_one():
    """Compiled routes run at bucketed shapes: a first chunk at its bucket; a later chunk at the bucket of the nominal
    chunk (the last, shorter one too) over a ring padded to sink + window at every offset, or over a stride store
    padded to the bucket of the slots in use."""
    assert route(SINK, "first", device="cuda", policy=CUDA, q_len=300).shape == (384, 384)
    for o, C in [(256, 256), (512, 256), (9984, 77)]:
        r = route(SINK, "later", device="cuda", policy=CUDA, q_len=C, offset=o, chunk=256)
        assert r.shape == (256, BLOCK + 256)  # 4 + 60 slots round up to one block
    stride = [route(STRIDE, "later", device="cuda", policy=CUDA, q_len=128, offset=o, chunk=128).shape
              for o in (128, 1024, 4096)]
    assert stride == [(128, padded_len(STRIDE.cache_slots(o)) + 128) for o in (128, 1024, 4096)]
    full = route(Full(), "later", device="cuda", policy=CUDA, q_len=100, offset=1000, chunk=256)
    assert full.shape == (256, padded_len(1100))


def test_attention_runs_the_routes_kernel_in_every_phase(monkeypatch):
    """Spies on the kernel table: a CPU generate() with chunked prefill calls, per layer and phase, exactly the kernel
    route() names for it -- and with a policy that moves a route, the moved kernel."""
    calls = []
    for name, fn in list(A.KERNELS.items()):
        monkeypatch.setitem(A.KERNELS, name, lambda at, *a, _n=name, _f=fn: calls.append(
            (at.pattern.is_full, a[3].phase if isinstance(a[3], A.KVStep) else "nocache", _n)) or _f(at, *a))
    torch.manual_seed(0)
    model = longgen_llama(97, 3, 4, 2, 32, 64, 512, full_layers=[1], sparse_pattern=AttnSink(3, 10)).eval()
    from flexgen_long.generation import generate
    with torch.compiler.set_stance("force_eager"):
        for policy, later in [(Policy(prefill_chunk=16), {"sdpa_lower_right", "sdpa_over_slots"}),
                              (Policy(prefill_chunk=16, chunk_flex=True), {"flex_full_chunk", "flex_over_slots"})]:
            calls.clear()
            generate(model, [list(range(1, 40)), [1, 2, 3, 4, 5]], max_new_tokens=20, policy=policy)
            kinds = {(full, phase): set() for full, phase, _ in calls}
            for full, phase, k in calls:
                kinds[full, phase].add(k)
            assert kinds[True, "first"] == {"sdpa_causal"} and kinds[False, "first"] == {"sdpa_dense_mask"}
            assert kinds[True, "later"] | kinds[False, "later"] == later
            assert kinds[True, "decode"] == {"sdpa_masked"}  # the buffer is filled only at its last slot
            assert kinds[False, "decode"] == {"sdpa_masked", "sdpa_exact"}  # the short row's ring fills at 13


def test_changing_a_route_moves_the_memory_plan_and_the_warmup_list():
    """One policy field that changes one route (dense_mask_max_len: a CPU's first chunks by flex instead of a dense
    mask) changes the memory estimate by exactly the two routes' difference, and the warm-up's list of compiled
    kernels from nothing to one flex graph per bucket; chunk_flex adds the later chunks' kernels."""
    torch.manual_seed(0)
    model = longgen_llama(97, 3, 4, 2, 32, 64, 4096, full_layers=[1], sparse_pattern=SINK).eval()
    n, a = 1000, 4
    dense, flexed = Policy(), Policy(dense_mask_max_len=0)
    est = {p: prefill_activation_bytes(model, n, torch.float32, device="cpu", policy=p) for p in (dense, flexed)}
    r = {p: route(SINK, "first", device="cpu", policy=p.on("cpu"), q_len=n, heads=(4, 2, 8), itemsize=a)
         for p in (dense, flexed)}
    assert r[dense].kernel == "sdpa_dense_mask" and r[dense].bytes == n * n * (MASK_BUILD_BYTES + a)
    assert r[flexed].kernel == "flex" and r[flexed].shape == (1024, 1024)
    # the sparse layers' attention dominates their peak here, so the estimate moves by the routes' difference
    assert est[dense] - est[flexed] == int((r[dense].bytes - r[flexed].bytes) * 1.5)
    with torch.compiler.set_stance("force_eager"):
        assert Engine(model, dense).warmup(n)["graphs"] == []
        w = Engine(model, flexed).warmup(n)["graphs"]
        assert w == sorted(("flex", repr(SINK), (b, b)) for b in buckets(n))
        chunked = Engine(model, Policy(prefill_chunk=256, chunk_flex=True)).warmup(n)["graphs"]
    assert {k for k, _, _ in chunked} == {"flex_full_chunk", "flex_over_slots"}  # first chunks: dense on a CPU
    assert ("flex_over_slots", repr(SINK), (256, 128 + 256)) in chunked


def test_decode_signature_follows_the_route_table():
    """The engine keys its captured decode steps by the route table's kernels: a full buffer turns exact only at its
    last slot, a ring once full."""
    torch.manual_seed(0)
    model = longgen_llama(97, 3, 4, 2, 32, 64, 512, full_layers=[1], sparse_pattern=AttnSink(3, 10)).eval()
    engine = Engine(model)
    engine.reserve(1, 40)
    assert engine.signature(5) == ("sdpa_masked", "sdpa_masked")
    assert engine.signature(12) == ("sdpa_exact", "sdpa_masked")  # the AttnSink ring (13 slots) first
    assert engine.signature(39) == ("sdpa_exact", "sdpa_exact")
