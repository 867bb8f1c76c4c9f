"""The shape policy (flexgen_long.shapes): buckets, the compiled-function registry, and the policy at work on CPU --
50 distinct lengths through the no-cache forward, forward + backward and generate(), with values checked against an
independent path and the number of compiled graphs held to the documented bound."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from flexgen_long import AttnSink, BlockSparse, longgen_tiny
from flexgen_long.attention import MaskSet, flex_attend
from flexgen_long.engine import Engine
from flexgen_long.generation import generate
from flexgen_long.policy import Policy
from flexgen_long.masks import build_block_mask, dense_mask
from flexgen_long.shapes import bucket_count, buckets, compiled, compiled_graphs, padded_len


def flex_graphs() -> int:
    return len(compiled_graphs("_flex"))


def test_ladder():
    assert [padded_len(n) for n in (1, 2, 127, 128, 129, 255, 256, 257, 384, 385, 512, 513, 768, 769)] == \
        [128, 128, 128, 128, 256, 256, 256, 384, 384, 512, 512, 768, 768, 1024]
    assert buckets(131072)[:8] == [128, 256, 384, 512, 768, 1024, 1536, 2048]
    assert buckets(131072)[-3:] == [65536, 98304, 131072]
    for n in list(range(1, 5000)) + [random.Random(0).randrange(1, 1 << 20) for _ in range(2000)]:
        p = padded_len(n)
        assert p >= n and p % 128 == 0
        assert p in buckets(n)
        assert p == 128 or p / n < 1.5 or p == 256, (n, p)  # at most half a rung wasted (256 for 129..255)
        assert padded_len(p) == p  # a bucket is its own bucket
    for m in (1, 128, 129, 1000, 4096, 32768, 131072, 1 << 20):
        assert bucket_count(m) <= max(1, 2 * math.ceil(math.log2(m / 128)))
    assert bucket_count(131072) == 20
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="length"):
            padded_len(bad)


def test_one_compile_per_key_and_never_the_recompile_limit():
    """More keys than dynamo's recompile_limit, on one function: each key gets its own code object, so each compiles
    once and none is refused."""
    def add_one(x):
        return x + 1

    limit = torch._dynamo.config.recompile_limit
    fns = []
    for n in range(1, limit + 4):
        fn = compiled(add_one, ("test", n), dynamic=False, fullgraph=True)
        assert torch.equal(fn(torch.zeros(n)), torch.ones(n))
        fns.append(fn)
    ours = [g for g in compiled_graphs("test_one_compile") if g.key[2][0] == "test"]
    assert len(ours) == limit + 3
    assert all(g.first_call_s > 0 for g in ours)
    again = compiled(add_one, ("test", 3), dynamic=False, fullgraph=True)
    assert torch.equal(again(torch.zeros(3)), torch.ones(3))
    assert len([g for g in compiled_graphs("test_one_compile") if g.key[2][0] == "test"]) == limit + 3


@pytest.mark.parametrize("pat,S,heads,kv_heads,packed", [
    (AttnSink(4, 40), 300, 4, 2, False),
    (BlockSparse(32, 1, 3, per_head=True), 77, 4, 2, True),
])
def test_compiled_flex_with_padding_equals_sdpa(pat, S, heads, kv_heads, packed):
    """The compiled CPU kernel on q / k / v padded to the bucket, against SDPA with the dense mask (exact shapes)."""
    g = torch.Generator().manual_seed(0)
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([S // 3, S // 3, S - 2 * (S // 3)]))[None] \
        if packed else None
    q, k, v = (torch.randn(1, h, S, 16, generator=g) for h in (heads, kv_heads, kv_heads))
    P = padded_len(S)
    bm = build_block_mask(pat, S, S, num_heads=heads, num_kv_heads=kv_heads, doc_ids=doc, padded_lengths=(P, P))
    before = flex_graphs()
    with torch.no_grad():
        out = flex_attend(q, k, v, bm)
    m = dense_mask(pat, S, S, num_heads=heads, num_kv_heads=kv_heads, doc_ids=doc)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert flex_graphs() == before + 1


def test_padded_and_exact_bucket_lengths_share_one_graph():
    """q / k / v arrive as transposed projection views; padding keeps that layout, so a 100-token call (padded) and a
    128-token call (not padded) have the same strides and run one graph."""
    pat = AttnSink(4, 40)
    before = flex_graphs()
    for S in (100, 128, 77):
        x = torch.randn(1, S, 2, 16).transpose(1, 2)  # [B, H, S, D] view of [B, S, H, D], as in the layer
        bm = build_block_mask(pat, S, S, num_heads=2, padded_lengths=(128, 128))
        with torch.no_grad():
            out = flex_attend(x, x, x, bm)
        want = F.scaled_dot_product_attention(x, x, x, attn_mask=dense_mask(pat, S, S))
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert flex_graphs() == before + 1


# ---- the policy on the model, 50 distinct lengths in one process -------------------------------------------------------
LENGTHS = sorted(random.Random(12).sample(range(1, 301), 46) + [127, 128, 129, 256])  # 50 distinct, block edges


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return longgen_tiny(max_seq_len=512).eval()  # layer 1 full, the others AttnSink(4, 60)


def test_no_grad_forward_50_lengths(tiny):
    """Compiled flex (forced, as on a GPU) at 50 lengths: equal to the dense-mask path, and at most one graph per
    bucket for the one sparse pattern; the CPU default (dense up to Policy.dense_mask_max_len) compiles nothing."""
    assert max(LENGTHS) <= Policy().on("cpu").dense_mask_max_len and len(set(LENGTHS)) == 50
    attn = [layer.attn for layer in tiny.layers]
    before, seen = flex_graphs(), {id(g) for g in compiled_graphs("_flex")}
    for S in LENGTHS:
        tokens = torch.randint(0, 256, (1, S), generator=torch.Generator().manual_seed(S))
        with torch.no_grad():
            default = tiny(tokens)
            masks = MaskSet([a.pattern for a in attn], S, num_heads=attn[0].num_heads,
                            num_kv_heads=attn[0].num_kv_heads, device="cpu", kind="block")
            flexed = tiny(tokens, mask=masks)
        torch.testing.assert_close(flexed, default, atol=2e-5, rtol=1e-5, msg=f"S={S}")
    assert flex_graphs() - before <= bucket_count(max(LENGTHS))
    # this test's graphs: at most one per bucket (an earlier test in this process may have made some already)
    q_shape = 0  # position in flex_graph_key
    sizes = [g.key[2][q_shape][2] for g in compiled_graphs("_flex") if id(g) not in seen]
    assert len(sizes) == len(set(sizes)) and set(sizes) <= set(buckets(max(LENGTHS)))


def test_forward_backward_50_lengths(tiny):
    """CPU training at 50 lengths runs the dense-mask path (flex has no CPU backward): nothing compiled, logits equal
    to the no-grad forward, gradients finite everywhere."""
    tiny.train()
    try:
        before = flex_graphs()
        for S in LENGTHS:
            tokens = torch.randint(0, 256, (1, S), generator=torch.Generator().manual_seed(S))
            tiny.zero_grad()
            logits = tiny(tokens)
            loss = F.cross_entropy(logits[0, :-1], tokens[0, 1:]) if S > 1 else logits.sum()
            loss.backward()
            with torch.no_grad():
                torch.testing.assert_close(logits, tiny(tokens), atol=2e-5, rtol=1e-5)
            grads = [p.grad for p in tiny.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
        assert flex_graphs() == before
    finally:
        tiny.eval()


def test_generate_50_lengths_and_every_tail(tiny):
    """generate() at 50 prompt lengths, prefilled whole and in chunks of 64 (every tail length 1..64 occurs): the
    prefill's last logits equal the no-cache forward's, and the greedy tokens equal argmax of the no-cache forward."""
    before = flex_graphs()
    tails = set()
    for i, S in enumerate(LENGTHS):
        prompt = torch.randint(0, 256, (S,), generator=torch.Generator().manual_seed(1000 + S)).tolist()
        chunk = None if i % 2 else 64
        tails.add(S % 64 if chunk else None)
        with torch.no_grad():
            full = tiny(torch.tensor([prompt]))[0, -1]
        engine = Engine(tiny, Policy(prefill_chunk=chunk))
        engine.reserve(1, S + 2)
        last = engine.prefill(torch.tensor(prompt), 0)
        torch.testing.assert_close(last, full, atol=2e-5, rtol=1e-5, msg=f"S={S} chunk={chunk}")
        out = generate(engine, [prompt], max_new_tokens=2)[0].tokens
        t0 = int(full.argmax())
        with torch.no_grad():
            t1 = int(tiny(torch.tensor([prompt + [t0]]))[0, -1].argmax())
        assert out == [t0, t1], f"S={S} chunk={chunk}"
    assert len(tails) > 15
    assert flex_graphs() == before  # CPU prompts this short run the dense path


def test_generate_mixed_batch_equals_each_alone(tiny):
    prompts = [list(range(1, 1 + n)) for n in (1, 77, 129, 200)]
    together = generate(tiny, prompts, max_new_tokens=4, policy=Policy(prefill_chunk=50))
    for p, got in zip(prompts, together):
        assert generate(tiny, [p], max_new_tokens=4)[0].tokens == got.tokens
