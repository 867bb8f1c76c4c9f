"""FP8 KV caches on the GPU: flexgen_long.kv_fp8's Triton kernel at the shapes a full layer's decode step sends
(MHA and GQA, D 64 and 128, rows of different lengths in one batch, lengths around every key block, long caches),
against the float64 reference over the dequantised cache; and ``generate()`` with ``Policy(kv_cache_dtype="fp8")``
on its GPU defaults (compiled layers, CUDA graphs, flex later chunks) against the bf16 cache: short prompts, odd
lengths, ragged chunks, a mixed batch, many lengths in one process."""

from __future__ import annotations

import pytest
import torch

from flexgen_long import kv_fp8
from flexgen_long.engine import Engine
from flexgen_long.generation import generate
from flexgen_long.models import longgen_llama
from flexgen_long.patterns import AttnSink
from flexgen_long.policy import Policy
from reference import rel_err

DEV = "cuda"
FP8 = Policy(kv_cache_dtype="fp8")


@pytest.mark.parametrize("hq,hkv,D", [(32, 32, 128), (32, 8, 128), (9, 3, 64), (4, 4, 64), (8, 1, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_kernel_matches_reference(hq, hkv, D, dtype, record_property):
    S = 4099
    lengths = [1, 63, 64, 65, 1000, 4099, 2048]
    gen = torch.Generator(device=DEV).manual_seed(hq * 100 + D)
    B = len(lengths)
    q = torch.randn(B, hq, 1, D, device=DEV, generator=gen).to(dtype)
    k8, ks = kv_fp8.quantize(3 * torch.randn(B, hkv, S, D, device=DEV, generator=gen))
    v8, vs = kv_fp8.quantize(torch.randn(B, hkv, S, D, device=DEV, generator=gen))
    L = torch.tensor(lengths, device=DEV, dtype=torch.int32)
    out = kv_fp8.decode_attention(q, k8, ks, v8, vs, L)
    ref = kv_fp8.decode_attention_reference(q, k8, ks, v8, vs, L, dtype=torch.float64)
    err = rel_err(out, ref)
    record_property("rel_err", err)
    assert not out.isnan().any()
    assert err < (2e-2 if dtype != torch.float32 else 1e-2)  # bf16 operands in the dots; output in q's dtype


def test_kernel_long_cache_and_splits(record_property):
    """128K slots with rows filled to different lengths; every split count from 1 to 256 gives the same output."""
    B, hq, hkv, D, S = 2, 32, 8, 128, 131072
    gen = torch.Generator(device=DEV).manual_seed(1)
    q = torch.randn(B, hq, 1, D, device=DEV, generator=gen, dtype=torch.bfloat16)
    k8, ks = kv_fp8.quantize(torch.randn(B, hkv, S, D, device=DEV, generator=gen, dtype=torch.bfloat16))
    v8, vs = kv_fp8.quantize(torch.randn(B, hkv, S, D, device=DEV, generator=gen, dtype=torch.bfloat16))
    L = torch.tensor([S, 77777], device=DEV)
    ref = kv_fp8.decode_attention_reference(q, k8, ks, v8, vs, L, dtype=torch.float64)
    errs = {n: rel_err(kv_fp8.decode_attention(q, k8, ks, v8, vs, L, num_splits=n), ref) for n in (1, 7, 64, 256)}
    record_property("rel_err_by_splits", errs)
    assert max(errs.values()) < 2e-2


def test_kernel_in_a_cuda_graph_reads_new_lengths():
    """Captured once, replayed after the lengths change in place: the replay reads the new lengths."""
    B, hq, hkv, D, S = 3, 8, 2, 128, 2048
    q = torch.randn(B, hq, 1, D, device=DEV, dtype=torch.bfloat16)
    k8, ks = kv_fp8.quantize(torch.randn(B, hkv, S, D, device=DEV))
    v8, vs = kv_fp8.quantize(torch.randn(B, hkv, S, D, device=DEV))
    L = torch.tensor([5, 100, 2048], device=DEV)
    kv_fp8.decode_attention(q, k8, ks, v8, vs, L)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = kv_fp8.decode_attention(q, k8, ks, v8, vs, L)
    for new in ([1, 2, 3], [2048, 1000, 129]):
        L.copy_(torch.tensor(new, device=DEV))
        g.replay()
        ref = kv_fp8.decode_attention_reference(q, k8, ks, v8, vs, L, dtype=torch.float64)
        assert rel_err(out, ref) < 2e-2


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    return longgen_llama(256, 4, 4, 2, 256, 512, 8192, full_layers=[1, 2],
                         sparse_pattern=AttnSink(64, 448)).to(DEV, torch.bfloat16).eval()


def test_generate_fp8_against_bf16_many_lengths(hybrid, record_property):
    """generate() on the GPU defaults (compiled layers, CUDA graphs, look-ahead) with FP8 full-layer caches: 40
    prompt lengths in one process, including 1, odd lengths, block edges and a 3000-token prompt in 1024-token
    chunks. Every call returns its tokens; the first token (the prefill's argmax over keys as stored in FP8) agrees
    with the bf16 cache's on at least 90% of the lengths (a random model has near-ties); logits are bounded below."""
    lengths = [1, 2, 3, 17, 63, 64, 65, 127, 128, 129, 255, 257, 300, 511, 513, 777, 1000, 1023, 1025, 1500]
    lengths += [2 * n + 1 for n in range(600, 620)]
    gen = torch.Generator().manual_seed(0)
    same_first = 0
    for n in lengths:
        prompt = torch.randint(0, 256, (n,), generator=gen).tolist()
        a = generate(hybrid, [prompt], max_new_tokens=4)[0].tokens
        b = generate(hybrid, [prompt], max_new_tokens=4, policy=FP8)[0].tokens
        assert len(b) == 4
        same_first += a[0] == b[0]
    record_property("first_token_equal", f"{same_first}/{len(lengths)}")
    assert same_first >= 0.9 * len(lengths)
    prompt = torch.randint(0, 256, (3000,), generator=gen).tolist()
    out = generate(hybrid, [prompt], max_new_tokens=8, policy=FP8.replace(prefill_chunk=1024))[0]
    assert len(out.tokens) == 8 and out.prefill_chunk == 1024


def test_engine_fp8_teacher_forced_logits(hybrid, record_property):
    """Prefill (in ragged chunks) and 40 decode steps with the same tokens into a bf16 and an FP8 engine (CUDA graphs
    on both): the logits' relative error stays under 5e-2 and the argmax agrees on most steps."""
    p = torch.randint(0, 256, (2345,), generator=torch.Generator().manual_seed(3), device="cpu").to(DEV)
    engines = [Engine(hybrid, Policy(prefill_chunk=1000)), Engine(hybrid, FP8.replace(prefill_chunk=1000))]
    for e in engines:
        e.reserve(2, 2400)
        e.prefill(p, 0)
        e.prefill(p[:1234], 1)  # a second row, shorter: rows at different positions in one step
    errs, agree = [], 0
    for t in range(40):
        tok = torch.randint(0, 256, (2,), generator=torch.Generator().manual_seed(t)).to(DEV)
        a, b = (e.step(tok).float() for e in engines)
        errs.append(rel_err(b, a))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    record_property("max_rel_err", max(errs))
    record_property("argmax_agree", f"{agree}/80")
    assert max(errs) < 5e-2
    assert agree >= 76
    kv = [e.cache.nbytes for e in engines]
    record_property("cache_bytes_bf16_fp8", kv)
    assert kv[1] < kv[0]
