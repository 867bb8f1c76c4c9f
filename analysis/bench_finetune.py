"""GPU runs of the finetuning recipe itself (length-extension finetuning): step time and peak memory, hybrid
against full attention, through `tune run recipes/longgen_finetune.py` exactly as a user launches it, on the embedded
corpus with a byte tokenizer (the model's vocabulary is larger than the tokenizer's; speed does not depend on it).

    python analysis/bench_finetune.py --out $OUT/finetune.json [--specs 1b-16k 7b6l-32k ...] [--nproc 2]

Each spec runs `max_steps` optimizer steps; step time is the median over the steps after the first (which compiles),
from the recipe's own metrics (tokens/s per rank), peak memory from torchtune's memory stats.
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

MODELS = {
    # Llama-3.2-1B shape, 16 layers, middle third (5..9) full
    "1b": ["model._component_=flexgen_long.models.longgen_llama3_2_1b", "~model.vocab_size",
           "model.rope_base=500000"],
    # Llama-2-7B shape reduced to 6 layers, 2 full (same ~1/3 ratio as 11 of 32)
    "7b6l": ["model._component_=flexgen_long.models.longgen_llama", "model.vocab_size=32000", "model.num_layers=6",
             "model.num_heads=32", "model.num_kv_heads=32", "model.embed_dim=4096",
             "model.intermediate_dim=11008", "model.norm_eps=1e-5"],
}


def run_spec(name: str, seq: int, layout: str, nproc: int, steps: int, logdir: str) -> dict:
    model = MODELS[name]
    tag = f"{name}-{seq // 1024}k-{layout}-x{nproc}"
    out_dir = os.path.join("/tmp/ft", tag)
    args = ["tune", "run"] + (["--nproc_per_node", str(nproc)] if nproc > 1 else []) + [
        "recipes/longgen_finetune.py", "--config", "recipes/configs/tiny_longgen.yaml",
        *model, f"model.max_seq_len={seq}", f"seq_len={seq}",
        f"model.full_layers={'all' if layout == 'full' else 'middle'}",
        "model.sparse_pattern.sink=64", "model.sparse_pattern.window=1984",
        "device=cuda", "dtype=bf16", "enable_activation_checkpointing=true", "compile=false",
        "batch_size=1", "gradient_accumulation_steps=1", f"max_steps={steps}", "log_every_n_steps=1",
        f"dataset.max_tokens={max(2_000_000, seq * (steps + 2) * nproc * 2)}",
        "checkpoint.save_every_n_steps=null", f"output_dir={out_dir}",
        "checkpoint.overwrite=true",  # the benchmark's own scratch directory: a rerun replaces its checkpoint
        "metric_logger._component_=torchtune.training.metric_logging.DiskLogger", f"metric_logger.log_dir={logdir}/{tag}",
    ]
    t0 = time.time()
    p = subprocess.run(args, capture_output=True, text=True)
    row = {"spec": tag, "model": name, "seq_len": seq, "layout": layout, "nproc": nproc, "steps": steps,
           "command": " ".join(args), "wall_s": round(time.time() - t0, 1), "rc": p.returncode}
    if p.returncode != 0:
        row["error_tail"] = (p.stdout + p.stderr)[-3000:]
        print(f"[{tag}] FAILED rc={p.returncode}\n{row['error_tail'][-1500:]}", flush=True)
        return row
    logs = [os.path.join(dp, f) for dp, _, fs in os.walk(f"{logdir}/{tag}") for f in fs]
    steps_seen = []
    for path in logs:
        for line in open(path):
            m = re.match(r"Step (\d+) \| (.*)", line.strip())
            if m:
                kv = dict(re.findall(r"(\w+):([-\d.e+]+)", m.group(2)))
                steps_seen.append((int(m.group(1)), {k: float(v) for k, v in kv.items()}))
    steps_seen.sort()
    row["metrics"] = [dict(step=s, **m) for s, m in steps_seen]
    later = [m for s, m in steps_seen if s > 1]
    if later:
        tps = [m["tokens_per_second_per_rank"] for m in later]
        row["step_s_median"] = statistics.median(seq / t for t in tps)
        row["tokens_per_s_per_rank_median"] = statistics.median(tps)
        row["peak_memory_alloc_gib"] = max(m.get("peak_memory_alloc", float("nan")) for m in later)
        row["peak_memory_reserved_gib"] = max(m.get("peak_memory_reserved", float("nan")) for m in later)
        row["loss"] = [m["loss"] for _, m in steps_seen]
    print(f"[{tag}] step {row.get('step_s_median', float('nan')):.3f} s, peak alloc "
          f"{row.get('peak_memory_alloc_gib', float('nan')):.1f} GiB, wall {row['wall_s']} s, losses {row.get('loss')}",
          flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--specs", nargs="+", default=["1b-16k", "1b-64k", "7b6l-32k", "7b6l-128k"],
                    help="<model>-<K tokens>, model in %s" % list(MODELS))
    ap.add_argument("--layouts", nargs="+", default=["hybrid", "full"])
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--commit", default="unknown")
    a = ap.parse_args(argv)
    import torch
    res = {"benchmark": "finetune_recipe", "card": torch.cuda.get_device_name(), "gpus": a.nproc,
           "torch": torch.__version__, "commit": a.commit, "runs": []}
    for spec in a.specs:
        name, k = spec.rsplit("-", 1)
        for layout in a.layouts:
            res["runs"].append(run_spec(name, int(k.rstrip("k")) * 1024, layout, a.nproc, a.steps, "/tmp/ftlogs"))
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
    by = {}
    for r in res["runs"]:
        by.setdefault((r["model"], r["seq_len"]), {})[r["layout"]] = r
    print("\n== summary (card: %s, %d GPU) ==" % (res["card"], a.nproc))
    for (m, s), d in by.items():
        h, f = d.get("hybrid", {}), d.get("full", {})
        if "step_s_median" in h and "step_s_median" in f:
            print(f"{m:>5} {s // 1024:>4}K  hybrid {h['step_s_median']:.3f} s  full {f['step_s_median']:.3f} s  "
                  f"speedup {f['step_s_median'] / h['step_s_median']:.2f}x  peak GiB {h['peak_memory_alloc_gib']:.1f} vs "
                  f"{f['peak_memory_alloc_gib']:.1f}")
    sys.exit(0 if all(r["rc"] == 0 for r in res["runs"]) else 1)


if __name__ == "__main__":
    main()
