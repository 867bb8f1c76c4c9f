"""Where the time goes in ``generate()``'s two phases, hybrid against dense: a kernel-level profile (torch.profiler) of
the prefill of one prompt and of the decode step, each kernel put in a category, beside the phase's own timing.

    python analysis/profile_generate.py --shape llama2_7b --ctx 131072 --out analysis/results/profile_generate_<card>.json
    python analysis/profile_generate.py --shape llama2_7b --ctx 131072 --compile-decode --out ...   # the fused step
    python analysis/profile_generate.py ... --compile-prefill --fuse-projections   # compiled prefill, fused matmuls
    python analysis/profile_generate.py --tiny --out /tmp/profile_tiny.json     # CPU smoke test (seconds)

Method. The model (random bf16 weights: speed does not depend on values; ``--tiny``: a toy fp32 model on the CPU) is
built once; for each layout (hybrid: the middle third full and the library's default AttnSink elsewhere; dense: every
layer full, through ``relayout``, same weights):

1. Prefill: a random ``ctx``-token prompt through ``Engine.prefill`` into row 0 of a batch-1 engine's caches
   (``--chunk``: whole by default, as ``generate()`` does when the activations fit; eager layers, or compiled ones with
   ``--compile-prefill``), once to compile, then once under the profiler and once more timed on the host clock up to a
   device sync (the wall time the profile is compared with). The engine's policy has ``cuda_graphs=False``.
2. Decode: ``Engine.step`` over the filled caches, eager layers or, with ``--compile-decode``, compiled ones
   (``Policy.compile_decode``). Each step advances the row, so the steps run at positions ``ctx``, ``ctx + 1``, ...
   (two warm-up steps, ``--steps`` profiled, then ``--reps`` timed) over caches sized for all of them: the full
   layers' buffers are not yet full and take the masked route, a filled ring the mask-free one, as in ``generate()``
   before its last token (``decode_routes``: layers per route kernel, the same at every profiled and timed position).
   The profiled steps run *outside* a CUDA graph, so that every kernel is seen; their kernel times are what the graph
   replays, whose own time (``graphed_step_ms``: a second engine with the same policy but the device's default CUDA
   graphs, the prompt prefilled again, median of ``--reps`` steps after the capturing one) is measured beside them. The
   gap between the graphed step and the sum of its kernels is time with no kernel running (launch boundaries inside
   the graph, synchronisation); the gap to the unprofiled step (``eager_step_ms``, outside graphs, eager or compiled
   layers) is host launch overhead that the graph removes. Records made before the engine profiled one step at the
   position ``ctx`` over caches of ``ctx + 1`` tokens (every buffer and ring exactly full: the mask-free route in
   every layer, counted as ``exact_layers``).

Per phase and layout: the sum of kernel times, that sum per category (matmul: cuBLAS/CUTLASS GEMM and GEMV kernels;
attention: flash, cuDNN, memory-efficient SDPA and Triton flex kernels; fused: other Inductor-generated Triton kernels;
norm, rope/elementwise, copy/cache write, reduction/softmax, other), the 20 largest kernels (name, calls, ms), and the
bytes a decode step must read (weights + cached K/V) over its graphed time. On the CPU (``--tiny``) the "kernels" are
the aten operators' own CPU times (a smoke test of the script, not a profile worth reading).

The JSON holds the card, versions, the command's arguments and every table; ``--commit`` records the tree.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import environment  # noqa: E402  (analysis/bench.py: card, versions)
from bench_generation import SHAPES, bytes_per_step  # noqa: E402

from bench import decode_routes  # noqa: E402

from flexgen_long.engine import Engine  # noqa: E402
from flexgen_long.layout import DEFAULT_SPARSE_PATTERN  # noqa: E402
from flexgen_long.models import fuse_projections, longgen_tiny, relayout  # noqa: E402
from flexgen_long.policy import Policy  # noqa: E402
from flexgen_long import timing  # noqa: E402

#: Kernel name -> category, first match wins (names as CUPTI reports them on Hopper; aten operator names on the CPU).
CATEGORIES = [
    ("matmul", r"^triton_tem_fused_(add)?b?mm"),  # Inductor's matmul templates (max-autotune), before flex's template
    ("attention", r"flash|fmha|cudnn|attention|attn|flex|sdpa|_fwd_kernel|triton_tem_fused"),
    ("matmul", r"gemm|gemv|cutlass|xmma|nvjet|sm90_|matmul|aten::mm|aten::addmm|aten::bmm|aten::linear|splitk"),
    ("norm", r"rms|norm"),
    ("fused (Inductor)", r"^triton_"),
    ("reduction/softmax", r"reduce|softmax|sum|max|argmax|topk|sort"),
    ("copy/cache write", r"copy|memcpy|memset|index|scatter|gather|cat|fill|clone|where"),
    ("rope/elementwise", r"elementwise|vectorized|unrolled|mul|add|silu|sigmoid|neg|sin|cos|pow|rsqrt|exp"),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def kernel_table(prof, device_type: str, calls_per_phase: int = 1) -> dict:
    """Kernels (CUDA) or aten operators' self times (CPU) of a profile, per call of the profiled phase."""
    per: dict = defaultdict(lambda: [0, 0.0])
    for evt in prof.events():
        if device_type == "cuda":
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.device_time_total
        else:
            if not evt.name.startswith("aten::") or evt.self_cpu_time_total <= 0:
                continue
            us = evt.self_cpu_time_total
        per[evt.name][0] += 1
        per[evt.name][1] += us / 1e3
    by_cat: dict = defaultdict(float)
    for name, (_, ms) in per.items():
        by_cat[category(name)] += ms / calls_per_phase
    total = sum(by_cat.values())
    top = sorted(per.items(), key=lambda kv: -kv[1][1])[:20]
    return {"kernel_ms": total, "kernels": sum(c for c, _ in per.values()) / calls_per_phase,
            "by_category_ms": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:160], "calls": c / calls_per_phase, "ms": ms / calls_per_phase,
                     "category": category(n)} for n, (c, ms) in top]}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_steps(steps: int, reps: int) -> int:
    """Decode steps of a layout's profile: two warm-up steps, the profiled ones, timing.measure's warm-up and timed
    ones (the caches hold one position more, so that a full buffer stays on the masked route throughout)."""
    return 2 + steps + 1 + reps


def profile_layout(model, ctx: int, policy: Policy, steps: int, reps: int, device) -> dict:
    """Both phases of one layout (module docstring): an engine with ``policy`` outside CUDA graphs for the profiles and
    the unprofiled step, then on a GPU a second one with the device's default (CUDA graphs) for the graphed step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    n_steps = decode_steps(steps, reps)
    prompt = torch.randint(0, model.tok_embeddings.num_embeddings, (ctx,), device=device)
    tok = torch.zeros(1, dtype=torch.long, device=device)
    engine = Engine(model, policy.replace(cuda_graphs=False))
    engine.reserve(1, ctx + n_steps + 1, ctx)

    def run_prefill():
        engine.prefill(prompt, 0)  # rewrites row 0: every run starts from the same prompt
        _sync(device)

    run_prefill()  # compiles (flex for these shapes; the layers with --compile-prefill)
    with profile(activities=activities) as prof:
        run_prefill()
    out = {"prefill": kernel_table(prof, device.type)}
    t = time.perf_counter()
    run_prefill()
    out["prefill"]["wall_s"] = time.perf_counter() - t

    routes = decode_routes(engine, ctx, ctx + n_steps - 1)
    for _ in range(2):  # compile / warm up
        engine.step(tok)
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step(tok)
        _sync(device)
    dec = kernel_table(prof, device.type, steps)
    dec["mode"] = "fused" if policy.compile_decode else "eager"
    dec["decode_routes"] = routes
    dec["eager_step_ms"] = timing.measure(lambda: engine.step(tok), device.type, budget_ms=0, min_reps=reps,
                                          max_reps=reps)["median_ms"]
    engine.cache = None  # before the graphed engine's caches
    if device.type == "cuda":
        torch.cuda.empty_cache()
        g = Engine(model, policy)
        g.reserve(1, ctx + n_steps + 1, ctx)  # the same caches as the profiled steps
        g.prefill(prompt, 0)
        decode_routes(g, ctx, ctx + reps)  # the graphed steps run the profiled steps' routes
        dec["graphed_step_ms"] = timing.measure(lambda: g.step(tok), "cuda", budget_ms=0, min_reps=reps,
                                                max_reps=reps)["median_ms"]  # its warm-up call captures
        dec["idle_in_graph_ms"] = dec["graphed_step_ms"] - dec["kernel_ms"]
        dec["bytes_per_step"] = bytes_per_step(model, g.cache)
        dec["TBps"] = dec["bytes_per_step"] / (dec["graphed_step_ms"] * 1e-3) / 1e12
        del g
        torch.cuda.empty_cache()
    out["decode"] = dec
    return out


def print_table(res: dict) -> None:
    for layout, r in res["layouts"].items():
        for phase in ("prefill", "decode"):
            p = r[phase]
            head = (f"{layout:>6} {phase:<7} kernels {p['kernel_ms']:9.2f} ms ({p['kernels']:.0f} launches)"
                    + (f", wall {p['wall_s']:.3f} s" if "wall_s" in p else "")
                    + (f", graphed step {p['graphed_step_ms']:.3f} ms ({p['TBps']:.2f} TB/s), idle in graph "
                       f"{p['idle_in_graph_ms']:.3f} ms" if "graphed_step_ms" in p else "")
                    + (f", eager step {p['eager_step_ms']:.3f} ms" if "eager_step_ms" in p else ""))
            print(head)
            print("        " + ", ".join(f"{k} {v:.2f}" for k, v in p["by_category_ms"].items()))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="llama2_7b", choices=sorted(SHAPES))
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the whole prompt)")
    ap.add_argument("--compile-decode", action="store_true", help="profile the compiled decode step "
                    "(Policy.compile_decode), not the eager one")
    ap.add_argument("--compile-prefill", action="store_true", help="profile the compiled prefill (Policy."
                    "compile_prefill: each layer's work around attention compiled), not the eager prefill")
    ap.add_argument("--fuse-projections", action="store_true", help="profile after models.fuse_projections (one "
                    "q/k/v and one gate/up matrix product per layer)")
    ap.add_argument("--steps", type=int, default=5, help="decode steps under the profiler")
    ap.add_argument("--reps", type=int, default=30, help="timed steps / graph replays (median)")
    ap.add_argument("--layouts", nargs="+", default=["hybrid", "dense"], choices=["hybrid", "dense"])
    ap.add_argument("--commit", default=None)
    ap.add_argument("--tiny", action="store_true", help="toy fp32 model on the CPU, ctx 256: a smoke test")
    a = ap.parse_args(argv)
    if a.ctx < 1 or (a.chunk is not None and a.chunk < 1) or a.steps < 1 or a.reps < 1:
        ap.error(f"--ctx, --chunk, --steps and --reps must be >= 1, got {a.ctx}, {a.chunk}, {a.steps} and {a.reps}")
    if a.tiny:
        device, dtype, ctx = torch.device("cpu"), torch.float32, min(a.ctx, 256)
        model = longgen_tiny(max_seq_len=ctx + decode_steps(a.steps, a.reps) + 1).eval()
        shape = "tiny"
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (or --tiny for the CPU smoke test)")
        device, dtype, ctx, shape = torch.device("cuda"), torch.bfloat16, a.ctx, a.shape
        torch.set_default_dtype(dtype)
        with device:
            model = SHAPES[shape](max_seq_len=ctx + decode_steps(a.steps, a.reps) + 1).eval()
    if a.fuse_projections:
        fuse_projections(model)
    full_idx = sorted(i for i, l in enumerate(model.layers) if l.attn.pattern.is_full)
    sparse = next((l.attn.pattern for l in model.layers if not l.attn.pattern.is_full), DEFAULT_SPARSE_PATTERN)
    policy = Policy(prefill_chunk=a.chunk, compile_prefill=a.compile_prefill, compile_decode=a.compile_decode)
    res = {"benchmark": "profile of generate()'s phases", **environment(device, a.commit), "args": vars(a), "shape": shape, "ctx": ctx, "dtype": str(dtype).replace("torch.", ""),
           "full_layers": full_idx, "sparse_pattern": repr(sparse), "layouts": {}}
    with torch.inference_mode():
        for layout in a.layouts:
            relayout(model, full_idx if layout == "hybrid" else "all", sparse)
            res["layouts"][layout] = profile_layout(model, ctx, policy, a.steps, a.reps, device)
            Path(a.out).write_text(json.dumps(res, indent=1))
    print_table(res)
    return res


if __name__ == "__main__":
    main()
