"""Serving capacity from the memory plan: the largest batch of L-token prompts that ``generate()`` can hold on a card,
hybrid (middle third full, the default AttnSink elsewhere) against every layer full, for the Llama-2-7B and
Llama-3.1-8B shapes. Shapes only -- the models are built on the meta device, nothing is allocated, no GPU is needed --
so these are **estimates** (``flexgen_long.cache.serving_capacity``: weights + KV caches + the larger of the prefill's
and a decode step's activations, the activation terms on the high side), not measurements.

    python analysis/capacity.py --out analysis/results/capacity_plan.json [--budget-gib 79.1] [--contexts 32768 131072]

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
from flexgen_long.models import longgen_llama2_7b, longgen_llama3_1_8b  # noqa: E402

SHAPES = {"llama2_7b": longgen_llama2_7b, "llama3_1_8b": longgen_llama3_1_8b}
GiB = 2**30


def plan(contexts, budget_gib: float, new_tokens: int, prefill_chunk: int | None) -> dict:
    rows = []
    for shape, build in SHAPES.items():
        for layout, full in (("hybrid", "middle"), ("dense", "all")):
            with torch.device("meta"):
                model = build(max_seq_len=max(contexts) + new_tokens, full_layers=full)
            for ctx in contexts:
                r = serving_capacity(model, ctx, new_tokens, int(budget_gib * GiB), prefill_chunk=prefill_chunk)
                rows.append({"shape": shape, "layout": layout, "ctx": ctx,
                             **{k: (v / GiB if k.endswith("_bytes") else v) for k, v in r.items()}})
    for r in rows:
        if r["layout"] == "hybrid":
            d = next(x for x in rows if x["layout"] == "dense" and x["shape"] == r["shape"] and x["ctx"] == r["ctx"])
            r["batch_ratio_vs_dense"] = r["batch"] / d["batch"] if d["batch"] else None
    return {"what": "serving capacity from the memory plan (estimate, not measured)", "budget_gib": budget_gib,
            "new_tokens": new_tokens, "prefill_chunk": prefill_chunk, "dtype": "bf16",
            "note": "*_bytes fields are in GiB", "rows": rows}


def figure(res: dict, path: Path) -> Path:
    shapes = list(SHAPES)
    ctxs = sorted({r["ctx"] for r in res["rows"]})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2))
    for ax, shape in zip(axes, shapes):
        for i, layout in enumerate(("hybrid", "dense")):
            ys = [next(r["batch"] for r in res["rows"] if r["shape"] == shape and r["layout"] == layout
                       and r["ctx"] == c) for c in ctxs]
            xs = [j + (i - 0.5) * 0.38 for j in range(len(ctxs))]
            bars = ax.bar(xs, ys, width=0.38, label=layout)
            ax.bar_label(bars, [str(y) for y in ys])
        ax.set_xticks(range(len(ctxs)))
        ax.set_xticklabels([f"{c // 1024}K" for c in ctxs])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("largest batch that fits")
        ax.set_title(shape)
        ax.legend()
    fig.suptitle(f"Serving capacity on {res['budget_gib']} GiB (memory plan, an estimate: not measured); "
                 f"bf16, {res['new_tokens']} new tokens, prefill in {res['prefill_chunk']}-token chunks", fontsize=9)
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
    a = ap.parse_args(argv)
    if a.budget_gib <= 0 or any(c < 1 for c in a.contexts) or a.new_tokens < 1 or a.prefill_chunk < 0:
        raise SystemExit("--budget-gib must be > 0, --contexts and --new-tokens >= 1, --prefill-chunk >= 0")
    res = plan(a.contexts, a.budget_gib, a.new_tokens, a.prefill_chunk or None)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(figure(res, Path(a.figure)))
    print(f"{'shape':12s} {'ctx':>7s} {'layout':7s} {'batch':>5s} {'KV/row GiB':>10s} {'total GiB':>9s}")
    for r in res["rows"]:
        print(f"{r['shape']:12s} {r['ctx']:7d} {r['layout']:7s} {r['batch']:5d} {r['kv_per_row_bytes']:10.2f} "
              f"{r['total_bytes']:9.1f}")


if __name__ == "__main__":
    main()
