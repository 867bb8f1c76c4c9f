"""A full layer's decode-step attention over a bf16 cache (SDPA, today's route) against the FP8 cache read by
``flexgen_long.kv_fp8.decode_attention``, at Llama-2-7B (32/32 heads) and Llama-3.1-8B (32/8) shapes, D 128.

Each case: the bf16 keys/values are drawn at random (not zeros), quantised with ``kv_fp8.quantize``; the FP8 kernel's
output is checked against the float64 reference over the dequantised cache (relative L2 error) with every output
element written (the output buffer is never pre-zeroed: NaN would show), and against bf16 SDPA over the original
cache (the quantisation's own error). Times: one call captured in a CUDA graph (decode runs in graphs), replayed
after a warm-up, each replay timed by CUDA events, median of ``--reps``; inputs larger than the L2 cache. Bandwidth
counts the K/V bytes each path must read (bf16: 4*D per token and KV head; FP8: 2*D + 8). ``--sweep`` adds split
counts and kernel configs at 128K.

    python analysis/bench_kv_fp8.py --out analysis/results/kv_fp8_<card>.json [--sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flexgen_long import kv_fp8  # noqa: E402

SHAPES = {"llama2_7b": (32, 32), "llama3_1_8b": (32, 8)}
D = 128


def graph_ms(fn, reps: int) -> float:
    """Median ms of one CUDA-graph replay of ``fn`` (warmed up first)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def case(name, hq, hkv, B, S, reps, configs):
    gen = torch.Generator(device="cuda").manual_seed(sum(map(ord, name)) * 1000 + B * 7 + S)  # fixed per case
    q = torch.randn(B, hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k8, ks, v8, vs = (torch.empty(B, hkv, S, D, device="cuda", dtype=kv_fp8.FP8),
                      torch.empty(B, hkv, S, device="cuda"), torch.empty(B, hkv, S, D, device="cuda",
                                                                           dtype=kv_fp8.FP8),
                      torch.empty(B, hkv, S, device="cuda"))
    for b in range(B):  # a row at a time: quantize's fp32 temporaries of a whole 128K batch would not fit
        k8[b], ks[b] = kv_fp8.quantize(k[b])
        v8[b], vs[b] = kv_fp8.quantize(v[b])
    lengths = torch.full((B,), S, device="cuda", dtype=torch.int32)
    row = {"shape": name, "heads": [hq, hkv], "batch": B, "S": S}
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    ref_bf16 = sdpa()
    row["sdpa_bf16_ms"] = graph_ms(sdpa, reps)
    bytes_bf16, bytes_fp8 = B * hkv * S * 4 * D, B * hkv * S * kv_fp8.stored_bytes(D)
    row["sdpa_bf16_TBps"] = bytes_bf16 / row["sdpa_bf16_ms"] / 1e9
    # correctness at the default config, on a sub-batch (the float64 reference is slow at 128K)
    out = kv_fp8.decode_attention(q, k8, ks, v8, vs, lengths)
    torch.cuda.synchronize()
    ref = kv_fp8.decode_attention_reference(q[:1], k8[:1], ks[:1], v8[:1], vs[:1], lengths[:1], dtype=torch.float64)
    row["nan"] = bool(out.isnan().any())
    row["err_vs_reference"] = rel(out[:1], ref)
    row["err_vs_bf16_sdpa"] = rel(out, ref_bf16)
    row["fp8"] = []
    for cfg in configs:
        splits = cfg.pop("num_splits", None)
        fn = lambda: kv_fp8.decode_attention(q, k8, ks, v8, vs, lengths, num_splits=splits,  # noqa: E731
                                             config=cfg or None)
        ms = graph_ms(fn, reps)
        row["fp8"].append({"config": cfg, "num_splits": splits or kv_fp8.default_num_splits(B, hkv, S), "ms": ms,
                           "TBps": bytes_fp8 / ms / 1e9, "vs_sdpa_bf16": row["sdpa_bf16_ms"] / ms})
    best = min(row["fp8"], key=lambda r: r["ms"])
    print(f"{name:12s} B{B} S{S:>6d} | sdpa bf16 {row['sdpa_bf16_ms']:.3f} ms {row['sdpa_bf16_TBps']:.2f} TB/s | fp8 "
          f"default {row['fp8'][0]['ms']:.3f} ms {row['fp8'][0]['TBps']:.2f} TB/s ({row['fp8'][0]['vs_sdpa_bf16']:.2f}x)"
          f" best {best['ms']:.3f} {best['config']} splits {best['num_splits']} | err ref {row['err_vs_reference']:.1e}"
          f" vs bf16 {row['err_vs_bf16_sdpa']:.1e}", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kv_fp8 needs a CUDA GPU")
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": args.commit, "rows": [],
           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name, (hq, hkv) in SHAPES.items():
        for B, S in ((1, 32768), (1, 131072), (8, 32768), (8, 131072)):
            configs = [{}]
            if args.sweep and S == 131072:
                configs += [{"num_splits": n} for n in (16, 32, 64, 128)]
                configs += [{"BLOCK_N": bn, "num_warps": w, "num_stages": st}
                            for bn, w, st in ((32, 4, 3), (128, 4, 3), (128, 8, 3), (64, 4, 4), (64, 8, 2))]
            res["rows"].append(case(name, hq, hkv, B, S, args.reps, configs))
            torch.cuda.empty_cache()  # the case's tensors went with its frame
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
