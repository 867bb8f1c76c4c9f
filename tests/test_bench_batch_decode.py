"""analysis/bench_batch_decode.py's CPU smoke mode (--tiny) end to end, in-process: budget skips with their numbers,
timed rows of both layouts and both decode modes (one engine each: row 0 prefilled, copied, stepped), the decode
routes of the timed positions, the largest batches from serving_capacity, the hybrid / dense summary, and the
batch-decode figure of analysis/plot_speedups.py."""

import json

import matplotlib.pyplot as plt
import pytest
from scripts import load_script


def test_tiny_smoke_run_and_figure(tmp_path):
    bench = load_script("analysis/bench_batch_decode.py")
    out = tmp_path / "bd.json"
    # one shape and one context keep the test short (two sets of fused graphs compile: batch 1, then dynamic)
    res = bench.main(["--tiny", "--shapes", "tiny_mha", "--contexts", "512", "--reps", "3", "--out", str(out),
                      "--commit", "test", "--fuse-projections"])
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["errors"] == 0 and saved["commit"] == "test"
    assert saved["summary"] == json.loads(json.dumps(res["summary"]))  # the file holds what main() returned
    assert "harness-level" in saved["method"] and saved["capacity_contexts"] == [512] and saved["fused_projections"]
    assert saved["decode_compile_backend"] == "eager" and "compile_decode=True" in saved["policies"]["fused"]

    timed = [r for r in saved["rows"] if r.get("modes")]
    for layout in ("hybrid", "dense"):
        assert {r["batch"] for r in timed if r["layout"] == layout and r["kind"] == "sweep"} >= {1, 2}, layout
    for r in timed:
        assert r["bytes_per_step"] > 0 and r["kv_GiB"] > 0 and r["plan_GiB"] <= saved["budget_gib"], r
        # the steps run at positions 512 .. 517 over caches of 512 + 128 tokens: the full buffers are not yet full
        # (masked), the AttnSink(4, 60) rings are (mask-free) -- generate()'s route before its last token
        assert r["decode_routes"] == ({"sdpa_exact": 4, "sdpa_masked": 2} if r["layout"] == "hybrid"
                                      else {"sdpa_masked": 6}), r
        for mode in ("eager", "fused"):
            m = r["modes"][mode]
            assert 0 < m["min_ms"] <= m["step_ms"] <= m["max_ms"] and m["reps"] == 3, (r["batch"], mode, m)
            assert m["prefill_s"] > 0 and m["prefill_new_graphs"] == 0  # a CPU prefill compiles nothing
            assert m["first_calls_s"] > 0 and m["capture_s"] == 0  # no CUDA graphs on a CPU
            assert m["tokens_per_s"] == pytest.approx(r["batch"] / (m["step_ms"] * 1e-3))
            assert m["TBps"] > 0
        assert r["modes"]["fused"]["max_rel_diff_vs_first_mode"] < 1e-5  # the fused step computes the same logits
        assert r["modes"]["eager"]["compile_s"] == 0
    assert timed[0]["modes"]["fused"]["compile_s"] > 0  # the first fused engine compiled its decode step

    # the 0.07 GiB budget leaves no room for 4 dense rows: skipped with the plan's numbers, never run
    skipped = [r for r in saved["rows"] if "skipped" in r]
    assert [(r["layout"], r["batch"]) for r in skipped] == [("dense", 4)]
    assert "over budget" in skipped[0]["skipped"] and "> 0.07 GiB" in skipped[0]["skipped"]

    # capacity: each layout's largest batch, the hybrid's larger; both timed (the dense one in its sweep row)
    cap = {c["layout"]: c for c in saved["capacity"]}
    assert cap["hybrid"]["batch"] > cap["dense"]["batch"] >= 1
    assert cap["hybrid"]["total_bytes"] <= saved["budget_gib"]  # GiB in the JSON
    largest = {r["layout"]: r for r in saved["rows"] if r["kind"] == "largest"}
    assert largest["hybrid"]["batch"] == cap["hybrid"]["batch"] and largest["hybrid"]["modes"]
    assert largest["dense"]["batch"] == cap["dense"]["batch"] and largest["dense"].get("same_as_sweep_row")

    summ = saved["summary"]
    pairs = {p["batch"]: p for p in summ["hybrid_vs_dense"]}
    assert set(pairs) == {1, 2, 4}
    for b in (1, 2):
        for mode in ("eager", "fused"):
            e = pairs[b][mode]
            assert e["ratio"] == pytest.approx(e["hybrid_tokens_per_s"] / e["dense_tokens_per_s"]) and e["ratio"] > 0
    assert pairs[4]["eager"]["ratio"] is None and "over budget" in pairs[4]["dense_not_timed"]
    (c,) = summ["capacity"]
    assert c["capacity_ratio"] == pytest.approx(cap["hybrid"]["batch"] / cap["dense"]["batch"])
    for mode in ("eager", "fused"):
        assert c[mode]["hybrid_tokens_per_s_at_largest"] > 0 and c[mode]["dense_tokens_per_s_at_largest"] > 0

    # the figure: one panel, four lines, the largest batches starred, the skipped row in the footnote
    plot = load_script("analysis/plot_speedups.py")
    plot.main(["--batch-decode", str(out), "--out", str(tmp_path / "figs")])
    drawn = plot.plot_batch_decode([saved], tmp_path / "figs2")
    fig, path, labels = drawn[saved["card"]]
    assert path.exists() and path.stat().st_size > 10_000 and path.name.startswith("batch_decode_")
    assert (tmp_path / "figs" / path.name).exists()
    panel = labels["tiny_mha, 512 context"]
    assert {"hybrid eager", "hybrid fused", "dense eager", "dense fused"} <= set(panel)
    assert f"hybrid eager: largest batch {cap['hybrid']['batch']}" in panel
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "dense eager")
    assert list(line.get_xdata()) == [1, 2]  # the skipped batch of 4 is not drawn ...
    assert "tiny_mha 512 dense B=4: over budget" in fig.texts[-1].get_text()  # ... but listed
    plt.close(fig)
    with pytest.raises(SystemExit, match="--batch-decode: no bench_batch_decode.py results"):
        plot.main(["--batch-decode", str(tmp_path / "none_*.json")])


def test_bad_arguments_are_named(capsys):
    bench = load_script("analysis/bench_batch_decode.py")
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--shapes", "llama2_7b", "--out", "/dev/null"])
    assert "--shapes: ['llama2_7b'] not among ['tiny_gqa', 'tiny_mha']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--contexts", "256", "--capacity-contexts", "512", "--out", "/dev/null"])
    assert "--capacity-contexts must be among --contexts [256], got [512]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--reps", "5", "--new-tokens", "8", "--out", "/dev/null"])
    assert "--new-tokens must exceed --reps + 3" in capsys.readouterr().err
