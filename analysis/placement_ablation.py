"""Which layers carry a pretrained model's retrieval? Apply a LongGen layout to the base model at inference (no
training), with the same budget of full layers placed two ways -- where the model's own retrieval heads are
(``model.full_layers=retrieval:<n>``'s choice) and the middle ``n`` (the paper's rule) -- and measure passkey (and
optionally multi-key needle) retrieval with the eval recipe, against the unmodified model with every layer full.

Within the base model's own context, a sparse layer loses every key outside its window. If the layers that the
retrieval scoring picks are the ones that carry retrieval, keeping them full keeps the passkey, and making them
sparse loses it. That is the premise of ``model.full_layers: retrieval``; this tests it causally, with intervals,
before any training (which can move retrieval around).

    python analysis/placement_ablation.py --model-dir DIR --out analysis/results/placement_smollm2 \\
        [--budgets 10 6] [--length 4096] [--samples-per-cell 20] [--tasks passkey] [--controls]
        [--scores LAYERS_JSON] [--device cpu|cuda] [--dtype fp32|bf16] [--only VARIANT ...] [--summary-only]

Stages (each skipped when its JSON exists, so a cut run resumes):
- ``scores.json``: the base model's retrieval scores (``flexgen_long.retrieval.score_model_dir``, at the finetuning
  recipe's defaults unless ``--score-length`` / ``--score-samples``), or those of ``--scores`` (a
  ``recipes/longgen_layers.py --json`` file of the same model).
- ``eval_<variant>.json``: the eval recipe (``recipes/configs/smollm2/eval_32k.yaml`` with overrides) on ``full``,
  and for each budget n ``retrieval_<n>`` and ``middle_<n>``; with ``--controls`` also ``bottom_<n>`` (the n layers
  that score lowest: what the ranking says matters least).
- ``summary.json``, ``summary.md`` and ``summary.png``: each accuracy with its 95% Wilson interval in three scopes:
  every depth; the depths whose needle lies beyond every sparse layer's reach (0 < depth < 1: after the sinks, before
  the window, where only the full layers see it); depth 1 (right before the question). Retrieval - middle, retrieval
  - full, middle - full (and retrieval - bottom) per budget, task and scope, with Newcombe's interval and whether it
  excludes 0. The accuracy by depth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # recipes/ is imported as a package from the repository root
    sys.path.insert(0, str(REPO))

EVAL_CONFIG = "recipes/configs/smollm2/eval_32k.yaml"
TASK_NAMES = {"passkey": "passkey", "multikey_needle": "multi-key needle"}


def log(msg: str) -> None:
    print(f"[placement {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _write(path: Path, obj: dict) -> None:
    from flexgen_long.checkpoint_io import write_atomic
    write_atomic(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read {path}: {e}") from None


def layer_scores(args, out: Path) -> dict:
    """The base model's per-layer retrieval scores: ``scores.json``, from ``--scores`` or computed once."""
    f = out / "scores.json"
    if f.exists():
        return _load(f)
    if args.scores:
        src = _load(Path(args.scores))
        if "scores" not in src or "choice" not in src:
            raise SystemExit(f"error: {args.scores} is not a recipes/longgen_layers.py --json file (no 'scores' / "
                             "'choice')")
        rec = {"ranking": src["choice"]["ranking"], "layer_copy_score": src["choice"]["layer_copy_score"],
               "layer_needle_mass": src["choice"]["layer_needle_mass"], "prompts": src["choice"]["prompts"],
               "length": src["choice"]["length"], "seconds": src["scores"].get("seconds"),
               "device": src["scores"].get("device"), "dtype": src["scores"].get("dtype"),
               "from": Path(args.scores).name}
    else:
        from flexgen_long import retrieval
        from flexgen_long import recipe_config as rc
        from flexgen_long.tokenizers import hf_tokenizer
        log(f"scoring {args.model_dir} for retrieval heads")
        s = retrieval.score_model_dir(args.model_dir, hf_tokenizer(str(args.model_dir)), device=args.device,
                                      dtype=rc.DTYPES[args.dtype], length=args.score_length,
                                      samples_per_depth=args.score_samples)
        c = retrieval.choose_full_layers(s, "retrieval:1")
        rec = {"ranking": c.ranking, "layer_copy_score": c.layer_copy_score, "layer_needle_mass": c.layer_needle_mass,
               "prompts": c.prompts, "length": c.length, "seconds": round(s.seconds, 1), "device": args.device,
               "dtype": args.dtype}
    _write(f, rec)
    return rec


def variants(args, scores: dict) -> dict[str, list[int] | str]:
    """variant name -> its full layers."""
    from flexgen_long.layout import full_layer_indices
    L = len(scores["ranking"])
    v: dict[str, list[int] | str] = {}
    for i, n in enumerate(args.budgets):  # the first budget's pair first: a cut run already holds a comparison
        if not 1 <= n < L:
            raise SystemExit(f"error: --budgets: {n} is not in 1..{L - 1} (the model has {L} layers)")
        v[f"retrieval_{n}"] = sorted(scores["ranking"][:n])
        v[f"middle_{n}"] = list(full_layer_indices(L, n / L))
        if i == 0:
            v["full"] = "all"
        if args.controls:
            v[f"bottom_{n}"] = sorted(scores["ranking"][-n:])
    return v


def eval_overrides(name: str, full, args, out: Path) -> list[str]:
    from flexgen_long.data import ANSWER_ROOM
    over = [f"output_dir={out}", f"name=eval_{name}", f"checkpoint_dir={args.model_dir}",
            f"tokenizer.checkpoint_dir={args.model_dir}", f"device={args.device}", f"dtype={args.dtype}",
            f"lengths=[{args.length}]", "tasks=" + json.dumps(args.tasks).replace(" ", ""),
            f"samples_per_cell={args.samples_per_cell}", f"perplexity_documents={args.perplexity_documents}",
            # the RoPE table to the prompt + its answer; the model's own RoPE base (no extension: within its context)
            f"model.max_seq_len={args.length + ANSWER_ROOM}",
            "model.full_layers=" + (full if isinstance(full, str) else json.dumps(full).replace(" ", ""))]  # sparse layers: the config's AttnSink(64, 448), 512 keys
    return over


def run_eval(name: str, full, args, out: Path) -> None:
    from flexgen_long import cli
    from flexgen_long import recipe_config as rc
    from recipes.longgen_eval import evaluate
    over = eval_overrides(name, full, args, out)
    log(f"+ tune run recipes/longgen_eval.py --config {EVAL_CONFIG} " + " ".join(over))
    with rc.user_errors():
        evaluate(cli.load_config(REPO / EVAL_CONFIG, over))


# -- summary -----------------------------------------------------------------------------------------------------------
#: The scopes of each accuracy, by the needle's depth in the prompt: every depth; the depths whose needle lies beyond
#: every sparse layer's reach (after the sinks, before the window: there only the full layers see it); and depth 1,
#: the needle right before the question, inside every window.
SCOPES = {"all": "all depths", "beyond": "needle beyond the sinks and the window",
          "end": "needle right before the question"}
_IN_SCOPE = {"all": lambda d: True, "beyond": lambda d: 0 < d < 1, "end": lambda d: d == 1}


def _scope_counts(task: dict) -> dict[str, tuple[int, int]]:
    """scope -> (exact matches, prompts) of one task at its single length."""
    per = task["samples_per_cell"]
    correct = [round(row[0] * per) for row in task["accuracy"]]
    out = {}
    for scope, inside in _IN_SCOPE.items():
        ks = [k for d, k in zip(task["depths"], correct) if inside(d)]
        out[scope] = (sum(ks), per * len(ks))
    assert out["all"] == (task["correct_by_length"][0], task["prompts_by_length"]), "counts disagree with the eval"
    return out


def build_summary(out: Path, scores: dict, names: dict) -> dict:
    from flexgen_long.stats import difference_interval, wilson_interval

    rows, evals = {}, {}
    for v in names:
        f = out / f"eval_{v}.json"
        if not f.exists():
            continue
        e = evals[v] = _load(f)
        rows[v] = {"full_layers": e["layout"]["full_layers"], "seconds": e.get("seconds"), "retrieval": {}}
        for task, r in e["retrieval"].items():
            row = rows[v]["retrieval"][task] = {"depths": r["depths"], "samples_per_cell": r["samples_per_cell"],
                                                "accuracy_by_depth": [a[0] for a in r["accuracy"]]}
            for scope, (k, n) in _scope_counts(r).items():
                if n:
                    lo, hi = wilson_interval(k, n)
                    row[scope] = {"correct": k, "prompts": n, "rate": k / n, "interval": [round(lo, 4), round(hi, 4)]}
        if e.get("perplexity"):
            rows[v]["perplexity"] = e["perplexity"]["ppl"][0]
    budgets = sorted({int(v.split("_")[1]) for v in names if "_" in v}, reverse=True)
    compare = []
    for n in budgets:
        for x, y in ((f"retrieval_{n}", f"middle_{n}"), (f"retrieval_{n}", "full"), (f"middle_{n}", "full"),
                     (f"retrieval_{n}", f"bottom_{n}")):
            if x not in rows or y not in rows:
                continue
            for task in rows[x]["retrieval"]:
                for scope in SCOPES:
                    a, b = rows[x]["retrieval"][task].get(scope), rows[y]["retrieval"].get(task, {}).get(scope)
                    if a is None or b is None:
                        continue
                    lo, hi = difference_interval(a["correct"], a["prompts"], b["correct"], b["prompts"])
                    compare.append({"budget": n, "a": x, "b": y, "task": task, "scope": scope,
                                    "difference": a["rate"] - b["rate"], "interval": [round(lo, 4), round(hi, 4)],
                                    "significant": lo > 0 or hi < 0})
    any_eval = next(iter(evals.values()), {})
    return {"what": "a LongGen layout applied to the base model at inference, no training: full layers placed by the "
                    "model's retrieval scores vs the middle ones, same budget",
            "length": next(iter(any_eval.get("retrieval", {}).values()), {}).get("lengths", [None])[0],
            "sparse_pattern": next((p for e in evals.values() for p in e["layout"].get("patterns", []) if p != "Full()"),
                                   None), "scopes": SCOPES,
            "scoring": any_eval.get("scoring"), "device": any_eval.get("device"), "dtype": any_eval.get("dtype"),
            "card": any_eval.get("card"), "torch": any_eval.get("torch"), "layer_scores": scores,
            "variants": rows, "comparisons": compare}


def _tasks(s: dict) -> list[str]:
    return sorted({t for r in s["variants"].values() for t in r["retrieval"]}, key=list(TASK_NAMES).index)


def summary_markdown(s: dict) -> str:
    from flexgen_long.stats import format_rate
    cols = [(t, scope) for t in _tasks(s) for scope in SCOPES]
    lines = [f"Base model at inference, {s['length']} tokens, sparse layers {s['sparse_pattern']}; "
             f"{s['device']} {s['dtype']}" + (f" ({s['card']})" if s.get("card") not in (None, s["device"]) else "")
             + "; exact match with its 95% Wilson interval", "",
             "| variant | full layers | " + " | ".join(f"{TASK_NAMES[t]}, {SCOPES[sc]}" for t, sc in cols)
             + " | perplexity |", "|---|---|" + "---|" * len(cols) + "---|"]
    for v, r in s["variants"].items():
        full = r["full_layers"]
        full = "all" if len(full) == len(s["layer_scores"]["ranking"]) else ", ".join(map(str, full))
        cells = []
        for t, sc in cols:
            c = r["retrieval"].get(t, {}).get(sc)
            cells.append(f"{format_rate(c['correct'], c['prompts'])} (n={c['prompts']})" if c else "--")
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "--"
        lines.append(f"| {v} | {full} | " + " | ".join(cells) + f" | {ppl} |")
    if s["comparisons"]:
        lines += ["", "| difference | task | scope | value [95% CI] | excludes 0 |", "|---|---|---|---|---|"]
        for c in s["comparisons"]:
            lo, hi = c["interval"]
            lines.append(f"| {c['a']} - {c['b']} | {TASK_NAMES[c['task']]} | {SCOPES[c['scope']]} | "
                         f"{c['difference']:+.2f} [{lo:+.2f}, {hi:+.2f}] | {'yes' if c['significant'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot_summary(s: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flexgen_long.stats import wilson_interval

    tasks = _tasks(s)
    names = list(s["variants"])
    budgets = [v.split("_")[1] for v in names if "_" in v]
    dashed = {v for v in names if "_" in v and v.split("_")[1] != budgets[0]}  # budgets after the first
    colour = {"full": "black", "retrieval": "tab:green", "middle": "tab:orange", "bottom": "tab:gray"}
    fig, axes = plt.subplots(len(tasks), 3, figsize=(16, 4.2 * len(tasks)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.4, 1.1, 1.4]})
    scores = s["layer_scores"]
    for i, t in enumerate(tasks):
        ax = axes[i][0]
        for j, v in enumerate(names):
            for k, (scope, alpha, hatch) in enumerate((("all", 0.35, None), ("beyond", 0.9, None), ("end", 0.6, "//"))):
                r = s["variants"][v]["retrieval"].get(t, {}).get(scope)
                if r is None:
                    continue
                x, (lo, hi) = j + (k - 1) * 0.27, r["interval"]
                ax.bar(x, r["rate"], width=0.25, color=colour[v.split("_")[0]], alpha=alpha, hatch=hatch,
                       edgecolor="white" if hatch else None, label=SCOPES[scope] if j == 0 else None)
                ax.errorbar(x, r["rate"], yerr=[[r["rate"] - lo], [hi - r["rate"]]], color="black", capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_ylim(0, 1.3)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_ylabel(f"{TASK_NAMES[t]} exact match")
        ax.set_title(f"{TASK_NAMES[t]} at {s['length']} tokens (95% Wilson CI)")
        ax.legend(fontsize=7, loc="upper center", ncol=2)
        ax = axes[i][1]
        for j, v in enumerate(names):
            r = s["variants"][v]["retrieval"].get(t)
            if r is None:
                continue
            n = r["samples_per_cell"]
            ci = [wilson_interval(round(a * n), n) for a in r["accuracy_by_depth"]]
            x = [d + 0.012 * (j - (len(names) - 1) / 2) for d in r["depths"]]  # side by side, not on top
            ax.errorbar(x, r["accuracy_by_depth"], yerr=[[a - lo for a, (lo, _) in zip(r["accuracy_by_depth"], ci)],
                                                         [hi - a for a, (_, hi) in zip(r["accuracy_by_depth"], ci)]],
                        marker="o", ms=4, capsize=2, color=colour[v.split("_")[0]], ls="--" if v in dashed else "-",
                        label=v)
        ax.set_xlabel("needle depth (0 = start of the prompt)")
        ax.set_ylim(-0.03, 1.03)
        per = {s["variants"][v]["retrieval"][t]["samples_per_cell"] for v in names
               if t in s["variants"][v]["retrieval"]}
        ax.set_title(f"by depth ({'/'.join(map(str, sorted(per)))} prompts each, 95% CI; the window holds depth 1)")
        ax.legend(fontsize=8)
        ax = axes[i][2]
        if i == 0:
            L = len(scores["ranking"])
            ax.bar(range(L), scores["layer_copy_score"], color="tab:blue")
            for v in names:
                if v == "full":
                    continue
                full = s["variants"][v]["full_layers"]
                y = {"retrieval": 1.02, "middle": 1.08, "bottom": 1.14}[v.split("_")[0]] + 0.025 * (v in dashed)
                ax.scatter(full, [y] * len(full), marker="s" if v not in dashed else "D", s=14,
                           color=colour[v.split("_")[0]], label=f"{v}: full")
            ax.set_xlabel("layer")
            ax.set_ylabel("best head's copy score")
            ax.set_title(f"base model's retrieval scores ({scores['prompts']} prompts of {scores['length']})")
            ax.legend(fontsize=7, loc="center left")
            ax.set_ylim(0, 1.2)
        else:
            ax.axis("off")
    fig.suptitle(f"LongGen layouts applied at inference to the base model ({s['device']} {s['dtype']}"
                 + (f", {s['card']}" if s.get("card") not in (None, s["device"]) else "") + ")")
    fig.tight_layout()
    f = out / "summary.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    return f


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, type=Path, help="an HF Llama directory (the base model)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budgets", type=int, nargs="+", default=[10, 6], help="full layers per layout (default 10 6)")
    ap.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096; within the model's context)")
    ap.add_argument("--samples-per-cell", type=int, default=20, help="prompts per depth (5 depths; default 20)")
    ap.add_argument("--perplexity-documents", type=int, default=4)
    ap.add_argument("--tasks", nargs="+", default=["passkey"], choices=list(TASK_NAMES))
    ap.add_argument("--controls", action="store_true", help="also the n lowest-scoring layers full")
    ap.add_argument("--scores", default=None, help="a recipes/longgen_layers.py --json file of the same model")
    ap.add_argument("--score-length", type=int, default=None,
                    help="scoring prompt tokens (default: the finetuning recipe's, 4096 or the model's RoPE table)")
    ap.add_argument("--score-samples", type=int, default=8, help="scoring prompts per depth (default 8, as the recipe)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these variants (then the summary)")
    ap.add_argument("--summary-only", action="store_true", help="evaluate nothing: the summary of what exists")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default fp32 on cpu, bf16 on cuda")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    if not (args.model_dir / "config.json").is_file():
        raise SystemExit(f"error: --model-dir {args.model_dir} holds no config.json (an HF Llama directory)")
    args.model_dir = args.model_dir.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    scores = layer_scores(args, args.out)
    names = variants(args, scores)
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise SystemExit(f"error: --only: unknown {unknown}; the variants are {list(names)}")
    for v, full in names.items():
        if args.summary_only or (args.out / f"eval_{v}.json").exists() or (args.only and v not in args.only):
            continue
        t0 = time.perf_counter()
        run_eval(v, full, args, args.out)
        log(f"{v}: {time.perf_counter() - t0:.0f} s")
    s = build_summary(args.out, scores, names)
    if not s["variants"]:
        log(f"no variant evaluated yet in {args.out}: no summary")
        return s
    _write(args.out / "summary.json", s)
    md = summary_markdown(s)
    (args.out / "summary.md").write_text(md)
    f = plot_summary(s, args.out)
    print(md)
    log(f"wrote {args.out / 'summary.json'}, summary.md, {f.name}")
    return s


if __name__ == "__main__":
    main()
