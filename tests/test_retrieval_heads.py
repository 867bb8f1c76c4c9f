"""analysis/repro/retrieval_heads.py: the figure-and-JSON front end of flexgen_long.retrieval (tested in
tests/test_retrieval.py) on a real checkpoint: what it writes, the layers it suggests, and its refusals."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from flexgen_long import checkpoint_io

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "analysis" / "repro"))
import retrieval_heads as rh  # noqa: E402


def test_best_window_picks_the_highest_contiguous_sum():
    assert rh.best_window([0, 0, 0, 0.01, 0.71, 0.13, 0.01, 0.01], 3) == [3, 4, 5]
    assert rh.best_window([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.03, 0.71], 4) == [8, 9, 10, 11]
    assert rh.best_window([1, 1, 1, 1], 2) == [0, 1]        # ties: the first window
    with pytest.raises(ValueError, match=r"n must be in \[1, 4\]"):
        rh.best_window([1, 1, 1, 1], 5)


def test_cli_writes_json_and_figure_and_suggests_layers(tmp_path, monkeypatch):
    """The CLI end to end on a real checkpoint; the suggestion is checked on per-layer scores chosen here (random
    weights copy nothing), with the layers it must pick worked out by hand: 6 layers -> "middle" has 2 full layers;
    the two best of copy scores [0.5, 0, 0, 0.3, 0.35, 0.1] are layers 0 and 4, the best contiguous pair [3, 4]."""
    cfg = {"_component_": "flexgen_long.models.longgen_llama", "vocab_size": 259, "num_layers": 6, "num_heads": 2,
           "num_kv_heads": 1, "embed_dim": 32, "intermediate_dim": 64, "max_seq_len": 512, "full_layers": "all"}
    from omegaconf import OmegaConf
    from torchtune import config
    model = config.instantiate(OmegaConf.create(cfg))
    ckpt = checkpoint_io.save_checkpoint(tmp_path / "run", 1, model.state_dict(), checkpoint_io.hf_config(model, cfg))
    copy = [0.5, 0.0, 0.0, 0.3, 0.35, 0.1]
    measured = rh.score_model_dir

    def fake(*a, **k):
        s = measured(*a, **k)
        return dataclasses.replace(s, copy_score=[[c, 0.0] for c in copy])
    monkeypatch.setattr(rh, "score_model_dir", fake)
    out = tmp_path / "heads"
    res = rh.main([str(ckpt), "--out", str(out), "--samples", "1", "--device", "cpu", "--dtype", "fp32",
                   "--tokenizer", "bytes"])
    assert res["length"] == 496                              # max_seq_len - 16: room for the answer
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["layout"]["full_layers"] == [0, 1, 2, 3, 4, 5] and saved["recompute_max_rel_error"] < 1e-3
    assert saved["suggested_full_layers"] == {"n": 2, "top": [0, 4], "contiguous": [3, 4]} and saved["ranking"][:2] == [0, 4]
    assert saved["layer_copy_score"] == copy and len(saved["needle_mass"]) == 6 and len(saved["needle_mass"][0]) == 2
    assert out.with_suffix(".png").stat().st_size > 10_000
    bytes_ = ["--tokenizer", "bytes", "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"^error: length must be >= 128 .* within max_seq_len=512, got 600"):
        rh.main([str(ckpt), "--out", str(out), "--length", "600", *bytes_])   # no room for the answer
    with pytest.raises(SystemExit, match=r"^error: length must be >= 128 .*, got 100"):
        rh.main([str(ckpt), "--out", str(out), "--length", "100", *bytes_])   # no room for a prompt
    with pytest.raises(SystemExit, match=r"^error: .*\(MODEL_DIR\) holds neither tokenizer.json nor tokenizer.model"):
        rh.main([str(ckpt), "--out", str(out), "--device", "cpu"])    # no tokenizer: named, never bytes by default
