"""Driver of the small-scale LongGen retrieval reproduction: one command per stage, run from the repo root.

    python analysis/repro/run_stage.py calibrate          # 30 steps of s1 and of s2 (b): measured tokens/s, minutes
    python analysis/repro/run_stage.py s1                 # pretrain, full attention, 1K context
    python analysis/repro/run_stage.py s2 VARIANT         # extend s1 to 8K with VARIANT's layout
    python analysis/repro/run_stage.py s3 VARIANT         # evaluate (VARIANT f: StreamingLLM on a's checkpoint)
    python analysis/repro/run_stage.py heads s1           # retrieval heads: which layers copy the passkey
    python analysis/repro/run_stage.py table              # markdown table + heatmap links + summary.png

s2 and s3 also take ``all`` or a comma list (``s2 b,c,d``) with ``--gpus N`` (and ``--jobs-per-gpu K``): the variants
then run as separate processes, N x K at a time, each on one GPU (CUDA_VISIBLE_DEVICES), each with its own log under
``--outputs``/logs.
On a 4-GPU machine the whole experiment is four commands:

    python analysis/repro/run_stage.py s1
    python analysis/repro/run_stage.py s2 all --gpus 4
    python analysis/repro/run_stage.py s3 all --gpus 4
    python analysis/repro/run_stage.py table

Each training / eval stage is exactly one ``tune run`` of the project's recipes with the configs in
recipes/configs/repro/ plus a few overrides; the driver prints the command before running it. Checkpoints go to
``--outputs`` (default outputs/repro, not committed); JSON, PNG and the table to ``--results`` (default
analysis/results/repro, committed). Training always passes ``checkpoint.resume=true``: rerunning a stage that a time
limit cut off continues it; rerunning a finished one does nothing. ``--set key=value`` adds overrides (repeatable);
``--toy`` shrinks everything to a CPU smoke test (tiny widths, 2 steps) -- the tests run the driver that way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # flexgen_long from this checkout, also without an installed package
sys.path.insert(0, str(Path(__file__).resolve().parent))  # retrieval_heads, next to this file
CONFIGS = "recipes/configs/repro"

#: The sparse patterns of s2 (8K): 512 keys per AttnSink query; BlockSparse 256 local + one block in 16.
PATTERNS = {
    "attnsink": {"_component_": "flexgen_long.patterns.AttnSink", "sink": 64, "window": 448},
    "blocksparse": {"_component_": "flexgen_long.patterns.BlockSparse", "block": 64, "local_blocks": 4,
                    "vertical_stride": 16, "per_head": True},
}
#: (full_layers, sparse pattern) per variant; 8 layers -> a third is 3 layers in every placement.
VARIANTS = {
    "a": ("all", "attnsink"),                  # full attention (the pattern is unused)
    "b": ("middle", "attnsink"),               # LongGen AttnSink, layers 2-4 full
    "c": ("middle", "blocksparse"),            # LongGen BlockSparse, layers 2-4 full
    "d": ("none", "attnsink"),                 # every layer sparse
    "e_bottom": ("bottom", "attnsink"),        # layers 0-2 full
    "e_top": ("top", "attnsink"),              # layers 5-7 full
    "e_interleave": ([1, 4, 7], "attnsink"),   # spread out ("interleave:3" would give only 2 of 8 layers)
}
#: Diagnostics, run only when named (not in ``all``): the other middle third of 8 layers. [2, 3, 4] (what "middle"
#: gives) and [3, 4, 5] are both three layers about the model's centre (3.5); run 4 showed retrieval improving the
#: higher the full layers sit, so the upper choice tests whether placement alone explains (b)'s gap.
#: ``b_heads``: AttnSink with the full layers that s1's retrieval heads suggest (stage ``heads s1`` first: the
#: contiguous third of the layers with the highest copy scores, from --results/heads_s1.json).
DIAGNOSTIC = {
    "b_upper_mid": ([3, 4, 5], "attnsink"),
    "c_upper_mid": ([3, 4, 5], "blocksparse"),
    "b_heads": ("heads", "attnsink"),
}
#: f: evaluation only -- variant a's checkpoint with AttnSink(64, 448) on every layer at inference.
STREAMING = {"checkpoint_of": "a", "sink": 64, "window": 448}
#: Display order of tables and figures.
ORDER = [*VARIANTS, "f", *DIAGNOSTIC]

# --toy: CPU-sized overrides that keep every code path (8 layers, both pattern kinds, eval grid) but run in seconds.
TOY_MODEL = ["model.embed_dim=32", "model.num_heads=2", "model.num_kv_heads=1", "model.intermediate_dim=64",
             "device=cpu", "dtype=fp32", "optimizer.fused=false", "batch_size=2", "max_steps=2",
             "log_every_n_steps=1", "lr_scheduler.num_warmup_steps=1", "dataset.max_tokens=20000"]
TOY = {
    # passkey only: 4 multi-key needles alone (~480 byte tokens) outgrow these sequences
    "s1": TOY_MODEL + ["seq_len=256", "model.max_seq_len=256", "dataset.synthetic_length=256",
                       "dataset.synthetic_tasks=[passkey]"],
    "s2": TOY_MODEL + ["seq_len=512", "model.max_seq_len=544", "dataset.synthetic_length=[256,512]",
                       "dataset.synthetic_tasks=[passkey]"],
    "s3": ["device=cpu", "dtype=fp32", "tasks=[passkey]", "lengths=[256]", "depths=[0.0,1.0]", "samples_per_cell=1",
           "perplexity_documents=1"],
}
TOY_PATTERNS = {
    "attnsink": {"_component_": "flexgen_long.patterns.AttnSink", "sink": 4, "window": 28},
    "blocksparse": {"_component_": "flexgen_long.patterns.BlockSparse", "block": 16, "local_blocks": 2,
                    "vertical_stride": 4, "per_head": True},
}
TOY_STREAMING = {"sink": 4, "window": 28}


def _tune(recipe: str, config: str, overrides: list[str], log_path: Path) -> str:
    """Run ``tune run recipe --config config overrides`` from the repo root, echo and keep its output."""
    # `python -m torchtune._cli.tune` is the `tune` console script, found wherever torchtune is importable (the GPU
    # image installs it with pip --target, which puts no script on PATH)
    cmd = [sys.executable, "-m", "torchtune._cli.tune", "run", recipe, "--config", config, *overrides]
    print("+ tune " + " ".join(cmd[4:]), flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p, \
            open(log_path, "w") as log:
        for line in p.stdout:
            sys.stdout.write(line)
            log.write(line)
            lines.append(line)
    if p.returncode:
        raise SystemExit(f"stage failed (exit {p.returncode}); log: {log_path}")
    return "".join(lines)


def pattern_overrides(p: dict) -> list[str]:
    """Overrides that set ``model.sparse_pattern`` to ``p`` field by field (torchtune's CLI merges into the YAML
    node). The configs hold an AttnSink, so another pattern first removes sink / window (``~key``), which it would
    refuse as unknown arguments."""
    drop = [] if p["_component_"].endswith(".AttnSink") else ["~model.sparse_pattern.sink",
                                                                "~model.sparse_pattern.window"]
    return drop + [f"model.sparse_pattern.{k}={json.dumps(v)}" for k, v in p.items()]


def _pattern_overrides(name: str, toy: bool) -> list[str]:
    return pattern_overrides((TOY_PATTERNS if toy else PATTERNS)[name])


def full_layers_override(value) -> str:
    """``model.full_layers=`` a layout name or a list of layer indices (written without spaces: one CLI word)."""
    return "model.full_layers=" + (json.dumps(value).replace(" ", "") if isinstance(value, list) else value)


def layout_overrides(variant: str, toy: bool = False, results: Path | None = None) -> list[str]:
    """The s2 overrides that make ``variant``: its full layers and its sparse pattern (``b_heads``: the full layers
    suggested by ``results``/heads_s1.json)."""
    full, pattern = {**VARIANTS, **DIAGNOSTIC}[variant]
    if full == "heads":
        f = Path(results or ".") / "heads_s1.json"
        if not f.exists():
            raise SystemExit(f"variant {variant} places its full layers by s1's retrieval heads, but {f} is missing: "
                             "run stage `heads s1` first (same --outputs/--results)")
        full = json.loads(f.read_text())["suggested_full_layers"]["contiguous"]
    return [full_layers_override(full), *_pattern_overrides(pattern, toy)]


def train_summary(stdout: str, stage: str, variant: str, overrides: list[str], seconds: float) -> dict:
    """Loss and tokens/s from the recipe's metric lines ("Step N | loss:L lr:... tokens_per_second_per_rank:T")."""
    rows = [(int(s), float(l), float(t)) for s, l, t in
            re.findall(r"Step (\d+) \| loss:([0-9.]+) .*?tokens_per_second_per_rank:([0-9.]+)", stdout)]
    # the first logged window holds start-up (first flex compiles, allocator warm-up): not the steady state
    steady = [t for _, _, t in rows[1:]] or [t for _, _, t in rows]
    return {"stage": stage, "variant": variant, "overrides": overrides, "wall_seconds": round(seconds, 1),
            "logged_steps": [s for s, _, _ in rows], "loss": [l for _, l, _ in rows],
            "tokens_per_s": statistics.median(steady) if steady else None,
            "already_done": "nothing to do" in stdout,
            # tokens/s is per job: with --jobs-per-gpu K, K jobs shared the GPU (run_parallel sets this)
            "jobs_per_gpu": int(os.environ.get("FLEXGEN_REPRO_JOBS_PER_GPU", "1"))}


def run_train(stage: str, variant: str, args) -> dict:
    out = Path(args.outputs) / (stage if stage == "s1" else f"s2_{variant}")
    overrides = [f"output_dir={out}", "checkpoint.resume=true"]
    if stage == "s2":
        from flexgen_long.checkpoint_io import latest_checkpoint
        base = latest_checkpoint(Path(args.outputs) / "s1")
        if base is None:
            raise SystemExit(f"no s1 checkpoint in {Path(args.outputs) / 's1'}: run `python {Path(__file__).relative_to(REPO)} s1` "
                             "first (on the same machine: checkpoints are not committed)")
        overrides += [f"checkpoint.base_dir={base}", *layout_overrides(variant, args.toy, Path(args.results))]
    overrides += (TOY[stage] if args.toy else []) + list(args.set)
    config = f"{CONFIGS}/{'s1_pretrain' if stage == 's1' else 's2_extend'}.yaml"
    t0 = time.perf_counter()
    stdout = _tune("recipes/longgen_finetune.py", config, overrides,
                   Path(args.outputs) / "logs" / f"{stage}_{variant}.log")
    summary = train_summary(stdout, stage, variant, overrides, time.perf_counter() - t0)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"train_{stage}_{variant}.json"
    if summary["already_done"] and path.exists():
        return json.loads(path.read_text())  # keep the real run's numbers
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"training summary: {path}", flush=True)
    return summary


def run_eval(variant: str, args) -> None:
    """The eval recipe on the variant's latest s2 checkpoint, or with ``--step N`` on its step-N checkpoint (results
    then go to ``--results``/step_N, so that accuracy can be followed over training)."""
    ckpt_of = STREAMING["checkpoint_of"] if variant == "f" else variant
    ckpt = Path(args.outputs) / f"s2_{ckpt_of}"
    results = Path(args.results)
    if args.step is not None:
        ckpt, results = ckpt / f"step_{args.step}", results / f"step_{args.step}"
        if not ckpt.is_dir():
            raise SystemExit(f"no checkpoint {ckpt}: --step takes a step that s2 kept (checkpoint.keep_last_n)")
    overrides = [f"checkpoint_dir={ckpt}", f"name={variant}", f"output_dir={results}"]
    if variant == "f":
        s = TOY_STREAMING if args.toy else STREAMING
        overrides += [f"streaming_llm.sink={s['sink']}", f"streaming_llm.window={s['window']}"]
    overrides += (TOY["s3"] if args.toy else []) + list(args.set)
    _tune("recipes/longgen_eval.py", f"{CONFIGS}/eval.yaml", overrides,
          Path(args.outputs) / "logs" / f"s3_{variant}{'' if args.step is None else f'_step{args.step}'}.log")


def run_heads(name: str, args) -> None:
    """Retrieval heads (analysis/repro/retrieval_heads.py) of s1's or a variant's latest checkpoint -> --results/
    heads_NAME.json/png: which layers copy the passkey, i.e. where the full layers would keep retrieval."""
    from flexgen_long.checkpoint_io import latest_checkpoint
    import retrieval_heads
    out = Path(args.outputs) / ("s1" if name == "s1" else f"s2_{name}")
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise SystemExit(f"no checkpoint in {out}: run stage {'s1' if name == 's1' else 's2 ' + name} first")
    extra = ["--device", "cpu", "--dtype", "fp32", "--samples", "1"] if args.toy else []
    retrieval_heads.main([str(ckpt), "--out", str(Path(args.results) / f"heads_{name}"), "--name", name,
                          "--tokenizer", "bytes", *extra])


def calibrate(args) -> None:
    """30 steps of s1 and of s2 (b) into a scratch directory: the measured tokens/s, and what the configs' step counts
    would take at that rate -- before spending the budget on the full stages."""
    from omegaconf import OmegaConf
    scratch = argparse.Namespace(**{**vars(args), "outputs": str(Path(args.outputs) / "calibrate"),
                                    "results": str(Path(args.outputs) / "calibrate"),
                                    "set": [*args.set, "max_steps=30", "log_every_n_steps=10",
                                            "checkpoint.save_every_n_steps=null"]})
    for stage, variant, cfg in (("s1", "s1", "s1_pretrain"), ("s2", "b", "s2_extend")):
        s = run_train(stage, variant, scratch)
        c = OmegaConf.load(REPO / CONFIGS / f"{cfg}.yaml")
        tokens = c["max_steps"] * c["batch_size"] * c["seq_len"]
        tps = s["tokens_per_s"]
        print(f"calibrate {stage}: {tps} tokens/s -> the config's {c['max_steps']} steps ({tokens} tokens) take "
              f"{tokens / tps / 60:.1f} min of training" if tps else f"calibrate {stage}: no rate logged", flush=True)


def run_parallel(stage: str, variants: list[str], gpus: int, args) -> None:
    """Run ``stage`` for each variant as its own driver process, ``gpus x --jobs-per-gpu`` at a time, each on one GPU;
    print a line as each starts and ends. Why not torchrun: the variants are independent jobs, not one data-parallel
    job. Several jobs per GPU pay off for this small model, whose steps leave the GPU idle between kernel launches."""
    logs = Path(args.outputs) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    extra = ["--outputs", args.outputs, "--results", args.results, *(["--toy"] if args.toy else []),
             *(["--step", str(args.step)] if args.step is not None else []),
             *[a for kv in args.set for a in ("--set", kv)]]
    # GPU g of this driver is the g-th visible device: a driver restricted by CUDA_VISIBLE_DEVICES=2,3 runs its jobs
    # on physical GPUs 2 and 3 (each child sees one of them), so two drivers can share a machine
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    devices = visible or [str(g) for g in range(gpus)]
    if gpus > len(devices):
        raise SystemExit(f"--gpus {gpus} but CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} "
                         f"shows {len(devices)}")
    queue, running, failed, t0 = list(variants), {}, [], time.perf_counter()
    free = [devices[g] for _ in range(args.jobs_per_gpu) for g in range(gpus)]
    while queue or running:
        while queue and free:
            v, gpu = queue.pop(0), free.pop(0)
            tag = "" if args.step is None else f"_step{args.step}"
            log = open(logs / f"{stage}_{v}{tag}.driver.log", "w")
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu), "PYTHONUNBUFFERED": "1",
                   "FLEXGEN_REPRO_JOBS_PER_GPU": str(args.jobs_per_gpu)}
            p = subprocess.Popen([sys.executable, __file__, stage, v, *extra], cwd=REPO, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
            running[v] = (p, gpu, log, time.perf_counter())
            print(f"[{stage} {v}] started on GPU {gpu}; log {log.name}", flush=True)
        time.sleep(0.2 if args.toy else 2)
        for v, (p, gpu, log, start) in list(running.items()):
            if p.poll() is None:
                continue
            log.close()
            del running[v]
            free.append(gpu)
            took = time.perf_counter() - start
            if p.returncode:
                failed.append(v)
                tail = Path(log.name).read_text().splitlines()[-15:]
                print(f"[{stage} {v}] FAILED (exit {p.returncode}) after {took:.0f} s:\n  " + "\n  ".join(tail),
                      flush=True)
            else:
                print(f"[{stage} {v}] done in {took:.0f} s ({time.perf_counter() - t0:.0f} s since the start)",
                      flush=True)
    if failed:
        raise SystemExit(f"{stage}: {len(failed)} of {len(variants)} variants failed: {failed}")


def load_evals(results: Path) -> tuple[dict, list[str]]:
    """The eval JSONs in ``results`` by name, and the names in display order (the variants, f, then any others)."""
    evals = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))
             if not p.stem.startswith(("train_", "heads_"))}
    return evals, [v for v in ORDER if v in evals] + sorted(set(evals) - set(ORDER))


def line_style(variant: str) -> dict:
    """Figures: full attention solid black and thick, StreamingLLM dashed, the rest matplotlib's cycle."""
    return {"color": "black", "lw": 2.5} if variant == "a" else {"ls": "--"} if variant == "f" else {}


def layout_label(e: dict) -> str:
    """'full [2, 3, 4] + AttnSink' from an eval JSON's layout (the sparse kind, or StreamingLLM at inference)."""
    full = e["layout"]["full_layers"]
    sparse = sorted({p.split("(")[0] for p in e["layout"].get("patterns", []) if not p.startswith("Full")})
    if e.get("streaming_llm"):
        return f"full {full} + StreamingLLM"
    return f"full {full}" + (f" + {'/'.join(sparse)}" if sparse else "")


def build_table(results: Path) -> str:
    """Markdown: variant x length -- passkey / multi-key accuracy (mean over depths), perplexity; training tokens/s."""
    evals, order = load_evals(results)
    if not evals:
        raise SystemExit(f"no evaluation JSON in {results}: run the s3 stages first")
    lengths = sorted({L for e in evals.values() for r in e["retrieval"].values() for L in r["lengths"]}
                     | {L for e in evals.values() if e.get("perplexity") for L in e["perplexity"]["lengths"]})

    def cell(e, task, L):
        r = e["retrieval"].get(task)
        return f"{r['mean_by_length'][r['lengths'].index(L)]:.2f}" if r and L in r["lengths"] else "–"

    def ppl(e, L):
        p = e.get("perplexity")
        return f"{p['ppl'][p['lengths'].index(L)]:.3f}" if p and L in p["lengths"] else "–"

    def tps(v):
        f = results / f"train_s2_{STREAMING['checkpoint_of'] if v == 'f' else v}.json"
        d = json.loads(f.read_text()) if f.exists() else {}
        t, k = d.get("tokens_per_s"), d.get("jobs_per_gpu", 1)
        return (f"{t:,.0f}" + (f" ({k} jobs/GPU)" if k > 1 else "")) if t else "–"

    head = ["variant", "layout"] + [f"passkey {L}" for L in lengths] + [f"multikey {L}" for L in lengths] + \
           [f"ppl {L}" for L in lengths] + ["s2 train tokens/s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in order:
        e = evals[v]
        lay = layout_label(e)
        rows.append("| " + " | ".join([v, lay] + [cell(e, "passkey", L) for L in lengths] +
                                      [cell(e, "multikey_needle", L) for L in lengths] +
                                      [ppl(e, L) for L in lengths] + [tps(v)]) + " |")
    cards = sorted({e.get("card", "?") for e in evals.values()})
    figs = "\n".join(f"![{v}]({v}_retrieval.png)" for v in order if (results / f"{v}_retrieval.png").exists())
    heads = sorted(results.glob("heads_*.png"))
    if heads:  # retrieval heads (the heads stage): where each model copies the passkey from
        figs += "\n\nRetrieval heads (copy score per layer and head; F = full-attention layer):\n\n" + \
            "\n".join(f"![{p.stem}]({p.name})" for p in heads)
    return (f"Accuracy: exact match, mean over needle depths ({next(iter(evals.values()))['scoring']}). "
            f"Perplexity: held-out documents. Cards: {', '.join(cards)}.\n\n" + "\n".join(rows) + "\n\n" + figs + "\n")


def plot_summary(results: Path, out: Path) -> Path:
    """One figure for the whole experiment: passkey and multi-key accuracy (mean over depths) and perplexity against
    context length, a line per variant (full attention solid black, StreamingLLM dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    evals, order = load_evals(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = [("passkey", "passkey accuracy"), ("multikey_needle", "multi-key needle accuracy"), (None, "perplexity")]
    for ax, (task, title) in zip(axes, panels):
        for v in order:
            e = evals[v]
            style = line_style(v)
            label = f"{v}: {layout_label(e)}"
            if task is None:
                p = e.get("perplexity")
                if p:
                    ax.plot(p["lengths"], p["ppl"], marker="o", label=label, **style)
            elif task in e["retrieval"]:
                r = e["retrieval"][task]
                ax.plot(r["lengths"], r["mean_by_length"], marker="o", label=label, **style)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title + ("" if task is None else " (mean over depths)"))
        if task is not None:
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, loc="best")
    cards = ", ".join(sorted({e.get("card", "?") for e in evals.values()}))
    fig.suptitle(f"Small-scale LongGen reproduction: retrieval and perplexity after extension 1K -> 8K ({cards})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_steps(results: Path, out: Path) -> Path:
    """Passkey accuracy (mean over depths) against s2 training step, one panel per context length, a line per
    variant: the intermediate checkpoints in ``results``/step_N plus the final one (its step from the train JSON)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points: dict[str, dict[int, dict]] = {}
    for d in sorted(results.glob("step_*")):
        for p in d.glob("*.json"):
            points.setdefault(p.stem, {})[int(d.name.split("_")[1])] = json.loads(p.read_text())
    for v in list(points):
        final, train = results / f"{v}.json", results / f"train_s2_{STREAMING['checkpoint_of'] if v == 'f' else v}.json"
        logged = json.loads(train.read_text())["logged_steps"] if train.exists() else []
        if final.exists() and logged:
            points[v][logged[-1]] = json.loads(final.read_text())
    lengths = sorted({L for pts in points.values() for e in pts.values() for L in e["retrieval"]["passkey"]["lengths"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 4), squeeze=False, sharey=True)
    for ax, L in zip(axes[0], lengths):
        for v in [v for v in ORDER if v in points]:
            steps = sorted(points[v])
            acc = [points[v][t]["retrieval"]["passkey"]["mean_by_length"][
                points[v][t]["retrieval"]["passkey"]["lengths"].index(L)] for t in steps]
            style = line_style(v)
            ax.plot(steps, acc, marker="o", label=v, **style)
        ax.set_title(f"passkey at {L} tokens")
        ax.set_xlabel("s2 step")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (mean over depths)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["calibrate", "s1", "s2", "s3", "heads", "table"])
    ap.add_argument("variant", nargs="?",
                    help=f"s2: one of {list(VARIANTS)} or the diagnostics {list(DIAGNOSTIC)}; s3: those or f; "
                         "heads: s1 or an s2 variant; each: 'all' (the variants; no diagnostics, no s1) or a comma "
                         "list")
    ap.add_argument("--outputs", default="outputs/repro", help="checkpoints and logs (not committed)")
    ap.add_argument("--results", default="analysis/results/repro", help="JSON, heatmaps, table (committed)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe override")
    ap.add_argument("--toy", action="store_true", help="CPU smoke-test sizes (seconds)")
    ap.add_argument("--gpus", type=int, default=1,
                    help="with several variants: how many run at once, one GPU each (default 1)")
    ap.add_argument("--step", type=int, default=None,
                    help="s3: evaluate the s2 checkpoint of this step (results in --results/step_N)")
    ap.add_argument("--jobs-per-gpu", type=int, default=1,
                    help="with several variants: how many share one GPU (default 1)")
    args = ap.parse_args(argv)
    # what 'all' means per stage (never the diagnostics), and what may be named
    every = {"s2": list(VARIANTS), "s3": [*VARIANTS, "f"], "heads": list(VARIANTS)}.get(args.stage)
    allowed = None if every is None else [*every, *DIAGNOSTIC] + (["s1"] if args.stage == "heads" else [])
    if allowed is None and args.variant is not None:
        ap.error(f"stage {args.stage} takes no variant")
    if args.step is not None and args.stage != "s3":
        ap.error("--step is for stage s3 (evaluate an intermediate s2 checkpoint)")
    if args.gpus < 1 or args.jobs_per_gpu < 1:
        ap.error(f"--gpus and --jobs-per-gpu must be >= 1, got {args.gpus} and {args.jobs_per_gpu}")
    if allowed is not None:
        many = every if args.variant == "all" else (args.variant or "").split(",")
        bad = [v for v in many if v not in allowed]
        if bad or not many:
            ap.error(f"stage {args.stage} needs a variant from {allowed}, 'all' or a comma list of them; "
                     f"got {args.variant!r}")
        if len(many) > 1:
            return run_parallel(args.stage, many, args.gpus, args)
    if args.stage == "calibrate":
        calibrate(args)
    elif args.stage in ("s1", "s2"):
        run_train(args.stage, args.variant or "s1", args)
    elif args.stage == "s3":
        run_eval(args.variant, args)
    elif args.stage == "heads":
        run_heads(args.variant, args)
    else:
        results = Path(args.results)
        table = build_table(results)
        (results / "table.md").write_text(table)
        print(table)
        print(f"summary figure: {plot_summary(results, results / 'summary.png')}")
        if any(results.glob("step_*/*.json")):
            print(f"accuracy over training: {plot_steps(results, results / 'steps.png')}")


if __name__ == "__main__":
    main()
