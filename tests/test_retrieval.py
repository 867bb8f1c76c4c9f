"""flexgen_long.retrieval: copy score and needle mass on hand-made attention; the recomputed attention is each layer's
real attention (its output reproduced through the output projection on AttnSink and per-head BlockSparse layers, and
its probabilities equal to an independent dense-mask softmax); a model with a copy head planted by hand
(tests/reference.py) is ranked with that layer first; the budget rules; the progress lines."""

import math

import pytest
import torch

from flexgen_long import cli
from flexgen_long import retrieval as rt
from flexgen_long.models import longgen_llama
from flexgen_long.patterns import AttnSink, BlockSparse, Full
from flexgen_long.tokenizers import ByteTokenizer

from reference import dense, planted_copy_model


def test_copy_score_and_needle_mass_on_hand_made_attention():
    tokens = torch.tensor([[0, 1, 2, 7, 8, 9, 4, 5, 8, 3]])   # the needle is positions 3..5 (7, 8, 9)
    targets = torch.tensor([[7, 8, 9, 0]])                    # three answer tokens being produced, and a padded row
    valid = torch.tensor([[True, True, True, False]])
    needle = torch.zeros(1, 10, dtype=torch.bool)
    needle[0, 3:6] = True
    probs = torch.full((1, 4, 4, 10), 0.01)
    for a, j in enumerate([3, 4, 5, 5]):
        probs[0, 0, a, j] = 0.91    # head 0 copies: each step's argmax is the needle token it produces
    for a in range(4):
        probs[0, 1, a, 4] = 0.91    # head 1 stares at one needle token: a hit only when that token is produced
        probs[0, 2, a, 8] = 0.91    # head 2 attends to an 8 outside the needle: never a copy
        probs[0, 3, a, 0] = 0.91    # head 3 sinks
    copy, mass = rt.copy_and_mass(probs, tokens, targets, valid, needle)
    assert copy[0].tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.0])   # the padded row counts for nothing
    assert mass[0].tolist() == pytest.approx([0.93, 0.93, 0.03, 0.03])


def test_scoring_prompts_mark_the_needle_sentence_and_the_answer():
    """Each scoring prompt: the passkey prompt and its answer (no EOS), the answer's start, and the needle -- the
    sentence that holds the key, found by the task builder (flexgen_long.data.task_samples)."""
    tok = ByteTokenizer()
    prompts = rt.passkey_prompts(tok, 300, 2, (0.0, 0.6, 1.0))
    assert len(prompts) == 6 and {p.answer_start for p in prompts} == {300}
    for p in prompts:
        key = tok.decode(p.ids[p.answer_start:]).strip().rstrip(".")
        needle = tok.decode(p.ids[p.needle.start:p.needle.stop])
        assert needle == f" The pass key is {key}. Remember it. {key} is the pass key. "
        assert tok.decode(p.ids[:p.answer_start]).count(key) == 2          # the needle holds the key, nothing else does


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
    res = rt.retrieval_scores(model, ByteTokenizer(), 300, samples_per_depth=1, depths=(0.2, 0.8), progress=False)
    assert res.prompts == 2 and len(res.copy_score) == 6 and len(res.copy_score[0]) == 8
    assert res.recompute_max_rel_error < 1e-5            # fp32: the layer outputs, reproduced up to rounding
    assert res.patterns[2] == repr(BlockSparse(block=16, local_blocks=2, vertical_stride=4, per_head=True))
    for m in (res.copy_score, res.needle_mass):
        assert all(0.0 <= x <= 1.0 for row in m for x in row)

    # an independent reference for layer_probs: softmax over tests/reference.py's token-by-token dense mask
    torch.manual_seed(1)
    q, k = torch.randn(2, 8, 5, 16), torch.randn(2, 4, 200, 16)
    rows = torch.tensor([[150, 160, 170, 180, 199], [20, 40, 60, 80, 100]])
    for attn in (model.layers[i].attn for i in (0, 1, 2)):
        mask = dense(attn.pattern, 200, 200, num_heads=8, num_kv_heads=4)[0]         # [1 or 8, 200, 200]
        mask = mask.expand(8, 200, 200)
        kk = k.repeat_interleave(2, dim=1)
        logits = torch.einsum("bhad,bhsd->bhas", q, kk) / math.sqrt(16)
        want = torch.stack([logits[b].masked_fill(~mask[:, rows[b]], float("-inf")) for b in range(2)]).softmax(-1)
        torch.testing.assert_close(rt.layer_probs(attn.pattern, q, k, rows), want, rtol=1e-5, atol=1e-6)


def test_bf16_models_pass_the_check_with_room():
    """In bf16 (the GPU runs) q, k, v are rounded as the layer rounds them, so the recompute misses the real output
    by bf16 rounding only -- far below the 0.1 that a wrong mask or RoPE exceeds."""
    res = rt.retrieval_scores(_hybrid().to(torch.bfloat16), ByteTokenizer(), 300, samples_per_depth=1,
                              depths=(0.2, 0.8), progress=False)
    assert 0 < res.recompute_max_rel_error < 0.02 and res.dtype == "bfloat16"


def test_a_wrong_mask_fails_the_recompute_check(monkeypatch):
    """The check has teeth: scoring the sparse layers as if they were full is caught, naming those layers."""
    model = _hybrid()
    real = rt.layer_probs
    monkeypatch.setattr(rt, "layer_probs", lambda pattern, q, k, rows: real(Full(), q, k, rows))
    with pytest.raises(rt.RecomputeMismatch, match=r"layer\(s\) \[1, 2, 4, 5\]"):
        rt.retrieval_scores(model, ByteTokenizer(), 300, samples_per_depth=1, depths=(0.5,), progress=False)


def test_batches_give_the_scores_of_single_prompts():
    """Right-padding and the answer rows of prompts with answers of different lengths: batch size changes nothing."""
    model = _hybrid()
    one = rt.retrieval_scores(model, ByteTokenizer(), 260, samples_per_depth=3, depths=(0.3,), batch_size=1,
                              progress=False)
    many = rt.retrieval_scores(model, ByteTokenizer(), 260, samples_per_depth=3, depths=(0.3,), batch_size=3,
                               progress=False)
    assert {len(p.ids) for p in rt.passkey_prompts(ByteTokenizer(), 260, 3, (0.3,))} != {260}
    torch.testing.assert_close(torch.tensor(one.copy_score), torch.tensor(many.copy_score))
    torch.testing.assert_close(torch.tensor(one.needle_mass), torch.tensor(many.needle_mass))


@pytest.mark.parametrize("copy_layer, prev_layer", [(4, 1), (2, 0)])
def test_the_planted_copy_head_ranks_first(copy_layer, prev_layer):
    """A layer that copies the passkey by construction (an induction head, weights set by hand) tops the ranking with
    a high copy score; every other layer copies nothing. The choice for a budget of one is that layer, wherever it
    is -- the middle-third rule would pick layer 2 of 6."""
    model = planted_copy_model(copy_layer=copy_layer, prev_layer=prev_layer)
    s = rt.retrieval_scores(model, ByteTokenizer(), 400, samples_per_depth=4, progress=False)
    assert s.recompute_max_rel_error < 1e-4
    assert s.ranking()[0] == copy_layer
    assert s.layer_copy_score[copy_layer] > 0.3                         # 4 of the 7 answer tokens at best
    assert all(c == 0.0 for i, c in enumerate(s.layer_copy_score) if i != copy_layer)
    assert s.layer_needle_mass[copy_layer] > 0.5
    assert rt.choose_full_layers(s, "retrieval:1").layers == [copy_layer]


def test_without_the_plant_or_behind_a_window_the_copy_score_is_gone():
    """Controls: the same model with the copy head's query zeroed copies nothing; with the copy layer made AttnSink
    (the needle outside its window) it is scored under that pattern and copies nothing either."""
    model = planted_copy_model()
    with torch.no_grad():
        model.layers[4].attn.q_proj.weight.zero_()
    s = rt.retrieval_scores(model, ByteTokenizer(), 400, samples_per_depth=2, progress=False)
    assert max(s.layer_copy_score) == 0.0
    model = planted_copy_model()
    model.layers[4].attn.pattern = AttnSink(sink=4, window=16)
    s = rt.retrieval_scores(model, ByteTokenizer(), 400, samples_per_depth=2, depths=(0.1, 0.3), progress=False)
    assert max(s.layer_copy_score) == 0.0 and s.layer_needle_mass[4] < 0.05


def _scores(copy, mass):
    L = len(copy)
    return rt.HeadScores(copy_score=[[c, 0.0] for c in copy], needle_mass=[[m, 0.0] for m in mass], length=256,
                         prompts=40, depths=[0.5], seed=0, patterns=["Full()"] * L, recompute_max_rel_error=0.0,
                         seconds=0.0, device="cpu", dtype="float32")


def test_budget_choice_and_ranking_rules():
    # 9 layers: copy scores, ties broken by needle mass, then by the lower index
    copy = [0.0, 0.5, 0.0, 0.9, 0.1, 0.1, 0.0, 0.7, 0.0]
    mass = [0.2, 0.6, 0.3, 0.9, 0.4, 0.5, 0.3, 0.8, 0.1]
    s = _scores(copy, mass)
    assert s.ranking() == [3, 7, 1, 5, 4, 2, 6, 0, 8]
    assert rt.choose_full_layers(s, "retrieval").layers == [1, 3, 7]            # n(1/3) of 9 = 3, as "middle"
    assert rt.choose_full_layers(s, "retrieval:5").layers == [1, 3, 4, 5, 7]
    assert rt.choose_full_layers(s, "retrieval:0.25").layers == [3, 7]         # floor(0.25 * 9 + 0.5) = 2
    assert rt.choose_full_layers(s, "retrieval:1.0").layers == list(range(9))
    c = rt.choose_full_layers(s, "retrieval:2", source="/m")
    assert c.config_line() == "model.full_layers=[3,7]"
    assert rt.FullLayerChoice.from_dict(c.to_dict()) == c
    assert rt.HeadScores.from_dict(s.to_dict()) == s
    table = c.table().splitlines()
    assert table[1].split() == ["1", "3", "0.900", "0.900", "yes"] and table[3].split() == ["3", "1", "0.500", "0.600"]
    with pytest.raises(ValueError, match=r"layer count must be an int in \[1, 9\]"):
        rt.choose_full_layers(s, "retrieval:10")


def test_progress_off_a_terminal_is_periodic_lines(monkeypatch, capsys):
    """Scoring reports progress through cli.progress: stderr captured here is not a TTY, so no bar but a line every
    10 s and one at the end."""
    rt.retrieval_scores(_hybrid(), ByteTokenizer(), 300, samples_per_depth=1, depths=(0.5,))
    assert capsys.readouterr().err.splitlines()[-1].startswith("retrieval scores (300 tokens, cpu): 1/1 (")
    bar = cli.progress(5, "scores")
    for _ in range(5):
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scores: 5/5 (")
    clock = iter(range(0, 1000, 11))  # every reading 11 s after the one before
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    bar = cli.progress(3, "scores")
    for _ in range(3):
        bar.update(1)
    assert [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()] == ["scores: 1/3", "scores: 2/3",
                                                                                     "scores: 3/3"]
