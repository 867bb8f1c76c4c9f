"""GPU benchmark of generation over compact caches: KV memory, prefill time and decode step time of the hybrid model
against the same model with every layer full, on the Llama-2-7B and Llama-3.1-8B shapes (random bf16 weights; speed
does not depend on values), plus a correctness check of the GPU prefill/decode paths against the no-cache forward.

    python analysis/bench_generation.py --out results.json [--contexts 8192 32768 65536 131072] [--shapes llama2_7b]
    python analysis/bench_generation.py --one-million --out results_1m.json   # Llama-3.1-8B hybrid, 1M-token prompt

Harness rows (an ``Engine``, no sampling loop): the prefill of a ``ctx``-token prompt (chunked by ``--chunk``) after a
warm-up prefill, then decode steps at positions ``ctx``, ``ctx + 1``, ... (``Engine.step``: CUDA graphs; eager and,
with ``--compile-decode``, compiled layers): median ms per step. Bytes per step = every weight read once (the
embedding table excepted: one row) + every cached K/V byte; bandwidth = bytes / step time.

The user's path (``--generate``): ``generate(model, [prompt], max_new_tokens=N, policy=...)`` itself, called twice per
row (the first call compiles and captures; the second is reported), with its own timings: ``Generation.prefill_s``
and the decode time per token from ``Generation.decode_s`` (the Python loop, sampling, one host wait per token and the
CUDA-graph replays included; capture and the decode step's compilation recorded apart), and peak memory. ``--chunks
0 8192``: the policy's ``prefill_chunk``, 0 = the whole prompt. ``--modes``: the rows per layout, each ``plain`` (eager
layers) or a ``+``-joined set of ``compile_decode``, ``fuse_projections`` (``models.fuse_projections``),
``compile_prefill``; without it, the products of ``--compile-decode`` / ``--fuse-projections`` /
``--compile-prefill``. ``--layouts``: hybrid and/or dense. ``--kv-cache-dtypes``: each row per cache storage
(``Policy.kv_cache_dtype``: ``model`` = the model's dtype, ``fp8``); ``--quantize``: each row per weight format
(``none``, ``int8wo``, ...; quantized after fusing in fused modes).

    python analysis/bench_generation.py --generate --out gen.json --contexts 131072 --shapes llama2_7b --chunks 0 8192
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from flexgen_long.cache import free_memory_bytes, plan_cache
from flexgen_long.engine import Engine
from flexgen_long.generation import generate
from flexgen_long.models import (fuse_projections, longgen_llama, longgen_llama2_7b, longgen_llama3_1_8b, relayout,
                                 unfuse_projections)
from flexgen_long.patterns import AttnSink
from flexgen_long.policy import Policy
from flexgen_long.quantize import quantize_weights, weight_bytes
from flexgen_long import timing

SPARSE = AttnSink(sink=64, window=1984)  # 2048 keys per query (the paper's ~1/64 of 128K), the records' pattern; the
# library default is now the block-aligned AttnSink(128, 1920) (flexgen_long.layout), timed through generate() by
# --generate --sparse
SHAPES = {"llama2_7b": longgen_llama2_7b, "llama3_1_8b": longgen_llama3_1_8b}


def _cuda_time(fn, reps: int) -> float:
    """Median ms of ``reps`` timed calls after a warm-up (flexgen_long.timing, the benchmarks' one timer)."""
    return timing.measure(fn, "cuda", budget_ms=0, min_reps=reps, max_reps=reps)["median_ms"]


def set_layout(model, hybrid: bool, full_idx):
    """The hybrid layout (``full_idx`` full, SPARSE elsewhere) or every layer full, through the library's relayout."""
    relayout(model, sorted(full_idx) if hybrid else "all", SPARSE)


def weight_bytes_per_step(model) -> int:
    emb = model.tok_embeddings.weight
    return sum(p.nbytes for p in model.parameters()) - emb.nbytes + emb[0].nbytes


def bytes_per_step(model, cache) -> int:
    """What a decode step must read: every weight once (the embedding table: one row) + every cached K/V byte."""
    return weight_bytes_per_step(model) + sum(c.k.nbytes + c.v.nbytes for c in cache.layers.values())


def measure(model, ctx: int, chunk: int, decode_reps: int = 30, compile_decode: bool = False) -> dict:
    dev = torch.device("cuda")
    steps = 2 * (decode_reps + 2) + 2  # warm-up and timed steps of each step kind, at successive positions
    plan = plan_cache(model, 1, ctx + steps, torch.bfloat16)
    kv_bytes = sum(lp.bytes for lp in plan.layers)
    row = {"ctx": ctx, "kv_bytes": kv_bytes}
    free = free_memory_bytes(dev)
    if kv_bytes + 6 * 2**30 > free:  # activations of an 8K chunk: a few GiB
        row["skipped"] = f"KV {kv_bytes / 2**30:.1f} GiB + ~6 GiB activations > {free / 2**30:.1f} GiB free"
        return row
    prompt = torch.randint(0, model.tok_embeddings.num_embeddings, (ctx,), device=dev)
    kinds = [("decode_ms", Policy(prefill_chunk=chunk, compile_decode=False, compile_prefill=False))]
    if compile_decode:
        kinds.append(("decode_compiled_ms", Policy(prefill_chunk=chunk, compile_decode=True, compile_prefill=False)))
    tok = prompt[-1:].clone()
    for key, policy in kinds:
        engine = Engine(model, policy)
        t = time.perf_counter()
        engine.reserve(1, ctx + steps)
        row[key.replace("_ms", "_compile_s")] = time.perf_counter() - t if policy.compile_decode else 0.0
        if key == "decode_ms":
            row["prefill_includes_compile"] = ctx > 131072
            if ctx <= 131072:  # warm-up (compiles flex for these shapes); at 1M the one prefill includes compilation
                engine.prefill(prompt, 0)
                engine.reserve(1, ctx + steps)
            torch.cuda.synchronize()
            t = time.perf_counter()
            engine.prefill(prompt, 0)
            torch.cuda.synchronize()
            row["prefill_s"] = time.perf_counter() - t
        else:
            engine.prefill(prompt, 0)
        row[key] = _cuda_time(lambda: engine.step(tok), decode_reps)
        if key == "decode_ms":
            row["bytes_per_step"] = bytes_per_step(model, engine.cache)
        engine.cache = None  # free the caches before the next kind's
    row["decode_GBps"] = row["bytes_per_step"] / (row["decode_ms"] * 1e-3) / 1e9
    row["peak_alloc_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.empty_cache()
    return row


def user_path(model, ctx: int, policy: Policy, new_tokens: int) -> dict:
    """``generate()`` as users call it, second of two calls (module docstring)."""
    prompt = torch.randint(0, model.tok_embeddings.num_embeddings, (ctx,)).tolist()
    row = {"ctx": ctx, "prefill_chunk": policy.prefill_chunk or "whole", "new_tokens": new_tokens,
           "compile_decode": policy.compile_decode, "compile_prefill": policy.compile_prefill}
    t = time.perf_counter()
    first = generate(model, [prompt], max_new_tokens=new_tokens, policy=policy)[0]
    row["first_call_s"] = time.perf_counter() - t
    row["first_call_prefill_s"] = first.prefill_s
    row["first_call_compile_s"] = first.compile_s
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    g = generate(model, [prompt], max_new_tokens=new_tokens, policy=policy)[0]
    row["capture_s"] = g.capture_s
    row["prefill_s"] = g.prefill_s
    row["decode_ms_per_token"] = g.decode_s / max(len(g.tokens) - 1, 1) * 1e3
    row["tokens_per_s"] = g.tokens_per_s
    row["same_tokens_as_first_call"] = g.tokens == first.tokens
    row["peak_alloc_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    row["kv_bytes"] = plan_cache(model, 1, ctx + new_tokens, torch.bfloat16, policy).total_bytes
    torch.cuda.empty_cache()
    return row


#: What a hybrid row shares with the dense row its ratios are taken against: shape, prompt and every mode.
PAIRED_BY = ("shape", "ctx", "prefill_chunk", "compile_decode", "compile_prefill", "fused_projections",
             "kv_cache_dtype", "quantize")


def run_user_path(args) -> None:
    sparse = [AttnSink(*map(int, p.split(","))) for p in args.sparse]
    if args.modes:
        modes = [("compile_decode" in m, "fuse_projections" in m, "compile_prefill" in m) for m in args.modes]
    else:  # every product of the flags asked for
        modes = [(cd, fp, cp) for cp in ([False, True] if args.compile_prefill else [False])
                 for fp in ([False, True] if args.fuse_projections else [False])
                 for cd in ([False, True] if args.compile_decode else [False])]
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "path": "generate()",
           "compile_options": args.compile_options, "commit": args.commit,
           "full_layers": "middle third", "dtype": "bf16", "batch": 1, "rows": []}
    torch.set_default_dtype(torch.bfloat16)
    # quantized weights cannot be unfused or restored: one model per (shape, scheme, fused), freed before the next
    builds = [(shape, q, fp) for shape in args.shapes for q in args.quantize
              for fp in sorted({m[1] for m in modes}) if q != "none"]
    builds = [(shape, "none", None) for shape in args.shapes if "none" in args.quantize] + builds
    for shape, q, fused in builds:
        with torch.device("cuda"):
            model = SHAPES[shape](max_seq_len=max(args.contexts) + args.new_tokens).eval()
        full_idx = [i for i, l in enumerate(model.layers) if l.attn.pattern.is_full]
        if q != "none":
            if fused:
                fuse_projections(model)
            quantize_weights(model, q)
        for ctx in args.contexts:
            for chunk in args.chunks:
                rows_modes = [m for m in modes if q == "none" or m[1] == fused]
                layouts = [("hybrid", p, m, kv) for p in sparse for m in rows_modes for kv in args.kv_cache_dtypes
                           if "hybrid" in args.layouts] + \
                    [("dense", None, m, kv) for m in rows_modes for kv in args.kv_cache_dtypes
                     if "dense" in args.layouts]
                for layout, pat, (cd, fp, cp), kv in layouts:
                    relayout(model, full_idx if pat is not None else "all", pat or SPARSE)
                    if q == "none":
                        (fuse_projections if fp else unfuse_projections)(model)
                    policy = Policy(prefill_chunk=chunk or None, compile_decode=cd, compile_prefill=cp,
                                    compile_options=args.compile_options,
                                    kv_cache_dtype=None if kv == "model" else kv)
                    r = {"shape": shape, "layout": layout, "sparse_pattern": repr(pat) if pat else None,
                         "fused_projections": fp, "kv_cache_dtype": kv, "quantize": q,
                         "weight_bytes": weight_bytes(model)}
                    try:
                        r.update(user_path(model, ctx, policy, args.new_tokens))
                    except (torch.OutOfMemoryError, MemoryError) as e:
                        r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                        torch.cuda.empty_cache()
                    res["rows"].append(r)
                    print(json.dumps(r), flush=True)
                    with open(args.out, "w") as f:
                        json.dump(res, f, indent=1)
        del model
        torch.cuda.empty_cache()
    for r in res["rows"]:
        if r["layout"] == "hybrid" and "prefill_s" in r:
            d = next((x for x in res["rows"] if x["layout"] == "dense" and "prefill_s" in x
                      and all(x.get(k) == r.get(k) for k in PAIRED_BY)), None)
            if d is not None:
                r["prefill_speedup"] = d["prefill_s"] / r["prefill_s"]
                r["decode_speedup"] = d["decode_ms_per_token"] / r["decode_ms_per_token"]
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{'shape':12s} {'layout':7s} {'ctx':>7s} {'chunk':>6s} {'mode':28s} {'prefill s':>9s} {'ms/token':>8s} "
          f"{'peak GiB':>8s}")
    for r in res["rows"]:
        mode = "+".join(k for k in ("compile_decode", "fused_projections", "compile_prefill") if r.get(k)) or "plain"
        mode += "" if r.get("kv_cache_dtype", "model") == "model" else f" kv:{r['kv_cache_dtype']}"
        mode += "" if r.get("quantize", "none") == "none" else f" w:{r['quantize']}"
        print(f"{r['shape']:12s} {r['layout']:7s} {r.get('ctx', 0):7d} {str(r.get('prefill_chunk', '')):>6s} "
              f"{mode:28s} {r.get('prefill_s', float('nan')):9.3f} {r.get('decode_ms_per_token', float('nan')):8.3f} "
              f"{r.get('peak_alloc_GiB', float('nan')):8.2f}" + (f"  {r['error']}" if "error" in r else ""))


def gpu_correctness() -> dict:
    """GPU paths (flex first chunk; later chunks by flex, Full over the buffer and sparse over [slots ; chunk];
    masked / mask-free decode) against the no-cache forward of the same model, fp32, teacher-forced."""
    dev = torch.device("cuda")
    out = {}
    for pat in (AttnSink(4, 60),):
        torch.manual_seed(0)
        m = longgen_llama(300, 4, 8, 2, 256, 512, 2048, full_layers="middle", sparse_pattern=pat).to(dev).eval()
        S, P = 700, 520
        toks = torch.randint(0, 300, (1, S), device=dev)
        with torch.inference_mode():
            ref = m(toks)[0]
        engine = Engine(m, Policy(prefill_chunk=256))
        engine.reserve(1, S)
        outs = [engine.prefill(toks[0, :P], 0, all_logits=True)]
        outs += [engine.step(toks[:, t]) for t in range(P, S)]
        got = torch.cat(outs)
        out[repr(pat)] = float((got - ref).abs().max() / ref.abs().max())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--one-million", action="store_true")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--compile-decode", action="store_true",
                    help="also time the decode step with compiled layers (Policy(compile_decode=True); with "
                         "--generate: such rows beside the eager ones)")
    ap.add_argument("--generate", action="store_true", help="time generate() itself (the user's path)")
    ap.add_argument("--compile-options", type=json.loads, default=None, metavar="JSON",
                    help="with --generate: Inductor options of the compiled decode step (Policy.compile_options), "
                         "e.g. '{\"coordinate_descent_tuning\": true}'")
    ap.add_argument("--fuse-projections", action="store_true",
                    help="with --generate: each row also with models.fuse_projections (one q/k/v and one gate/up "
                         "matrix product per layer)")
    ap.add_argument("--compile-prefill", action="store_true",
                    help="with --generate: each row also with Policy(compile_prefill=True)")
    ap.add_argument("--modes", nargs="+", default=None, metavar="MODE",
                    help="with --generate: exactly these rows per layout (instead of the flags' products): each "
                         "'plain' or a '+'-joined set of compile_decode, fuse_projections, compile_prefill")
    ap.add_argument("--layouts", nargs="+", default=["hybrid", "dense"], choices=["hybrid", "dense"],
                    help="with --generate: the layouts to time")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 8192],
                    help="with --generate: the policy's prefill_chunk values, 0 = whole prompt")
    ap.add_argument("--new-tokens", type=int, default=128, help="with --generate: tokens generated per call")
    ap.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "int8wo", "fp8", "int4wo"],
                    help="with --generate: each row per weight format (flexgen_long.quantize.quantize_weights, after "
                         "fuse_projections in fused modes; a fresh model per format)")
    ap.add_argument("--kv-cache-dtypes", nargs="+", default=["model"], choices=["model", "fp8"],
                    help="with --generate: each row per KV-cache storage (Policy.kv_cache_dtype; model: the model's "
                         "dtype)")
    ap.add_argument("--sparse", nargs="+", default=["64,1984", "128,1920"],
                    help="with --generate: the hybrid rows' AttnSink patterns, as sink,window")
    args = ap.parse_args()
    known = {"plain", "compile_decode", "fuse_projections", "compile_prefill"}
    for m in args.modes or ():
        if not set(m.split("+")) <= known:
            ap.error(f"--modes: {m!r} is not 'plain' or a '+'-joined set of {sorted(known - {'plain'})}")
    args.modes = [set(m.split("+")) for m in args.modes] if args.modes else None
    if args.generate:
        return run_user_path(args)
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "sparse_pattern": repr(SPARSE),
           "full_layers": "middle (10..20 of 32)", "prefill_chunk": args.chunk, "dtype": "bf16", "batch": 1,
           "commit": args.commit, "decode": "Engine.step at successive positions from ctx, CUDA graphs"}
    if not args.one_million:
        res["gpu_correctness_max_rel_err"] = gpu_correctness()
        print("correctness", res["gpu_correctness_max_rel_err"], flush=True)
    torch.set_default_dtype(torch.bfloat16)
    for shape in (["llama3_1_8b"] if args.one_million else args.shapes):
        contexts = [1 << 20] if args.one_million else args.contexts
        with torch.device("cuda"):
            model = SHAPES[shape](max_seq_len=max(contexts) + 1).eval()
        full_idx = {i for i, l in enumerate(model.layers) if l.attn.pattern.is_full}
        rows = []
        for ctx in contexts:
            for layout in (("hybrid",) if args.one_million else ("hybrid", "dense")):
                set_layout(model, layout == "hybrid", full_idx)
                torch.cuda.reset_peak_memory_stats()
                r = {"shape": shape, "layout": layout, **measure(model, ctx, args.chunk, compile_decode=args.compile_decode)}
                rows.append(r)
                print(json.dumps(r), flush=True)
                with open(args.out, "w") as f:
                    json.dump({**res, "rows": res.get("rows", []) + rows}, f, indent=1)
        res["rows"] = res.get("rows", []) + rows
        del model
        torch.cuda.empty_cache()
    # summary: hybrid vs dense per (shape, ctx)
    summ = []
    for r in res["rows"]:
        if r["layout"] != "hybrid":
            continue
        d = next((x for x in res["rows"] if x["layout"] == "dense" and x["shape"] == r["shape"]
                  and x["ctx"] == r["ctx"]), None)
        s = {"shape": r["shape"], "ctx": r["ctx"], "kv_GiB_hybrid": r["kv_bytes"] / 2**30}
        if d is not None:
            s["kv_GiB_dense"] = d["kv_bytes"] / 2**30
            s["kv_reduction"] = 1 - r["kv_bytes"] / d["kv_bytes"]
            if "decode_ms" in d and "decode_ms" in r:
                s["decode_speedup"] = d["decode_ms"] / r["decode_ms"]
            if "prefill_s" in d and "prefill_s" in r:
                s["prefill_speedup"] = d["prefill_s"] / r["prefill_s"]
            if "decode_compiled_ms" in d and "decode_compiled_ms" in r:
                s["decode_compiled_speedup"] = d["decode_compiled_ms"] / r["decode_compiled_ms"]
                s["decode_compiled_GBps_hybrid"] = r["bytes_per_step"] / (r["decode_compiled_ms"] * 1e-3) / 1e9
        summ.append(s)
    res["summary"] = summ
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{'shape':12s} {'ctx':>7s} {'layout':7s} {'KV GiB':>8s} {'prefill s':>9s} {'decode ms':>9s} "
          f"{'compiled ms':>11s} {'GB/s':>7s}")
    for r in res["rows"]:
        print(f"{r['shape']:12s} {r['ctx']:7d} {r['layout']:7s} {r['kv_bytes'] / 2**30:8.2f} "
              f"{r.get('prefill_s', float('nan')):9.2f} {r.get('decode_ms', float('nan')):9.3f} "
              f"{r.get('decode_compiled_ms', float('nan')):11.3f} {r.get('decode_GBps', float('nan')):7.0f}"
              + (f"  ({r['skipped']})" if "skipped" in r else ""))
    print(json.dumps(summ, indent=1))


if __name__ == "__main__":
    main()
