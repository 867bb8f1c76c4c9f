"""analysis/bench_decode_kernel.py end to end on a CPU at tiny shapes. decode_attention is the plain-torch reference
on a CPU, so this checks the script's plumbing -- the --check pass, every method timed, bytes, bandwidth, ratios, the
JSON -- not the kernel's speed (that needs the GPU run the script is for)."""

import json

from scripts import load_script


def test_benchmark_smoke_on_cpu(tmp_path):
    bench = load_script("analysis/bench_decode_kernel.py")
    out = tmp_path / "d.json"
    res = bench.main(["--device", "cpu", "--tiny", "--check", "--models", "llama3_1_8b", "--batches", "1", "2",
                      "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["card"].startswith("cpu") and "torch" in saved and "triton" in saved
    rows = saved["rows"]
    assert len(rows) == len(res["rows"]) == 4  # S 256 x L = S, S/2 x B 1, 2
    assert {(r["B"], r["L"]) for r in rows} == {(1, 256), (2, 256), (1, 128), (2, 128)}
    for r in rows:
        assert "error" not in r, r
        assert r["check_rel_err"] < 1e-2
        assert r["needed_bytes"] == 2 * r["B"] * 8 * r["L"] * 128 * 2  # K and V, 8 KV heads, D 128, bf16
        for m in ("masked", "ideal", "ours"):
            assert r[m]["ms"] > 0 and r[m]["GBps"] == r["needed_bytes"] / (r[m]["ms"] * 1e-3) / 1e9, (m, r[m])
        assert r["speedup_vs_masked"] == r["masked"]["ms"] / r["ours"]["ms"]
        assert r["fraction_of_ideal"] == r["ideal"]["ms"] / r["ours"]["ms"]
