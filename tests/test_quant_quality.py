"""analysis/quant_quality.py on a CPU with the real SmolLM2 weights at tiny sizes: every variant runs through the eval
and generate recipes, the summary holds each accuracy with its interval and difference from the baseline, each
perplexity's relative difference, the greedy texts, and the figure; the baseline is required. The numbers check the
plumbing only (one prompt per cell)."""

from __future__ import annotations

import json

import pytest

from scripts import load_script


def test_quality_gates_run_every_variant_and_summarise(smollm2_dir, tmp_path):
    qq = load_script("analysis/quant_quality.py")
    out = tmp_path / "qq"
    summ = qq.main(["--model-dir", str(smollm2_dir), "--out", str(out), "--device", "cpu", "--lengths", "320",
                    "--samples-per-cell", "1", "--documents", "1", "--variants", "bf16", "int8wo+fp8kv"])
    assert set(summ["variants"]) == {"bf16", "int8wo+fp8kv"}
    base, both = summ["variants"]["bf16"], summ["variants"]["int8wo+fp8kv"]
    for task in ("passkey", "multikey_needle"):
        row = both["retrieval"][task]["320"]
        assert row["n"] == 5 and 0 <= row["rate"] <= 1 and row["interval"][0] <= row["rate"] <= row["interval"][1]
        lo, hi = row["difference_interval"]
        assert lo <= row["minus_bf16"] <= hi and row["within"] == (lo <= 0 <= hi)
        assert base["retrieval"][task]["320"]["minus_bf16"] == 0
    assert base["perplexity"]["320"]["relative_to_bf16"] == 0
    assert abs(both["perplexity"]["320"]["relative_to_bf16"]) < 0.05  # int8 weights + FP8 caches: a small change
    assert base["text_equal_to_bf16"] and len(both["generated"]) == 2
    assert all(t.startswith("=== [") for t in both["generated"])
    md = (out / "summary.md").read_text()
    assert "int8wo+fp8kv | passkey | 320 |" in md and (out / "summary.png").stat().st_size > 10_000
    assert json.loads((out / "summary.json").read_text())["gates_met"] == summ["gates_met"]
    assert json.loads((out / "eval_int8wo+fp8kv.json").read_text())["kv_cache_dtype"] == "fp8"
    with pytest.raises(SystemExit):
        qq.main(["--model-dir", str(smollm2_dir), "--out", str(out), "--variants", "int8wo"])
