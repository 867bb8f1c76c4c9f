"""GPU measurements behind the shape policy (flexgen_long.shapes), written to one JSON:

1. padding: whole-layer prefill (no-grad forward, last-position logits) and training step (forward + backward) of
   3 Llama-2-7B-shaped layers (1 full + 2 AttnSink(64, 1984), bf16) at lengths on a bucket rung (32768, 131072: the
   policy's shape *is* the exact shape) and just off one (33768 -> 49152, 130072 -> 131072), through the library's own
   forward (flex at the bucket's length). The committed record (results/shapes_NVIDIA_H200.json) also ran each
   off-rung length at its exact shape, by replacing the library's ``padded_len`` with the identity for the run; the
   public API has no way to run flex unpadded (the shape policy is not a setting), so that comparison is no longer
   made: its measurement stays in the record and in analysis/README.md;
2. static buckets vs ``torch.compile(dynamic=True)``: graphs made over 7 bucket sizes, first-call times, steady-state
   forward and forward+backward at 32768 (32 q / 8 kv heads, D 128, AttnSink(64, 1984));
3. GQA for causal SDPA: ``enable_gqa=True`` against K/V expanded to the query heads with ``repeat_interleave`` (16K
   tokens, 32 q / 8 kv heads, D 64 and 128), warmed up, forward and forward+backward;
4. a full layer's later prefill chunk (8192 queries at offset 57344 over 65536 keys): lower-right causal SDPA (K/V
   expanded, ``causal_lower_right``: the route ``sdpa_lower_right``) against compiled flex with the Full BlockMask at
   that offset (``flex_attend``, the route ``flex_full_chunk``);
5. sink alignment (``--parts sinks``): AttnSink layers with the same 2,048 keys per query, sink 64 (window 1984, the
   window's far edge cuts every key block) against sink 128 (window 1920, block-aligned), compiled flex forward and
   forward+backward at 131072 tokens (32 q / 8 kv heads, D 128, bf16), with causal SDPA (cuDNN/flash) beside them.

Kernel-level parts call torch directly (``F.scaled_dot_product_attention``, ``torch.compile(flex_attention)``) or the
library's public ``flex_attend``. Timing: triton's ``do_bench`` medians for kernels; for the layer stack,
``flexgen_long.timing.measure`` (CUDA events, warm-up, median). The committed record was taken with bench.py's former
timer, the same method. On a GPU:

    python analysis/bench_shapes.py --out analysis/results/shapes_<card>.json --commit SHA
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import flex_attention
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import build, environment, free, guarded, run_layers, set_layout  # noqa: E402
from flexgen_long.attention import flex_attend  # noqa: E402
from flexgen_long.masks import build_block_mask  # noqa: E402
from flexgen_long.patterns import AttnSink, Full  # noqa: E402
from flexgen_long.shapes import compiled_graphs, padded_len  # noqa: E402
from flexgen_long.timing import measure  # noqa: E402

DEV = torch.device("cuda")
SINK = AttnSink(64, 1984)


def median_ms(fn) -> float:
    return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))


def flex(q, k, v, block_mask):
    """flex_attention with grouped KV heads, as the library calls it (compiled by the caller)."""
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


def expand_kv(q, k, v):
    """K/V repeated to the query heads (what ``enable_gqa`` spares)."""
    group = q.shape[1] // k.shape[1]
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def sdpa_lower_right(q, k, v):
    """Causal SDPA of the last S of T positions: K/V expanded (the flash kernel takes equal head counts), the diagonal
    aligned to the last key."""
    k, v = expand_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[-2], k.shape[-2]))


def padding_cost(res: dict, lengths) -> None:
    model = build("llama2_7b", 3, max(lengths) + 128, DEV, torch.bfloat16)
    set_layout(model, "middle", SINK)
    out = res.setdefault("padding", {"model": "llama2_7b shape, 3 layers (1 full, 2 AttnSink(64, 1984)), bf16, B=1",
                                      "rows": []})
    for S in lengths:
        tokens = torch.randint(0, 32000, (1, S), device=DEV)

        def prefill():
            with torch.no_grad():
                return model.output(run_layers(model, tokens, needs_grad=False)[:, -1:])

        def train():
            model.zero_grad(set_to_none=True)
            run_layers(model, tokens, needs_grad=True).float().square().mean().backward()

        row = {"S": S, "bucket": padded_len(S), "mode": "policy",
               "prefill": guarded(lambda: measure(prefill, DEV, budget_ms=3000)),
               "train": guarded(lambda: measure(train, DEV, budget_ms=6000))}
        out["rows"].append(row)
        print(f"padding S={S:7d} prefill {row['prefill'].get('median_ms', row['prefill'])} ms, "
              f"train {row['train'].get('median_ms', row['train'])} ms", flush=True)
        free()
    del model
    free()


def flex_inputs(P, S, grad=False):
    q = torch.randn(1, 32, P, 128, device=DEV, dtype=torch.bfloat16, requires_grad=grad)
    k = torch.randn(1, 8, P, 128, device=DEV, dtype=torch.bfloat16, requires_grad=grad)
    v = torch.randn(1, 8, P, 128, device=DEV, dtype=torch.bfloat16, requires_grad=grad)
    bm = build_block_mask(SINK, S, S, num_heads=32, num_kv_heads=8, device=DEV, padded_lengths=(P, P))
    return q, k, v, bm


def dynamic_vs_static(res: dict) -> None:
    out = res.setdefault("dynamic_vs_static", {"pattern": repr(SINK), "heads": "32 q / 8 kv, D 128, bf16",
                                               "dynamic": [], "static": []})
    counters = torch._dynamo.utils.counters
    dyn = torch.compile(flex, dynamic=True, fullgraph=True)
    for P in (4096, 6144, 8192, 12288, 16384, 24576, 32768):
        q, k, v, bm = flex_inputs(P, P - 5)
        for name, call in (("dynamic", lambda: dyn(q, k, v, bm)), ("static", lambda: flex_attend(q, k, v, bm))):
            g0 = counters["stats"]["unique_graphs"]
            t0 = time.perf_counter()
            r = guarded(lambda: (call(), torch.cuda.synchronize(), {})[2])
            r.update({"P": P, "first_call_s": time.perf_counter() - t0,
                      "new_graphs": counters["stats"]["unique_graphs"] - g0})
            out[name].append(r)
            print(f"{name} P={P}: {r}", flush=True)
    q, k, v, bm = flex_inputs(32768, 32768)
    g = torch.randn(1, 32, 32768, 128, device=DEV, dtype=torch.bfloat16)
    for name, fn in (("dynamic", dyn), ("static", flex_attend)):
        out[f"{name}_fwd_ms_32768"] = guarded(lambda: median_ms(lambda: fn(q, k, v, bm)))
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        out[f"{name}_fwd_bwd_ms_32768"] = guarded(lambda: median_ms(lambda: fn(qg, kg, vg, bm).backward(g)))
        print(name, out[f"{name}_fwd_ms_32768"], out[f"{name}_fwd_bwd_ms_32768"], flush=True)
    free()


def gqa(res: dict) -> None:
    rows = res.setdefault("gqa_causal_sdpa", [])
    S = 16384
    for D in (64, 128):
        q = torch.randn(1, 32, S, D, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(1, 8, S, D, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(1, 8, S, D, device=DEV, dtype=torch.bfloat16)
        g = torch.randn_like(q)
        fns = {"enable_gqa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
               "expanded (repeat_interleave included)": lambda q, k, v: F.scaled_dot_product_attention(
                   q, *expand_kv(q, k, v), is_causal=True)}
        for name, fn in fns.items():
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            row = {"S": S, "D": D, "variant": name,
                   "fwd_ms": guarded(lambda: median_ms(lambda: fn(q, k, v))),
                   "fwd_bwd_ms": guarded(lambda: median_ms(lambda: fn(qg, kg, vg).backward(g)))}
            rows.append(row)
            print(row, flush=True)
    free()


def full_chunk(res: dict) -> None:
    C, T = 8192, 65536
    o = T - C
    q = torch.randn(1, 32, C, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 8, T, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, 8, T, 128, device=DEV, dtype=torch.bfloat16)
    bm = build_block_mask(Full(), C, T, q_offset=o, num_heads=32, num_kv_heads=8, device=DEV,
                          padded_lengths=(padded_len(C), padded_len(T)))
    a, b = sdpa_lower_right(q, k, v), flex_attend(q, k, v, bm)
    res["full_chunk"] = {"C": C, "offset": o, "T": T, "heads": "32 q / 8 kv, D 128, bf16",
                         "max_abs_diff": float((a.float() - b.float()).abs().max()),
                         "sdpa_lower_right_ms": median_ms(lambda: sdpa_lower_right(q, k, v)),
                         "flex_q_offset_ms": median_ms(lambda: flex_attend(q, k, v, bm))}
    print(res["full_chunk"], flush=True)
    free()


def sink_alignment(res: dict, S: int = 131072) -> None:
    rows = res.setdefault("sink_alignment", {"S": S, "heads": "32 q / 8 kv, D 128, bf16", "rows": []})["rows"]
    q = torch.randn(1, 32, S, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 8, S, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, 8, S, 128, device=DEV, dtype=torch.bfloat16)
    g = torch.randn_like(q)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    for pat in (AttnSink(64, 1984), AttnSink(128, 1920), AttnSink(4, 2044)):
        bm = build_block_mask(pat, S, S, num_heads=32, num_kv_heads=8, device=DEV)
        partial = int(bm.kv_num_blocks.sum())
        full = int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0
        row = {"pattern": repr(pat), "keys_per_query": pat.sink + pat.window, "partial_blocks": partial,
               "full_blocks": full,
               "fwd_ms": guarded(lambda: median_ms(lambda: flex_attend(q, k, v, bm))),
               "fwd_bwd_ms": guarded(lambda: median_ms(lambda: flex_attend(qg, kg, vg, bm).backward(g)))}
        rows.append(row)
        print(row, flush=True)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    row = {"pattern": "Full (causal SDPA)", "fwd_ms": guarded(lambda: median_ms(lambda: sdpa(q, k, v))),
           "fwd_bwd_ms": guarded(lambda: median_ms(lambda: sdpa(qg, kg, vg).backward(g)))}
    rows.append(row)
    print(row, flush=True)
    free()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 33768, 130072, 131072])
    ap.add_argument("--parts", nargs="+", default=["gqa", "full_chunk", "dynamic", "padding"],
                    choices=["gqa", "full_chunk", "dynamic", "padding", "sinks"])
    a = ap.parse_args()
    res = {"benchmark": "shape policy", **environment(DEV, a.commit)}
    parts = {"gqa": gqa, "full_chunk": full_chunk, "dynamic": dynamic_vs_static,
             "padding": lambda r: padding_cost(r, a.lengths), "sinks": sink_alignment}
    for name in a.parts:
        t0 = time.perf_counter()
        res.setdefault("errors", {})[name] = guarded(lambda: (parts[name](res), {})[1]) or None
        res.setdefault("part_s", {})[name] = round(time.perf_counter() - t0, 1)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    res["compiled_graphs"] = len(compiled_graphs())
    Path(a.out).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
