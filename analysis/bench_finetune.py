"""GPU runs of the finetuning recipe itself: whole-step time, peak memory per GPU and tokens/s per GPU, hybrid against
full attention, launched with `tune run` exactly as a user does (`--nproc_per_node N`: FSDP2 over N GPUs).

    # the Llama-2-7B benchmark on one 8-GPU machine (FSDP2 over 8, plus 2 for the scaling efficiency 2 -> 8):
    python analysis/bench_finetune.py --nproc 8 2 --specs 7b-32k 7b-64k 7b-128k \\
        --out analysis/results/finetune_8gpu_<card>.json --commit $(git rev-parse --short HEAD)
    # the same, on a CPU, before the machine exists: every run's config validated and its memory plan printed
    python analysis/bench_finetune.py --plan-only --nproc 8 2 --specs 7b-32k 7b-64k 7b-128k

Specs are `<model>-<K tokens>`. Models: `7b` -- the shipped configs `recipes/configs/llama2_7b_longgen_128k.yaml`
(hybrid: middle third full, AttnSink(128, 1920)) and `llama2_7b_full_128k.yaml` (`full_layers: all`) with random weights
(`checkpoint.base_dir=null`, a byte tokenizer, the Python standard library's sources as text, joined so that every
sequence is one document, as in the paper; speed does not depend on weights or text); `7b<N>l` -- the same with N
layers; `1b` / `3b` -- the Llama-3.2-1B / 3B shape (16 / 28 layers) on
`tiny_longgen.yaml`'s recipe fields and flexgen_long.losses.ChunkedLinearCrossEntropy (32 chunks: one chunk's
logits at a time; the committed 1b records, run before it existed, used the config's CrossEntropyLoss, as their
commands say). The whole-recipe step of the 3B shape on one GPU:

    python analysis/bench_finetune.py --specs 3b-64k 3b-128k --out analysis/results/finetune_3b_<card>.json

Every run: `max_steps` optimizer steps of one micro-batch per GPU (`gradient_accumulation_steps=1`), bf16,
activation checkpointing, `compile=false` (flex compiled inside the model; full layers on SDPA's causal kernel, as
every row is one document). Records made before the runs joined their text trained on packed short files (document
masks: full layers on flex, most causal work skipped); `plot_speedups.py --finetune` labels them "packed files".
Step time is the median over the steps after the first (which compiles), from the
recipe's own metrics (tokens/s per rank); peak memory is torchtune's, on rank 0, per step. Each run's record also holds
the memory plan of its config (`flexgen_long.train_plan`, the estimate `recipes/longgen_plan.py` prints).

The JSON is rewritten after every run; a second call with the same `--out` keeps the runs that succeeded and runs the
rest, so a machine that stops a long call can be given the same command again. Runs write no checkpoint
(`checkpoint.save_final=false`: a 7B one is about 40 GB, minutes of writing per run); each run's scratch output
directory is deleted after it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = "recipes/configs"
#: Random weights for the shipped 7B configs (which otherwise ask for a model directory and a corpus).
RANDOM_WEIGHTS = ["checkpoint.base_dir=null", "tokenizer._component_=flexgen_long.tokenizers.byte_tokenizer",
                  "~tokenizer.path", "~tokenizer.prompt_template", "dataset.source=python-stdlib"]
LLAMA2_7B_SHAPE = ["model._component_=flexgen_long.models.longgen_llama", "model.vocab_size=32000",
                   "model.num_heads=32", "model.num_kv_heads=32", "model.embed_dim=4096",
                   "model.intermediate_dim=11008", "model.norm_eps=1e-5"]
PAPER_SPEEDUP = 1.55  # LongGen's whole-model training speed-up at 128K (Llama-2-7B, 8 GPUs)


def model_args(name: str, layout: str) -> tuple[str, list[str]]:
    """(config, overrides) of model ``name`` with ``layout`` ('hybrid' or 'full')."""
    if layout not in ("hybrid", "full"):
        raise ValueError(f"layout must be 'hybrid' or 'full', got {layout!r}")
    if name in ("1b", "3b"):  # Llama-3.2-1B shape (16 layers, 5..9 full) / 3B (28 layers, middle third 9..17 full)
        return f"{CONFIGS}/tiny_longgen.yaml", [
            f"model._component_=flexgen_long.models.longgen_llama3_2_{name}", "~model.vocab_size", "model.rope_base=500000",
            f"model.full_layers={'all' if layout == 'full' else 'middle'}", "model.sparse_pattern.sink=128",
            "model.sparse_pattern.window=1920",
            # Vocabulary 128,256: at 128K tokens torchtune's CEWithChunkedOutputLoss alone plans 105.5 GiB (every
            # chunk's logits at once) and the 3B run does not fit an H200; this loss holds one chunk's logits.
            "loss._component_=flexgen_long.losses.ChunkedLinearCrossEntropy", "loss.num_chunks=32"]
    m = re.fullmatch(r"7b(?:(\d+)l)?", name)
    if not m or (m.group(1) is not None and not 1 <= int(m.group(1)) <= 32):
        raise ValueError(f"model must be 1b, 3b, 7b or 7b<N>l (N in 1..32 layers), got {name!r}")
    config = f"{CONFIGS}/llama2_7b_{'longgen' if layout == 'hybrid' else 'full'}_128k.yaml"
    shape = [*LLAMA2_7B_SHAPE, f"model.num_layers={m.group(1)}"] if m.group(1) else []
    return config, [*RANDOM_WEIGHTS, *shape]


def parse_spec(spec: str) -> tuple[str, int]:
    m = re.fullmatch(r"(\w+)-(\d+)k", spec)
    if not m:
        raise ValueError(f"spec must be <model>-<K tokens> (e.g. 7b-128k), got {spec!r}")
    model_args(m.group(1), "hybrid")
    return m.group(1), int(m.group(2)) * 1024


def run_args(name: str, seq: int, layout: str, nproc: int, steps: int, out_dir: str, log_dir: str,
             backend: str = "default") -> list[str]:
    """The `tune run` command of one run; ``backend``: the recipe's ``flex_backend`` (default: its own choice)."""
    config, overrides = model_args(name, layout)
    if backend != "default":
        overrides = [*overrides, f"flex_backend={backend}"]
    max_tokens = max(2_000_000, seq * (steps + 2) * nproc * 2)
    return ["tune", "run"] + (["--nproc_per_node", str(nproc)] if nproc > 1 else []) + [
        "recipes/longgen_finetune.py", "--config", config, *overrides,
        f"model.max_seq_len={seq}", f"seq_len={seq}", "device=cuda", "dtype=bf16",
        "enable_activation_checkpointing=true", "compile=false", "batch_size=1", "gradient_accumulation_steps=1",
        f"max_steps={steps}", "log_every_n_steps=1",
        f"dataset.max_tokens={max_tokens}",
        # Every sequence one document, as in the paper (full attention over all seq_len tokens): the source's files
        # joined into one long document and no synthetic tasks. Short packed documents would give the full layers a
        # document mask that skips most of the causal work -- a cheaper, different baseline.
        "dataset.synthetic_share=0", f"dataset.min_document_tokens={max_tokens}",
        "checkpoint.save_every_n_steps=null", "checkpoint.save_final=false", f"output_dir={out_dir}",
        "checkpoint.resume=false", "checkpoint.overwrite=true",  # the benchmark's own scratch directory
        "metric_logger._component_=torchtune.training.metric_logging.DiskLogger", f"metric_logger.log_dir={log_dir}"]


def _plan_cli():
    spec = importlib.util.spec_from_file_location("_longgen_plan", ROOT / "recipes" / "longgen_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plan_run(args: list[str], *, validate: bool = False):
    """The memory plan of a recorded `tune run` command (its config and overrides, its nproc), validated first when
    asked (the recipe's checks; the device only for its form on a machine without a GPU)."""
    from flexgen_long import train_plan

    cli = _plan_cli()
    nproc = int(args[args.index("--nproc_per_node") + 1]) if "--nproc_per_node" in args else 1
    i = args.index("--config")
    cfg = cli.load_config(ROOT / args[i + 1], args[i + 2:])
    model = cli.validate(cfg) if validate else None
    return train_plan.plan_from_config(cfg, nproc, model)


def parse_metrics(text: str) -> list[dict]:
    """Steps logged by torchtune's DiskLogger (`Step N | key:value key:value ...`), sorted by step."""
    steps = []
    for line in text.splitlines():
        m = re.match(r"Step (\d+) \| (.*)", line.strip())
        if m:
            kv = dict(re.findall(r"(\w+):([-\d.e+]+|nan|inf)", m.group(2)))
            steps.append({"step": int(m.group(1)), **{k: float(v) for k, v in kv.items()}})
    return sorted(steps, key=lambda s: s["step"])


def summarize_run(row: dict, metrics: list[dict]) -> dict:
    """Step time (median over steps after the first), tokens/s per GPU and peak memory of one run's metrics."""
    row["metrics"] = metrics
    later = [m for m in metrics if m["step"] > 1]
    if later:
        tps = [m["tokens_per_second_per_rank"] for m in later]
        row["step_s_median"] = statistics.median(row["seq_len"] / t for t in tps)
        row["tokens_per_s_per_rank_median"] = statistics.median(tps)
        row["peak_memory_alloc_gib"] = max(m.get("peak_memory_alloc", float("nan")) for m in later)
        row["peak_memory_reserved_gib"] = max(m.get("peak_memory_reserved", float("nan")) for m in later)
        row["loss"] = [m["loss"] for m in metrics]
    return row


def summarize(runs: list[dict]) -> dict:
    """Hybrid vs full per (model, seq_len, nproc): step times, speed-up, peak memory, tokens/s per GPU; and the
    scaling efficiency of each (model, seq_len, layout) measured at several GPU counts: tokens/s per GPU at n GPUs
    over tokens/s per GPU at the fewest (each GPU trains one sequence per step, so 1.0 is perfect scaling)."""
    ok = [r for r in runs if "step_s_median" in r]
    backends: dict = {}
    for r in ok:
        backends.setdefault((r["model"], r["seq_len"], r["nproc"], r["layout"]), {})[r.get("flex_backend",
                                                                                            "default")] = r
    flash_vs_triton = [{"model": m, "seq_len": s, "nproc": n, "layout": lay,
                        "triton_step_s": d["triton"]["step_s_median"],
                        "flash_step_s": d["flash"]["step_s_median"],
                        "speedup": d["triton"]["step_s_median"] / d["flash"]["step_s_median"],
                        "loss": {b: d[b].get("loss") for b in ("triton", "flash")}}
                       for (m, s, n, lay), d in sorted(backends.items()) if {"triton", "flash"} <= set(d)]
    ok = [r for r in ok if r.get("flex_backend", "default") in ("default", "triton")]  # hybrid vs full: one backend
    by: dict = {}
    for r in ok:
        by.setdefault((r["model"], r["seq_len"], r["nproc"]), {})[r["layout"]] = r
    pairs = []
    for (model, seq, nproc), d in sorted(by.items()):
        h, f = d.get("hybrid"), d.get("full")
        if h and f:
            pairs.append({"model": model, "seq_len": seq, "nproc": nproc, "hybrid_step_s": h["step_s_median"],
                          "full_step_s": f["step_s_median"], "speedup": f["step_s_median"] / h["step_s_median"],
                          "hybrid_peak_gib": h["peak_memory_alloc_gib"], "full_peak_gib": f["peak_memory_alloc_gib"],
                          "hybrid_tokens_per_s_per_gpu": h["tokens_per_s_per_rank_median"],
                          "full_tokens_per_s_per_gpu": f["tokens_per_s_per_rank_median"]})
    scaling = []
    groups: dict = {}
    for r in ok:
        groups.setdefault((r["model"], r["seq_len"], r["layout"]), []).append(r)
    for (model, seq, layout), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["nproc"])
        if len(rs) > 1:
            base = rs[0]["tokens_per_s_per_rank_median"]
            scaling.append({"model": model, "seq_len": seq, "layout": layout, "base_nproc": rs[0]["nproc"],
                            "efficiency": {str(r["nproc"]): r["tokens_per_s_per_rank_median"] / base for r in rs}})
    return {"hybrid_vs_full": pairs, "scaling": scaling, "flash_vs_triton": flash_vs_triton}


def _run(args: list[str], timeout_s: float | None) -> tuple[int, str, bool]:
    """Run in its own process group (torchrun's workers too), killed whole at the timeout."""
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout_s)
        return p.returncode, out, False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return 124, out, True


def run_tag(name: str, seq: int, layout: str, nproc: int, backend: str = "default") -> str:
    return f"{name}-{seq // 1024}k-{layout}-x{nproc}" + ("" if backend == "default" else f"-{backend}")


def run_one(name: str, seq: int, layout: str, nproc: int, steps: int, scratch: Path, timeout_s,
            backend: str = "default") -> dict:
    tag = run_tag(name, seq, layout, nproc, backend)
    out_dir, log_dir = scratch / "out" / tag, scratch / "logs" / tag
    shutil.rmtree(log_dir, ignore_errors=True)
    args = run_args(name, seq, layout, nproc, steps, str(out_dir), str(log_dir), backend)
    row = {"spec": tag, "model": name, "seq_len": seq, "layout": layout, "nproc": nproc, "steps": steps,
           "flex_backend": backend, "command": shlex.join(args)}
    try:
        plan = plan_run(args)
        row.update(plan_peak_gib=round(plan.peak / 2**30, 3), plan_phase=plan.peak_phase)
    except ValueError as e:
        row["plan_error"] = str(e)
    t0 = time.time()
    rc, out, timed_out = _run(args, timeout_s)
    shutil.rmtree(out_dir, ignore_errors=True)  # the benchmark's own scratch directory (no checkpoint in it)
    row.update(wall_s=round(time.time() - t0, 1), rc=rc)
    if rc != 0:
        row["error_tail"] = out[-3000:]
        row["oom"] = "OutOfMemoryError" in out or "CUDA out of memory" in out
        row["timed_out"] = timed_out
        print(f"[{tag}] FAILED rc={rc}{' (timeout)' if timed_out else ''}\n{out[-1500:]}", flush=True)
        return row
    text = "".join(p.read_text() for p in sorted(log_dir.rglob("*.txt")))
    summarize_run(row, parse_metrics(text))
    print(f"[{tag}] step {row.get('step_s_median', float('nan')):.3f} s, "
          f"{row.get('tokens_per_s_per_rank_median', float('nan')):.0f} tokens/s per GPU, peak alloc "
          f"{row.get('peak_memory_alloc_gib', float('nan')):.1f} GiB (plan "
          f"{row.get('plan_peak_gib', float('nan')):.1f}), wall {row['wall_s']} s", flush=True)
    return row


def print_summary(res: dict) -> None:
    s = res["summary"]
    print(f"\n== summary (card: {res['card']}) ==")
    for p in s["hybrid_vs_full"]:
        print(f"{p['model']:>6} {p['seq_len'] // 1024:>4}K x{p['nproc']}  hybrid {p['hybrid_step_s']:.3f} s  full "
              f"{p['full_step_s']:.3f} s  speedup {p['speedup']:.2f}x (paper {PAPER_SPEEDUP}x at 128K)  tokens/s/GPU "
              f"{p['hybrid_tokens_per_s_per_gpu']:.0f} vs {p['full_tokens_per_s_per_gpu']:.0f}  peak GiB "
              f"{p['hybrid_peak_gib']:.1f} vs {p['full_peak_gib']:.1f}")
    for c in s["scaling"]:
        print(f"{c['model']:>6} {c['seq_len'] // 1024:>4}K {c['layout']:>6}  scaling efficiency vs "
              f"{c['base_nproc']} GPUs: " + ", ".join(f"{n} GPUs {e:.2f}" for n, e in c["efficiency"].items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON to write (and to continue: its successful runs are kept)")
    ap.add_argument("--specs", nargs="+", default=["1b-16k", "1b-64k", "7b6l-32k", "7b6l-128k"],
                    help="<model>-<K tokens>, model 1b, 3b, 7b or 7b<N>l")
    ap.add_argument("--layouts", nargs="+", default=["hybrid", "full"], choices=["hybrid", "full"])
    ap.add_argument("--nproc", nargs="+", type=int, default=[1], help="GPU counts to run each spec at")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--timeout-s", type=float, default=None, help="per run; a run past it is killed and recorded")
    ap.add_argument("--scratch", default="/tmp/flexgen_long_bench_finetune", help="runs' output and log dirs")
    ap.add_argument("--fresh", action="store_true", help="ignore the runs already in --out")
    ap.add_argument("--plan-only", action="store_true", help="validate every run's config and print its memory "
                                                             "plan (no GPU needed); nothing is run")
    ap.add_argument("--gpu-memory-gib", type=float, default=None, help="with --plan-only: fail a plan above it "
                                                                       "(default: an H200, 139.8)")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--flex-backends", nargs="+", default=["default"], choices=["default", "triton", "flash"],
                    help="each run per compiled-flex backend (the recipe's flex_backend; default: its own choice, "
                         "FLASH where flash-attn-4 imports); triton + flash adds their comparison to the summary")
    a = ap.parse_args(argv)
    specs = [parse_spec(s) for s in a.specs]
    if any(n < 1 for n in a.nproc):
        ap.error(f"--nproc: GPU counts must be >= 1, got {a.nproc}")
    grid = [(name, seq, layout, n, b) for name, seq in specs for n in a.nproc for layout in a.layouts
            for b in a.flex_backends]

    if a.plan_only:
        from flexgen_long import recipe_config as rc
        from flexgen_long import train_plan

        gib = a.gpu_memory_gib or train_plan.H200_GIB
        with rc.user_errors():
            for name, seq, layout, n, b in grid:
                args = run_args(name, seq, layout, n, a.steps, "/tmp/plan-only", "/tmp/plan-only-logs", b)
                plan = plan_run(args, validate=True)
                print(f"\n### {name}-{seq // 1024}k {layout} on {n} GPU(s)\n$ {shlex.join(args)}\n"
                      f"{plan.describe(gib)}")
                train_plan.check_fits(plan, gib)
        return
    if not a.out:
        ap.error("--out is required (except with --plan-only)")

    import torch

    res = {"benchmark": "finetune_recipe", "card": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
           "torch": torch.__version__, "commit": a.commit, "runs": []}
    done = {}
    if Path(a.out).exists() and not a.fresh:
        old = json.loads(Path(a.out).read_text())
        done = {r["spec"]: r for r in old.get("runs", []) if r.get("rc") == 0 and "step_s_median" in r}
        print(f"continuing {a.out}: {len(done)} successful run(s) kept", flush=True)
    if max(a.nproc) > res["gpus"]:
        ap.error(f"--nproc {max(a.nproc)} exceeds this machine's {res['gpus']} GPU(s)")
    scratch = Path(a.scratch)
    for name, seq, layout, n, b in grid:
        tag = run_tag(name, seq, layout, n, b)
        res["runs"].append(done.get(tag) or run_one(name, seq, layout, n, a.steps, scratch, a.timeout_s, b))
        res["summary"] = summarize(res["runs"])
        res["complete"] = all(r["rc"] == 0 for r in res["runs"]) and len(res["runs"]) == len(grid)
        Path(a.out).write_text(json.dumps(res, indent=1))
    print_summary(res)
    sys.exit(0 if res["complete"] else 1)


if __name__ == "__main__":
    main()
