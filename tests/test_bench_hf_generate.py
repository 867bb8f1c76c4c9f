"""analysis/bench_hf_generate.py's smoke run (CPU, a tiny random model): every row runs through the user's path
(checkpoint -> export -> transformers' generate(); our generate() on the same checkpoint) and the JSON holds what the
GPU run reports."""

import json

from scripts import load_script


def test_smoke_run_writes_the_table_and_the_json(tmp_path):
    bench = load_script("analysis/bench_hf_generate.py")
    result = bench.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "hf_generate_tiny_cpu.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    rows = {r["impl"]: r for r in saved["rows"]}
    assert set(rows) == {"ours", "hf_dynamic", "hf_static"}
    for r in rows.values():
        assert r["tokens_equal_to_ours"] == 8 and r["decode_ms_per_token"] > 0 and r["prefill_s"] > 0
    # the tiny model: 1 full layer of 4, AttnSink(4, 60), 2 KV heads of 16, fp32; 512 + 8 - 1 tokens cached
    want = (1 * 519 + 3 * (4 + 60 - 1)) * 2 * 2 * 16 * 4
    assert rows["hf_dynamic"]["kv_bytes"] == want
    assert rows["hf_static"]["kv_bytes"] > want  # static: a slot per position up to the capacity, the ring whole
    assert rows["ours"]["kv_bytes"] > want  # our plan: + the query's own slot and the positions
