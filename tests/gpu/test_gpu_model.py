"""The model and generate() on the GPU at the shapes users send: the failures seen before the shape policy (short
prompts, a ragged last prefill chunk, many distinct prompt lengths in one process), 50+ distinct lengths through the
no-cache forward, training steps and generate(), batches of mixed lengths, and the memory plan's free-memory count.
Every case checks values: against the dense-mask path of the same model (SDPA with the token rule's bool mask), or the
no-cache forward. Prefill chunks (first and later) and training run on both flex backends, Triton and FLASH (bf16;
FLASH cases are skipped, with the reason, where flash_attn.cute does not import); the defaults take FLASH where it
imports."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import flexgen_long.flex_backend as FB
from flexgen_long import AttnSink, BlockSparse, longgen_llama, longgen_tiny
from flexgen_long.attention import MaskSet, attention_layers
from flexgen_long.cache import check_fits, free_memory_bytes, plan_cache
from flexgen_long.engine import Engine
from flexgen_long.policy import Policy
from flexgen_long.routes import route
from flexgen_long.generation import generate
from reference import rel_err
from flexgen_long.shapes import bucket_count, compiled_graphs, padded_len

DEV = "cuda"
#: eager layers (the CUDA defaults compile the prefill's and the decode step's layers)
EAGER = Policy(compile_decode=False, compile_prefill=False)
FLASH_OK, FLASH_WHY = FB.flash_status(DEV) if torch.cuda.is_available() else (False, "no CUDA")
NEEDS_FLASH = pytest.mark.skipif(not FLASH_OK, reason=f"FLASH: {FLASH_WHY}")


def prefilled(model, prompt, chunk=None, max_len=None, all_logits=False, policy=EAGER):
    """An engine whose row 0 holds ``prompt`` (a device tensor), and the prefill's logits."""
    engine = Engine(model, policy.replace(prefill_chunk=chunk))
    engine.reserve(1, max_len or prompt.shape[0])
    return engine, engine.prefill(prompt, 0, all_logits=all_logits)



def flex_graphs() -> int:
    return len(compiled_graphs("_flex"))


def sparse_chunk_graphs() -> int:
    """Compiled flex graphs of sparse layers' later prefill chunks: their mask key (Pattern.positional_mask_mod's
    graph_key, one element of the flex key) starts with "positional"."""
    return sum(1 for g in compiled_graphs("_flex")
               if any(isinstance(x, tuple) and x[:1] == ("positional",) for x in g.key[2]))


def masks_of(model, S, kind, doc_ids=None):
    attn = attention_layers(model)
    return MaskSet([a.pattern for a in attn], S, num_heads=attn[0].num_heads, num_kv_heads=attn[0].num_kv_heads,
                   device=DEV, doc_ids=doc_ids, kind=kind)


def greedy_by_forward(model, prompt, n):
    """n greedy tokens by re-running the no-cache forward on the growing sequence."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([seq], device=DEV))[0, -1].argmax())
            out.append(t)
            seq.append(t)
    return out


# ---- the failures seen before the shape policy, as tests ---------------------------------------------------------------

@pytest.fixture(scope="module")
def small_bf16():
    torch.manual_seed(0)
    return longgen_llama(256, 3, 4, 2, 512, 512, 4096).to(DEV, torch.bfloat16).eval()


@pytest.mark.parametrize("n", [100, 120, 127, 1, 65, 129])
def test_short_prompts_generate(small_bf16, n, record_property):
    """Was: NoValidChoicesError from flex's decoding lowering at 65-127 prompt tokens (AttnSink layers, bf16)."""
    prompt = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    with torch.no_grad():
        want = small_bf16(torch.tensor([prompt], device=DEV))[0, -1]
        _, got = prefilled(small_bf16, torch.tensor(prompt, device=DEV), max_len=n + 2)
    err = rel_err(got, want)
    record_property("prefill_vs_forward_rel_err", err)
    assert err < 1e-2
    out = generate(small_bf16, [prompt], max_new_tokens=2)[0].tokens
    assert out[0] == int(want.argmax())
    assert len(out) == 2


def test_short_forward_backward(small_bf16, record_property):
    """Was: the same failure in a forward + backward at 100 tokens. Gradients against the dense-mask path."""
    model = small_bf16.float().train()
    try:
        tokens = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(3)).to(DEV)
        grads = []
        for kind in ("block", "dense"):
            model.zero_grad()
            logits = model(tokens, mask=masks_of(model, 100, kind))
            F.cross_entropy(logits[:, :-1].reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        err = rel_err(grads[0], grads[1])
        record_property("grad_rel_err", err)
        assert torch.isfinite(grads[0]).all() and err < 1e-4
    finally:
        small_bf16.to(torch.bfloat16).eval()


@pytest.mark.parametrize("dtype,tail,chunk,backend", [
    (torch.bfloat16, 77, 8192, "triton"), (torch.bfloat16, 1, 8192, "triton"), (torch.bfloat16, 300, 8192, "triton"),
    (torch.float32, 1290 - 1280, 256, "triton"), pytest.param(torch.bfloat16, 77, 8192, "flash", marks=NEEDS_FLASH),
    pytest.param(torch.bfloat16, 300, 8192, "flash", marks=NEEDS_FLASH)])
def test_ragged_last_prefill_chunk(dtype, tail, chunk, backend, record_property):
    """Was: a 77-token last chunk after 8192 (bf16, head_dim 128) and a 1,290-token prompt chunked by 256 (fp32)
    failed in flex's decoding lowering. The chunked prefill's logits (first chunk and the later one by compiled flex
    on ``backend``) against the no-cache forward with dense masks."""
    torch.manual_seed(0)
    model = longgen_llama(1000, 4, 8, 2, 1024, 2048, 32768, sparse_pattern=AttnSink(4, 60)).to(DEV, dtype).eval()
    n = (8192 if chunk == 8192 else 1280) + tail
    prompt = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n), device="cpu").to(DEV)
    with torch.no_grad():
        want = model(prompt[None], mask=masks_of(model, n, "dense"))[0, -1]
        _, got = prefilled(model, prompt, chunk, n + 1, policy=EAGER.replace(flex_backend=backend))
    err = rel_err(got, want)
    record_property("prefill_vs_forward_rel_err", err)
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_served_workload_many_lengths(record_property):
    """Was: calls 5-12 of a served workload (12 prompt lengths from 3K-40K, one process, Llama-shaped bf16 layers)
    failed with FailOnRecompileLimitHit. Now every call runs, its prefill equals the no-cache forward, and the
    compiled graphs stay within one per bucket."""
    torch.manual_seed(0)
    model = longgen_llama(32000, 4, 32, 8, 4096, 11008, 65536, sparse_pattern=AttnSink(64, 1984)).to(
        DEV, torch.bfloat16).eval()
    lengths = sorted(random.Random(7).sample(range(3000, 40000), 12))
    before, worst = flex_graphs(), 0.0
    for n in lengths:
        prompt = torch.randint(0, 32000, (n,), generator=torch.Generator().manual_seed(n)).to(DEV)
        with torch.no_grad():
            want = model(prompt[None])[0, -1]
            engine, got = prefilled(model, prompt, max_len=n + 4)
            del engine
        worst = max(worst, rel_err(got, want))
        out = generate(model, [prompt.tolist()], max_new_tokens=4)[0]
        assert out.tokens[0] == int(got.argmax()) and len(out.tokens) == 4
    graphs = flex_graphs() - before
    record_property("prefill_vs_forward_max_rel_err", worst)
    record_property("compiled_graphs", graphs)
    record_property("lengths", lengths)
    assert worst < 1e-3  # the same kernels on the same shapes: equal up to nondeterminism
    assert graphs <= bucket_count(max(lengths))


# ---- 50+ distinct lengths in one process ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return longgen_tiny(max_seq_len=2048).to(DEV).eval()  # fp32; layer 1 full, the others AttnSink(4, 60)


def test_forward_60_lengths(tiny, record_property):
    lengths = sorted(random.Random(1).sample(range(1, 700), 56) + [127, 128, 129, 255])
    before, worst = flex_graphs(), 0.0
    with torch.no_grad():
        for S in lengths:
            tokens = torch.randint(0, 256, (1, S), generator=torch.Generator().manual_seed(S)).to(DEV)
            got = tiny(tokens)
            want = tiny(tokens, mask=masks_of(tiny, S, "dense"))
            worst = max(worst, rel_err(got, want))
    graphs = flex_graphs() - before
    record_property("max_rel_err", worst)
    record_property("compiled_graphs", graphs)
    assert worst < 1e-4
    assert graphs <= bucket_count(max(lengths))


def test_training_steps_50_lengths(tiny, record_property):
    """50 optimizer steps, each at a new length (packed documents in every other step): the compiled path's gradients
    against the dense-mask path's, then an SGD step on the compiled path's gradients."""
    model = longgen_tiny(max_seq_len=2048).to(DEV)
    model.load_state_dict(tiny.state_dict())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    lengths = sorted(random.Random(2).sample(range(2, 257), 50))
    before, worst = flex_graphs(), 0.0
    for i, S in enumerate(lengths):
        tokens = torch.randint(0, 256, (2, S), generator=torch.Generator().manual_seed(S)).to(DEV)
        doc = (torch.arange(S, device=DEV) * 3 // S).expand(2, S) if i % 2 else None
        grads = []
        for kind in ("dense", "block"):
            opt.zero_grad()
            logits = model(tokens, mask=masks_of(model, S, kind, doc))
            F.cross_entropy(logits[:, :-1].reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert torch.isfinite(grads[1]).all()
        worst = max(worst, rel_err(grads[1], grads[0]))
        opt.step()
    graphs = flex_graphs() - before
    record_property("grad_max_rel_err", worst)
    record_property("compiled_graphs", graphs)
    assert worst < 1e-4
    assert graphs <= 3 * bucket_count(max(lengths))  # per bucket: AttnSink, AttnSink packed, Full packed


def test_generate_55_lengths_and_every_tail(tiny, record_property):
    lengths = sorted(random.Random(3).sample(range(1, 600), 51) + [127, 128, 129, 256])
    worst, tails = 0.0, set()
    for i, n in enumerate(lengths):
        prompt = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(5000 + n)).tolist()
        chunk = 128 if i % 2 else None
        tails.add(n % 128 if chunk else None)
        with torch.no_grad():
            want = tiny(torch.tensor([prompt], device=DEV))[0, -1]
            _, got = prefilled(tiny, torch.tensor(prompt, device=DEV), chunk, n + 3)
        worst = max(worst, rel_err(got, want))
        out = generate(tiny, [prompt], max_new_tokens=3, policy=Policy(prefill_chunk=chunk))[0].tokens
        assert out == greedy_by_forward(tiny, prompt, 3), f"n={n} chunk={chunk}"
    record_property("prefill_vs_forward_max_rel_err", worst)
    assert worst < 1e-4 and len(tails) > 20


def test_warmup_compiles_everything_generate_needs(tiny, record_property):
    """After Engine.warmup(max_prompt_len) for each prefill_chunk the traffic uses, prompts of any length up to it
    (whole or chunked) compile nothing more through generate() with the same policies -- no flex graph and no dynamo
    graph at all (the CUDA defaults compile the prefill's and the decode step's layers). Whole prompts need one flex
    graph per first-chunk bucket (7 up to 1500); chunking by 256 adds the full layers' later-chunk graphs, one per key
    bucket past 256 (5), and the sparse layers' one (chunk bucket 256; the AttnSink ring is padded to sink + window,
    one length): 6 more -- the route table's list."""
    policies = {"whole": Policy(prefill_chunk=None), "chunk_256": Policy(prefill_chunk=256)}
    w = {name: Engine(tiny, p).warmup(1500) for name, p in policies.items()}
    assert len(w["whole"]["graphs"]) == 7 and len(w["chunk_256"]["graphs"]) == 2 + 5 + 1
    stats = torch._dynamo.utils.counters["stats"]
    before, dynamo_before = flex_graphs(), stats["unique_graphs"]
    for i, n in enumerate(sorted(random.Random(4).sample(range(1, 1501), 30))):
        prompt = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        generate(tiny, [prompt], max_new_tokens=2, policy=policies["chunk_256" if i % 2 else "whole"])
    record_property("warmup", {k: {**v, "graphs": [list(map(str, g)) for g in v["graphs"]]} for k, v in w.items()})
    assert flex_graphs() == before
    assert stats["unique_graphs"] == dynamo_before


def test_mixed_batch_equals_each_alone(tiny):
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (1, 77, 129, 300, 1000, 64)]
    together = generate(tiny, prompts, max_new_tokens=6, policy=Policy(prefill_chunk=200))
    for p, got in zip(prompts, together):
        assert got.tokens == generate(tiny, [p], max_new_tokens=6)[0].tokens == greedy_by_forward(tiny, p, 6)


@pytest.mark.parametrize("pattern,dtype,backend", [
    (AttnSink(4, 60), torch.float32, "triton"), (BlockSparse(64, 2, 4, per_head=True), torch.float32, "triton"),
    (AttnSink(64, 448), torch.bfloat16, "triton"), pytest.param(AttnSink(64, 448), torch.bfloat16, "flash",
                                                                marks=NEEDS_FLASH),
    pytest.param(BlockSparse(64, 2, 4, per_head=True), torch.bfloat16, "flash", marks=NEEDS_FLASH)], ids=repr)
def test_sparse_later_chunks_many_lengths_and_offsets(pattern, dtype, backend, record_property):
    """Chunked prefill of a sparse model (GQA, full middle layers) over 18 prompt lengths and 4 chunk sizes -- many
    offsets, ragged last chunks, caches of many sizes: every token's logits equal the no-cache forward's, and the
    sparse layers' later chunks (flex over [used slots ; chunk], positional mask_mod) compile at most one graph per
    (chunk bucket, slot part's padded length), never one per offset, prompt length or cache size: an AttnSink ring is
    padded to sink + window (one graph per chunk bucket: chunks 100 and 128 -> 128, 200 and 256 -> 256), a
    BlockSparse store to the bucket of the slots in use. The no-cache reference runs SDPA with dense masks; the chunks
    run compiled flex on ``backend``."""
    torch.manual_seed(0)
    model = longgen_llama(256, 4, 4, 2, 256, 512, 4096, full_layers="middle", sparse_pattern=pattern).to(
        DEV, dtype).eval()
    lengths = sorted(random.Random(21).sample(range(129, 1500), 18))
    chunks = [128, 200, 256, 100]
    before, worst, keys = sparse_chunk_graphs(), 0.0, set()
    for i, n in enumerate(lengths):
        chunk = chunks[i % len(chunks)]
        prompt = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).to(DEV)
        with torch.no_grad():
            want = model(prompt[None], mask=masks_of(model, n, "dense"))[0]
            engine, got = prefilled(model, prompt, chunk, n + 1 + 37 * i, all_logits=True,  # cache sizes vary too
                                    policy=EAGER.replace(flex_backend=backend))
            del engine
        worst = max(worst, rel_err(got, want))
        keys |= {route(pattern.bind_heads(2), "later", device=DEV, policy=Policy(flex_backend=backend).on(DEV),
                       q_len=chunk, offset=o, chunk=chunk).shape for o in range(chunk, n, chunk)}
    graphs = sparse_chunk_graphs() - before
    record_property("prefill_vs_forward_max_rel_err", worst)
    record_property("sparse_chunk_graphs", graphs)
    record_property("chunk_and_slot_buckets", sorted(keys))
    assert worst < (2e-2 if dtype == torch.bfloat16 else 1e-4)
    assert 1 <= graphs <= len(keys)
    if isinstance(pattern, AttnSink):
        assert len(keys) == 2


@NEEDS_FLASH
@pytest.mark.parametrize("sparse", [AttnSink(64, 192), BlockSparse(128, 1, 3, per_head=True)], ids=repr)
def test_training_on_flash_matches_triton_and_dense(sparse, record_property):
    """Forward + backward of a small bf16 hybrid (GQA 4/2, head dim 128, the middle layer full) at odd lengths in one
    process, packed and not: every parameter's gradient with the training routes on FLASH against the same on Triton
    and on SDPA with dense masks. The FLASH routes stay on FLASH where its backward passes flex_backend's probe
    (recorded as ``train_backend``), else run Triton."""
    torch.manual_seed(0)
    model = longgen_llama(256, 3, 4, 2, 512, 512, 4096, sparse_pattern=sparse).to(DEV, torch.bfloat16).train()
    patterns = [a.pattern for a in attention_layers(model)]
    worst, used = {}, set()
    for i, S in enumerate((100, 257, 700)):
        tokens = torch.randint(0, 256, (2, S), generator=torch.Generator().manual_seed(S)).to(DEV)
        doc = (torch.arange(S, device=DEV) * 3 // S).expand(2, S) if i % 2 else None
        grads = {}
        for name in ("flash", "triton", "dense"):
            masks = MaskSet(patterns, S, num_heads=4, num_kv_heads=2, device=DEV, doc_ids=doc, grad=True,
                            kind="dense" if name == "dense" else None, dtype=torch.bfloat16, head_dim=128,
                            policy=Policy(flex_backend="triton" if name == "dense" else name))
            if name == "flash":
                used |= {r.backend for r, _ in masks.routes.values() if r.kernel == "flex"}
            model.zero_grad()
            logits = model(tokens, mask=masks)
            F.cross_entropy(logits[:, :-1].float().reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
            grads[name] = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        assert torch.isfinite(grads["flash"]).all()
        for pair in (("flash", "triton"), ("flash", "dense"), ("triton", "dense")):
            worst[pair] = max(worst.get(pair, 0.0), rel_err(grads[pair[0]], grads[pair[1]]))
            assert worst[pair] < 5e-2, f"S={S} {pair}: {worst[pair]:.2e}"  # bf16 through three layers and back
    record_property("grad_max_rel_err", {" vs ".join(k): v for k, v in worst.items()})
    record_property("train_backend", sorted(used))
    model.zero_grad(set_to_none=True)


# ---- memory plan ----------------------------------------------------------------------------------------------------------

def test_free_memory_counts_the_allocators_cache():
    """Was: after a large computation the allocator keeps its blocks reserved and cudaMemGetInfo alone calls them
    taken, so a cache that fits was refused."""
    torch.cuda.empty_cache()
    driver_free0 = torch.cuda.mem_get_info()[0]
    big = torch.empty(int(driver_free0 * 0.6), dtype=torch.uint8, device=DEV)
    del big  # freed to PyTorch's cache, still reserved on the card
    driver_free = torch.cuda.mem_get_info()[0]
    ours = free_memory_bytes(DEV)
    assert driver_free < 0.5 * driver_free0  # the cache really holds it
    assert ours > 0.9 * driver_free0
    model = longgen_tiny(max_seq_len=2048).to(DEV)
    plan = plan_cache(model, 1, 2048, torch.float32)
    check_fits(plan, DEV, reserve_bytes=int(driver_free0 * 0.5))  # fits only when the cached bytes count
    torch.cuda.empty_cache()


# ---- fused decode (each layer's work around attention compiled by Inductor) ------------------------------------------------

def twin_decode_max_err(model, dtype, lengths, max_len, steps, reference: Policy, candidate: Policy):
    """Prefill the same prompts of ``lengths`` into two engines (``reference`` and ``candidate`` policies, CUDA graphs
    off: every step runs), then decode ``steps`` greedy steps (the reference's tokens fed to both): the largest
    relative error of the candidate's logits."""
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]
    engines = [Engine(model, p.replace(cuda_graphs=False)) for p in (reference, candidate)]
    for e in engines:
        e.reserve(len(prompts), max_len)
        for row, p in enumerate(prompts):
            e.prefill(torch.tensor(p, device=DEV), row)
    tok, worst = torch.tensor([p[-1] for p in prompts], device=DEV), 0.0
    for _ in range(steps):
        want, got = engines[0].step(tok).float(), engines[1].step(tok).float()
        worst = max(worst, rel_err(got, want))
        tok = want.argmax(-1)
    return worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_decode_matches_eager_at_many_lengths(dtype, record_property):
    """The compiled decode step (Inductor) against the eager one on twin engines -- a mixed-length batch whose AttnSink
    rings fill, wrap and run full: logits agree at every step (fp32 to rounding, bf16 within bf16 noise); then
    generate() with CUDA graphs (the defaults) gives the eager step's greedy tokens (fp32) for 12 prompt lengths and
    batch sizes 1-4, compiling no graph after the first two batch sizes (counted by dynamo)."""
    torch.manual_seed(0)
    model = longgen_llama(1000, 4, 8, 2, 512, 1024, 4096, sparse_pattern=AttnSink(4, 60)).to(DEV, dtype).eval()
    worst = twin_decode_max_err(model, dtype, (1, 70, 333), 500, 100, EAGER, Policy(compile_decode=True))
    record_property("fused_vs_eager_logits_max_rel_err", worst)
    assert worst < (2e-2 if dtype == torch.bfloat16 else 1e-4)
    if dtype == torch.bfloat16:
        return  # greedy tokens of random bf16 weights can flip on near-ties; fp32 checks them below
    stats = torch._dynamo.utils.counters["stats"]
    Engine(model).warmup(1210)  # every graph these prompts need: the count below is the decode step's alone
    lengths = sorted(random.Random(11).sample(range(1, 1200), 12))
    before = None
    for i, n in enumerate(lengths):
        batch = [torch.randint(0, 1000, (m,), generator=torch.Generator().manual_seed(m)).tolist()
                 for m in (n, max(1, n // 3), n + 5, 7)[:1 + i % 4]]
        fused = generate(model, batch, max_new_tokens=8)
        plain = generate(model, batch, max_new_tokens=8, policy=EAGER)
        assert [r.tokens for r in fused] == [r.tokens for r in plain], f"n={n} batch={len(batch)}"
        if i == 2:  # batch sizes 1, 2, 3 seen: the dynamic-batch graphs exist
            before = stats["unique_graphs"]
    record_property("graphs_after_first_three_calls", stats["unique_graphs"] - before)
    assert stats["unique_graphs"] == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_projections_match_separate_ones(dtype, record_property):
    """fuse_projections (q/k/v and gate/up weights as row blocks of one matrix) against the separate projections on
    the GPU: the no-cache forward's logits, then generate() eager and with compile_decode=True (Inductor traces the
    fused matrices as buffers) -- fp32 gives the same greedy tokens for mixed-length batches; unfusing restores the
    separate path exactly."""
    from flexgen_long.models import fuse_projections, unfuse_projections
    torch.manual_seed(0)
    model = longgen_llama(1000, 4, 8, 2, 512, 1024, 4096, sparse_pattern=AttnSink(4, 60)).to(DEV, dtype).eval()
    x = torch.randint(0, 1000, (2, 700), device=DEV)
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (1, 70, 333)]
    with torch.no_grad():
        want = model(x).float()
    plain = [r.tokens for r in generate(model, prompts, max_new_tokens=12, policy=EAGER)]
    fuse_projections(model)
    with torch.no_grad():
        got = model(x).float()
    err = rel_err(got, want)
    record_property("forward_max_rel_err", err)
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5)
    if dtype == torch.float32:
        assert [r.tokens for r in generate(model, prompts, max_new_tokens=12, policy=EAGER)] == plain
        assert [r.tokens for r in generate(model, prompts, max_new_tokens=12)] == plain  # compiled: the default
    unfuse_projections(model)
    with torch.no_grad():
        assert torch.equal(model(x).float(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_prefill_matches_eager_at_many_lengths(dtype, record_property):
    """The compiled prefill (Policy(compile_prefill=True): Inductor, dynamic shapes, each layer's work around attention
    compiled) against the eager prefill, every token's logits, for prompts users send: 1, 65, 127 and 129 tokens, odd
    lengths, chunked with a ragged or 1-token tail (fp32 to rounding, bf16 within bf16 noise). Then, after
    Engine.warmup with the CUDA defaults, 14 distinct prompt lengths through generate() compile nothing, and (fp32)
    give the eager path's greedy tokens."""
    torch.manual_seed(0)
    model = longgen_llama(1000, 4, 8, 2, 512, 1024, 4096, sparse_pattern=AttnSink(4, 60)).to(DEV, dtype).eval()
    worst = 0.0
    with torch.inference_mode():
        for n, chunk in [(1, None), (65, None), (127, None), (129, None), (333, None), (1000, 256), (769, 256),
                         (1210, 300)]:
            prompt = torch.randint(0, 1000, (n,), device=DEV)
            want = prefilled(model, prompt, chunk, all_logits=True)[1].float()
            got = prefilled(model, prompt, chunk, all_logits=True, policy=Policy(compile_prefill=True))[1].float()
            worst = max(worst, rel_err(got, want))
    record_property("compiled_vs_eager_prefill_max_rel_err", worst)
    assert worst < (2e-2 if dtype == torch.bfloat16 else 1e-4)
    if dtype == torch.bfloat16:
        return  # greedy tokens of random bf16 weights can flip on near-ties; fp32 checks them below
    stats = torch._dynamo.utils.counters["stats"]
    Engine(model, Policy(prefill_chunk=300)).warmup(1210)
    before = stats["unique_graphs"]
    lengths = [1, 2, 64, 128] + sorted(random.Random(5).sample(range(3, 1210), 10))
    for i, n in enumerate(lengths):
        batch = [torch.randint(0, 1000, (m,), generator=torch.Generator().manual_seed(m)).tolist()
                 for m in (n, max(1, n // 3), n + 1)[:1 + i % 3]]
        got = generate(model, batch, max_new_tokens=6, policy=Policy(prefill_chunk=300))
        want = generate(model, batch, max_new_tokens=6, policy=EAGER.replace(prefill_chunk=300))
        assert [r.tokens for r in got] == [r.tokens for r in want], f"n={n} batch={len(batch)}"
    record_property("graphs_after_warmup", stats["unique_graphs"] - before)
    assert stats["unique_graphs"] == before


def test_lookahead_decode_stops_rows_exactly(record_property):
    """generate() on CUDA launches step t+1 before it waits for token t: rows that hit a stop token at different steps
    end exactly there (each the prefix of its uncut greedy run), the streamed (row, token) order is each row's tokens
    in order, a call whose only row stops early discards its launched step without touching the next call's results,
    and decode_s / tokens_per_s stay positive per row."""
    torch.manual_seed(0)
    model = longgen_llama(1000, 4, 8, 2, 512, 1024, 4096, sparse_pattern=AttnSink(4, 60)).to(DEV).eval()
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (90, 7, 300)]
    full = [r.tokens for r in generate(model, prompts, max_new_tokens=40)]
    stop = next((t for t in full[0][3:30] if t not in full[0][:3]), None)
    assert stop is not None
    k = full[0].index(stop)
    streamed = []
    cut = generate(model, prompts, max_new_tokens=40, stop_tokens=[stop],
                   on_token=lambda b, t: streamed.append((b, t)))
    for b, r in enumerate(cut):
        want = full[b][:full[b].index(stop) + 1] if stop in full[b] else full[b]
        assert r.tokens == want, f"row {b}"
        assert [t for row, t in streamed if row == b] == r.tokens
        assert r.decode_s > 0 and r.tokens_per_s > 0
    assert len(cut[0].tokens) == k + 1
    alone = generate(model, prompts[:1], max_new_tokens=40, stop_tokens=[stop])[0]
    assert alone.tokens == full[0][:k + 1]
    again = [r.tokens for r in generate(model, prompts, max_new_tokens=40)]
    assert again == full
    record_property("row0_stopped_after", k + 1)
