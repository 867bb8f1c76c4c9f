"""GPU benchmark of the pattern masks.

1. Correctness on the GPU: compiled flex with our BlockMask == SDPA with the dense mask (fp32, forward and gradients),
   odd lengths, offsets, GQA, packed documents.
2. BlockMask build time per pattern at each length: ours (analytic, from the block rule) against
   ``torch.compile(create_block_mask)`` over the same mask_mod.
3. Attention forward and forward+backward per pattern against the dense baseline (cuDNN / flash SDPA, causal) in the
   same process, B=1, Hq=32, Hkv=8, D=128, bf16; density and efficiency = (dense time * density / 0.5) / sparse time.
   Levers tried on the sparse patterns: mask block size and the flex kernel's tile options.

    python analysis/bench_masks.py --out results.json [--lengths 8192 32768 131072] [--commit SHA]

Timing: flexgen_long.timing.measure -- CUDA events around each call, warm-up first, median (and min/max) of repeated
calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from flexgen_long.masks import build_block_mask, dense_mask, density
from flexgen_long.patterns import AttnSink, BlockSparse, Full
from flexgen_long.timing import measure

torch._dynamo.config.recompile_limit = 256  # one compiled graph per (length, pattern, options) here, on purpose
torch._dynamo.config.cache_size_limit = 256
flex = torch.compile(flex_attention, dynamic=False)
compiled_cbm = torch.compile(create_block_mask)

PATTERNS = {
    "flex_causal": (Full(), 128),
    "sink64_win4096": (AttnSink(sink=64, window=4096), 128),
    "sink128_win3968": (AttnSink(sink=128, window=3968), 128),
    "blocksparse_b128_l16_s64_perhead": (BlockSparse(block=128, local_blocks=16, vertical_stride=64, per_head=True), 128),
    "blocksparse_b128_l16_s32": (BlockSparse(block=128, local_blocks=16, vertical_stride=32), 128),
}
HQ, HKV, D = 32, 8, 128


def time_ms(fn, budget_ms: float = 2500.0, min_reps: int = 5, max_reps: int = 100) -> dict:
    """Median (min, max) ms of ``fn`` after a warm-up call, repeated to fill ``budget_ms`` (flexgen_long.timing)."""
    return measure(fn, "cuda", budget_ms=budget_ms, min_reps=min_reps, max_reps=max_reps)


def correctness() -> list[dict]:
    out = []
    torch.manual_seed(0)
    cases = [
        (AttnSink(4, 100), 333, 1000, 667, 128, None),
        (AttnSink(0, 257), 1000, 1000, 0, 128, "docs"),
        (BlockSparse(64, 2, 4, per_head=True), 777, 1100, 323, 128, None),
        (BlockSparse(128, 1, 3), 1000, 1000, 0, 128, "docs"),
        (Full(), 1000, 1000, 0, 128, "docs"),
    ]
    for pat, ql, kl, off, bs, docs in cases:
        doc_ids = None
        if docs:
            lens = [137, 400, 1, 62, 300, 100]
            doc_ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).cuda()[None]
        q = torch.randn(1, HQ // 4, ql, 64, device="cuda", requires_grad=True)
        k = torch.randn(1, HKV // 4, kl, 64, device="cuda", requires_grad=True)
        v = torch.randn(1, HKV // 4, kl, 64, device="cuda", requires_grad=True)
        bm = build_block_mask(pat, ql, kl, q_offset=off, num_heads=HQ // 4, num_kv_heads=HKV // 4, block_size=bs,
                              device="cuda", doc_ids=doc_ids)
        o = flex(q, k, v, block_mask=bm, enable_gqa=True)
        g = torch.randn_like(o)
        gq, gk, gv = torch.autograd.grad(o, (q, k, v), g)
        m = dense_mask(pat, ql, kl, q_offset=off, num_heads=HQ // 4, num_kv_heads=HKV // 4, doc_ids=doc_ids, device="cuda")
        with sdpa_kernel([SDPBackend.MATH]):
            r = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        rq, rk, rv = torch.autograd.grad(r, (q, k, v), g)
        errs = {n: float((a - b).abs().max()) for n, a, b in [("out", o, r), ("dq", gq, rq), ("dk", gk, rk), ("dv", gv, rv)]}
        out.append({"pattern": repr(pat), "q_len": ql, "kv_len": kl, "q_offset": off, "block": bs, "docs": bool(docs),
                    "max_abs_err": errs, "ok": all(x < 1e-4 for x in errs.values())})
        print(f"[check] {pat!r} q={ql} kv={kl} off={off} docs={bool(docs)}: " +
              " ".join(f"{n}={x:.1e}" for n, x in errs.items()), flush=True)
    return out


def bench_build(L: int) -> list[dict]:
    rows = []
    for name, (pat, bs) in PATTERNS.items():
        ours = time_ms(lambda: build_block_mask(pat, L, L, num_heads=HQ, num_kv_heads=HKV, block_size=bs,
                                                device="cuda"), budget_ms=500)
        mm = pat.mask_mod(num_heads=HQ, num_kv_heads=HKV)
        H = HQ if pat.bind_heads(HKV).head_dependent else 1
        try:
            ref = time_ms(lambda: compiled_cbm(mm, 1, H, L, L, device="cuda", BLOCK_SIZE=bs), budget_ms=500)
        except Exception as e:  # record, don't crash: the reference may OOM at 128K with per-head masks
            ref = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append({"length": L, "pattern": name, "heads_in_mask": H, "ours": ours, "compiled_create_block_mask": ref})
        print(f"[build] L={L} {name}: ours {ours['median_ms']:.3f} ms, create_block_mask "
              f"{ref.get('median_ms', float('nan')):.3f} ms", flush=True)
    return rows


def bench_attention(L: int, levers: bool) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    q = torch.randn(1, HQ, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, HQ, L, D, device="cuda", dtype=torch.bfloat16)

    def fwd_bwd(f):
        def run():
            o = f()
            torch.autograd.grad(o, (q, k, v), g)
        return run

    dense = {}
    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
        def f(backend=backend):
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        try:
            with torch.no_grad():
                fw = time_ms(f)
            fb = time_ms(fwd_bwd(f))
            dense[backend] = {"fwd": fw, "fwd_bwd": fb}
            print(f"[dense] L={L} {backend}: fwd {fw['median_ms']:.2f} ms, fwd+bwd {fb['median_ms']:.2f} ms", flush=True)
        except Exception as e:
            dense[backend] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            print(f"[dense] L={L} {backend}: {dense[backend]['error']}", flush=True)
    ok = [d for d in dense.values() if "fwd" in d]
    best_fwd = min(d["fwd"]["median_ms"] for d in ok)
    best_fb = min(d["fwd_bwd"]["median_ms"] for d in ok)
    rows.append({"length": L, "variant": "dense_sdpa", "backends": dense, "best_fwd_ms": best_fwd,
                 "best_fwd_bwd_ms": best_fb})

    variants = []
    for name, (pat, bs) in PATTERNS.items():
        variants.append((name, pat, bs, None))
    if levers:
        sink = PATTERNS["sink64_win4096"][0]
        variants += [
            ("sink64_win4096", sink, 64, None),
            ("sink64_win4096", sink, 128, {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}),
            ("sink64_win4096", sink, 128, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}),
            ("sink64_win4096", sink, 128, {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}),
            ("sink64_win4096", sink, 128, {"USE_TMA": True}),
            ("blocksparse_b64_l32_s64_perhead", BlockSparse(block=64, local_blocks=32, vertical_stride=64, per_head=True),
             64, None),
            ("sink128_win3968", PATTERNS["sink128_win3968"][0], 128,
             {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}),
        ]
    for name, pat, bs, opts in variants:
        bm = build_block_mask(pat, L, L, num_heads=HQ, num_kv_heads=HKV, block_size=bs, device="cuda")
        dens = density(pat, L, num_kv_heads=HKV)
        if bs < 128 and opts is None:  # the kernel's tiles must divide the mask's blocks
            opts = {"BLOCK_M": bs, "BLOCK_N": bs, "BLOCK_M1": bs // 2, "BLOCK_N1": bs, "BLOCK_M2": bs, "BLOCK_N2": bs // 2}
        kw = {"kernel_options": opts} if opts else {}
        f = lambda: flex(q, k, v, block_mask=bm, enable_gqa=True, **kw)  # noqa: E731
        row = {"length": L, "variant": name, "pattern": repr(pat), "mask_block": bs, "kernel_options": opts,
               "density": dens, "partial_blocks": int(bm.kv_num_blocks.sum()),
               "full_blocks": int(bm.full_kv_num_blocks.sum())}
        try:
            with torch.no_grad():
                fw = time_ms(f)
            fb = time_ms(fwd_bwd(f))
            row.update(fwd=fw, fwd_bwd=fb,
                       speedup_fwd=best_fwd / fw["median_ms"], speedup_fwd_bwd=best_fb / fb["median_ms"],
                       efficiency_fwd=(best_fwd * dens / 0.5) / fw["median_ms"],
                       efficiency_fwd_bwd=(best_fb * dens / 0.5) / fb["median_ms"])
            print(f"[flex] L={L} {name} blk={bs} opts={opts}: density {dens:.4f} fwd {fw['median_ms']:.3f} ms "
                  f"(eff {row['efficiency_fwd']:.2f}), fwd+bwd {fb['median_ms']:.3f} ms "
                  f"(eff {row['efficiency_fwd_bwd']:.2f})", flush=True)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"[flex] L={L} {name} opts={opts}: {row['error']}", flush=True)
        rows.append(row)
        del bm
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--levers-at", type=int, nargs="*", default=[131072], help="lengths at which to try kernel levers")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["check", "build", "attention"])
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_masks needs a CUDA GPU")
    import triton
    commit = a.commit
    if commit is None:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
        except Exception:
            commit = "unknown"
    res = {"benchmark": "masks", "card": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "python": platform.python_version(), "commit": commit,
           "shape": {"batch": 1, "q_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": "bfloat16"},
           "patterns": {n: {"pattern": repr(p), "mask_block": b} for n, (p, b) in PATTERNS.items()},
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "check" not in a.skip:
        res["correctness"] = correctness()
    if "build" not in a.skip:
        res["build"] = [r for L in a.lengths for r in bench_build(L)]
    if "attention" not in a.skip:
        res["attention"] = [r for L in a.lengths for r in bench_attention(L, L in a.levers_at)]
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("\n== summary ==")
    for r in res.get("build", []):
        print(f"build L={r['length']:>6} {r['pattern']:<34} ours {r['ours']['median_ms']:7.3f} ms   "
              f"compiled create_block_mask {r['compiled_create_block_mask'].get('median_ms', float('nan')):7.3f} ms")
    for r in res.get("attention", []):
        if r["variant"] == "dense_sdpa":
            print(f"attn  L={r['length']:>6} dense SDPA best: fwd {r['best_fwd_ms']:.2f} ms, fwd+bwd {r['best_fwd_bwd_ms']:.2f} ms")
        elif "fwd" in r:
            print(f"attn  L={r['length']:>6} {r['variant']:<34} blk {r['mask_block']:>3} {str(r['kernel_options']):<60} "
                  f"dens {r['density']:.4f} fwd {r['fwd']['median_ms']:8.3f} ms eff {r['efficiency_fwd']:.2f} | "
                  f"fwd+bwd {r['fwd_bwd']['median_ms']:8.3f} ms eff {r['efficiency_fwd_bwd']:.2f}")


if __name__ == "__main__":
    main()
