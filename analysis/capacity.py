"""Serving capacity from the memory plan: the largest batch of L-token prompts that ``generate()`` can hold on a card,
hybrid (middle third full, the default AttnSink elsewhere) against every layer full, for the Llama-2-7B and
Llama-3.1-8B shapes. Shapes only -- the models are built on the meta device, nothing is allocated, no GPU is needed --
so these are **estimates** (``flexgen_long.cache.serving_capacity``: weights + KV caches + the larger of the prefill's
and a decode step's activations, the activation terms on the high side), not measurements.

    python analysis/capacity.py --out analysis/results/capacity_plan.json [--budget-gib 79.1] [--contexts 32768 131072]
    python analysis/capacity.py --formats bf16 int8wo+fp8kv ...     # also with int8 weights and FP8 full-layer caches

``--formats``: each row per byte format -- ``bf16``, ``int8wo`` (``quantize_weights(model, "int8wo")`` after
``fuse_projections``, on the meta device: its bytes as stored), ``fp8kv`` (``Policy(kv_cache_dtype="fp8")``) or
``int8wo+fp8kv``.

79.1 GiB: an 80 GB H100 as torch reports its total memory. Writes the JSON and a figure next to it
(``analysis/figures/capacity_plan.png`` by default).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from flexgen_long.cache import serving_capacity  # noqa: E402
from flexgen_long.models import fuse_projections, longgen_llama2_7b, longgen_llama3_1_8b  # noqa: E402
from flexgen_long.policy import Policy  # noqa: E402
from flexgen_long.quantize import quantize_weights  # noqa: E402

SHAPES = {"llama2_7b": longgen_llama2_7b, "llama3_1_8b": longgen_llama3_1_8b}
GiB = 2**30


FORMATS = ("bf16", "int8wo", "fp8kv", "int8wo+fp8kv")


def plan(contexts, budget_gib: float, new_tokens: int, prefill_chunk: int | None, formats=("bf16",)) -> dict:
    rows = []
    for shape, build in SHAPES.items():
        for layout, full in (("hybrid", "middle"), ("dense", "all")):
            for fmt in formats:
                with torch.device("meta"):
                    model = build(max_seq_len=max(contexts) + new_tokens, full_layers=full)
                if "int8wo" in fmt:
                    quantize_weights(fuse_projections(model), "int8wo")
                policy = Policy(kv_cache_dtype="fp8" if "fp8kv" in fmt else None)
                for ctx in contexts:
                    r = serving_capacity(model, ctx, new_tokens, int(budget_gib * GiB), prefill_chunk=prefill_chunk,
                                         policy=policy)
                    rows.append({"shape": shape, "layout": layout, "format": fmt, "ctx": ctx,
                                 **{k: (v / GiB if k.endswith("_bytes") else v) for k, v in r.items()}})
    for r in rows:
        if r["layout"] == "hybrid":
            d = next(x for x in rows if x["layout"] == "dense" and x["shape"] == r["shape"] and x["ctx"] == r["ctx"]
                     and x["format"] == r["format"])
            r["batch_ratio_vs_dense"] = r["batch"] / d["batch"] if d["batch"] else None
    return {"what": "serving capacity from the memory plan (estimate, not measured)", "budget_gib": budget_gib,
            "new_tokens": new_tokens, "prefill_chunk": prefill_chunk, "dtype": "bf16", "formats": list(formats),
            "note": "*_bytes fields are in GiB", "rows": rows}


def figure(res: dict, path: Path) -> Path:
    shapes = list(SHAPES)
    groups = sorted({(r["ctx"], r.get("format", "bf16")) for r in res["rows"]},
                    key=lambda g: (g[0], FORMATS.index(g[1])))
    fig, axes = plt.subplots(1, len(shapes), figsize=(max(5.5, 1.6 * len(groups)) * len(shapes), 4.2))
    for ax, shape in zip(axes, shapes):
        for i, layout in enumerate(("hybrid", "dense")):
            ys = [next(r["batch"] for r in res["rows"] if r["shape"] == shape and r["layout"] == layout
                       and r["ctx"] == c and r.get("format", "bf16") == f) for c, f in groups]
            xs = [j + (i - 0.5) * 0.38 for j in range(len(groups))]
            bars = ax.bar(xs, ys, width=0.38, label=layout)
            ax.bar_label(bars, [str(y) for y in ys])
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{c // 1024}K" + ("" if f == "bf16" else f"\n{f}") for c, f in groups])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("largest batch that fits")
        ax.set_title(shape)
        ax.legend()
    fig.suptitle(f"Serving capacity on {res['budget_gib']} GiB (memory plan, an estimate: not measured); "
                 f"{res['new_tokens']} new tokens, prefill in {res['prefill_chunk']}-token chunks", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--figure", default="analysis/figures/capacity_plan.png")
    ap.add_argument("--budget-gib", type=float, default=79.1)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-chunk", type=int, default=8192, help="0 = whole prompts")
    ap.add_argument("--formats", nargs="+", default=["bf16"], choices=FORMATS,
                    help="byte formats: bf16 weights and caches, int8 weights, FP8 full-layer caches, or both")
    a = ap.parse_args(argv)
    if a.budget_gib <= 0 or any(c < 1 for c in a.contexts) or a.new_tokens < 1 or a.prefill_chunk < 0:
        raise SystemExit("--budget-gib must be > 0, --contexts and --new-tokens >= 1, --prefill-chunk >= 0")
    res = plan(a.contexts, a.budget_gib, a.new_tokens, a.prefill_chunk or None, a.formats)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(figure(res, Path(a.figure)))
    print(f"{'shape':12s} {'ctx':>7s} {'layout':7s} {'format':13s} {'batch':>5s} {'weights GiB':>11s} "
          f"{'KV/row GiB':>10s} {'total GiB':>9s}")
    for r in res["rows"]:
        print(f"{r['shape']:12s} {r['ctx']:7d} {r['layout']:7s} {r['format']:13s} {r['batch']:5d} "
              f"{r['weights_bytes']:11.2f} {r['kv_per_row_bytes']:10.2f} {r['total_bytes']:9.1f}")


if __name__ == "__main__":
    main()
