"""Batch decode throughput and 80 GB serving capacity, hybrid vs dense: decode tokens/s at batch sizes 1, 8, 32 for the
hybrid model (middle third full, the library's default AttnSink(128, 1920) elsewhere) and the same model with every
layer full, at 32K and 128K context, on the Llama-2-7B (MHA) and Llama-3.1-8B (GQA) shapes with random bf16 weights;
then the largest batch of 128K-token prompts that fits an 80 GB card for each layout, and the decode rate there.

    python analysis/bench_batch_decode.py --shapes llama2_7b   --out $OUT/batch_decode_llama2_7b.json   --commit SHA
    python analysis/bench_batch_decode.py --shapes llama3_1_8b --out $OUT/batch_decode_llama3_1_8b.json --commit SHA
    python analysis/plot_speedups.py --batch-decode '$OUT/batch_decode_*.json' --out analysis/figures
    python analysis/bench_batch_decode.py --tiny --out /tmp/batch_decode_tiny.json     # CPU smoke test, ~1 min

Method (harness-level: ``flexgen_long.engine.Engine.step`` itself, not ``generate()``'s loop with its sampling and
one host sync per token). For each (shape, context, layout, batch B):

1. Budget: the step must fit a card of ``--budget-gib`` (79.1 GiB: an 80 GB card as torch reports its total memory,
   as analysis/capacity.py assumes): weights + ``plan_cache(model, B, ctx + new_tokens)`` + a decode step's
   activations (``decode_activation_bytes``). A batch over budget, or over the device's real free memory (its caches
   plus the larger of the prefill's and a step's activations), is recorded as ``"skipped": "<why, with the
   numbers>"`` and the run goes on (it never runs out of memory on purpose; an out-of-memory error that happens anyway
   is recorded as ``"error"``). Each row also says whether ``generate()`` itself fits the budget at that batch
   (``fits_generate``: ``serving_capacity``, which adds the 8K-chunk prefill's activations).
2. Per decode mode, one engine (``MODES``: ``eager``, ``Policy(compile_decode=False)``; ``fused``,
   ``Policy(compile_decode=True)``: each layer's work around attention compiled, its compilation done by
   ``Engine.reserve`` and recorded apart as ``compile_s``; both with CUDA graphs on a GPU, the device default, and
   the prefill in ``--chunk``-token chunks through eager layers): ``reserve(B, ctx + new_tokens)`` allocates the
   caches the plan counted; row 0 is prefilled with the group's random ctx-token prompt (``prefill_s``, wall time to a
   device sync; ``prefill_new_graphs``: graphs it compiled, non-zero for the first prefill of a shape) and
   ``copy_row`` copies it into every other row. A step's time does not depend on the cached values -- every row reads
   the same slots either way -- so B copies of one prompt time the same as B different prompts; the values are real
   prefill output, not zeros.
3. Steps: one token per row (one random id per row, fed at every step) through ``Engine.step``, which advances every
   row: the first two steps are the warm-up (``first_calls_s``; on a GPU the first captures the CUDA graph,
   ``capture_s``), then ``--reps`` (30) timed steps after ``timing.measure``'s own warm-up call, with CUDA events
   (``flexgen_long.timing``): median, min, max. The steps run at positions ctx, ctx + 1, ..., ctx + reps + 2, every one
   on the same routes (``decode_routes``: layers per route kernel of flexgen_long.routes; a change within the window
   is an error): the full layers' buffers, sized for ctx + new_tokens, are not yet full, so they take the masked route
   ``generate()`` runs until its last token; a filled AttnSink ring takes the mask-free one. The fused step's first
   logits are compared with the eager step's (same prompt, same position).
4. Per row: ms per step, tokens/s = B / step time, bytes per step = every weight once (the embedding table: one row)
   + every cached K/V byte of the batch (``bench_generation.bytes_per_step``), effective TB/s = bytes / step
   time and its fraction of this card's copy bandwidth (one large device-to-device copy, measured at the start), peak
   memory allocated over the warm-up and the timed steps.

Records made before the engine (the committed H200 results) differ in three places: each step ran at the one position
ctx over caches of ctx + 1 tokens (every buffer and ring exactly full: the mask-free route in every layer, counted as
``exact_layers``); row 0 was prefilled once per (shape, context, layout) into a batch-1 cache, copied into each
batch's cache, with the prefill recorded in ``prefills``; and the peak included that batch-1 source cache
(``source_cache_GiB``).

Then per (shape, context, batch) the hybrid / dense ratio of tokens/s, and capacity: per shape and layout at each
``--capacity-contexts`` (128K), ``flexgen_long.cache.serving_capacity`` (128 new tokens, 8K prefill chunks, the
budget) gives the largest batch; when it is > 0 that batch is timed too (``kind: "largest"``), and the summary gives
the hybrid / dense capacity ratio and tokens/s at each one's largest batch. Hybrid and dense run in the same process
on the same weights (the baseline in the same run).

GPU time (one H200, estimated, not yet run this way): per shape, process start and model build ~30 s; flex
compilation for the 8K-chunk prefills' shapes ~1 min (``warmup()`` compiled 20 such graphs up to 128K in 46 s on an
H200: analysis/results/served_NVIDIA_H200.json); one prefill per timed row and mode: 32K ~2 s, 128K ~6-11 s (~10 of
each per shape: ~2 minutes); fused-decode compilation ~1 min per set, two sets per shape (the first batch size, then
the dynamic batch); ~10 timed rows at a few seconds each (capture, warm-up, 2 x 30 steps of 10-30 ms). About 5-7
minutes per shape: one shape per command keeps each process under 10 minutes (a JSON per shape; the figure joins
them); ``--modes`` splits a shape further if needed.

``--tiny``: a CPU smoke test of the script's logic (two 6-layer toy shapes, MHA and GQA, AttnSink(4, 60), fp32,
contexts 256 and 512, batches 1 2 4, a 0.07 GiB budget so that some batches are skipped and the largest batches are a
few rows): the same plan, engines, prefill, copies, capacity and summary, but no CUDA graphs (a CPU has none), the
fused step through torch.compile's ``eager`` backend (dynamo's graph split without Inductor's code generation, which
takes minutes on a 2-core CPU).
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

from bench import decode_routes, environment, free  # noqa: E402
from bench_generation import SHAPES, bytes_per_step  # noqa: E402
from flexgen_long import timing  # noqa: E402
from flexgen_long.cache import (decode_activation_bytes, free_memory_bytes, plan_cache,  # noqa: E402
                                prefill_activation_bytes, serving_capacity)
from flexgen_long.engine import Engine  # noqa: E402
from flexgen_long.layout import DEFAULT_SPARSE_PATTERN  # noqa: E402
from flexgen_long.models import TINY_SPARSE_PATTERN, fuse_projections, longgen_llama, relayout  # noqa: E402
from flexgen_long.policy import Policy  # noqa: E402
from flexgen_long.shapes import compiled_graphs  # noqa: E402

GiB = 2**30
#: decode modes: whether the engine compiles the decode step (CUDA graphs on a GPU in both)
MODES = {"eager": False, "fused": True}
#: untimed steps before the timed ones: two warm-up steps (the first captures the CUDA graph) and timing.measure's own
WARMUP_STEPS = 3
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


def policies(modes, chunk: int, backend: str) -> dict:
    """The engine policy of each decode mode (module docstring, step 2)."""
    return {m: Policy(prefill_chunk=chunk, compile_prefill=False, compile_decode=MODES[m], compile_backend=backend)
            for m in modes}


def check_free(model, B: int, ctx: int, new_tokens: int, chunk: int, dtype, device) -> None:
    """MemoryError, with the numbers, when a batch's caches and the larger of the prefill's and a step's activations
    exceed the device's free memory."""
    max_len = ctx + new_tokens
    kv = plan_cache(model, B, max_len, dtype).total_bytes
    pre = prefill_activation_bytes(model, min(chunk, ctx), dtype, ctx, max_len, device)
    dec = decode_activation_bytes(model, B, max_len, dtype)
    avail = free_memory_bytes(device)
    if kv + max(pre, dec) > avail:
        raise MemoryError(f"not enough free memory: batch cache {kv / GiB:.4g} + the larger of prefill "
                          f"{pre / GiB:.4g} and decode {dec / GiB:.4g} GiB of activations > {avail / GiB:.4g} GiB "
                          f"free on {device}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_mode(model, policy: Policy, prompt, tok, B: int, new_tokens: int, reps: int, device) -> tuple[dict, Engine]:
    """One mode of one batch (module docstring, steps 2-3): the engine, row 0 prefilled and copied, the warm-up and
    timed steps. Returns the mode's record (its first step's logits under "logits") and the engine."""
    ctx, m = prompt.shape[0], {}
    engine = Engine(model, policy)
    engine.reserve(B, ctx + new_tokens, ctx)
    m["compile_s"] = engine.compile_s
    g0, t = len(compiled_graphs()), time.perf_counter()
    try:
        engine.prefill(prompt, 0)
        _sync(device)
    except torch.OutOfMemoryError as e:  # a skip, as the free-memory check's: the real allocator disagreed with it
        raise MemoryError(f"prefill of row 0 failed: OutOfMemoryError: {str(e).splitlines()[0][:200]}") from None
    m["prefill_s"], m["prefill_new_graphs"] = time.perf_counter() - t, len(compiled_graphs()) - g0
    for row in range(1, B):
        engine.copy_row(0, row)
    m["decode_routes"] = decode_routes(engine, ctx, ctx + WARMUP_STEPS + reps - 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    m["logits"] = engine.step(tok).float()  # a copy: a graph's output buffer is rewritten by the next replay
    engine.step(tok)
    _sync(device)
    m["first_calls_s"], m["capture_s"] = time.perf_counter() - t, engine.capture_s
    if device.type == "cuda":
        m["warmup_peak_alloc_GiB"] = torch.cuda.max_memory_allocated(device) / GiB
    m.update(_time(lambda: engine.step(tok), device, reps))
    return m, engine


def time_batch(model, prompt, B: int, new_tokens: int, chunk: int, modes: dict, reps: int,
               copy_TBps: float | None) -> dict:
    """Decode-step timings of one batch in every mode (module docstring, steps 2-4); raises MemoryError when the
    batch does not fit the device's free memory."""
    device, dtype = prompt.device, next(model.parameters()).dtype
    ctx = prompt.shape[0]
    check_free(model, B, ctx, new_tokens, chunk, dtype, device)
    tok = torch.randint(0, model.tok_embeddings.num_embeddings, (B,), device=device)
    row: dict = {"modes": {}}
    ref, peaks = None, []
    for mode, policy in modes.items():
        m, engine = time_mode(model, policy, prompt, tok, B, new_tokens, reps, device)
        if ref is None:
            row["decode_routes"] = m["decode_routes"]
            row["kv_GiB"] = engine.cache.nbytes / GiB
            row["bytes_per_step"] = bytes_per_step(model, engine.cache)
        del engine
        out = m.pop("logits")
        if ref is None:
            ref = out
        else:
            m["max_rel_diff_vs_first_mode"] = float((out - ref).abs().max() / ref.abs().max())
        peaks += [m.pop("warmup_peak_alloc_GiB", None), m.get("peak_alloc_GiB")]
        m["tokens_per_s"] = B / (m["step_ms"] * 1e-3)
        m["TBps"] = row["bytes_per_step"] / (m["step_ms"] * 1e-3) / 1e12
        if copy_TBps:
            m["fraction_of_copy_bandwidth"] = m["TBps"] / copy_TBps
        del m["decode_routes"]  # the same in every mode (the policy changes no decode route)
        row["modes"][mode] = m
        free()
    if device.type == "cuda":  # over each mode's caches, its capture and its timed steps
        row["peak_alloc_GiB"] = max(p for p in peaks if p is not None)
    return row


@torch.inference_mode()  # as generate() runs
def run_group(res, model, shape, ctx, layout, batches, capacity_ctx, args, modes, device, save) -> None:
    """Every batch of one (shape, ctx, layout): capacity, budget checks, the timed rows."""
    budget, dtype = int(args.budget_gib * GiB), next(model.parameters()).dtype
    cap = serving_capacity(model, ctx, args.new_tokens, budget, dtype, prefill_chunk=args.chunk,
                           device=device.type)
    if capacity_ctx:
        res["capacity"].append({"shape": shape, "ctx": ctx, "layout": layout, "new_tokens": args.new_tokens,
                                **{k: (v / GiB if k.endswith("_bytes") else v) for k, v in cap.items()}})
    plan = [(B, "sweep") for B in batches]
    if capacity_ctx and cap["batch"] > 0:
        plan.append((cap["batch"], "largest"))
    prompt = torch.randint(0, model.tok_embeddings.num_embeddings, (ctx,), device=device)
    for B, kind in plan:
        fields, why = budget_check(model, B, ctx, args.new_tokens, budget, dtype, cap)
        row = {"shape": shape, "ctx": ctx, "layout": layout, "batch": B, "kind": kind, **fields}
        if kind == "largest" and B in batches:
            row["same_as_sweep_row"] = True  # timed once, in the sweep row of the same batch
        if why:
            row["skipped"] = why
        elif not row.get("same_as_sweep_row"):
            try:
                row.update(time_batch(model, prompt, B, args.new_tokens, args.chunk, modes, args.reps,
                                      res.get("copy_TBps")))
            except MemoryError as e:  # the device's real free memory: a skip, with its numbers
                row["skipped"] = str(e)
            except Exception as e:  # noqa: BLE001 -- recorded, never a crash of the whole run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            free()
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()


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
    ap.add_argument("--reps", type=int, default=None, help="timed steps per mode, default 30 (--tiny: 5)")
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
    if a.reps + WARMUP_STEPS >= a.new_tokens:  # the last timed step must stay before the full buffers' last slot
        ap.error(f"--new-tokens must exceed --reps + {WARMUP_STEPS} (the steps run at successive positions within the "
                 f"caches), got --new-tokens {a.new_tokens}, --reps {a.reps}")
    if set(a.capacity_contexts) - set(a.contexts):
        ap.error(f"--capacity-contexts must be among --contexts {a.contexts}, got {a.capacity_contexts}")
    a.batches = sorted(set(a.batches))
    if tiny:
        device, dtype = torch.device("cpu"), torch.float32  # bf16 matmuls are slow on CPUs
        backend = "eager"  # Inductor would take minutes on a small CPU
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (or --tiny for the CPU smoke test)")
        device, dtype, backend = torch.device("cuda"), torch.bfloat16, "inductor"
    modes = policies(a.modes, a.chunk, backend)
    commit = a.commit
    if commit is None:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, cwd=Path(__file__).parent,
                                             stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    res = {"benchmark": "batch decode", "method": "harness-level decode steps through Engine.step at successive "
           "positions from ctx (CUDA-graph replay on GPU), not generate()'s loop; batch rows are copies of one "
           "prefilled row (copy_row: decode time does not depend on values)", **environment(device, commit),
           "tiny": tiny, "dtype": str(dtype).replace("torch.", ""), "weights": "random",
           "sparse_pattern": repr(TINY_SPARSE_PATTERN if tiny else DEFAULT_SPARSE_PATTERN),
           "full_layers": "middle third",
           "budget_gib": a.budget_gib, "new_tokens": a.new_tokens, "prefill_chunk": a.chunk, "reps": a.reps,
           "modes": a.modes, "shapes": a.shapes, "contexts": a.contexts, "batches": a.batches,
           "capacity_contexts": a.capacity_contexts, "decode_compile_backend": backend,
           "policies": {m: repr(p) for m, p in modes.items()}, "fused_projections": a.fuse_projections,
           "copy_TBps": copy_bandwidth_TBps(device), "rows": [], "capacity": [], "complete": False}
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
            full_idx = sorted(i for i, l in enumerate(model.layers) if l.attn.pattern.is_full)
            pattern = model.layers[next(i for i in range(len(model.layers)) if i not in full_idx)].attn.pattern
            for ctx in a.contexts:
                for layout in ("hybrid", "dense"):
                    relayout(model, full_idx if layout == "hybrid" else "all", pattern)
                    run_group(res, model, shape, ctx, layout, a.batches, ctx in a.capacity_contexts, a, modes,
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
