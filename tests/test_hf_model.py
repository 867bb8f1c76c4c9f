"""flexgen_long.hf_model: an exported LongGen model run by transformers (``AutoModelForCausalLM``, ``generate()``,
``pipeline``) against our own model as the oracle -- the torchtune model the checkpoint came from, its forward and
``flexgen_long.generation.generate`` -- with full attention as the negative control.

The real-model tests export SmolLM2-135M-Instruct (fixture ``smollm2_dir``) as a finetune checkpoint would be: the
recipe's checkpoint format with the layout (layers 10-19 full, AttnSink(4, 28) elsewhere: a test-sized window, so
that 100-token prompts are sparse) and the tokenizer recorded. The others use tiny random models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexgen_long import checkpoint_io, generation, hf
from flexgen_long import hf_model as H
from flexgen_long.cache import plan_cache
from flexgen_long.export_hf import export_hf
from flexgen_long.models import builder_config, longgen_llama, relayout
from flexgen_long.patterns import AttnSink, BlockSparse

REPO = Path(__file__).resolve().parents[1]
SINK, WINDOW = 4, 28
# our model's forward at <= 128 tokens runs flex eagerly (force_eager below): fine at these sizes
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def english() -> str:
    import argparse
    import inspect
    import logging
    import textwrap
    import unittest

    return "\n\n".join(inspect.getdoc(m) for m in (argparse, unittest, logging, textwrap))


def _cache(out):
    """The cache of a ``generate(return_dict_in_generate=True)`` result (``cache`` from transformers 5.24 on)."""
    return out.cache if "cache" in out else out.past_key_values


def _ours_forward(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        return model(torch.tensor([ids]))[0]


# -- SmolLM2, exported from a finetune-format checkpoint ---------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(smollm2_dir, tmp_path_factory):
    """(our model with the layout, the transformers model loaded from the export, its tokenizer, the export dir)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = relayout(hf.load_model(smollm2_dir).eval(), "middle", AttnSink(SINK, WINDOW))
    model_cfg = builder_config({"_component_": "flexgen_long.models.from_hf_config", "checkpoint_dir": str(smollm2_dir),
                                "full_layers": "middle", "sparse_pattern": {
                                    "_component_": "flexgen_long.patterns.AttnSink", "sink": SINK, "window": WINDOW}})
    recipe = {"tokenizer": {"_component_": "flexgen_long.tokenizers.hf_tokenizer", "checkpoint_dir": str(smollm2_dir)}}
    root = tmp_path_factory.mktemp("smol")
    checkpoint_io.save_checkpoint(root / "run", 7, ours.state_dict(),
                                  checkpoint_io.hf_config(ours, model_cfg, recipe=recipe))
    out = export_hf(root / "run", root / "hf", log=lambda s: None)  # the run dir: its latest step
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    tok.pad_token = tok.pad_token or tok.eos_token  # transformers < 5.24 converts SmolLM2's tokenizer without one
    return ours, theirs, tok, out


def test_export_records_the_layout_and_the_tokenizer(smol, smollm2_dir):
    from transformers import AutoTokenizer

    ours, theirs, tok, out = smol
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "flexgen_long_llama" and cfg["attn_implementation"] == "flexgen_long"
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == list(range(10, 20))
    assert set(cfg["layer_types"]) == {"full_attention", "sink_attention"}
    assert (cfg["attention_sink_size"], cfg["sliding_window"]) == (SINK, WINDOW)
    assert type(theirs).__name__ == "LongGenLlamaForCausalLM" and theirs.config._attn_implementation == "flexgen_long"
    text = english()[:200]  # the tokenizer the finetune run recorded (its base model's) came along
    assert tok(text).input_ids == AutoTokenizer.from_pretrained(smollm2_dir)(text).input_ids


def test_logits_equal_ours_at_every_position(smol):
    ours, theirs, tok, _ = smol
    ids = tok(english()).input_ids[:100]
    assert len(ids) > SINK + WINDOW
    with torch.no_grad():
        got = theirs(torch.tensor([ids])).logits[0]
    want = _ours_forward(ours, ids)
    err = (got - want).abs().max().item()
    assert err <= 1e-3, err
    relayout(ours, "all")
    try:
        full = _ours_forward(ours, ids)
    finally:
        relayout(ours, "middle", AttnSink(SINK, WINDOW))
    assert (full - want).abs().max().item() > 1.0  # the sparse layers really are sparse at this length


def test_greedy_generate_equals_ours_alone_and_in_a_left_padded_batch(smol):
    ours, theirs, tok, _ = smol
    ids = tok(english()).input_ids
    prompts, new = [ids[:70], ids[200:295]], 33
    want = [o.tokens for o in generation.generate(ours, prompts, max_new_tokens=new)]
    kv_heads, head_dim = theirs.config.num_key_value_heads, theirs.config.head_dim
    with torch.no_grad():
        for p, w in zip(prompts, want):
            out = theirs.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
            assert out.sequences[0, len(p):].tolist() == w
            # the trimmed caches: T keys in each of the 10 full layers, sink + window - 1 in each of the 20 others
            T = len(p) + new - 1  # the last token is sampled, never fed back
            assert H.cache_bytes(_cache(out)) == (10 * T + 20 * (SINK + WINDOW - 1)) * 2 * kv_heads * head_dim * 4
            plan = plan_cache(ours, 1, T, torch.float32).total_bytes  # ours: + the query's own slot and positions
            assert 0 < plan - H.cache_bytes(_cache(out)) < 0.05 * plan
        tok.padding_side = "left"
        batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
        out = theirs.generate(**batch, max_new_tokens=new, do_sample=False)
    width = batch.input_ids.shape[1]
    assert [out[i, width:].tolist() for i in range(2)] == want


def test_beam_search_and_static_cache_equal_uncached_decoding(smol):
    _, theirs, tok, _ = smol
    ids = tok(english()).input_ids
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": [ids[:30], ids[300:345]]}, return_tensors="pt")
    with torch.no_grad():
        beams = theirs.generate(**batch, max_new_tokens=8, do_sample=False, num_beams=3)
        uncached = theirs.generate(**batch, max_new_tokens=8, do_sample=False, num_beams=3, use_cache=False)
        greedy = theirs.generate(**batch, max_new_tokens=20, do_sample=False)
        static = theirs.generate(**batch, max_new_tokens=20, do_sample=False, cache_implementation="static")
    assert torch.equal(beams, uncached)  # every step over the trimmed caches = the whole sequence recomputed
    assert torch.equal(static, greedy)
    assert 30 + 8 > SINK + WINDOW


def test_pipeline_text_generation(smol):
    from transformers import pipeline

    _, theirs, tok, _ = smol
    prompt = english()[:300]
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.shape[1] > SINK + WINDOW
    with torch.no_grad():
        want = tok.decode(theirs.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:])
    got = pipeline("text-generation", model=theirs, tokenizer=tok)(prompt, max_new_tokens=10, do_sample=False,
                                                                     return_full_text=False)
    assert got[0]["generated_text"] == want


def test_lm_eval_hflm_takes_the_model(smol):
    """lm-evaluation-harness (where it is installed): ``HFLM(pretrained=model)``'s log-likelihoods equal our model's,
    and its greedy ``generate_until`` equals transformers' generate()."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    ours, theirs, tok, _ = smol
    lm = HFLM(pretrained=theirs, tokenizer=tok, batch_size=2, device="cpu")
    text = english()
    pairs = [(text[:300], text[300:360]), (text[1000:1150], text[1150:1230])]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (ll, _) in zip(pairs, got):
        ctx, cont = lm._encode_pair(context, continuation)  # lm-eval's own token split (it moves trailing spaces)
        whole = ctx + cont
        assert SINK + WINDOW < len(whole) <= 128
        logp = _ours_forward(ours, whole).log_softmax(-1)
        want = sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
        assert abs(ll - want) < 1e-3, (ll, want)
    gen = lm.generate_until([Instance("generate_until", {}, (text[:300], {"until": ["\n\n"], "max_gen_toks": 12,
                                                                             "do_sample": False}), 0)])
    ids = tok(text[:300], return_tensors="pt").input_ids
    with torch.no_grad():
        want = tok.decode(theirs.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
    assert gen[0] == want.split("\n\n")[0]


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_fresh_process_loads_the_hybrid_only_after_registration(smol):
    ours, theirs, tok, out = smol
    ids = tok(english()).input_ids[:60]
    load = f"from transformers import AutoModelForCausalLM; m = AutoModelForCausalLM.from_pretrained({str(out)!r}"
    r = _run(f"import flexgen_long.hf_model, torch; {load}); "
             f"print(m(torch.tensor([{ids}])).logits[0, -1].tolist())")
    assert r.returncode == 0, r.stderr[-2000:]
    with torch.no_grad():
        want = theirs(torch.tensor([ids])).logits[0, -1]
    assert (torch.tensor(json.loads(r.stdout.strip().splitlines()[-1])) - want).abs().max().item() < 1e-4
    # without the registration transformers does not know the model type: it refuses instead of running Llama
    r = _run(f"{load})")
    assert r.returncode != 0 and "model type `flexgen_long_llama`" in r.stderr, r.stderr[-2000:]
    # another attention implementation: refused at load time, in one line
    r = _run(f"import flexgen_long.hf_model; {load}, attn_implementation='sdpa')")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last.startswith("ValueError: attn_implementation='sdpa' is not supported"), last


def test_other_attention_implementations_are_refused(smol):
    _, theirs, _, out = smol
    from transformers import AutoModelForCausalLM

    for impl in ("sdpa", "eager", "flex_attention"):
        with pytest.raises(ValueError, match=f"attn_implementation='{impl}' is not supported") as e:
            AutoModelForCausalLM.from_pretrained(out, attn_implementation=impl)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="is not supported"):
        theirs.set_attn_implementation("sdpa")
    assert theirs.config._attn_implementation == "flexgen_long"


# -- tiny random models ------------------------------------------------------------------------------------------------
TINY = dict(vocab_size=256, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
            rope_base=10_000.0)


def _tiny(tmp_path, pattern, full_layers=(1,), max_seq_len=2048, num_layers=4):
    """(our random model, the transformers model of its export)."""
    from transformers import AutoModelForCausalLM

    args = dict(TINY, num_layers=num_layers, max_seq_len=max_seq_len)
    ours = longgen_llama(**args, full_layers=list(full_layers), sparse_pattern=pattern).eval()
    sparse = {"_component_": f"flexgen_long.patterns.{type(pattern).__name__}",
              **{k: v for k, v in vars(pattern).items() if k != "num_kv_heads"}}
    cfg = {"_component_": "flexgen_long.models.longgen_llama", **args, "full_layers": list(full_layers),
           "sparse_pattern": sparse}
    checkpoint_io.save_checkpoint(tmp_path / "run", 1, ours.state_dict(), checkpoint_io.hf_config(ours, cfg))
    export_hf(tmp_path / "run" / "step_1", tmp_path / "hf", log=lambda s: None)
    return ours, AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()


def test_long_calls_run_flex_with_analytic_masks_and_equal_the_dense_path(tmp_path, monkeypatch):
    """The FlexAttention path (forced here by a zero dense-mask budget) against the dense-mask path, on a batch with a
    left-padded row: a whole prompt (and a row padded after its tokens), and a 56-token chunk over trimmed caches (its
    keys: sink columns + window). Lengths share flex's length buckets, so that few graphs compile."""
    _, theirs = _tiny(tmp_path, AttnSink(4, 60))
    x = torch.randint(0, 256, (2, 256))
    mask = torch.ones(2, 256, dtype=torch.long)
    mask[1, :37] = 0
    both = mask.clone()
    both[0, -20:] = 0  # no cache: padding after a row's tokens too
    real = both.bool()
    kw = lambda cache: {H._CACHE_KW: cache}  # noqa: E731 -- cache= (transformers >= 5.24) or past_key_values=
    with torch.no_grad():
        dense = theirs(x, attention_mask=both, use_cache=False).logits
        dense_left = theirs(x, attention_mask=mask, use_cache=False).logits
        dense_chunk = theirs(x[:, 200:], attention_mask=mask,
                             **kw(_cache(theirs(x[:, :200], attention_mask=mask[:, :200])))).logits
        monkeypatch.setattr(H, "DENSE_MASK_LIMIT", 0)
        monkeypatch.setattr(H, "_dense_mask", lambda *a: pytest.fail("a dense mask was built"))
        flex = theirs(x, attention_mask=both, use_cache=False).logits
        prefix = theirs(x[:, :200], attention_mask=mask[:, :200])
        cached = [layer.keys.shape[2] for layer in _cache(prefix).layers]
        flex_chunk = theirs(x[:, 200:], attention_mask=mask, **kw(_cache(prefix))).logits
    assert cached == [4 + 37 + 59, 200, 4 + 37 + 59, 4 + 37 + 59]  # sink columns: sink + the most padding, + window
    assert (flex - dense)[real].abs().max().item() < 1e-5
    assert (flex_chunk - dense_chunk).abs().max().item() < 1e-5
    assert (flex_chunk - dense_left[:, 200:]).abs().max().item() < 1e-5


def test_a_32k_prompt_on_cpu_equals_ours(tmp_path, monkeypatch):
    """HF generate() over a 32K-token prompt: the sparse layers through flex with analytic BlockMasks, the full layer
    through SDPA's causal kernel -- no mask anywhere near 32K x 32K (dense masks are capped at DENSE_MASK_LIMIT)."""
    ours, theirs = _tiny(tmp_path, AttnSink(4, 60), max_seq_len=32768 + 16)
    prompt = torch.randint(0, 256, (32768,)).tolist()
    want = generation.generate(ours, [prompt], max_new_tokens=6)[0].tokens
    sizes = []
    real = H._dense_mask
    monkeypatch.setattr(H, "_dense_mask",
                        lambda p, q, k, *a: (sizes.append(q.numel() * k.shape[1]), real(p, q, k, *a))[1])
    with torch.no_grad():
        got = theirs.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    assert got == want
    assert sizes and max(sizes) <= 60 * 32768  # decode steps only: one query over the kept keys


def test_static_cache_compiled_decode_equals_dynamic(tmp_path):
    """``cache_implementation="static"`` with generate()'s torch.compile (fullgraph) on the CPU: one graph for every
    decode step (the mask has a fixed size), the same tokens as the dynamic cache, for a left-padded batch."""
    from transformers import CompileConfig

    _, theirs = _tiny(tmp_path, AttnSink(4, 12), full_layers=(1,), num_layers=2)
    x = torch.randint(0, 256, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # generate() compiles on CUDA only unless told
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        want = theirs.generate(x, attention_mask=mask, max_new_tokens=20, do_sample=False)
        got = theirs.generate(x, attention_mask=mask, max_new_tokens=20, do_sample=False,
                              cache_implementation="static", compile_config=compile_config)
    assert torch.equal(got, want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_block_sparse_layers_equal_ours(tmp_path):
    pattern = BlockSparse(block=16, local_blocks=2, vertical_stride=3, per_head=True)
    ours, theirs = _tiny(tmp_path, pattern)
    assert theirs.config.layer_types == ["block_sparse_attention", "full_attention"] + ["block_sparse_attention"] * 2
    ids = torch.randint(0, 256, (120,)).tolist()
    with torch.no_grad():
        got = theirs(torch.tensor([ids])).logits[0]
        out = theirs.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    assert (got - _ours_forward(ours, ids)).abs().max().item() < 1e-4
    assert out.sequences[0, 120:].tolist() == generation.generate(ours, [ids], max_new_tokens=20)[0].tokens
    assert {layer.keys.shape[2] for layer in _cache(out).layers} == {139}  # every key kept (see hf_model)


def test_assisted_decoding_rolls_back_sink_caches(tmp_path):
    """Prompt-lookup decoding drafts tokens and crops the caches back when they are rejected: the sink layers record
    their past until the crop (activate_past_recording), so the result is plain greedy decoding's."""
    _, theirs = _tiny(tmp_path, AttnSink(4, 12))
    x = torch.randint(0, 256, (1, 12)).repeat(1, 4)  # repeated text: the lookup finds drafts
    with torch.no_grad():
        want = theirs.generate(x, max_new_tokens=30, do_sample=False)
        got = theirs.generate(x, max_new_tokens=30, do_sample=False, prompt_lookup_num_tokens=4)
    assert torch.equal(got, want)


def test_config_and_batch_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"layer_types entries must be in .*got \['bogus'\]"):
        H.LongGenLlamaConfig(num_hidden_layers=2, layer_types=["bogus", "full_attention"])
    with pytest.raises(ValueError, match="attention_sink_size must be an int >= 0 for sink_attention layers"):
        H.LongGenLlamaConfig(num_hidden_layers=2, layer_types=["sink_attention", "full_attention"])
    with pytest.raises(ValueError, match=r"block_sparse must be an object with exactly"):
        H.LongGenLlamaConfig(num_hidden_layers=1, layer_types=["block_sparse_attention"], block_sparse={"block": 16})
    _, theirs = _tiny(tmp_path, AttnSink(4, 12))
    x = torch.randint(0, 256, (1, 10))
    gap = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask must pad rows on the left"):
        theirs(x, attention_mask=gap)
    with pytest.raises(ValueError, match=r"attention_mask must be a \[batch, tokens\] padding mask"):
        theirs(x, attention_mask=torch.ones(1, 1, 10, 10))
    with pytest.raises(ValueError, match=r"layout fields|share one pattern"):
        H.layout_fields([AttnSink(4, 12), AttnSink(8, 12)])
