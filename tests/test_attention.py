"""HybridAttention against attention written out by hand (expanded GQA, loop-built masks from tests/reference.py), its
kernel dispatch, the MaskSet, and the flex guard. CPU only; flex runs eagerly on these short sequences (the compiled
path is covered in test_shapes.py, and on GPU by tests/gpu/)."""

import math

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask
from torchtune.modules import RotaryPositionalEmbeddings

import reference as ref
from flexgen_long.attention import (FLEX_EAGER_MAX_LEN, KERNELS, FlexNotCompiledError, HybridAttention, KVStep,
                                    MaskSet, flex_attend, positions_in_documents)
from flexgen_long.cache import LayerCache
from flexgen_long.masks import build_block_mask
from flexgen_long.patterns import AttnSink, BlockSparse, Full
from flexgen_long.policy import Policy
from flexgen_long.routes import route

# eager flex on purpose (tiny shapes; the guard allows it up to FLEX_EAGER_MAX_LEN)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

H, HKV, D = 4, 2, 8


def make_attn(pattern, heads=H, kv_heads=HKV):
    E = heads * D
    lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
    return HybridAttention(embed_dim=E, num_heads=heads, num_kv_heads=kv_heads, head_dim=D, q_proj=lin(E, heads * D),
                           k_proj=lin(E, kv_heads * D), v_proj=lin(E, kv_heads * D), output_proj=lin(E, E),
                           pos_embeddings=RotaryPositionalEmbeddings(D, max_seq_len=4096), max_seq_len=4096,
                           pattern=pattern)


def by_hand(attn, x, doc_ids=None):
    """Projections, RoPE (positions restart per document), K/V repeated to every query head, softmax over a mask
    built token by token in Python."""
    B, S, _ = x.shape
    pos = None
    if doc_ids is not None:
        pos = torch.tensor([[t - ref.doc_starts(row)[1][t] for t in range(S)] for row in doc_ids.tolist()])
    q = attn.pos_embeddings(attn.q_proj(x).view(B, S, H, D), input_pos=pos).transpose(1, 2)
    k = attn.pos_embeddings(attn.k_proj(x).view(B, S, HKV, D), input_pos=pos).transpose(1, 2)
    v = attn.v_proj(x).view(B, S, HKV, D).transpose(1, 2)
    k, v = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    mask = ref.dense(attn.pattern, S, S, num_heads=H, num_kv_heads=HKV, doc_ids=doc_ids)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return attn.output_proj(out.transpose(1, 2).reshape(B, S, H * D))


PATTERNS = [Full(), AttnSink(sink=3, window=11), BlockSparse(block=16, local_blocks=1, vertical_stride=3, per_head=True)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_layer_matches_hand_written_attention(pattern, packed):
    S = 77
    attn = make_attn(pattern)
    x = torch.randn(2, S, H * D)
    doc = torch.tensor([[0] * 30 + [1] * 40 + [2] * 7, [5] * 50 + [3] * 27]) if packed else None
    pos = positions_in_documents(doc) if packed else None
    want = by_hand(attn, x, doc)
    for kind in ("dense", "block"):  # dense: SDPA + bool mask (CPU training path); block: flex (eager at this size)
        masks = MaskSet([pattern], S, num_heads=H, num_kv_heads=HKV, device="cpu", doc_ids=doc, kind=kind)
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            got = attn(x, mask=masks, input_pos=pos)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=f"kind={kind}")


def test_dispatch_picks_the_kernel(monkeypatch):
    """Full + unpacked needs no mask (SDPA is_causal); sparse or packed use the mask the MaskSet holds."""
    calls = []
    import flexgen_long.attention as A
    monkeypatch.setattr(A, "flex_attend", lambda q, k, v, m, backend: calls.append(("flex", m, backend)) or q)
    real_sdpa = A.F.scaled_dot_product_attention
    monkeypatch.setattr(A.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append(("sdpa", kw.get("is_causal"), kw.get("attn_mask")))
                        or real_sdpa(q, k, v, **kw))
    q, k = torch.randn(1, H, 40, D), torch.randn(1, HKV, 40, D)
    sink = AttnSink(sink=2, window=5)
    doc = torch.tensor([[0] * 20 + [1] * 20])
    unpacked = MaskSet([Full(), sink, sink], 40, num_heads=H, num_kv_heads=HKV, device="cpu", kind="block")
    packed = MaskSet([Full(), sink], 40, num_heads=H, num_kv_heads=HKV, device="cpu", doc_ids=doc, kind="block")
    dense = MaskSet([Full(), sink], 40, num_heads=H, num_kv_heads=HKV, device="cpu", kind="dense")
    assert list(unpacked.routes) == [Full(), sink]  # one route and mask per distinct pattern
    assert [r.kernel for r, _ in unpacked.routes.values()] == ["sdpa_causal", "flex"]
    assert [r.kernel for r, _ in packed.routes.values()] == ["flex", "flex"]  # documents: a mask even when full
    make_attn(Full()).attend(q, k, k, unpacked)
    make_attn(sink).attend(q, k, k, unpacked)
    make_attn(Full()).attend(q, k, k, packed)
    make_attn(sink).attend(q, k, k, dense)
    assert calls[0] == ("sdpa", True, None)
    assert calls[1][0] == "flex" and calls[1][1] is unpacked[sink] and isinstance(calls[1][1], BlockMask)
    assert calls[1][2] == "triton"  # a CPU policy's backend, from the route
    assert calls[2][0] == "flex" and calls[2][1] is packed[Full()]
    assert calls[3][0] == "sdpa" and calls[3][2] is dense[sink] and calls[3][2].dtype == torch.bool


def test_mask_set_takes_the_route_tables_kernel_per_device_grad_and_length():
    """The MaskSet builds the mask its route needs: dense bool on a CPU with a gradient (no flex backward there) or up
    to the policy's dense_mask_max_len, a BlockMask (flex) otherwise, none for a full layer's causal SDPA; a policy
    moves the threshold."""
    sink = AttnSink(2, 5)
    kind = lambda S, **kw: type(MaskSet([sink], S, num_heads=H, num_kv_heads=HKV, device="cpu", **kw)[sink])  # noqa
    limit = Policy().on("cpu").dense_mask_max_len
    assert limit == 2048 and Policy().on("cuda").dense_mask_max_len == 0
    assert kind(40) is torch.Tensor and kind(40, grad=True) is torch.Tensor
    assert kind(limit + 1, grad=True) is torch.Tensor  # no flex backward on a CPU
    assert kind(40, policy=Policy(dense_mask_max_len=16)) is BlockMask
    assert MaskSet([Full()], 40, num_heads=H, num_kv_heads=HKV, device="cpu")[Full()] is None  # SDPA is_causal


def test_guard_refuses_long_uncompiled_flex():
    S = FLEX_EAGER_MAX_LEN + 1
    bm = build_block_mask(AttnSink(sink=4, window=64), S, S)
    x = torch.randn(1, 1, S, 16)
    with torch.compiler.set_stance("force_eager"), pytest.raises(FlexNotCompiledError, match="uncompiled"):
        flex_attend(x, x, x, bm)


def test_flex_backward_on_cpu_is_refused():
    attn = make_attn(AttnSink(sink=2, window=5))
    masks = MaskSet([attn.pattern], 16, num_heads=H, num_kv_heads=HKV, device="cpu", kind="block")
    with pytest.raises(RuntimeError, match="no CPU backward"):
        attn(torch.randn(1, 16, H * D), mask=masks)


def test_bad_inputs():
    attn = make_attn(AttnSink(sink=2, window=5))
    x = torch.randn(1, 16, H * D)
    with pytest.raises(ValueError, match="MaskSet"):
        attn(x, mask=torch.ones(1, 16, 16, dtype=torch.bool))
    masks = MaskSet([attn.pattern], 8, num_heads=H, num_kv_heads=HKV, device="cpu")
    with pytest.raises(ValueError, match="seq_len=8"):
        attn(x, mask=masks)
    with pytest.raises(ValueError, match="doc_ids"):
        MaskSet([attn.pattern], 16, num_heads=H, num_kv_heads=HKV, device="cpu", doc_ids=torch.zeros(1, 15).long())
    with pytest.raises(ValueError, match="doc_ids"):
        MaskSet([attn.pattern], 16, num_heads=H, num_kv_heads=HKV, device="cpu", doc_ids=torch.zeros(1, 16))
    with pytest.raises(ValueError, match="kind"):
        MaskSet([attn.pattern], 16, num_heads=H, num_kv_heads=HKV, device="cpu", kind="sparse")
    with pytest.raises(NotImplementedError, match="KV cache"):
        attn.setup_cache(1, torch.float32, 16)


def test_positions_restart_per_document():
    doc = torch.tensor([[7, 7, 7, 2, 2, 7, 7], [1, 1, 1, 1, 1, 1, 1]])
    assert positions_in_documents(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]]


# AttnSink(128, 200) and BlockSparse(64, ...) fill several 128-token blocks of slots; AttnSink(4, 60) one
CHUNK_PATTERNS = [AttnSink(4, 60), AttnSink(128, 200), AttnSink(3, 45), BlockSparse(64, 2, 3),
                  BlockSparse(64, 2, 3, per_head=True)]


@pytest.mark.parametrize("pattern", CHUNK_PATTERNS, ids=repr)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_sparse_later_chunk_flex_equals_masked_sdpa(pattern, heads, kv_heads):
    """A sparse layer's later prefill chunk by flex over [used slots ; chunk] (the GPU path: padded to buckets, GQA
    unexpanded, positional mask_mod; here eager) against the CPU path (masked SDPA over every slot, K/V expanded), on
    the same cache state: rings not yet full and wrapped, odd offsets and chunks, a last chunk shorter than the
    nominal one."""
    attn = make_attn(pattern, heads, kv_heads)
    for o, C, chunk in [(1, 37, 37), (45, 23, 45), (300, 77, 100), (700, 200, 200), (901, 5, 128)]:
        g = torch.Generator().manual_seed(o)
        cache = LayerCache(pattern, 1, kv_heads, D, o + C + 5, torch.float32, "cpu")
        for s in range(0, o, chunk):
            m = min(chunk, o - s)
            cache.write_prefill(0, torch.randn(1, kv_heads, m, D, generator=g),
                                torch.randn(1, kv_heads, m, D, generator=g), s)
        # q / k / v as the layer makes them: transposed views of [1, C, heads, D]
        q, k, v = (torch.randn(1, C, h, D, generator=g).transpose(1, 2) for h in (heads, kv_heads, kv_heads))
        step = KVStep({attn: cache}, "later", Policy().on("cpu"), row=0, offset=o, chunk=chunk)
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            flex_route = route(cache.pattern, "later", device="cpu", policy=Policy(chunk_flex=True).on("cpu"),
                               q_len=C, offset=o, chunk=chunk, slots=cache.slots, heads=(heads, kv_heads, D))
            got = KERNELS["flex_over_slots"](attn, q, k, v, step, flex_route)
        want = KERNELS["sdpa_over_slots"](attn, q, k, v, step, step.route(attn, C, 4))
        assert step.route(attn, C, 4).kernel == "sdpa_over_slots" and flex_route.kernel == "flex_over_slots"
        assert got.shape == want.shape == (1, heads, C, D)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"o={o} C={C}")
