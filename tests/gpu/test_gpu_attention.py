"""The attention layer's compiled flex path on the GPU at lengths 1..300 (odd values, block boundaries +-1), fp32 and
bf16, MHA and GQA, AttnSink with block-aligned and unaligned sinks, BlockSparse with and without per-head shifts,
packed documents; inference and training. Oracle: SDPA over the dense token-rule mask in fp32 on the same inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchtune.modules import RotaryPositionalEmbeddings

from flexgen_long.attention import FLEX_EAGER_MAX_LEN, FlexNotCompiledError, HybridAttention, MaskSet, flex_attend
from flexgen_long.masks import build_block_mask, dense_mask
from flexgen_long.patterns import AttnSink, BlockSparse, Full
from reference import rel_err
from flexgen_long.shapes import bucket_count, compiled_graphs, padded_len

DEV = "cuda"
D = 64
LENGTHS = [1, 2, 3, 5, 17, 63, 64, 65, 77, 100, 120, 127, 128, 129, 130, 200, 255, 256, 257, 299, 300]
TRAIN_LENGTHS = [1, 63, 100, 127, 128, 129, 200, 256]  # two buckets: backward graphs are the slow compiles

CONFIGS = {  # id: (pattern, dtype, query heads, KV heads, packed)
    "sink_unaligned_fp32_gqa": (AttnSink(4, 60), torch.float32, 4, 2, False),
    "sink_aligned_bf16_mha": (AttnSink(128, 64), torch.bfloat16, 4, 4, False),
    "blocksparse_bf16_gqa": (BlockSparse(64, 2, 3), torch.bfloat16, 8, 2, False),
    "blocksparse_perhead_fp32_gqa": (BlockSparse(32, 1, 4, per_head=True), torch.float32, 8, 4, False),
    "full_packed_bf16_gqa": (Full(), torch.bfloat16, 4, 2, True),
    "sink_packed_fp32_mha": (AttnSink(4, 60), torch.float32, 2, 2, True),
}
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative L2 error against the fp32 reference



def layer(pattern, hq, hkv) -> HybridAttention:
    E = hq * D
    lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
    return HybridAttention(embed_dim=E, num_heads=hq, num_kv_heads=hkv, head_dim=D, q_proj=lin(E, E),
                           k_proj=lin(E, hkv * D), v_proj=lin(E, hkv * D), output_proj=lin(E, E),
                           pos_embeddings=RotaryPositionalEmbeddings(D, max_seq_len=4096), max_seq_len=4096,
                           pattern=pattern)


def docs_for(S: int, B: int, gen) -> torch.Tensor:
    rows = []
    for _ in range(B):
        n = int(torch.randint(1, 5, (1,), generator=gen))
        cuts = sorted(set(torch.randint(1, S, (n,), generator=gen).tolist())) if S > 1 else []
        lens = [b - a for a, b in zip([0] + cuts, cuts + [S])]
        rows.append(torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)))
    return torch.stack(rows).to(DEV)


def inputs(S, dtype, hq, hkv, packed, seed, grad=False):
    gen = torch.Generator().manual_seed(seed)
    B = 2
    q, k, v = (torch.randn(B, h, S, D, generator=gen).to(DEV, dtype) for h in (hq, hkv, hkv))
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    doc = docs_for(S, B, gen) if packed else None
    return q, k, v, doc


def reference(pattern, q, k, v, doc):
    S = q.shape[-2]
    m = dense_mask(pattern, S, S, num_heads=q.shape[1], num_kv_heads=k.shape[1], doc_ids=doc, device=DEV)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, enable_gqa=True)


def flex_graphs() -> int:
    return len(compiled_graphs("_flex"))


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=str)
def test_inference_lengths_1_to_300(cfg, record_property):
    pattern, dtype, hq, hkv, packed = CONFIGS[cfg]
    attn = layer(pattern, hq, hkv)
    before, worst = flex_graphs(), 0.0
    with torch.no_grad():
        for S in LENGTHS:
            q, k, v, doc = inputs(S, dtype, hq, hkv, packed, seed=S)
            masks = MaskSet([pattern], S, num_heads=hq, num_kv_heads=hkv, device=DEV, doc_ids=doc, kind="block")
            out = attn.attend(q, k, v, masks)
            assert out.shape == q.shape and out.dtype == dtype
            assert torch.isfinite(out).all(), f"S={S}: non-finite output"
            err = rel_err(out, reference(pattern, q, k, v, doc))
            worst = max(worst, err)
            assert err < TOL[dtype], f"S={S}: relative error {err:.2e}"
    graphs = flex_graphs() - before
    record_property("max_rel_err", worst)
    record_property("compiled_graphs", graphs)
    uses_flex = not isinstance(pattern, Full) or packed
    assert graphs <= (bucket_count(max(LENGTHS)) if uses_flex else 0)


@pytest.mark.parametrize("cfg", ["sink_unaligned_fp32_gqa", "blocksparse_perhead_fp32_gqa", "blocksparse_bf16_gqa",
                                 "full_packed_bf16_gqa"], ids=str)
def test_training_lengths(cfg, record_property):
    """Forward + backward through the compiled flex path: output and all three input gradients against autograd of
    the fp32 dense-mask reference."""
    pattern, dtype, hq, hkv, packed = CONFIGS[cfg]
    attn = layer(pattern, hq, hkv)
    before, worst = flex_graphs(), 0.0
    for S in TRAIN_LENGTHS:
        q, k, v, doc = inputs(S, dtype, hq, hkv, packed, seed=100 + S, grad=True)
        masks = MaskSet([pattern], S, num_heads=hq, num_kv_heads=hkv, device=DEV, doc_ids=doc, kind="block")
        out = attn.attend(q, k, v, masks)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(S)).to(DEV, dtype)
        got = torch.autograd.grad(out, (q, k, v), g)
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref_out = reference(pattern, *leaves, doc)
        want = torch.autograd.grad(ref_out, leaves, g.float())
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *got), (ref_out, *want)):
            assert torch.isfinite(a).all(), f"S={S} {name}: non-finite"
            err = rel_err(a, b)
            worst = max(worst, err)
            assert err < 2 * TOL[dtype], f"S={S} {name}: relative error {err:.2e}"
    graphs = flex_graphs() - before
    record_property("max_rel_err", worst)
    record_property("compiled_graphs", graphs)
    assert graphs <= bucket_count(max(TRAIN_LENGTHS))


def test_chunk_over_a_prefix_with_q_offset(record_property):
    """A padded query block at an offset over a longer key range (77 queries at 8192 over 8269 keys, the shape of a
    ragged last prefill chunk): the padded mask keeps the real rows exact."""
    worst = 0.0
    for pattern in (Full(), AttnSink(4, 60), BlockSparse(128, 2, 8, per_head=True)):
        C, o = 77, 8192
        T = o + C
        gen = torch.Generator().manual_seed(1)
        q = torch.randn(1, 8, C, 128, generator=gen).to(DEV, torch.bfloat16)
        k, v = (torch.randn(1, 2, T, 128, generator=gen).to(DEV, torch.bfloat16) for _ in range(2))
        bm = build_block_mask(pattern, C, T, q_offset=o, num_heads=8, num_kv_heads=2, device=DEV,
                              padded_lengths=(padded_len(C), padded_len(T)))
        with torch.no_grad():
            out = flex_attend(q, k, v, bm)
        m = dense_mask(pattern, C, T, q_offset=o, num_heads=8, num_kv_heads=2, device=DEV)
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, enable_gqa=True)
        err = rel_err(out, want)
        worst = max(worst, err)
        assert err < TOL[torch.bfloat16], f"{pattern}: {err:.2e}"
    record_property("max_rel_err", worst)


def test_guard_refuses_long_uncompiled_flex():
    S = FLEX_EAGER_MAX_LEN + 1
    bm = build_block_mask(AttnSink(4, 64), S, S, device=DEV)
    x = torch.randn(1, 1, S, 64, device=DEV)
    with torch.compiler.set_stance("force_eager"), pytest.raises(FlexNotCompiledError, match="uncompiled"):
        flex_attend(x, x, x, bm)
