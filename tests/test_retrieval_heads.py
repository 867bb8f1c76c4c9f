"""analysis/repro/retrieval_heads.py: the copy score and needle mass on hand-made attention, the layer window choice,
and -- on a hybrid model with AttnSink and per-head BlockSparse layers -- that the recomputed probabilities are the
layers' real attention (probabilities @ V reproduce each layer's output, and equal an independent dense-mask
softmax), so the scores describe the model and not a wrong mask."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from flexgen_long import checkpoint_io
from flexgen_long.masks import dense_mask
from flexgen_long.models import longgen_llama
from flexgen_long.patterns import AttnSink, BlockSparse, Full
from flexgen_long.tokenizers import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "analysis" / "repro"))
import retrieval_heads as rh  # noqa: E402


def test_copy_score_and_needle_mass_on_hand_made_attention():
    tokens = torch.tensor([0, 1, 2, 7, 8, 9, 4, 5, 8, 3])   # the needle is positions 3..5 (7, 8, 9)
    targets = torch.tensor([7, 8, 9])                       # the three answer tokens being produced
    needle = range(3, 6)
    probs = torch.full((4, 3, 10), 0.01)
    for a, j in enumerate([3, 4, 5]):
        probs[0, a, j] = 0.91       # head 0 copies: each step's argmax is the needle token it produces
    for a in range(3):
        probs[1, a, 4] = 0.91       # head 1 stares at one needle token: a hit only when that token is produced
        probs[2, a, 8] = 0.91       # head 2 attends to an 8 outside the needle: never a copy
        probs[3, a, 0] = 0.91       # head 3 sinks
    copy, mass = rh.score_heads(probs, tokens, targets, needle)
    assert copy.tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.0])
    assert mass.tolist() == pytest.approx([0.93, 0.93, 0.03, 0.03])


def test_best_window_picks_the_highest_contiguous_sum():
    assert rh.best_window([0, 0, 0, 0.01, 0.71, 0.13, 0.01, 0.01], 3) == [3, 4, 5]
    assert rh.best_window([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.03, 0.71], 4) == [8, 9, 10, 11]
    assert rh.best_window([1, 1, 1, 1], 2) == [0, 1]        # ties: the first window
    with pytest.raises(ValueError, match=r"n must be in \[1, 4\]"):
        rh.best_window([1, 1, 1, 1], 5)


def test_needle_positions_requires_exactly_one_occurrence():
    assert rh.needle_positions([5, 1, 2, 3, 6], [1, 2, 3]) == range(1, 4)
    with pytest.raises(ValueError, match="occurs 2 times"):
        rh.needle_positions([1, 2, 1, 2], [1, 2])


def _hybrid(seed=0):
    """6 layers: Full, AttnSink, per-head BlockSparse (4 KV heads: a different stride offset per head), ...; GQA 8/4."""
    torch.manual_seed(seed)
    model = longgen_llama(259, 6, 8, 4, 64, 128, 1024, 10_000, full_layers=[0, 3],
                          sparse_pattern=AttnSink(sink=4, window=40))
    bs = BlockSparse(block=16, local_blocks=2, vertical_stride=4, per_head=True)
    model.layers[2].attn.pattern = bs
    model.layers[5].attn.pattern = bs
    return model.eval()


def test_recomputed_attention_is_the_layers_attention_for_every_pattern():
    model = _hybrid()
    res = rh.retrieval_heads(model, ByteTokenizer(), 300, samples=1, depths=(0.2, 0.8))
    assert res["prompts"] == 2 and len(res["copy_score"]) == 6 and len(res["copy_score"][0]) == 8
    assert res["recompute_max_rel_error"] < 1e-5            # fp32: the same attention up to rounding
    for m in (res["copy_score"], res["needle_mass"]):
        assert all(0.0 <= x <= 1.0 for row in m for x in row)

    # an independent reference for layer_probs: softmax over the dense mask of flexgen_long.masks
    tokens = torch.randint(0, 256, (1, 200))
    rows = torch.arange(150, 200)
    cap = rh._Capture(model, rows)
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        cap.close()
    for i, attn in enumerate(cap.layers):
        q, k, _, _ = cap.seen[i]
        mask = dense_mask(attn.pattern, 200, 200, num_heads=8, num_kv_heads=4)[0, :, 150:]   # [1 or 8, 50, 200]
        kk = k[0].repeat_interleave(2, dim=0)
        ref = (torch.einsum("had,hsd->has", q[0], kk) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
        torch.testing.assert_close(rh.layer_probs(attn, q, k, rows), ref.softmax(-1), rtol=1e-5, atol=1e-6)


def test_a_wrong_mask_fails_the_recompute_check(monkeypatch):
    """The check has teeth: scoring the sparse layers as if they were full is caught."""
    model = _hybrid()
    real = rh.layer_probs
    monkeypatch.setattr(rh, "layer_probs", lambda attn, q, k, rows: real(
        type("A", (), {"pattern": Full()})(), q, k, rows))
    res = rh.retrieval_heads(model, ByteTokenizer(), 300, samples=1, depths=(0.5,))
    assert res["recompute_max_rel_error"] > 0.05


def test_cli_writes_json_and_figure_and_suggests_layers(tmp_path, monkeypatch):
    """The CLI end to end on a real checkpoint; the suggestion is checked on per-layer scores chosen here (random
    weights copy nothing), with the layers it must pick worked out by hand: 6 layers -> "middle" has 2 full layers;
    the best contiguous pair of [0.5, 0, 0, 0.3, 0.35, 0.1] is [3, 4] (0.65), the two best single layers [0, 4]."""
    cfg = {"_component_": "flexgen_long.models.longgen_llama", "vocab_size": 259, "num_layers": 6, "num_heads": 2,
           "num_kv_heads": 1, "embed_dim": 32, "intermediate_dim": 64, "max_seq_len": 512, "full_layers": "all"}
    from omegaconf import OmegaConf
    from torchtune import config
    model = config.instantiate(OmegaConf.create(cfg))
    ckpt = checkpoint_io.save_checkpoint(tmp_path / "run", 1, model.state_dict(), checkpoint_io.hf_config(model, cfg))
    scores = [0.5, 0.0, 0.0, 0.3, 0.35, 0.1]
    measured = rh.retrieval_heads
    monkeypatch.setattr(rh, "retrieval_heads", lambda *a, **k: {**measured(*a, **k), "layer_copy_score": scores})
    out = tmp_path / "heads"
    res = rh.main([str(ckpt), "--out", str(out), "--samples", "1", "--device", "cpu", "--dtype", "fp32"])
    assert res["length"] == 496                              # max_seq_len - 16: room for the answer
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["layout"]["full_layers"] == [0, 1, 2, 3, 4, 5] and saved["recompute_max_rel_error"] < 1e-3
    assert saved["suggested_full_layers"] == {"n": 2, "contiguous": [3, 4], "top": [0, 4]}
    assert len(saved["copy_score"]) == 6 and len(saved["copy_score"][0]) == 2
    assert out.with_suffix(".png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        rh.main([str(ckpt), "--out", str(out), "--length", "600", "--device", "cpu"])   # no room for the answer
