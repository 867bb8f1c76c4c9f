"""analysis/plot_speedups.py on a hand-made fixture (tests/fixtures/bench_fixture_*.json) and analysis/bench.py's CPU
smoke mode: figures are written, the right series are drawn, unmeasured points are not."""

import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from scripts import REPO, load_script

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"



def test_plot_fixture(tmp_path):
    plot = load_script("analysis/plot_speedups.py")
    drawn = plot.plot_all(str(FIXTURES / "bench_fixture_*.json"), str(tmp_path))
    assert len(drawn) == 1  # one 'ours' result; the HF file joins it as the peer
    d = drawn[0]
    for name in ("speedup", "kv", "times"):
        fig, path, _ = d[name]
        assert path.exists() and path.stat().st_size > 10_000 and path.parent == tmp_path
        title = fig._suptitle.get_text() if fig._suptitle else fig.axes[0].get_title()
        assert "Fixture GPU" in title and "llama2_7b" in title
    sp = d["speedup"][2]
    assert {"attnsink vs dense", "blocksparse vs dense", "attnsink vs HF sdpa", "attnsink vs HF flex_attention",
         "paper 1.67x"} <= set(sp["prefill"])
    assert {"attnsink vs dense", "blocksparse vs dense", "paper 1.41x"} <= set(sp["decode"])
    assert {"attnsink vs dense", "blocksparse vs dense", "paper 1.55x"} <= set(sp["train"])
    assert not any("HF" in s for s in sp["train"])  # the peer has no training measurement

    # dense prefill at 128K is OOM: the prefill speedup lines hold only 8K; the value is dense / hybrid
    fig = d["speedup"][0]
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "attnsink vs dense")
    assert list(line.get_xdata()) == [8192] and line.get_ydata()[0] == pytest.approx(300 / 250)
    # blocksparse decode at 8K was not measured: only 128K, 19 / 10
    line = next(ln for ln in fig.axes[1].get_lines() if ln.get_label() == "blocksparse vs dense")
    assert list(line.get_xdata()) == [131072] and line.get_ydata()[0] == pytest.approx(1.9)
    assert "dense 128K: OOM" in fig.texts[-1].get_text()

    assert {"dense", "attnsink", "blocksparse", "paper: dense -62%"} <= set(d["kv"][2]["kv"])
    assert {"dense", "attnsink", "blocksparse", "HF sdpa", "HF flex_attention"} <= set(d["times"][2]["prefill"])
    for dd in drawn:
        for fig, _, _ in dd.values():
            plt.close(fig)


def test_plot_cli_no_results(tmp_path):
    plot = load_script("analysis/plot_speedups.py")
    with pytest.raises(SystemExit):
        plot.main(["--results", str(tmp_path / "none_*.json"), "--out", str(tmp_path)])


def test_bench_cpu_smoke(tmp_path):
    """The harness end to end at tiny size on CPU: every phase, variant and length measured (a record of a failure or
    of nothing measured fails the test), KV memory as the library's own plan, JSON complete."""
    import torch
    from flexgen_long.cache import plan_cache
    from flexgen_long.models import longgen_tiny, relayout

    bench = load_script("analysis/bench.py")
    out = tmp_path / "bench_tiny.json"
    bench.main(["ours", "--device", "cpu", "--tiny", "--lengths", "128", "--train-layers", "2",
                "--budget-ms", "1", "--out", str(out), "--commit", "test"])
    r = json.loads(out.read_text())
    assert r["complete"] and r["commit"] == "test" and r["benchmark"] == "model_ours"
    for phase in ("prefill", "train", "decode"):
        for v in ("dense", "attnsink", "blocksparse"):
            rec = r[phase][v]["128"]
            assert set(rec) >= {"median_ms", "min_ms", "max_ms", "reps"} and not {"error", "oom", "not_measured"} & \
                set(rec), (phase, v, rec)
            assert 0 < rec["min_ms"] <= rec["median_ms"] <= rec["max_ms"] and rec["reps"] >= 3, (phase, v, rec)
    # decode steps at positions 128, 129, ... over caches sized for all of them: the full buffers not yet full
    # (masked), the AttnSink(4, 60) rings full (mask-free), BlockSparse stores keeping stale slots (masked)
    assert r["decode"]["attnsink"]["128"]["decode_routes"] == {"sdpa_exact": 3, "sdpa_masked": 1}
    assert r["decode"]["dense"]["128"]["decode_routes"] == r["decode"]["blocksparse"]["128"]["decode_routes"] == \
        {"sdpa_masked": 4}
    # KV memory: what generate() allocates for a 128-token prompt, by layout -- the plan, worked out here by hand too
    model = longgen_tiny(max_seq_len=129)  # 4 layers, layer 1 full; 2 KV heads, head_dim 16; fp32 on CPU
    for v, (full_layers, sparse) in bench.TINY_VARIANTS.items():
        relayout(model, full_layers, sparse if sparse is not None else bench.AttnSink(0, 1))
        assert r["kv"][v]["128"]["kv_bytes"] == plan_cache(model, 1, 128, torch.float32).total_bytes, v
    per_slot = 2 * 2 * 16 * 4 + 4  # K and V (2 heads x 16 x fp32) + one int32 position
    assert r["kv"]["dense"]["128"]["kv_bytes"] == 4 * 128 * per_slot
    assert r["kv"]["attnsink"]["128"]["kv_bytes"] == (128 + 3 * 64) * per_slot  # AttnSink(4, 60): 64 slots
    # BlockSparse(16, 2 local, stride 4, per head): a ring of 2 blocks + ceil(8 / 4) on-stride blocks, per KV head
    assert r["kv"]["blocksparse"]["128"]["kv_bytes"] == 128 * per_slot + 3 * 64 * (2 * 2 * 16 * 4 + 2 * 4)
    assert r["train_setup"]["num_layers"] == 2


def test_served_figure_counts_every_call_and_marks_failures(tmp_path):
    """plot_served draws each pass that ran, with its failures (no ttft) counted and marked, and the CLI reads the
    file; an unreadable file is an error that names it."""
    plot_speedups = load_script("analysis/plot_speedups.py")
    calls = lambda n, bad: [{"call": i, "lengths": [10 * (i + 1), 3], "ttft_s": 0.1 * (i + 1)} for i in range(n)] + [
        {"call": n + i, "lengths": [100_000], "error": "OutOfMemoryError: ..."} for i in range(bad)]  # noqa: E731
    res = {"card": "Test Card", "torch": "2.x", "workload": {"calls": 5, "max_batch": 2, "max_len": 1000},
           "model": {"num_layers": 3, "sparse": "AttnSink(sink=128, window=1920)", "full_layers": [1]},
           "passes": {"warmup": {"graphs": 4, "seconds": 2.0},
                      "warm": {"summary": {"ttft_p50_s": 0.3, "ttft_p99_s": 0.5, "compiled_graphs": 0},
                               "calls": calls(5, 0)},
                      "hf_sdpa": {"summary": {"ttft_p50_s": 1.0}, "calls": calls(2, 3)}}}
    fig, path, counts = plot_speedups.plot_served(res, tmp_path)
    assert counts == {"warm": (5, 0), "hf_sdpa": (5, 3)} and path.exists()
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("5 calls, 3 failed" in t for t in labels) and any("failed (OOM" in t for t in labels)
    plt.close(fig)
    f = tmp_path / "served.json"
    f.write_text(json.dumps(res))
    plot_speedups.main(["--served", str(f), "--out", str(tmp_path / "figs")])
    assert (tmp_path / "figs" / "served_Test_Card.png").exists()
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SystemExit, match="broken.json"):
        plot_speedups.main(["--served", str(tmp_path / "broken.json")])


def test_capacity_script_writes_the_plan_and_its_figure(tmp_path):
    """analysis/capacity.py: every (shape, layout, context) row, hybrid rows with their ratio to dense, the figure."""
    cap = load_script("analysis/capacity.py")
    out, fig = tmp_path / "cap.json", tmp_path / "cap.png"
    cap.main(["--out", str(out), "--figure", str(fig), "--contexts", "8192", "--budget-gib", "40"])
    res = json.loads(out.read_text())
    assert {(r["shape"], r["layout"]) for r in res["rows"]} == {
        (s, lay) for s in ("llama2_7b", "llama3_1_8b") for lay in ("hybrid", "dense")}
    for r in res["rows"]:
        assert r["batch"] >= 1 and r["total_bytes"] <= 40
        if r["layout"] == "hybrid":
            assert r["batch_ratio_vs_dense"] >= 1
    assert fig.exists() and "estimate" in res["what"]
    with pytest.raises(SystemExit, match="--budget-gib must be > 0"):
        cap.main(["--out", str(out), "--budget-gib", "0"])


def test_generate_figure_draws_the_user_path_against_the_best_dense(tmp_path):
    """plot_generate: prefill, decode per mode and memory bars of a bench_generation.py --generate record; the ratio
    on each hybrid decode bar is over the fastest dense mode; a failed row is listed; harness records are ignored."""
    plot = load_script("analysis/plot_speedups.py")

    def row(layout, fused, kernel, prefill, ms, peak=10.0, compiled_prefill=False):
        return {"shape": "llama2_7b", "layout": layout, "ctx": 131072, "prefill_chunk": "whole", "new_tokens": 128,
                "compile_decode": fused, "full_decode_kernel": kernel, "prefill_s": prefill,
                "compile_prefill": compiled_prefill,
                "decode_ms_per_token": ms, "peak_alloc_GiB": peak,
                "sparse_pattern": "AttnSink(sink=128, window=1920)" if layout == "hybrid" else None}

    rows = [row("hybrid", False, "sdpa", 6.0, 14.0), row("hybrid", True, "sdpa", 6.0, 11.0),
            row("dense", False, "sdpa", 12.0, 23.0), row("dense", True, "sdpa", 12.0, 22.0),
            row("hybrid", True, "sdpa", 5.5, 11.0, 9.0, True), row("dense", True, "sdpa", 11.4, 22.0, 9.0, True),
            {"shape": "llama2_7b", "layout": "dense", "ctx": 131072, "prefill_chunk": 8192, "compile_decode": False,
             "full_decode_kernel": "split_k", "error": "OutOfMemoryError: CUDA out of memory"}]
    res = {"card": "Test Card", "torch": "x", "path": "generate()", "full_layers": "middle third", "batch": 1,
           "rows": rows}
    drawn = plot.plot_generate([res, {"card": "Test Card", "rows": rows}], tmp_path)  # the second: no path, ignored
    assert list(drawn) == [("Test Card", "llama2_7b", 131072)]
    fig, path, labels = drawn[("Test Card", "llama2_7b", 131072)]
    assert path.exists() and path.name == "generate_Test_Card_llama2_7b_128K.png"
    assert labels["decode"] == ["hybrid 0", "dense 0", "hybrid 1", "dense 1"]
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert f"{22.0 / 14.0:.2f}x" in texts and f"{22.0 / 11.0:.2f}x" in texts  # over the best dense, 22 ms
    # prefill and memory: one group per prefill mode (eager / compiled layers), whatever the decode mode
    assert labels["prefill"] == labels["memory"] == ["hybrid 0", "dense 0", "hybrid 1", "dense 1"]
    prefill_texts = [t.get_text() for t in fig.axes[0].texts]
    assert f"{11.4 / 6.0:.2f}x" in prefill_texts and f"{11.4 / 5.5:.2f}x" in prefill_texts  # over the best dense
    assert "OutOfMemoryError" in fig.texts[-1].get_text()
    plt.close(fig)
    with pytest.raises(SystemExit, match="--generate"):
        plot.main(["--generate", str(tmp_path / "none_*.json"), "--out", str(tmp_path)])


def test_plots_from_committed_json_into_a_chosen_folder_and_never_over_a_file(tmp_path, capsys):
    """On a CPU, from the committed JSON: the figures go to --out; a second run refuses to replace them (naming the
    file) unless --overwrite, and the committed figures are not touched."""
    plot = load_script("analysis/plot_speedups.py", "plot_speedups")
    committed = {p: p.stat().st_mtime_ns for p in (REPO / "analysis" / "figures").glob("*.png")}
    args = ["--generate", str(REPO / "analysis/results/generation_generate_fused_NVIDIA_H200.json"), "--out",
            str(tmp_path / "figs")]
    plot.main(args)
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert written and all(p.parent == tmp_path / "figs" and p.stat().st_size > 10_000 for p in written)
    before = {p: p.read_bytes() for p in written}
    with pytest.raises(SystemExit, match=rf"error: {re.escape(str(written[0]))} exists; .* --overwrite"):
        plot.main(args)
    assert {p: p.read_bytes() for p in written} == before
    plot.main([*args, "--overwrite"])
    assert {p: p.stat().st_mtime_ns for p in (REPO / "analysis" / "figures").glob("*.png")} == committed
