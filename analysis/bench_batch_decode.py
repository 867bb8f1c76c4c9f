"""Batch decode throughput and 80 GB serving capacity, hybrid vs dense: decode tokens/s at batch sizes 1, 8, 32 for the
hybrid model (middle third full, the library's default AttnSink(128, 1920) elsewhere) and the same model with every
layer full, at 32K and 128K context, on the Llama-2-7B (MHA) and Llama-3.1-8B (GQA) shapes with random bf16 weights;
then the largest batch of 128K-token prompts that fits an 80 GB card for each layout, and the decode rate there.

    python analysis/bench_batch_decode.py --shapes llama2_7b   --out $OUT/batch_decode_llama2_7b.json   --commit SHA
    python analysis/bench_batch_decode.py --shapes llama3_1_8b --out $OUT/batch_decode_llama3_1_8b.json --commit SHA
    python analysis/plot_speedups.py --batch-decode '$OUT/batch_decode_*.json' --out analysis/figures
    python analysis/bench_batch_decode.py --tiny --out /tmp/batch_decode_tiny.json     # CPU smoke test, ~1 min

Method (harness-level: the decode step itself, not ``generate()``'s loop with its sampling and one host sync per
token). For each (shape, context, layout, batch B):

1. Budget: the step must fit a card of ``--budget-gib`` (79.1 GiB: an 80 GB card as torch reports its total memory,
   as analysis/capacity.py assumes): weights + ``plan_cache(model, B, ctx + new_tokens)`` + a decode step's
   activations (``decode_activation_bytes``). A batch over budget, or over the device's real free memory, is recorded
   as ``"skipped": "<why, with the numbers>"`` and the run goes on (it never runs out of memory on purpose; an
   out-of-memory error that happens anyway is recorded as ``"error"``). Each row also says whether ``generate()``
   itself fits the budget at that batch (``fits_generate``: ``serving_capacity``, which adds the 8K-chunk prefill's
   activations): 7B dense at 128K decodes in 80 GB (76.8 GiB) but its 8K-chunk prefill is estimated not to fit.
2. Caches: row 0 is prefilled once per (shape, context, layout) into a batch-1 ``ModelCache(model, 1, ctx + 1)`` with a
   random prompt of ctx tokens through the library's ``prefill`` (8K chunks; its time includes flex compilation and is
   recorded as such). For B > 1 a ``ModelCache(model, B, ctx + 1)`` is allocated and row 0's k, v and pos are copied
   into every row of every layer (the batch-1 cache is freed after the group's last batch). A decode step's time
   does not depend on the cached values -- every row reads the same number of slots either way -- so B copies of one
   prompt time the same as B different prompts; the values are real prefill output, not zeros.
3. Step: one token per row at position ctx (every full buffer and every ring exactly full: the mask-free path,
   ``exact_layers(model, cache, ctx, ctx)``), captured with ``_GraphedStep`` (CUDA-graph replay) in two modes:
   ``eager`` (``decode_step``) and ``fused`` (``compile=True``: ``fused_decode_step``, each layer's work around
   attention compiled; ``compile_s`` is its ahead-of-time compilation, recorded apart -- ~1 min the first time in a
   process, milliseconds after). Warm-up (the capture step and one more), then ``--reps`` (30) timed replays with CUDA
   events (``flexgen_long.timing``): median, min, max. The fused step's logits are compared with the eager step's.
4. Per row: ms per step, tokens/s = B / step time, bytes per step = every weight once (the embedding table: one row)
   + every cached K/V byte of the batch (``bench_generation.bytes_per_step``), effective TB/s = bytes / step
   time and its fraction of this card's copy bandwidth (one large device-to-device copy, measured at the start), peak
   memory allocated (the batch-1 source cache included when B > 1: ``source_cache_GiB``).

Then per (shape, context, batch) the hybrid / dense ratio of tokens/s, and capacity: per shape and layout at each
``--capacity-contexts`` (128K), ``flexgen_long.cache.serving_capacity`` (128 new tokens, 8K prefill chunks, the
budget) gives the largest batch; when it is > 0 that batch is timed too (``kind: "largest"``), and the summary gives
the hybrid / dense capacity ratio and tokens/s at each one's largest batch. Hybrid and dense run in the same process
on the same weights (the baseline in the same run).

GPU time (one H200, estimated, not yet run): per shape, process start and model build ~30 s; flex compilation for the
8K-chunk prefills' shapes ~1 min (``warmup()`` compiled 20 such graphs up to 128K in 46 s on an H200:
analysis/results/served_NVIDIA_H200.json); the prefills, one per layout and context (a layout with no batch in budget
is not prefilled): 32K ~2 s, 128K ~9-15 s; fused-decode compilation ~1 min per set, two sets per shape (batch 1, then
the dynamic batch); ~10 timed rows at a few seconds each (capture, warm-up, 2 x 30 replays of 10-30 ms). About 4-6
minutes per shape: one shape per command keeps each process under 10 minutes (a JSON per shape; the figure joins them)
-- ~10-12 minutes of GPU time for both.

``--tiny``: a CPU smoke test of the script's logic (two 6-layer toy shapes, MHA and GQA, AttnSink(4, 60), fp32,
contexts 256 and 512, batches 1 2 4, a 0.07 GiB budget so that some batches are skipped and the largest batches are a
few rows): the same plan, prefill, copy, capacity and summary, but no CUDA graphs -- ``decode_step`` and
``fused_decode_step`` called directly and timed with ``flexgen_long.timing``, the fused step through torch.compile's
``eager`` backend (dynamo's graph split without Inductor's code generation, which takes minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_generation, bench
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import environment, free  # noqa: E402
from bench_generation import SHAPES, bytes_per_step  # noqa: E402
from flexgen_long import generation, timing  # noqa: E402
from flexgen_long.cache import (ModelCache, decode_activation_bytes, free_memory_bytes, plan_cache,  # noqa: E402
                                prefill_activation_bytes, serving_capacity)
from flexgen_long.generation import _GraphedStep, compile_decode_ahead, decode_step, exact_layers, \
    fused_decode_step, prefill  # noqa: E402
from flexgen_long.layout import DEFAULT_SPARSE_PATTERN  # noqa: E402
from flexgen_long.models import TINY_SPARSE_PATTERN, fuse_projections, longgen_llama, relayout  # noqa: E402
from flexgen_long.patterns import Full  # noqa: E402

GiB = 2**30
MODES = ("eager", "fused")
#: --tiny: two toy shapes that keep the big ones' difference (MHA vs GQA), 6 layers so the middle third (2, 3) is full
TINY_SHAPES = {"tiny_mha": dict(vocab_size=256, num_kv_heads=4), "tiny_gqa": dict(vocab_size=512, num_kv_heads=2)}
#: --tiny's default budget: the memory estimate's fixed terms (64 MiB of slack on top of the activations) dominate at
#: toy sizes, so ~70 MiB is what makes the largest batch a few rows and the dense 512-token batch of 4 too large
TINY_BUDGET_GIB = 0.07

# Dynamo's recompile limit is left as users have it: the fused step compiles at most three sets of graphs per shape
# (first batch size, batch 1, dynamic batch), within it; each shape starts from a reset (below).


def build(shape: str, max_seq_len: int, device: torch.device):
    """The shape's model (random weights, middle third full, the run's sparse pattern) on ``device``."""
    with torch.device(device):
        if shape in TINY_SHAPES:
            t = TINY_SHAPES[shape]
            return longgen_llama(t["vocab_size"], 6, 4, t["num_kv_heads"], 64, 256, max_seq_len, 10_000,
                                 sparse_pattern=TINY_SPARSE_PATTERN).eval()
        return SHAPES[shape](max_seq_len=max_seq_len, sparse_pattern=DEFAULT_SPARSE_PATTERN).eval()


def copy_bandwidth_TBps(device: torch.device) -> float | None:
    """This card's achievable memory bandwidth: one 1 GiB device-to-device copy (bytes read + written), median of 10
    after a warm-up -- the ceiling that the rows' effective TB/s is compared with. None on the CPU."""
    if device.type != "cuda":
        return None
    src = torch.randn(GiB // 4, device=device)  # random data: zeros can move faster than real values
    dst = torch.empty_like(src)
    ms = timing.measure(lambda: dst.copy_(src), device, budget_ms=0, min_reps=10, max_reps=10)["median_ms"]
    del src, dst
    torch.cuda.empty_cache()
    return 2 * GiB / (ms * 1e-3) / 1e12


def _time(fn, device: torch.device, reps: int) -> dict:
    """Median / min / max ms of ``reps`` calls after one warm-up call (flexgen_long.timing: CUDA events on a GPU)."""
    m = timing.measure(fn, device, budget_ms=0, min_reps=reps, max_reps=reps)
    out = {"step_ms": m["median_ms"], "min_ms": m["min_ms"], "max_ms": m["max_ms"], "reps": m["reps"]}
    if "peak_mem_gib" in m:  # measured from the start of the timed calls: caches, weights and the graph's memory
        out["peak_alloc_GiB"] = m["peak_mem_gib"]
    return out


def budget_check(model, B: int, ctx: int, new_tokens: int, budget: int, dtype, cap: dict) -> tuple[dict, str | None]:
    """The row's plan on the emulated card: (fields, None) when weights + KV + decode activations fit ``budget``, else
    (fields, why). ``cap``: serving_capacity's answer for this (ctx, layout), which says whether generate() fits."""
    weights = sum(p.nbytes for p in model.parameters())
    kv = plan_cache(model, B, ctx + new_tokens, dtype).total_bytes
    dec = decode_activation_bytes(model, B, ctx + new_tokens, dtype)
    need = weights + kv + dec
    fields = {"plan_GiB": need / GiB, "kv_plan_GiB": kv / GiB, "fits_generate": B <= cap["batch"]}
    if need <= budget:
        return fields, None
    return fields, (f"over budget: weights {weights / GiB:.4g} + KV {B} x {kv / B / GiB:.4g} (max_len ctx + "
                    f"{new_tokens}) + decode activations {dec / GiB:.4g} = {need / GiB:.4g} GiB > "
                    f"{budget / GiB:.4g} GiB")


def prefill_row0(model, ctx: int, chunk: int, dtype, device) -> tuple[ModelCache | None, dict]:
    """A batch-1 cache of max_len ctx + 1 holding a random ctx-token prompt, prefilled through the library's
    ``prefill``; (None, {"skipped": why}) when it and the prefill's activations do not fit in free memory."""
    kv = plan_cache(model, 1, ctx + 1, dtype).total_bytes
    act = prefill_activation_bytes(model, min(chunk, ctx), dtype, ctx, ctx + 1, device)
    avail = free_memory_bytes(device)
    if kv + act > avail:
        return None, {"skipped": f"prefill of row 0 does not fit: KV {kv / GiB:.4g} + prefill activations "
                                 f"{act / GiB:.4g} GiB > {avail / GiB:.4g} GiB free"}
    cache = ModelCache(model, 1, ctx + 1, dtype, device)
    prompt = torch.randint(0, model.tok_embeddings.num_embeddings, (ctx,), device=device)
    t = time.perf_counter()
    prefill(model, cache, prompt, 0, chunk)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return cache, {"prefill_s": time.perf_counter() - t, "prefill_includes_compile": True,
                   "kv_per_row_GiB": kv / GiB}


def batch_cache(model, src: ModelCache, B: int, ctx: int, dtype, device) -> ModelCache:
    """``src`` (batch 1) itself for B = 1, else a batch-B cache with row 0's k, v and pos in every row."""
    if B == 1:
        return src
    cache = ModelCache(model, B, ctx + 1, dtype, device)
    for a, c in cache.layers.items():
        s = src.layers[a]
        c.k.copy_(s.k.expand_as(c.k))
        c.v.copy_(s.v.expand_as(c.v))
        c.pos.copy_(s.pos.expand_as(c.pos))
    return cache


def time_batch(model, src: ModelCache, B: int, ctx: int, dtype, device, modes, reps: int,
               copy_TBps: float | None) -> dict:
    """Decode-step timings of one batch (module docstring, steps 2-4); raises MemoryError when the batch's cache and
    its steps' activations exceed the device's free memory."""
    row: dict = {}
    kv_now = plan_cache(model, B, ctx + 1, dtype).total_bytes if B > 1 else 0
    act = 2 * decode_activation_bytes(model, B, ctx + 1, dtype)  # each captured graph keeps its own activations
    avail = free_memory_bytes(device)
    if kv_now + act > avail:
        raise MemoryError(f"not enough free memory: batch cache {kv_now / GiB:.4g} + decode activations "
                          f"{act / GiB:.4g} GiB (x2 graphs) > {avail / GiB:.4g} GiB free on {device}")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = batch_cache(model, src, B, ctx, dtype, device)
    tok = torch.randint(0, model.tok_embeddings.num_embeddings, (B,), device=device)
    pos = torch.full((B,), ctx, dtype=torch.long, device=device)
    exact = exact_layers(model, cache, ctx, ctx)
    row["exact_layers"] = len(exact)
    row["kv_GiB"] = cache.nbytes / GiB
    row["bytes_per_step"] = bytes_per_step(model, cache)
    row["source_cache_GiB"] = src.nbytes / GiB if B > 1 else 0.0
    row["modes"] = {}
    ref, peaks = None, []
    for mode in modes:
        m: dict = {}
        if cuda:
            t = time.perf_counter()
            step = _GraphedStep(model, cache, B, device, compile=mode == "fused")
            m["compile_s"] = step.compile_s if mode == "fused" else 0.0
            out = step(tok, pos, exact).clone()  # real step + capture (the warm-up CUDA graphs need)
            step(tok, pos, exact)
            m["first_calls_s"] = time.perf_counter() - t
            peaks.append(torch.cuda.max_memory_allocated(device) / GiB)  # the capture's, before timing resets it
            m.update(_time(lambda: step(tok, pos, exact), device, reps))
            peaks.append(m["peak_alloc_GiB"])
        else:  # --tiny: no CUDA graphs, the step functions themselves
            m["compile_s"] = compile_decode_ahead(model, B, dtype, device) if mode == "fused" else 0.0
            fn = fused_decode_step if mode == "fused" else decode_step
            t = time.perf_counter()
            out = fn(model, cache, tok, pos, exact).clone()
            m["first_calls_s"] = time.perf_counter() - t
            m.update(_time(lambda: fn(model, cache, tok, pos, exact), device, reps))
            step = None
        out = out.float()
        if ref is None:
            ref = out
        else:
            m["max_rel_diff_vs_first_mode"] = float((out - ref).abs().max() / ref.abs().max())
        m["tokens_per_s"] = B / (m["step_ms"] * 1e-3)
        m["TBps"] = row["bytes_per_step"] / (m["step_ms"] * 1e-3) / 1e12
        if copy_TBps:
            m["fraction_of_copy_bandwidth"] = m["TBps"] / copy_TBps
        row["modes"][mode] = m
        del step, out
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
    if cuda:  # over the batch cache's allocation, each mode's capture and its timed replays
        row["peak_alloc_GiB"] = max(peaks)
    if cache is not src:
        del cache
    return row


@torch.inference_mode()  # as generate() runs: caches made outside it would fail the compiled step's guards
def run_group(res, model, shape, ctx, layout, batches, capacity_ctx, args, dtype, device, save) -> None:
    """Every batch of one (shape, ctx, layout): capacity, budget checks, one prefill of row 0, the timed rows."""
    budget = int(args.budget_gib * GiB)
    cap = serving_capacity(model, ctx, args.new_tokens, budget, dtype, prefill_chunk=args.chunk,
                           device=device.type)
    if capacity_ctx:
        res["capacity"].append({"shape": shape, "ctx": ctx, "layout": layout, "new_tokens": args.new_tokens,
                                **{k: (v / GiB if k.endswith("_bytes") else v) for k, v in cap.items()}})
    plan = [(B, "sweep") for B in batches]
    if capacity_ctx and cap["batch"] > 0:
        plan.append((cap["batch"], "largest"))
    rows = []
    for B, kind in plan:
        fields, why = budget_check(model, B, ctx, args.new_tokens, budget, dtype, cap)
        row = {"shape": shape, "ctx": ctx, "layout": layout, "batch": B, "kind": kind, **fields}
        if kind == "largest" and B in batches:
            row["same_as_sweep_row"] = True  # timed once, in the sweep row of the same batch
        if why:
            row["skipped"] = why
        rows.append(row)
    todo = [r for r in rows if "skipped" not in r and not r.get("same_as_sweep_row")]
    src, pre = (None, {"skipped": "no batch in budget: row 0 not prefilled"}) if not todo else (None, {})
    if todo:
        try:
            src, pre = prefill_row0(model, ctx, args.chunk, dtype, device)
        except (torch.OutOfMemoryError, MemoryError) as e:
            pre = {"skipped": f"prefill of row 0 failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    res["prefills"].append({"shape": shape, "ctx": ctx, "layout": layout, **pre})
    print(json.dumps(res["prefills"][-1]), flush=True)
    for row in rows:
        if any(row is t for t in todo):
            if src is None:
                row["skipped"] = pre["skipped"]
            else:
                try:
                    row.update(time_batch(model, src, row["batch"], ctx, dtype, device, args.modes, args.reps,
                                          res.get("copy_TBps")))
                except MemoryError as e:  # the device's real free memory: a skip, with its numbers
                    row["skipped"] = str(e)
                except Exception as e:  # noqa: BLE001 -- recorded, never a crash of the whole run
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                free()
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()
    del src
    free()


def _tps(row, mode):
    return ((row or {}).get("modes") or {}).get(mode, {}).get("tokens_per_s")


def summarize(res: dict) -> dict:
    """Hybrid / dense tokens/s per (shape, ctx, batch, mode), and capacity: the largest batches, their ratio and the
    tokens/s at each one's largest batch."""
    rows = res["rows"]
    find = lambda **kw: next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)  # noqa: E731
    pairs = []
    for key in sorted({(r["shape"], r["ctx"], r["batch"]) for r in rows if r["kind"] == "sweep"}):
        s, c, b = key
        h, d = find(shape=s, ctx=c, batch=b, layout="hybrid"), find(shape=s, ctx=c, batch=b, layout="dense")
        e = {"shape": s, "ctx": c, "batch": b}
        for mode in res["modes"]:
            th, td = _tps(h, mode), _tps(d, mode)
            e[mode] = {"hybrid_tokens_per_s": th, "dense_tokens_per_s": td,
                       "ratio": th / td if th and td else None}
        for lay, r in (("hybrid", h), ("dense", d)):
            if r is None or not r.get("modes"):
                e[f"{lay}_not_timed"] = (r or {}).get("skipped") or (r or {}).get("error") or "not in this run"
        pairs.append(e)
    caps = []
    for s, c in sorted({(r["shape"], r["ctx"]) for r in res["capacity"]}):
        ch = next(r for r in res["capacity"] if (r["shape"], r["ctx"], r["layout"]) == (s, c, "hybrid"))
        cd = next((r for r in res["capacity"] if (r["shape"], r["ctx"], r["layout"]) == (s, c, "dense")), None)
        bh, bd = ch["batch"], (cd or {}).get("batch")
        e = {"shape": s, "ctx": c, "budget_gib": res["budget_gib"], "largest_batch_hybrid": bh,
             "largest_batch_dense": bd, "capacity_ratio": bh / bd if bd else None}
        if bd == 0:
            e["note"] = f"dense: not even one {c}-token prompt fits the budget with generate()"
        for mode in res["modes"]:
            th = _tps(_timed(rows, s, c, "hybrid", bh), mode) if bh else None
            td = _tps(_timed(rows, s, c, "dense", bd), mode) if bd else None
            e[mode] = {"hybrid_tokens_per_s_at_largest": th, "dense_tokens_per_s_at_largest": td,
                       "throughput_ratio": th / td if th and td else None}
        caps.append(e)
    return {"hybrid_vs_dense": pairs, "capacity": caps}


def _timed(rows, shape, ctx, layout, batch):
    """The timed row of this batch (a largest-batch row equal to a sweep batch is timed in the sweep row)."""
    return next((r for r in rows if (r["shape"], r["ctx"], r["layout"], r["batch"]) == (shape, ctx, layout, batch)
                 and r.get("modes")), None)


def print_table(res: dict) -> None:
    print(f"\n{'shape':12s} {'ctx':>7s} {'layout':6s} {'B':>3s} {'kind':7s} "
          + " ".join(f"{m + ' ms':>9s} {'tok/s':>8s} {'TB/s':>5s}" for m in res["modes"]) + f" {'peak GiB':>8s}")
    for r in res["rows"]:
        head = f"{r['shape']:12s} {r['ctx']:7d} {r['layout']:6s} {r['batch']:3d} {r['kind']:7s} "
        if r.get("modes"):
            cols = " ".join(f"{m['step_ms']:9.3f} {m['tokens_per_s']:8.1f} {m['TBps']:5.2f}"
                            for m in (r["modes"][k] for k in res["modes"]))
            peak = r.get("peak_alloc_GiB")
            print(head + cols + (f" {peak:8.1f}" if peak is not None else ""))
        else:
            print(head + ("(same as the sweep row)" if r.get("same_as_sweep_row") else
                          f"({r.get('skipped') or r.get('error')})"))
    for p in res["summary"]["hybrid_vs_dense"]:
        untimed = "; ".join(f"{lay} not timed ({p[f'{lay}_not_timed'].split(':')[0]})" for lay in ("hybrid", "dense")
                            if f"{lay}_not_timed" in p)
        print(f"{p['shape']:12s} {p['ctx']:7d} B={p['batch']:<3d} hybrid/dense tok/s: "
              + (untimed or ", ".join(f"{m} {p[m]['ratio']:.2f}x" for m in res["modes"])))
    for c in res["summary"]["capacity"]:
        ratio = f"{c['capacity_ratio']:.1f}x" if c["capacity_ratio"] else "-"
        print(f"{c['shape']:12s} {c['ctx']:7d} largest batch hybrid {c['largest_batch_hybrid']} / dense "
              f"{c['largest_batch_dense']} ({ratio}) on {c['budget_gib']} GiB; tok/s at largest, hybrid / dense: "
              + ", ".join(f"{m} {c[m]['hybrid_tokens_per_s_at_largest'] or 0:.1f} / "
                          f"{c[m]['dense_tokens_per_s_at_largest'] or 0:.1f}" for m in res["modes"]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file, rewritten after every row")
    ap.add_argument("--shapes", nargs="+", default=None, help=f"of {sorted(SHAPES)} (--tiny: {sorted(TINY_SHAPES)})")
    ap.add_argument("--contexts", type=int, nargs="+", default=None, help="default 32768 131072 (--tiny: 256 512)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 32 (--tiny: 1 2 4)")
    ap.add_argument("--capacity-contexts", type=int, nargs="*", default=None,
                    help="contexts whose largest batch is found and timed; default the largest context")
    ap.add_argument("--budget-gib", type=float, default=None,
                    help=f"the emulated card's memory, default 79.1 (an 80 GB card; --tiny: {TINY_BUDGET_GIB})")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt in the memory plan")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk, default 8192 (--tiny: 128)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--reps", type=int, default=None, help="timed replays per mode, default 30 (--tiny: 5)")
    ap.add_argument("--commit", default=None, help="git commit of the benchmarked tree (the device copy has no .git)")
    ap.add_argument("--fuse-projections", action="store_true", help="time the model after models.fuse_projections "
                    "(one q/k/v and one gate/up matrix product per layer)")
    ap.add_argument("--tiny", action="store_true", help="toy model on the CPU: a smoke test of the script")
    a = ap.parse_args(argv)
    tiny = a.tiny
    shapes_ok = TINY_SHAPES if tiny else SHAPES
    a.shapes = a.shapes or list(shapes_ok)
    a.contexts = a.contexts or ([256, 512] if tiny else [32768, 131072])
    a.batches = a.batches or ([1, 2, 4] if tiny else [1, 8, 32])
    a.capacity_contexts = [max(a.contexts)] if a.capacity_contexts is None else a.capacity_contexts
    a.budget_gib = a.budget_gib if a.budget_gib is not None else (TINY_BUDGET_GIB if tiny else 79.1)
    a.chunk = a.chunk or (128 if tiny else 8192)
    a.reps = a.reps or (5 if tiny else 30)
    bad = [s for s in a.shapes if s not in shapes_ok]
    if bad:
        ap.error(f"--shapes: {bad} not among {sorted(shapes_ok)}" + ("" if tiny else " (toy shapes need --tiny)"))
    if min(a.contexts + a.batches) < 1 or a.new_tokens < 1 or a.chunk < 1 or a.reps < 1 or a.budget_gib <= 0:
        ap.error("--contexts, --batches, --new-tokens, --chunk and --reps must be >= 1, --budget-gib > 0")
    if set(a.capacity_contexts) - set(a.contexts):
        ap.error(f"--capacity-contexts must be among --contexts {a.contexts}, got {a.capacity_contexts}")
    a.batches = sorted(set(a.batches))
    if tiny:
        device, dtype = torch.device("cpu"), torch.float32  # bf16 matmuls are slow on CPUs
        generation.COMPILE_BACKEND = "eager"  # Inductor would take minutes on a small CPU
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (or --tiny for the CPU smoke test)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    commit = a.commit
    if commit is None:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, cwd=Path(__file__).parent,
                                             stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    res = {"benchmark": "batch decode", "method": "harness-level decode step (CUDA-graph replay on GPU; decode_step / "
           "fused_decode_step called directly on CPU), not generate()'s loop; batch rows are copies of one prefilled "
           "row (decode time does not depend on values)", **environment(device, commit),
           "tiny": tiny, "dtype": str(dtype).replace("torch.", ""), "weights": "random",
           "sparse_pattern": repr(TINY_SPARSE_PATTERN if tiny else DEFAULT_SPARSE_PATTERN),
           "full_layers": "middle third",
           "budget_gib": a.budget_gib, "new_tokens": a.new_tokens, "prefill_chunk": a.chunk, "reps": a.reps,
           "modes": a.modes, "shapes": a.shapes, "contexts": a.contexts, "batches": a.batches,
           "capacity_contexts": a.capacity_contexts, "decode_compile_backend": generation.COMPILE_BACKEND,
           "fused_projections": a.fuse_projections,
           "copy_TBps": copy_bandwidth_TBps(device), "prefills": [], "rows": [], "capacity": [], "complete": False}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def save():
        res["wall_s"] = time.time() - t0
        out.write_text(json.dumps(res, indent=1))

    save()
    torch.manual_seed(0)
    prev_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random weights built directly in the run's dtype
    try:
        for shape in a.shapes:
            # Each shape compiles afresh: otherwise dynamo recompiles the first shape's graphs for the second with the
            # weight sizes that changed marked dynamic (automatic dynamic shapes), and its fused step would run
            # generic kernels that a process serving one model never would.
            torch._dynamo.reset()
            model = build(shape, max(a.contexts) + a.new_tokens, device)
            if a.fuse_projections:
                fuse_projections(model)
            full_idx = sorted(i for i, l in enumerate(model.layers) if isinstance(l.attn.pattern, Full))
            pattern = model.layers[next(i for i in range(len(model.layers)) if i not in full_idx)].attn.pattern
            for ctx in a.contexts:
                for layout in ("hybrid", "dense"):
                    relayout(model, full_idx if layout == "hybrid" else "all", pattern)
                    run_group(res, model, shape, ctx, layout, a.batches, ctx in a.capacity_contexts, a, dtype,
                              device, save)
            del model
            free()
    finally:
        torch.set_default_dtype(prev_dtype)
    res["summary"] = summarize(res)
    res["errors"] = sum("error" in r for r in res["rows"])
    res["complete"] = True
    save()
    print_table(res)
    if res["errors"]:
        raise SystemExit(f"{res['errors']} row(s) failed: see 'error' in {out}")
    return res


if __name__ == "__main__":
    main()
