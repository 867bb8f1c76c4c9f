"""Figures from committed benchmark JSON (analysis/bench.py): speedups, KV memory and absolute times vs context length.

    python analysis/plot_speedups.py [--results 'analysis/results/bench_*.json'] [--out figures] [--overwrite]

Runs on a CPU from the committed JSON; writes into ``--out`` (default ``./figures``) and never replaces an existing
file unless ``--overwrite`` (the committed figures are redrawn with ``--out analysis/figures --overwrite``): where one
of its figures exists already, it writes none.

For each ``bench.py ours`` result (one card, one model shape) it draws, into ``--out``:

* ``speedup_<card>_<model>.png`` -- dense time / hybrid time vs context length, one panel each for prefill, decode and
  training, one line per hybrid variant (plus ours vs the HF peer where a ``bench.py hf`` result for the same card and
  shape exists), the paper's 1.67x / 1.41x / 1.55x dashed;
* ``kv_<card>_<model>.png`` -- analytic KV cache size per variant, and the paper's -62% as a dashed line under dense;
* ``times_<card>_<model>.png`` -- absolute median times (log axis) with min-max bars, HF peer included.

With ``--batch-decode 'analysis/results/batch_decode_*.json'`` it draws instead, from ``bench_batch_decode.py``
results, one ``batch_decode_<card>.png`` per card: decode tokens/s against batch size (log-log), a panel per shape
and context, hybrid vs dense, eager vs fused step, each layout's largest batch on the budget starred.

With ``--finetune 'analysis/results/finetune_*.json'`` it draws instead, from ``bench_finetune.py`` results, one
``finetune_<card>.png`` per card: whole-step time, speed-up (full / hybrid) with the paper's 1.55x, peak memory per GPU
(measured, and the memory plan's estimate where the run recorded it) and scaling efficiency (tokens/s per GPU against
the fewest GPUs measured), one line per model and GPU count.

Missing points (out of memory, errors, not measured) are left out of the lines and listed in the figure's footnote,
so a figure never shows a number the JSON does not hold.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and device machines have no display
import matplotlib.pyplot as plt  # noqa: E402

PHASES = ("prefill", "decode", "train")
COLORS = {"dense": "black", "attnsink": "tab:blue", "blocksparse": "tab:orange", "hf:sdpa": "tab:red",
          "hf:flex_attention": "tab:purple"}


def load(pattern: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            r = json.load(f)
        r["_path"] = path
        out.append(r)
    return out


def _ok(rec) -> bool:
    return isinstance(rec, dict) and isinstance(rec.get("median_ms"), (int, float)) and rec["median_ms"] > 0


def _why(rec) -> str:
    if not isinstance(rec, dict):
        return "missing"
    if rec.get("oom"):
        return "OOM"
    return rec.get("not_measured") or rec.get("error", "failed")[:40]


def series(table: dict, variant: str) -> tuple[list[int], list[dict], list[str]]:
    """(lengths, records) of the measured points of one variant, sorted by length, and notes for the rest."""
    pts, notes = [], []
    for length, rec in (table or {}).get(variant, {}).items():
        if _ok(rec):
            pts.append((int(length), rec))
        else:
            notes.append(f"{variant} {int(length) // 1024}K: {_why(rec)}")
    pts.sort(key=lambda p: p[0])
    return [p[0] for p in pts], [p[1] for p in pts], notes


def speedups(table: dict, base: str, variant: str) -> tuple[list[int], list[float]]:
    """Lengths where both were measured, and base median / variant median."""
    b, v = table.get(base, {}), table.get(variant, {})
    xs = sorted(int(k) for k in v if _ok(v[k]) and _ok(b.get(k)))
    return xs, [b[str(x)]["median_ms"] / v[str(x)]["median_ms"] for x in xs]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_")


def _xaxis(ax, lengths):
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([f"{x // 1024}K" if x >= 1024 else str(x) for x in lengths])
    ax.set_xlabel("context length (tokens)")


def _footnote(fig, notes):
    if notes:
        fig.text(0.01, 0.01, "not plotted: " + "; ".join(sorted(set(notes))), fontsize=6, wrap=True, va="bottom")


def _savefig(fig, path: Path) -> None:
    """Write the PNG, never over an existing file (``main`` moves the figures into --out, replacing files there only
    with --overwrite)."""
    if path.exists():
        raise SystemExit(f"error: {path} exists; give another --out, or --overwrite to replace it")
    fig.savefig(path, dpi=110)


def _save_panels(fig, suptitle: str, notes: list, path: Path) -> Path:
    """Title, the 'not plotted' footnote, layout and PNG of a three-panel figure."""
    fig.suptitle(suptitle)
    _footnote(fig, notes)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    _savefig(fig, path)
    return path


def plot_run(ours: dict, hf: dict | None, out_dir: Path) -> dict:
    """Draw the three figures of one ``ours`` result (and its HF peer, if any). Returns {name: (figure, path,
    {panel title: [line labels]})} so tests can check what was drawn."""
    card, model = ours["card"], ours["model"]
    tag = f"{_slug(card)}_{model}"
    title = f"{model} shape, {card}, {ours.get('dtype', 'bf16')}, batch {ours.get('batch', 1)} (torch {ours['torch']})"
    paper = ours.get("paper", {})
    variants = [v for v in ours.get("variants", {}) if v != "dense"]
    lengths = sorted({int(x) for t in PHASES for v in ours.get(t, {}).values() for x in v})
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = {}

    # speedup vs length: dense / hybrid, per phase; ours vs HF where the peer measured the same phase
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    labels, notes = {}, []
    for ax, phase in zip(axes, PHASES):
        table = ours.get(phase, {})
        for v in variants:
            xs, ys = speedups(table, "dense", v)
            notes += series(table, v)[2] + series(table, "dense")[2]
            if xs:
                ax.plot(xs, ys, "o-", color=COLORS.get(v), label=f"{v} vs dense")
        if hf and phase in ("prefill", "decode"):
            for impl, recs in hf.get(phase, {}).items():
                xs = sorted(int(k) for k in recs if _ok(recs[k]) and _ok(table.get("attnsink", {}).get(k)))
                ys = [recs[str(x)]["median_ms"] / table["attnsink"][str(x)]["median_ms"] for x in xs]
                notes += [n.replace(impl, f"HF {impl}", 1) for n in series(hf.get(phase), impl)[2]]
                if xs:
                    ax.plot(xs, ys, "s:", color=COLORS.get(f"hf:{impl}"), label=f"attnsink vs HF {impl}")
        if phase in paper:
            ax.axhline(paper[phase], ls="--", color="gray", label=f"paper {paper[phase]:.2f}x")
        ax.axhline(1.0, color="lightgray", lw=0.8)
        ax.set_title(f"{phase}" + (" (reduced depth)" if phase == "train" else ""))
        ax.set_ylabel("speedup (baseline time / hybrid time)")
        _xaxis(ax, lengths)
        ax.legend(fontsize=7)
        labels[phase] = [ln.get_label() for ln in ax.get_lines()]
    if ours.get("train_setup"):
        ts = ours["train_setup"]
        axes[2].set_title(f"train fwd+bwd, {ts['num_layers']} of {ours['shape']['num_layers']} layers "
                          f"(full: {ts['full_layers'].get('attnsink')})")
    path = _save_panels(fig, f"Hybrid LongGen speedup over dense: {title}", notes, out_dir / f"speedup_{tag}.png")
    drawn["speedup"] = (fig, path, labels)

    # KV memory vs length (analytic)
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    kv = ours.get("kv", {})
    for v, recs in kv.items():
        xs = sorted(int(k) for k in recs)
        ax.plot(xs, [recs[str(x)]["kv_gib"] for x in xs], "o-", color=COLORS.get(v), label=v)
    if "dense" in kv and "kv_reduction" in paper:
        xs = sorted(int(k) for k in kv["dense"])
        ax.plot(xs, [kv["dense"][str(x)]["kv_gib"] * (1 - paper["kv_reduction"]) for x in xs], "--", color="gray",
                label=f"paper: dense -{paper['kv_reduction']:.0%}")
    ax.set_yscale("log")
    ax.set_ylabel("KV cache (GiB, analytic)")
    _xaxis(ax, lengths)
    ax.set_title(f"KV cache vs length\n{title}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"kv_{tag}.png"
    _savefig(fig, path)
    drawn["kv"] = (fig, path, {"kv": [ln.get_label() for ln in ax.get_lines()]})

    # absolute times, log axis, min-max bars
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    labels, notes = {}, []
    for ax, phase in zip(axes, PHASES):
        sources = [(v, ours.get(phase, {}), v) for v in ours.get("variants", {})]
        if hf and phase in hf:
            sources += [(f"HF {impl}", hf[phase], impl) for impl in hf[phase]]
        for label, table, key in sources:
            xs, recs, n = series(table, key)
            notes += [x.replace(key, label, 1) for x in n]
            if xs:
                med = [r["median_ms"] for r in recs]
                err = [[m - r["min_ms"] for m, r in zip(med, recs)], [r["max_ms"] - m for m, r in zip(med, recs)]]
                color = COLORS.get(key if not label.startswith("HF") else f"hf:{key}")
                ax.errorbar(xs, med, yerr=err, fmt="o-" if not label.startswith("HF") else "s:", color=color,
                            label=label, capsize=3)
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms, log)" + (" per token" if phase == "decode" else ""))
        ax.set_title(phase + (" step (reduced depth)" if phase == "train" else ""))
        _xaxis(ax, lengths)
        ax.legend(fontsize=7)
        labels[phase] = [c.get_label() for c in ax.containers]
    path = _save_panels(fig, f"Absolute times: {title}", notes, out_dir / f"times_{tag}.png")
    drawn["times"] = (fig, path, labels)
    return drawn


def plot_all(results: str, out: str) -> list[dict]:
    runs = load(results)
    ours = [r for r in runs if r.get("benchmark") == "model_ours"]
    hfs = {(r["card"], r["model"]): r for r in runs if r.get("benchmark") == "model_hf"}
    drawn = []
    for r in ours:
        drawn.append(plot_run(r, hfs.get((r["card"], r["model"])), Path(out)))
    return drawn


FT_LAYOUTS = {"hybrid": "-", "full": "--"}
PAPER_TRAIN_SPEEDUP = 1.55  # LongGen's whole-model training speed-up at 128K (Llama-2-7B, 8 GPUs)


def _ft_ok(r) -> bool:
    return r.get("rc") == 0 and isinstance(r.get("step_s_median"), (int, float))


def _ft_packed(r) -> bool:
    """Whether a run trained on packed short documents (its command joins no documents)."""
    return "dataset.min_document_tokens=" not in r.get("command", "")


def plot_finetune(results: list[dict], out_dir: Path) -> dict:
    """One figure per card from bench_finetune.py results (runs of several files of one card are joined; a spec run
    twice keeps its last record). Returns {card: (figure, path, {panel: [line labels]})} for the tests."""
    by_card: dict = {}
    for res in results:
        # Records from before the benchmark joined its source into one document per sequence trained on packed short
        # files, whose document masks skip most of the full layers' causal work: their series are labelled apart.
        by_card.setdefault(res["card"], {}).update({
            (r["spec"], _ft_packed(r)): {**r, "model": r["model"] + (" packed files" if _ft_packed(r) else "")}
            for r in res.get("runs", [])})
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = {}
    for card, runs in by_card.items():
        ok = [r for r in runs.values() if _ft_ok(r)]
        notes = [f"{r['spec']}: {'OOM' if r.get('oom') else 'timeout' if r.get('timed_out') else 'failed'}"
                 for r in runs.values() if not _ft_ok(r)]
        series: dict = {}
        for r in ok:
            series.setdefault((r["model"], r["nproc"], r["layout"]), []).append(r)
        lengths = sorted({r["seq_len"] for r in ok})
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        color = {k: cycle[i % len(cycle)] for i, k in enumerate(sorted({(m, n) for m, n, _ in series}))}
        fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
        labels = {}
        for (model, nproc, layout), rs in sorted(series.items()):
            rs.sort(key=lambda r: r["seq_len"])
            xs, c, label = [r["seq_len"] for r in rs], color[(model, nproc)], f"{model} x{nproc} {layout}"
            axes[0].plot(xs, [r["step_s_median"] for r in rs], "o" + FT_LAYOUTS[layout], color=c, label=label)
            axes[2].plot(xs, [r["peak_memory_alloc_gib"] for r in rs], "o" + FT_LAYOUTS[layout], color=c,
                         label=f"{label} measured")
            planned = [(r["seq_len"], r["plan_peak_gib"]) for r in rs if "plan_peak_gib" in r]
            if planned:
                axes[2].plot(*zip(*planned), "x:", color=c, label=f"{label} plan (estimate)")
        for (model, nproc, layout), rs in sorted(series.items()):
            if layout != "hybrid" or (model, nproc, "full") not in series:
                continue
            full = {r["seq_len"]: r["step_s_median"] for r in series[(model, nproc, "full")]}
            pts = sorted((r["seq_len"], full[r["seq_len"]] / r["step_s_median"]) for r in rs if r["seq_len"] in full)
            if pts:
                axes[1].plot(*zip(*pts), "o-", color=color[(model, nproc)], label=f"{model} x{nproc}")
        axes[1].axhline(PAPER_TRAIN_SPEEDUP, ls="--", color="gray", label=f"paper {PAPER_TRAIN_SPEEDUP:.2f}x (128K)")
        axes[1].axhline(1.0, color="lightgray", lw=0.8)
        groups: dict = {}
        for r in ok:
            groups.setdefault((r["model"], r["seq_len"], r["layout"]), []).append(r)
        counts = sorted({r["nproc"] for r in ok})
        for (model, seq, layout), rs in sorted(groups.items()):
            rs.sort(key=lambda r: r["nproc"])
            if len(rs) > 1:
                base = rs[0]["tokens_per_s_per_rank_median"]
                axes[3].plot([r["nproc"] for r in rs], [r["tokens_per_s_per_rank_median"] / base for r in rs],
                             "o" + FT_LAYOUTS[layout], label=f"{model} {seq // 1024}K {layout}")
        if not axes[3].get_lines():
            axes[3].text(0.5, 0.5, "no spec measured at several GPU counts", ha="center", transform=axes[3].transAxes)
        axes[3].axhline(1.0, color="lightgray", lw=0.8)
        axes[3].set_xscale("log", base=2)
        axes[3].set_xticks(counts)
        axes[3].set_xticklabels([str(c) for c in counts])
        axes[3].set_xlabel("GPUs")
        for ax, title, ylabel in ((axes[0], "whole recipe step (1 sequence per GPU)", "median step time (s, log)"),
                                  (axes[1], "speed-up: full / hybrid step", "speed-up"),
                                  (axes[2], "peak memory per GPU (rank 0)", "GiB allocated"),
                                  (axes[3], "scaling: tokens/s per GPU vs fewest GPUs", "efficiency")):
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            if ax is not axes[3] and lengths:
                _xaxis(ax, lengths)
            ax.legend(fontsize=6)
            labels[title.split(":")[0].split(" (")[0]] = [ln.get_label() for ln in ax.get_lines()]
        axes[0].set_yscale("log")
        torch_v = sorted({res.get("torch", "?") for res in results if res["card"] == card})
        path = _save_panels(fig, f"Finetuning recipe, hybrid vs full attention: {card} (torch {', '.join(torch_v)})",
                            notes, out_dir / f"finetune_{_slug(card)}.png")
        drawn[card] = (fig, path, labels)
    return drawn


def plot_served(res: dict, out_dir: Path) -> tuple:
    """bench_served.py's record as one figure: time to first token per call against the call's total prompt tokens
    (every pass that ran: ours after warm-up, ours cold, each HF backend; failed calls marked x at their prompt size),
    and the summary table in the title. Returns (figure, path, {pass: (calls, failures)})."""
    fig, ax = plt.subplots(figsize=(9, 5.2))
    styles = {"warm": ("o", "C0", "ours, after warmup()"), "cold": ("s", "C1", "ours, no warm-up"),
              "hf_sdpa": ("^", "C2", "transformers sdpa"), "hf_flex_attention": ("v", "C3", "transformers flex")}
    counts = {}
    for name, (marker, color, label) in styles.items():
        p = res.get("passes", {}).get(name)
        if not p or "calls" not in p:
            continue
        ok = [c for c in p["calls"] if "ttft_s" in c]
        bad = [c for c in p["calls"] if "ttft_s" not in c]
        sm = p.get("summary", {})
        counts[name] = (len(p["calls"]), len(bad))
        tag = (f"{label}: {len(p['calls'])} calls, {len(bad)} failed, TTFT p50 {sm.get('ttft_p50_s', float('nan')):.2f}"
               f" / p99 {sm.get('ttft_p99_s', float('nan')):.2f} s, decode {sm.get('decode_tokens_per_s', 0):.0f} tok/s"
               f", {sm.get('compiled_graphs', 0)} graphs compiled")
        ax.scatter([sum(c["lengths"]) for c in ok], [c["ttft_s"] for c in ok], marker=marker, color=color, s=14,
                   alpha=0.7, label=tag)
        if bad:
            top = max([c["ttft_s"] for c in ok], default=1.0)
            ax.scatter([sum(c["lengths"]) for c in bad], [top * 1.5] * len(bad), marker="x", color=color, s=30,
                       label=f"{label}: failed (OOM / error), drawn at the top")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens in the call (all rows)")
    ax.set_ylabel("time to first token (s)")
    ax.legend(fontsize=6.5, loc="upper left")
    w, m = res.get("workload", {}), res.get("model", {})
    wu = res.get("passes", {}).get("warmup", {})
    fig.suptitle(f"Served workload, {w.get('calls')} generate() calls of 1-{w.get('max_batch')} rows, prompts 1 to "
                 f"{w.get('max_len')} tokens: {res.get('card')} (torch {res.get('torch')})\n"
                 f"{m.get('num_layers')} layers, {m.get('sparse')} + full {m.get('full_layers')}; warmup(): "
                 f"{wu.get('graphs', '?')} graphs in {wu.get('seconds', float('nan')):.0f} s", fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"served_{_slug(res.get('card', 'unknown'))}.png"
    _savefig(fig, path)
    return fig, path, counts


BD_STYLE = {("hybrid", "eager"): ("o-", "tab:blue"), ("hybrid", "fused"): ("o--", "tab:cyan"),
            ("dense", "eager"): ("s-", "black"), ("dense", "fused"): ("s--", "tab:gray")}


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_batch_decode(results: list[dict], out_dir: Path) -> dict:
    """One figure per card from bench_batch_decode.py results (several files of one card are joined, e.g. one per
    shape): a panel per (shape, context) with decode tokens/s against the batch size (log-log), hybrid vs dense, eager
    vs fused step; a layout's largest batch on the card's budget is starred. Rows that were skipped (over budget, not
    enough memory) or failed are listed in the footnote, not drawn. Returns {card: (figure, path, {panel title: [line
    labels]})} for the tests."""
    by_card: dict = {}
    for res in results:
        by_card.setdefault(res["card"], []).append(res)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = {}
    for card, runs in by_card.items():
        rows = [r for res in runs for r in res.get("rows", [])]
        modes = [m for m in ("eager", "fused") if any(m in res.get("modes", ()) for res in runs)]
        panels = sorted({(r["shape"], r["ctx"]) for r in rows})
        shapes = sorted({s for s, _ in panels})
        ctxs = sorted({c for _, c in panels})
        fig, axes = plt.subplots(len(shapes), len(ctxs), figsize=(5.2 * len(ctxs), 4.2 * len(shapes)), squeeze=False)
        labels, notes = {}, []
        for r in rows:
            if not r.get("modes") and not r.get("same_as_sweep_row"):
                why = (r.get("skipped") or r.get("error") or "not measured").split(":")[0]
                notes.append(f"{r['shape']} {_tokens(r['ctx'])} {r['layout']} B={r['batch']}: {why}")
        for (shape, ctx) in panels:
            ax = axes[shapes.index(shape)][ctxs.index(ctx)]
            timed = [r for r in rows if (r["shape"], r["ctx"]) == (shape, ctx) and r.get("modes")]
            batches = sorted({r["batch"] for r in timed})
            for layout in ("hybrid", "dense"):
                for mode in modes:
                    pts = sorted((r["batch"], r["modes"][mode]["tokens_per_s"]) for r in timed
                                 if r["layout"] == layout and mode in r["modes"])
                    if not pts:
                        continue
                    fmt, color = BD_STYLE[(layout, mode)]
                    ax.plot(*zip(*pts), fmt, color=color, label=f"{layout} {mode}")
                    largest = [r for r in rows if (r["shape"], r["ctx"], r["layout"], r["kind"]) ==
                               (shape, ctx, layout, "largest")]
                    for lr in largest:
                        y = dict(pts).get(lr["batch"])
                        if y is not None:
                            ax.plot([lr["batch"]], [y], "*", ms=13, color=color,
                                    label=f"{layout} {mode}: largest batch {lr['batch']}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            if batches:
                ax.set_xticks(batches)
                ax.set_xticklabels([str(b) for b in batches])
            ax.set_xlabel("batch size (rows decoded together)")
            ax.set_ylabel("decode tokens/s (all rows, log)")
            title = f"{shape}, {_tokens(ctx)} context"
            ax.set_title(title)
            ax.legend(fontsize=6)
            labels[title] = [ln.get_label() for ln in ax.get_lines()]
        torch_v = sorted({res.get("torch", "?") for res in runs})
        budget = sorted({res.get("budget_gib") for res in runs})
        path = _save_panels(fig, f"Batch decode throughput, hybrid vs dense: {card}\n(torch {', '.join(torch_v)}; "
                                 f"largest batch on {', '.join(map(str, budget))} GiB starred; harness-level step)",
                            notes, out_dir / f"batch_decode_{_slug(card)}.png")
        drawn[card] = (fig, path, labels)
    return drawn


PAPER_PREFILL_SPEEDUP, PAPER_DECODE_SPEEDUP = 1.67, 1.41  # LongGen at 128K, Llama-2-7B


def _decode_mode(r) -> str:
    return (f"{'fused' if r.get('compile_decode') else 'eager'} step, {r.get('full_decode_kernel', 'sdpa')}"
            + (", one qkv/gate-up matmul" if r.get("fused_projections") else ""))


def _prefill_mode(r) -> str:
    return (f"chunk {r['prefill_chunk']}, {'compiled' if r.get('compile_prefill') else 'eager'}"
            + (" + 1 qkv/gate-up mm" if r.get("fused_projections") else ""))


def plot_generate(results: list[dict], out_dir: Path) -> dict:
    """The user path: one figure per (card, shape, context) from ``bench_generation.py --generate`` records (rows
    timed through ``generate()`` itself, second of two calls): prefill seconds and peak memory per prefill mode (chunk,
    eager / compiled layers, fused projections), decode milliseconds per token per decode mode (eager / fused step x
    the full-layer decode kernel: SDPA unless a record names another, as older ones did the removed split-K kernel),
    hybrid beside dense, the panel's best dense over each hybrid bar written on it. Rows that failed (out of memory) are listed in the footnote.
    Returns {(card, shape, ctx): (figure, path, {panel: [bar labels]})} for the tests."""
    groups: dict = {}
    for res in results:
        if res.get("path") != "generate()":
            continue
        for r in res.get("rows", []):
            groups.setdefault((res["card"], r["shape"], r["ctx"]), ([], res))[0].append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = {"hybrid": "tab:blue", "dense": "black"}
    drawn = {}
    for (card, shape, ctx), (rows, res) in sorted(groups.items()):
        ok = [r for r in rows if "prefill_s" in r]
        notes = [f"{r['layout']} {_decode_mode(r)}, chunk {r.get('prefill_chunk')}: {r['error'].split(':')[0]}"
                 for r in rows if "error" in r]
        fig, axes = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [1.4, 2, 1.4]})
        labels = {}

        def bars(ax, keys, value, fmt):
            """Grouped bars: one group per key, hybrid then dense. Written on each hybrid bar: the fastest (lowest) dense
            bar of the panel over it -- the baseline is dense at its best, not dense in the same mode."""
            names = []
            dense = [value(r) for r in ok if r["layout"] == "dense" and any(k(r) for k in keys)]
            best = min(dense) if dense else None
            for i, key in enumerate(keys):
                pair = {}
                for j, layout in enumerate(("hybrid", "dense")):
                    r = next((x for x in ok if x["layout"] == layout and key(x)), None)
                    if r is None:
                        continue
                    v = value(r)
                    pair[layout] = v
                    ax.bar(i + (j - 0.5) * 0.38, v, 0.36, color=colors[layout], alpha=0.85,
                           label=layout if i == 0 else None)
                    ax.text(i + (j - 0.5) * 0.38, v, fmt.format(v), ha="center", va="bottom", fontsize=7)
                    names.append(f"{layout} {i}")
                if "hybrid" in pair and best is not None:
                    ax.text(i - 0.19, pair["hybrid"] * 0.5, f"{best / pair['hybrid']:.2f}x", ha="center",
                            color="white", fontsize=8, fontweight="bold", rotation=90)
            return names

        chunks = list(dict.fromkeys(r["prefill_chunk"] for r in ok))
        # the prefill does not depend on the decode mode: one group per prefill mode (the first row of each)
        pmodes = list(dict.fromkeys(_prefill_mode(r) for r in ok))
        labels["prefill"] = bars(axes[0], [lambda r, m=m: _prefill_mode(r) == m for m in pmodes],
                                 lambda r: r["prefill_s"], "{:.2f}")
        axes[0].set_xticks(range(len(pmodes)))
        axes[0].set_xticklabels([m.replace(", ", "\n") for m in pmodes], fontsize=7)
        axes[0].set_ylabel("prefill (s)")
        axes[0].set_title(f"prefill in generate() (paper {PAPER_PREFILL_SPEEDUP}x)")
        modes = list(dict.fromkeys(_decode_mode(r) for r in ok))
        labels["decode"] = bars(axes[1], [lambda r, m=m: _decode_mode(r) == m and r["prefill_chunk"] == chunks[0]
                                          for m in modes], lambda r: r["decode_ms_per_token"], "{:.1f}")
        axes[1].set_xticks(range(len(modes)))
        axes[1].set_xticklabels(modes, fontsize=8)
        axes[1].set_ylabel("decode (ms per token)")
        axes[1].set_title(f"decode in generate(), {ok[0]['new_tokens'] if ok else '?'} new tokens "
                          f"(paper {PAPER_DECODE_SPEEDUP}x)")
        labels["memory"] = bars(axes[2], [lambda r, m=m: _prefill_mode(r) == m for m in pmodes],
                                lambda r: r["peak_alloc_GiB"], "{:.1f}")
        axes[2].set_xticks(range(len(pmodes)))
        axes[2].set_xticklabels([m.replace(", ", "\n") for m in pmodes], fontsize=7)
        axes[2].set_xlabel(f"{_tokens(ctx)}-token prompt")
        axes[2].set_ylabel("peak GiB allocated")
        axes[2].set_title("peak memory (weights + caches + work)")
        for ax in axes:
            ax.legend(fontsize=7)
        sparse = sorted({r["sparse_pattern"] for r in ok if r.get("sparse_pattern")})
        path = _save_panels(fig, f"generate() end to end, {shape} shape, {_tokens(ctx)}-token prompt, batch "
                                 f"{res.get('batch', 1)}, {res.get('dtype', '')}: {card} (torch {res.get('torch')})\n"
                                 f"hybrid = full {res.get('full_layers', '?')} + {', '.join(sparse)}; "
                                 f"white: the panel's best dense / hybrid", notes,
                            out_dir / f"generate_{_slug(card)}_{shape}_{_tokens(ctx)}.png")
        drawn[(card, shape, ctx)] = (fig, path, labels)
    return drawn


def _draw(a, out_dir: Path) -> list[tuple]:
    """The figures ``main``'s arguments ``a`` ask for, written into ``out_dir``: [(figure, path)]. No figure at all
    is an error naming what matched nothing."""
    if a.generate:
        drawn, none = plot_generate(load(a.generate), out_dir).values(), \
            f"--generate: no bench_generation.py --generate results match {a.generate!r}"
    elif a.batch_decode:
        drawn, none = plot_batch_decode(load(a.batch_decode), out_dir).values(), \
            f"--batch-decode: no bench_batch_decode.py results match {a.batch_decode!r}"
    elif a.served:
        try:
            res = json.loads(Path(a.served).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--served {a.served}: cannot read a bench_served.py JSON file ({e})")
        drawn, none = [plot_served(res, out_dir)], ""
    elif a.finetune:
        drawn, none = plot_finetune(load(a.finetune), out_dir).values(), \
            f"no bench_finetune.py results match {a.finetune!r}"
    else:
        drawn, none = [v for d in plot_all(a.results, str(out_dir)) for v in d.values()], \
            f"no bench.py 'ours' results match {a.results!r}"
    if not drawn:
        raise SystemExit(none)
    return [(fig, path) for fig, path, _ in drawn]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="analysis/results/bench_*.json", help="glob of bench.py JSON files")
    ap.add_argument("--finetune", default=None, help="glob of bench_finetune.py JSON files: draw their figures "
                                                     "instead")
    ap.add_argument("--served", default=None, help="a bench_served.py JSON file: draw its figure instead")
    ap.add_argument("--batch-decode", default=None, help="glob of bench_batch_decode.py JSON files: draw their "
                                                         "figure instead")
    ap.add_argument("--generate", default=None, help="glob of bench_generation.py --generate JSON files (the "
                                                     "generate() path): draw their figures instead")
    ap.add_argument("--out", default="figures", help="folder for the PNGs (default: ./figures); existing files are "
                                                     "not replaced unless --overwrite")
    ap.add_argument("--overwrite", action="store_true", help="replace existing figures (e.g. the committed ones, "
                                                             "with --out analysis/figures)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    # Every figure is drawn into a temporary folder first: an existing one in --out is refused (unless --overwrite)
    # before anything is written there, never after some figures were.
    with tempfile.TemporaryDirectory(prefix="plot_speedups-") as staging:
        figures = _draw(a, Path(staging))
        targets = [out / path.name for _, path in figures]
        existing = [str(t) for t in targets if t.exists()]
        if existing and not a.overwrite:
            also = f"; so do {', '.join(existing[1:])}" if existing[1:] else ""
            raise SystemExit(f"error: {existing[0]} exists{also}; nothing was written: give another --out, or "
                             "--overwrite to replace them")
        out.mkdir(parents=True, exist_ok=True)
        for (fig, path), target in zip(figures, targets):
            shutil.move(path, target)
            print(target)
            plt.close(fig)


if __name__ == "__main__":
    main()
