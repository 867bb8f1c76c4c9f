"""Quality gates of the byte-saving options on a real model: int8 weight-only weights (``quantize=int8wo``), FP8 full-
layer KV caches (``kv_cache_dtype=fp8``) and both, against the model's bf16, through the eval and generate recipes.

Each variant is one ``recipes/longgen_eval.py`` run (passkey and multi-key needle at every length x 5 depths x
``--samples-per-cell`` prompts, perplexity on ``--documents`` held-out documents) and one ``recipes/longgen_generate.py``
run on its README prompts (greedy). The summary (``summary.json``, ``summary.md``, ``summary.png``) gives every accuracy
with its 95% Wilson interval, each variant's difference from bf16 with Newcombe's interval (the gate: the interval
holds 0), each perplexity's relative difference from bf16 (the gate: within 1%), and whether the greedy text equals
bf16's (else both texts). The prompts are the same seeded ones for every variant, so the intervals, which treat them
as independent samples, are conservative.

    python -m flexgen_long.import_gguf --out /tmp/smol                 # SmolLM2-135M-Instruct (8K context)
    python analysis/quant_quality.py --model-dir /tmp/smol --out analysis/results/quant_quality_smollm2 --device cuda
    # a finetuned 32K checkpoint: --model-dir CKPT --tokenizer-dir /tmp/smol --lengths 4096 8192 16384 32768
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = {"bf16": {}, "int8wo": {"quantize": "int8wo"}, "fp8kv": {"kv_cache_dtype": "fp8"},
            "int8wo+fp8kv": {"quantize": "int8wo", "kv_cache_dtype": "fp8"}}
EVAL_CONFIG = REPO / "recipes/configs/eval/smollm2_135m.yaml"
GENERATE_CONFIG = REPO / "recipes/configs/generate/smollm2_135m.yaml"
PPL_GATE = 0.01


def _overrides(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v).replace(' ', '') if isinstance(v, list) else v}" for k, v in d.items()]


def run_variant(name: str, extra: dict, args, out: Path) -> dict:
    from flexgen_long import cli
    from recipes.longgen_eval import evaluate
    from recipes.longgen_generate import generate_text

    common = {"checkpoint_dir": args.model_dir, "tokenizer.checkpoint_dir": args.tokenizer_dir or args.model_dir,
              "device": args.device, "dtype": "bf16" if args.device != "cpu" else "fp32", **extra}
    if args.full_layers != "keep":
        common["model.full_layers"] = args.full_layers
    t0 = time.perf_counter()
    cfg = cli.load_config(EVAL_CONFIG, _overrides({
        **common, "output_dir": str(out), "name": f"eval_{name}", "overwrite": "true", "lengths": args.lengths,
        "tasks": ["passkey", "multikey_needle"], "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
        "samples_per_cell": args.samples_per_cell, "perplexity_documents": args.documents,
        "perplexity_join_files": "true", "model.max_seq_len": max(args.lengths) + 64}))
    res = evaluate(cfg)
    text = io.StringIO()
    gcfg = cli.load_config(GENERATE_CONFIG, _overrides({**common, "max_new_tokens": 48}))
    with contextlib.redirect_stdout(text):
        generate_text(gcfg)
    res["generated"] = [ln for ln in text.getvalue().splitlines() if ln.startswith("=== [")]
    res["variant_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def summarize(results: dict, out: Path, card: str) -> dict:
    from flexgen_long.stats import difference_interval, format_rate, wilson_interval

    base = results["bf16"]
    dtype = base.get("dtype", "bf16")  # the baseline row is named bf16; a CPU run keeps the weights in fp32
    summ = {"card": card, "baseline_dtype": dtype, "variants": {}}
    lines = [f"# Byte-saving options against the unquantized model ({card}; its weights in {dtype}: the row 'bf16')",
             "",
             "| variant | task | length | accuracy (95% interval) | minus bf16 (95% interval) | within |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        v = summ["variants"][name] = {"retrieval": {}, "perplexity": {}, "text_equal_to_bf16": None}
        for task, t in r["retrieval"].items():
            n = t["samples_per_cell"] * len(t["depths"])
            for i, L in enumerate(t["lengths"]):
                k = round(t["mean_by_length"][i] * n)
                kb = round(base["retrieval"][task]["mean_by_length"][i] * n)
                lo, hi = difference_interval(k, n, kb, n)
                row = {"k": k, "n": n, "rate": k / n, "interval": wilson_interval(k, n), "minus_bf16": (k - kb) / n,
                       "difference_interval": [lo, hi], "within": lo <= 0 <= hi}
                v["retrieval"].setdefault(task, {})[str(L)] = row
                lines.append(f"| {name} | {task} | {L} | {format_rate(k, n)} | {(k - kb) / n:+.2f} [{lo:+.2f}, "
                             f"{hi:+.2f}] | {'yes' if row['within'] else '**no**'} |")
        if r.get("perplexity"):
            for i, L in enumerate(r["perplexity"]["lengths"]):
                p, pb = r["perplexity"]["ppl"][i], base["perplexity"]["ppl"][i]
                v["perplexity"][str(L)] = {"ppl": p, "relative_to_bf16": p / pb - 1, "within": abs(p / pb - 1) <= PPL_GATE}
        v["text_equal_to_bf16"] = r["generated"] == base["generated"]
        v["generated"] = r["generated"]
        v["seconds"] = r["variant_seconds"]
    lines += ["", f"| variant | perplexity by length (relative to bf16; gate {PPL_GATE:.0%}) | greedy text = bf16's |",
              "|---|---|---|"]
    for name, v in summ["variants"].items():
        ppl = ", ".join(f"{L}: {x['ppl']:.3f} ({x['relative_to_bf16']:+.2%})" for L, x in v["perplexity"].items())
        lines.append(f"| {name} | {ppl} | {'yes' if v['text_equal_to_bf16'] else 'no'} |")
    for name, v in summ["variants"].items():
        if not v["text_equal_to_bf16"]:
            lines += ["", f"Greedy text, {name}:", *[f"    {t}" for t in v["generated"]], "bf16:",
                      *[f"    {t}" for t in summ["variants"]["bf16"]["generated"]]]
    summ["gates_met"] = all(x["within"] for v in summ["variants"].values() for t in v["retrieval"].values()
                            for x in t.values()) and \
        all(x["within"] for v in summ["variants"].values() for x in v["perplexity"].values())
    (out / "summary.json").write_text(json.dumps(summ, indent=1) + "\n")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(summ, out / "summary.png")
    print("\n".join(lines))
    return summ


def plot(summ: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summ["variants"])
    tasks = list(summ["variants"]["bf16"]["retrieval"])
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5 * (len(tasks) + 1), 4))
    for ax, task in zip(axes, tasks):
        lengths = list(summ["variants"]["bf16"]["retrieval"][task])
        for j, name in enumerate(names):
            rows = [summ["variants"][name]["retrieval"][task][L] for L in lengths]
            x = [i + (j - len(names) / 2) * 0.15 for i in range(len(lengths))]
            ax.errorbar(x, [r["rate"] for r in rows], yerr=[[r["rate"] - r["interval"][0] for r in rows],
                                                             [r["interval"][1] - r["rate"] for r in rows]],
                        fmt="o", capsize=3, label=name)
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_title(f"{task} (95% Wilson)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("prompt tokens")
    ax = axes[-1]
    for j, name in enumerate(names[1:], start=1):  # each variant in its colour of the accuracy panels
        ppl = summ["variants"][name]["perplexity"]
        ax.plot(list(ppl), [100 * x["relative_to_bf16"] for x in ppl.values()], "o-", color=f"C{j}", label=name)
    ax.axhspan(-100 * PPL_GATE, 100 * PPL_GATE, color="0.9", label=f"gate +-{PPL_GATE:.0%}")
    ax.legend()
    ax.set_title("perplexity vs the unquantized model (%)")
    ax.set_xlabel("tokens")
    axes[0].legend()
    fig.suptitle(f"int8 weights / FP8 KV against the unquantized model ({summ.get('baseline_dtype', 'bf16')} "
                 f"weights: the 'bf16' points) -- {summ['card']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, help="an HF model directory or a finetuning checkpoint")
    ap.add_argument("--tokenizer-dir", default=None, help="the tokenizer's directory (default --model-dir)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000])
    ap.add_argument("--samples-per-cell", type=int, default=20, help="prompts per (task, length, depth): x5 depths")
    ap.add_argument("--documents", type=int, default=4)
    ap.add_argument("--full-layers", default="all", help="model.full_layers of an HF directory (all: the original "
                                                          "model, every cache FP8 under fp8kv); keep: a checkpoint's own")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)
    if "bf16" not in args.variants:
        ap.error("--variants must include bf16 (the baseline)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = {}
    for name in args.variants:
        print(f"[quant_quality] {name} ...", flush=True)
        results[name] = run_variant(name, VARIANTS[name], args, out)
    return summarize(results, out, card)


if __name__ == "__main__":
    main()
