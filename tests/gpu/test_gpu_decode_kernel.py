"""flexgen_long.decode_kernel's compiled Triton kernels on the GPU at the shapes users send: Llama-2-7B (32 query /
32 KV heads) and Llama-3.1-8B (32 / 8) layers, D 128, bf16, caches of 4096 and 131072 slots, batch 1 and 8 with rows
of mixed lengths (1 and S among them), one split, the default and many, splits wholly past L (buffers poisoned with
NaN), strided K/V, fp32; then CUDA-graph capture: one capture, replayed for new lengths and queries copied into its
static inputs. Oracle: decode_attention_reference (fp32, per-row slices) on the same inputs; it is itself checked
against masked SDPA in tests/test_decode_kernel.py."""

from __future__ import annotations

import pytest
import torch

import flexgen_long.decode_kernel as dk
from flexgen_long.decode_kernel import decode_attention, decode_attention_reference, default_num_splits
from reference import rel_err

DEV = "cuda"
D = 128
MODELS = {"llama2_7b": (32, 32), "llama31_8b": (32, 8)}  # (query heads, KV heads)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative L2 error against the fp32 reference


def mixed_lengths(B: int, S: int) -> list[int]:
    """B lengths with 1 and S among them and the rest around key-block edges and mid-cache."""
    pool = [1, S, 129, S // 2 + 3, 2, S - 1, 1000, 64]
    return pool[:B] if B > 1 else [S]


def inputs(B, hq, hkv, S, dtype, seed, strided=False):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, hq, 1, D, device=DEV, dtype=dtype, generator=gen)
    if strided:  # a [B, S, Hkv, D] buffer seen as [B, Hkv, S, D]
        k, v = (torch.randn(B, S, hkv, D, device=DEV, dtype=dtype, generator=gen).transpose(1, 2) for _ in range(2))
    else:
        k, v = (torch.randn(B, hkv, S, D, device=DEV, dtype=dtype, generator=gen) for _ in range(2))
    return q, k, v


def check(out, q, k, v, lengths, what: str) -> float:
    assert out.shape == q.shape and out.dtype == q.dtype, what
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = rel_err(out, decode_attention_reference(q, k, v, lengths))
    assert err < TOL[q.dtype], f"{what}: relative error {err:.2e}"
    return err


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("S", [4096, 131072])
@pytest.mark.parametrize("B", [1, 8])
def test_user_shapes_bf16(model, S, B, record_property):
    hq, hkv = MODELS[model]
    q, k, v = inputs(B, hq, hkv, S, torch.bfloat16, seed=S + B)
    worst = 0.0
    for lens in (mixed_lengths(B, S), [1] * B, [S] * B, [S // 3 + 17] * B):
        lengths = torch.tensor(lens, device=DEV, dtype=torch.int32)
        for splits in (None, 1, 64):
            out = decode_attention(q, k, v, lengths, num_splits=splits)
            worst = max(worst, check(out, q, k, v, lengths, f"lengths {lens[:4]}..., splits {splits}"))
    record_property("max_rel_err", worst)
    record_property("default_splits", default_num_splits(B, hkv, S))


@pytest.mark.parametrize("model", list(MODELS))
def test_fp32_strided_and_every_length_near_block_edges(model, record_property):
    """fp32 (IEEE dots, tolerance 1e-5), K/V strided, lengths 1..300 at every BLOCK_N edge in rows of 3."""
    hq, hkv = MODELS[model]
    S, worst = 640, 0.0
    q, k, v = inputs(3, hq, hkv, S, torch.float32, seed=7, strided=True)
    edges = [1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 299, 300, S]
    for i in range(0, len(edges), 3):
        lengths = torch.tensor((edges[i:i + 3] + [S, S])[:3], device=DEV, dtype=torch.int64)
        for splits in (1, 3, 16):
            out = decode_attention(q, k, v, lengths, num_splits=splits)
            worst = max(worst, check(out, q, k, v, lengths, f"lengths {lengths.tolist()}, splits {splits}"))
    record_property("max_rel_err", worst)


def test_empty_splits_poisoned(monkeypatch, record_property):
    """Buffers start as NaN; splits wholly past L write lse -inf and zeros; the output has no NaN."""
    made = []

    def poisoned(*shape, dtype, device):
        t = torch.full(shape, float("nan"), dtype=dtype, device=device)
        made.append(t)
        return t

    monkeypatch.setattr(dk, "_empty", poisoned)
    hq, hkv = MODELS["llama31_8b"]
    S = 4096
    q, k, v = inputs(4, hq, hkv, S, torch.bfloat16, seed=3)
    lengths = torch.tensor([1, 65, 700, S], device=DEV, dtype=torch.int32)
    out = decode_attention(q, k, v, lengths, num_splits=32)
    part_o, part_lse, _ = made
    assert not part_o.isnan().any() and not part_lse.isnan().any()
    empty = torch.isneginf(part_lse)
    assert empty[0, :, 1:].all() and not empty[0, :, 0].any()  # L 1: split 0 only
    assert empty[3].sum() == 0  # L = S: 32 splits of 128 keys, all full
    assert (part_o[empty] == 0).all()
    record_property("max_rel_err", check(out, q, k, v, lengths, "poisoned"))


@pytest.mark.parametrize("model,S,B", [("llama2_7b", 4096, 8), ("llama31_8b", 4096, 8), ("llama31_8b", 131072, 1)])
def test_cuda_graph_replays_new_lengths(model, S, B, record_property):
    """One capture with static q, k, v, lengths; then for each new set of lengths (and a new query), copy_ into the
    static tensors, replay, compare with the reference. The grid is fixed by shapes, so no recapture is needed."""
    hq, hkv = MODELS[model]
    q, k, v = inputs(B, hq, hkv, S, torch.bfloat16, seed=11)
    lengths = torch.tensor(mixed_lengths(B, S), device=DEV, dtype=torch.int32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(2):
            decode_attention(q, k, v, lengths)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, lengths)
    gen = torch.Generator().manual_seed(5)
    worst = 0.0
    schedule = [mixed_lengths(B, S), [1] * B, [S] * B,
                *[torch.randint(1, S + 1, (B,), generator=gen).tolist() for _ in range(5)]]
    for step, lens in enumerate(schedule):
        lengths.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen).to(q.dtype))
        graph.replay()
        torch.cuda.synchronize()
        worst = max(worst, check(out.clone(), q, k, v, lengths, f"replay {step}, lengths {lens}"))
    record_property("max_rel_err", worst)
    record_property("replays", len(schedule))
