"""The attention layer's compiled flex path on the GPU at lengths 1..300 (odd values, block boundaries +-1), fp32 and
bf16, MHA and GQA, AttnSink with block-aligned and unaligned sinks, BlockSparse with and without per-head shifts,
packed documents; inference and training; on both flex backends, Triton and FLASH (bf16 cases; FLASH takes 16-bit
inputs only, and its cases are skipped, with the reason, where flash_attn.cute does not import). Oracle: SDPA over the
dense token-rule mask in fp32 on the same inputs; FLASH is also compared with Triton."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchtune.modules import RotaryPositionalEmbeddings

import flexgen_long.flex_backend as FB
from flexgen_long.attention import FLEX_EAGER_MAX_LEN, FlexNotCompiledError, HybridAttention, MaskSet, flex_attend
from flexgen_long.masks import build_block_mask, dense_mask
from flexgen_long.patterns import AttnSink, BlockSparse, Full
from flexgen_long.policy import Policy
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
FLASH_OK, FLASH_WHY = FB.flash_status(DEV) if torch.cuda.is_available() else (False, "no CUDA")
BACKENDS = ["triton", pytest.param("flash", marks=pytest.mark.skipif(not FLASH_OK, reason=f"FLASH: {FLASH_WHY}"))]


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


def masks_for(pattern, S, dtype, hq, hkv, doc, backend, grad=False) -> MaskSet:
    """The layer's MaskSet with flex forced (kind="block") on ``backend``."""
    return MaskSet([pattern], S, num_heads=hq, num_kv_heads=hkv, device=DEV, doc_ids=doc, kind="block", grad=grad,
                   policy=Policy(flex_backend=backend), dtype=dtype, head_dim=D)


def skip_float32_on_flash(backend, dtype):
    if backend == "flash" and dtype == torch.float32:
        pytest.skip("float32 routes to Triton (FLASH takes float16 / bfloat16): the Triton case covers it")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=str)
def test_inference_lengths_1_to_300(cfg, backend, record_property):
    pattern, dtype, hq, hkv, packed = CONFIGS[cfg]
    skip_float32_on_flash(backend, dtype)
    attn = layer(pattern, hq, hkv)
    before, worst, vs_triton = flex_graphs(), 0.0, 0.0
    with torch.no_grad():
        for S in LENGTHS:
            q, k, v, doc = inputs(S, dtype, hq, hkv, packed, seed=S)
            masks = masks_for(pattern, S, dtype, hq, hkv, doc, backend)
            assert masks.route(pattern).backend == backend
            out = attn.attend(q, k, v, masks)
            assert out.shape == q.shape and out.dtype == dtype
            assert torch.isfinite(out).all(), f"S={S}: non-finite output"
            err = rel_err(out, reference(pattern, q, k, v, doc))
            worst = max(worst, err)
            assert err < TOL[dtype], f"S={S}: relative error {err:.2e}"
            if backend == "flash":
                triton = attn.attend(q, k, v, masks_for(pattern, S, dtype, hq, hkv, doc, "triton"))
                vs_triton = max(vs_triton, rel_err(out, triton))
                assert vs_triton < TOL[dtype], f"S={S}: FLASH vs Triton {vs_triton:.2e}"
    graphs = flex_graphs() - before
    record_property("max_rel_err", worst)
    record_property("flash_vs_triton_max_rel_err", vs_triton)
    record_property("compiled_graphs", graphs)
    assert graphs <= (2 if backend == "flash" else 1) * bucket_count(max(LENGTHS))  # FLASH: Triton's graphs too


def forward_backward(attn, pattern, q, k, v, doc, masks, seed):
    """Output and the three input gradients of the layer's attention under ``masks``, for a fixed output gradient."""
    out = attn.attend(q, k, v, masks)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEV, q.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), g)), g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", ["sink_unaligned_fp32_gqa", "blocksparse_perhead_fp32_gqa", "blocksparse_bf16_gqa",
                                 "full_packed_bf16_gqa", "sink_aligned_bf16_mha"], ids=str)
def test_training_lengths(cfg, backend, record_property):
    """Forward + backward through the compiled flex path: output and all three input gradients against autograd of
    the fp32 dense-mask reference, and FLASH's against Triton's. A FLASH training route keeps FLASH where its
    backward passed flex_backend's probe for the mask, else runs Triton (recorded as ``train_backend``)."""
    pattern, dtype, hq, hkv, packed = CONFIGS[cfg]
    skip_float32_on_flash(backend, dtype)
    attn = layer(pattern, hq, hkv)
    before, worst, vs_triton, used = flex_graphs(), 0.0, 0.0, set()
    for S in TRAIN_LENGTHS:
        q, k, v, doc = inputs(S, dtype, hq, hkv, packed, seed=100 + S, grad=True)
        masks = masks_for(pattern, S, dtype, hq, hkv, doc, backend, grad=True)
        used.add(masks.route(pattern).backend)
        got, g = forward_backward(attn, pattern, q, k, v, doc, masks, S)
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref_out = reference(pattern, *leaves, doc)
        want = (ref_out, *torch.autograd.grad(ref_out, leaves, g.float()))
        triton = forward_backward(attn, pattern, q, k, v, doc, masks_for(pattern, S, dtype, hq, hkv, doc, "triton",
                                                                         grad=True), S)[0] \
            if backend == "flash" else got
        for name, a, b, t in zip(("out", "dq", "dk", "dv"), got, want, triton):
            assert torch.isfinite(a).all(), f"S={S} {name}: non-finite"
            err = rel_err(a, b)
            worst, vs_triton = max(worst, err), max(vs_triton, rel_err(a, t))
            assert err < 2 * TOL[dtype], f"S={S} {name}: relative error {err:.2e}"
            assert vs_triton < 2 * TOL[dtype], f"S={S} {name}: FLASH vs Triton {vs_triton:.2e}"
    graphs = flex_graphs() - before
    record_property("max_rel_err", worst)
    record_property("flash_vs_triton_max_rel_err", vs_triton)
    record_property("train_backend", sorted(used))
    record_property("compiled_graphs", graphs)
    assert len(used) == 1  # one verdict per mask kind
    assert graphs <= (2 if backend == "flash" else 1) * bucket_count(max(TRAIN_LENGTHS))


@pytest.mark.skipif(not FLASH_OK, reason=f"FLASH: {FLASH_WHY}")
def test_training_falls_back_to_triton_where_flash_backward_fails(monkeypatch, capsys, record_property):
    """Where flex_backend's probe finds FLASH's backward failing for a mask (forced here: the probe's verdict is
    replaced), the training route runs Triton -- gradients exactly Triton's -- and one line says so, whatever the
    number of forwards; the inference route of the same mask stays on FLASH."""
    pattern, dtype, hq, hkv, packed = CONFIGS["blocksparse_bf16_gqa"]
    why = "FLASH backward failed: NotImplementedError: forced by the test"
    monkeypatch.setattr(FB, "backward_error", lambda *a, **kw: why)
    FB.log_once.cache_clear()
    capsys.readouterr()
    attn = layer(pattern, hq, hkv)
    for S in (100, 257):
        q, k, v, doc = inputs(S, dtype, hq, hkv, packed, seed=S, grad=True)
        masks = masks_for(pattern, S, dtype, hq, hkv, doc, "flash", grad=True)
        assert masks.route(pattern).backend == "triton"
        got = forward_backward(attn, pattern, q, k, v, doc, masks, S)[0]
        want = forward_backward(attn, pattern, q, k, v, doc, masks_for(pattern, S, dtype, hq, hkv, doc, "triton",
                                                                        grad=True), S)[0]
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("flex attention:")]
    assert lines == [f"flex attention: Triton backend for training {pattern.bind_heads(hkv)!r} ({why})"]
    assert masks_for(pattern, 100, dtype, hq, hkv, None, "flash").route(pattern).backend == "flash"
    record_property("said", lines)


@pytest.mark.skipif(not FLASH_OK, reason=f"FLASH: {FLASH_WHY}")
def test_flash_backward_probe_on_every_mask_kind(record_property):
    """flex_backend's probe (FLASH forward + backward of 256 tokens against fp32 dense SDPA) on each bf16 mask kind
    the suite trains, packed and not: its verdicts, recorded (None: FLASH trains that kind)."""
    verdicts = {}
    for pattern, hq, hkv, head_dim in [(AttnSink(128, 64), 4, 4, 64), (AttnSink(4, 60), 8, 2, 128),
                                       (BlockSparse(64, 2, 3), 8, 2, 64),
                                       (BlockSparse(32, 1, 4, per_head=True), 8, 4, 64), (Full(), 4, 2, 64)]:
        for doc_batch in (None, 2):
            kind = dict(num_heads=hq, num_kv_heads=hkv, head_dim=head_dim, dtype=torch.bfloat16, device=DEV,
                        doc_batch=doc_batch)
            verdicts[f"{pattern!r} heads {hq}/{hkv} D {head_dim} docs {doc_batch}"] = FB.backward_error(
                pattern.bind_heads(hkv), **kind)
    record_property("flash_backward_verdicts", verdicts)
    assert all(v is None or v.startswith("FLASH ") for v in verdicts.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_over_a_prefix_with_q_offset(backend, record_property):
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
            out = flex_attend(q, k, v, bm, backend)
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


def test_the_policy_resolves_flash_where_it_imports():
    """None resolves to FLASH exactly where flash_attn.cute imports on this sm90+ card; an explicit FLASH elsewhere
    is refused in one line."""
    assert Policy().on(DEV).flex_backend == ("flash" if FLASH_OK else "triton")
    if not FLASH_OK:
        with pytest.raises(ValueError, match="^Policy.flex_backend='flash' cannot run on cuda: "):
            Policy(flex_backend="flash").on(DEV)
