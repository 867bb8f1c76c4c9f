"""Decode-step attention of a full layer: the split-K kernel (flexgen_long.decode_kernel) against today's path and the
ideal, one query token per row over a preallocated KV cache of S slots of which L are valid.

    python analysis/bench_decode_kernel.py --check --out analysis/results/decode_kernel_<card>.json --commit SHA
    python analysis/bench_decode_kernel.py --device cpu --tiny --out /tmp/d.json     # smoke test (seconds, CPU)

Methods, timed in the same process on the same inputs:

* ``masked`` -- today's path (flexgen_long/attention.py, a full layer's decode step): SDPA over the whole buffer with
  the bool mask ``arange(S) < L`` per row, [B, 1, 1, S] broadcast over the heads, ``enable_gqa=True``; the mask is
  built inside the timed call, as the layer builds it each step;
* ``ideal``  -- SDPA without a mask over exactly ``k[:, :, :L]``, ``enable_gqa=True``, the fastest of the flash,
  cuDNN and memory-efficient backends that accept the call (each is timed; the row names the winner). Every row of a
  batch here has the same L, so the slice exists at batch 8 too; in serving, rows of different lengths cannot be
  sliced, and the ideal is a bound that only batch 1 can reach;
* ``ours``   -- ``decode_attention`` with its default ``num_splits``.

Shapes: Llama-2-7B (32 query / 32 KV heads) and Llama-3.1-8B (32 / 8), D 128, bf16; S in {8192, 32768, 131072};
L = S and S/2 (every row); B in {1, 8}. ``--sweep`` adds ``ours`` at other split counts and kernel configs (BLOCK_N,
num_warps, num_stages), the data for tuning ``kernel_config`` and ``default_num_splits``.

Timing: each method is captured in a CUDA graph (decode runs in one: generation.py captures the step), so host
launch overhead is left out alike for all three, and timed by CUDA events around graph replays: warm-up replays,
then the median over ``--reps`` replays. Inputs rotate: the graph runs the method over N independent copies of
q/K/V/lengths in turn, N large enough that the copies together exceed 4x the L2 cache (so no call finds its K/V in
L2 from the previous replay; N = 1 once one copy alone is that large), and a call's time is the replay's over N.

Reported per row: milliseconds per call, effective bandwidth = bytes of K/V actually needed
(2 * B * Hkv * L * D * 2 bytes, bf16) over the time, and ``ours`` against each baseline (``speedup_vs_masked`` =
masked / ours; ``fraction_of_ideal`` = ideal / ours, 1.0 meaning as fast as unmasked SDPA over exactly L keys).
``--check`` first compares ``ours`` with ``decode_attention_reference`` at each shape (relative L2 error, recorded;
a row over 1e-2 is marked failed and not timed). The JSON holds the card, torch and triton versions (bench.py's
``environment``) and every row, rewritten after each row.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import environment, free, guarded  # noqa: E402
from flexgen_long.decode_kernel import (decode_attention, decode_attention_reference, default_num_splits,  # noqa: E402
                                        kernel_config)

MODELS = {"llama2_7b": (32, 32), "llama3_1_8b": (32, 8)}  # (query heads, KV heads), head dim 128
D = 128
CHECK_TOL = 1e-2  # bf16 output against the fp32 reference, relative L2
SWEEP_CONFIGS = [{"BLOCK_N": 32}, {"BLOCK_N": 64}, {"BLOCK_N": 128}, {"num_warps": 8}, {"num_stages": 3},
                 {"BLOCK_N": 128, "num_warps": 8}]


def masked_sdpa(q, k, v, lengths):
    S = k.shape[2]
    mask = (torch.arange(S, device=k.device) < lengths[:, None]).view(-1, 1, 1, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def ideal_backends(device):
    """name -> a context forcing that SDPA backend (flash, cuDNN, memory-efficient); on CPU torch's own pick."""
    if device.type != "cuda":
        import contextlib
        return {"default": contextlib.nullcontext}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return {name: (lambda b=b: sdpa_kernel([b])) for name, b in
            (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
             ("efficient", SDPBackend.EFFICIENT_ATTENTION))}


def copies_for(bytes_per_copy: int, device, limit: int = 64) -> int:
    """Input copies to rotate through: together over 4x the L2 cache; at most ``limit`` and a quarter of free memory."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    free_bytes = torch.cuda.mem_get_info(device)[0]
    n = math.ceil(4 * l2 / bytes_per_copy)
    return max(1, min(n, limit, int(0.25 * free_bytes // bytes_per_copy)))


def make_inputs(B, hq, hkv, S, L, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, hq, 1, D, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(B, hkv, S, D, device=device, dtype=dtype, generator=gen) for _ in range(2))
    return q, k, v, torch.full((B,), L, device=device, dtype=torch.int32)


def time_per_call(fn, copies: list, device, reps: int, warmup: int = 10) -> float:
    """Milliseconds per call of ``fn(*copy)``: a CUDA graph running fn over every copy once, replayed (GPU); plain
    calls timed with perf_counter (CPU smoke runs)."""
    if device.type != "cuda":
        fn(*copies[0])
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            for c in copies:
                fn(*c)
            ts.append((time.perf_counter() - t) * 1e3 / len(copies))
        return statistics.median(ts)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile / pick kernels outside the capture
        for c in copies:
            fn(*c)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in copies:
            fn(*c)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / len(copies))
    del graph
    return statistics.median(ts)


def bench_row(model, B, S, L, a, device, dtype) -> dict:
    hq, hkv = MODELS[model]
    need = 2 * B * hkv * L * D * dtype.itemsize  # K and V bytes the answer depends on
    per_copy = 2 * B * hkv * S * D * dtype.itemsize
    n = copies_for(per_copy, device)
    row = {"model": model, "heads": f"{hq}/{hkv}", "D": D, "dtype": str(dtype).removeprefix("torch."), "B": B, "S": S,
           "L": L, "needed_bytes": need, "copies": n, "num_splits": default_num_splits(B, hkv, S),
           "config": kernel_config(dtype, hq // hkv, D)}
    copies = [make_inputs(B, hq, hkv, S, L, dtype, device, seed=i) for i in range(n)]
    if a.check:
        q, k, v, lengths = copies[0]
        row["check_rel_err"] = rel_err(decode_attention(q, k, v, lengths), decode_attention_reference(q, k, v, lengths))
        if not row["check_rel_err"] < CHECK_TOL:
            row["error"] = f"check failed: relative error {row['check_rel_err']:.3e} >= {CHECK_TOL}"
            return row

    def timed(fn, cps=copies):
        r = guarded(lambda: {"ms": time_per_call(fn, cps, device, a.reps)})
        if "ms" in r:
            r["GBps"] = need / (r["ms"] * 1e-3) / 1e9
        return r

    row["masked"] = timed(masked_sdpa)
    sliced = [(q, k[:, :, :L], v[:, :, :L]) for q, k, v, _ in copies]
    tries = {}
    for name, ctx in ideal_backends(device).items():
        def call(q, k, v, ctx=ctx):
            with ctx():
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        tries[name] = timed(call, sliced)
    ok = {name: r for name, r in tries.items() if "ms" in r}
    best = min(ok, key=lambda name: ok[name]["ms"]) if ok else None
    row["ideal_backends"] = tries
    row["ideal"] = {**ok[best], "backend": best} if ok else {"error": "no SDPA backend accepted the call"}
    row["ours"] = timed(lambda q, k, v, lengths: decode_attention(q, k, v, lengths))
    if "ms" in row["ours"]:
        if "ms" in row["masked"]:
            row["speedup_vs_masked"] = row["masked"]["ms"] / row["ours"]["ms"]
        if "ms" in row["ideal"]:
            row["fraction_of_ideal"] = row["ideal"]["ms"] / row["ours"]["ms"]
    if a.sweep:
        base = row["num_splits"]
        sweep = {}
        for splits in sorted({max(1, base // 2), base * 2, base * 4} - {base}):
            if splits <= S:
                sweep[f"splits={splits}"] = timed(lambda q, k, v, lengths, s=splits: decode_attention(
                    q, k, v, lengths, num_splits=s))
        for cfg in SWEEP_CONFIGS:
            sweep[json.dumps(cfg)] = timed(lambda q, k, v, lengths, c=cfg: decode_attention(q, k, v, lengths, config=c))
        row["ours_sweep"] = sweep
    del copies
    free()
    return row


def rel_err(got, want) -> float:
    got, want = got.float(), want.float()
    return float((got - want).norm() / want.norm())


def fmt(r: dict, key: str) -> str:
    return f"{r[key]:.3f}" if key in r else "-"


def table(rows: list[dict]) -> str:
    head = (f"{'model':12s} {'B':>2s} {'S':>7s} {'L':>7s} | {'masked ms':>9s} {'ideal ms':>9s} {'ours ms':>9s} | "
            f"{'masked GB/s':>11s} {'ideal GB/s':>10s} {'ours GB/s':>9s} | {'vs masked':>9s} {'of ideal':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        m, i, o = (r.get(x, {}) for x in ("masked", "ideal", "ours"))
        gb = lambda d: f"{d['GBps']:.0f}" if "GBps" in d else "-"  # noqa: E731
        lines.append(f"{r['model']:12s} {r['B']:2d} {r['S']:7d} {r['L']:7d} | {fmt(m, 'ms'):>9s} {fmt(i, 'ms'):>9s} "
                     f"{fmt(o, 'ms'):>9s} | {gb(m):>11s} {gb(i):>10s} {gb(o):>9s} | "
                     f"{fmt(r, 'speedup_vs_masked'):>9s} {fmt(r, 'fraction_of_ideal'):>8s}"
                     + (f"  {r['error']}" if "error" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072], help="cache sizes S")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=50, help="timed graph replays per measurement (median)")
    ap.add_argument("--check", action="store_true", help="compare ours with the reference at each shape first")
    ap.add_argument("--sweep", action="store_true", help="also time ours at other split counts and kernel configs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="S 256, 2 reps: a CPU smoke test in seconds")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if a.tiny:
        a.lengths, a.reps = [256], 2
    dtype = torch.bfloat16
    res = {"benchmark": "decode attention: split-K kernel vs masked SDPA vs SDPA over L keys",
           **environment(device, a.commit), "method": "CUDA-graph replays, CUDA events, median; inputs rotated "
           "past 4x L2" if device.type == "cuda" else "CPU smoke run: perf_counter, no graphs", "reps": a.reps,
           "rows": []}
    print(table([]))
    for model in a.models:
        for S in a.lengths:
            for L in (S, S // 2):
                for B in a.batches:
                    t0 = time.perf_counter()
                    row = guarded(lambda: bench_row(model, B, S, L, a, device, dtype))
                    row = {"model": model, "B": B, "S": S, "L": L, **row, "seconds": round(time.perf_counter() - t0, 1)}
                    res["rows"].append(row)
                    print(table([row]).splitlines()[-1], flush=True)
                    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    print("\n" + table(res["rows"]))
    return res


if __name__ == "__main__":
    main()
