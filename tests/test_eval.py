"""recipes/longgen_eval.py and the retrieval reproduction driver (analysis/repro/run_stage.py): grid and files, the
StreamingLLM override, exact-match scoring against oracle stubs, perplexity against an independent NLL, config
validation, and the driver's stages end to end at toy size."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from flexgen_long import checkpoint_io, hf
from flexgen_long.attention import MaskSet
from flexgen_long.cache import ModelCache
from flexgen_long.models import longgen_tiny
from flexgen_long.patterns import AttnSink
from flexgen_long.tokenizers import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_EVAL = REPO / "recipes" / "configs" / "eval" / "tiny.yaml"
TOK = ByteTokenizer()
TINY_CFG = {"_component_": "flexgen_long.models.longgen_tiny", "vocab_size": 259, "max_seq_len": 1024,
            "full_layers": "middle",
            "sparse_pattern": {"_component_": "flexgen_long.patterns.AttnSink", "sink": 4, "window": 60}}


def _tiny_checkpoint(root: Path) -> Path:
    """A random tiny model saved as the finetuning recipe saves it (HF safetensors + config.json)."""
    from torchtune import config
    model = config.instantiate(OmegaConf.create(TINY_CFG))
    return checkpoint_io.save_checkpoint(root, 3, model.state_dict(), checkpoint_io.hf_config(model, TINY_CFG))


def _cfg(**overrides):
    cfg = OmegaConf.load(TINY_EVAL)
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))


def _dense_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] by one forward over dense bool masks of the layers' patterns: no KV cache, no
    generation module, no flex -- an independent path to the same numbers."""
    ms = MaskSet([layer.attn.pattern for layer in model.layers], len(ids), num_heads=4, num_kv_heads=2,
                 device="cpu", kind="dense")
    with torch.no_grad():
        return model(torch.tensor([ids]), mask=ms)[0]


def _greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(_dense_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def test_eval_on_checkpoint_matches_an_independent_decoder_and_perplexity(tmp_path):
    """Every number of the eval JSON recomputed another way: the predicted answers by greedy decoding with full
    forwards (no cache), accuracy as exact match of those, perplexity as exp(mean NLL) of a dense-mask forward."""
    from recipes.longgen_eval import evaluate, heldout_documents, retrieval_samples

    _tiny_checkpoint(tmp_path / "run")
    out = tmp_path / "eval"
    lengths, depths = [500, 640], [0.0, 1.0]
    res = evaluate(_cfg(checkpoint_dir=str(tmp_path / "run"), output_dir=str(out), lengths=lengths, depths=depths,
                        samples_per_cell=2, perplexity_documents=1))
    assert res["name"] == "run" and res["checkpoint"].endswith("step_3")  # output_dir given: the latest step
    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    model = hf.load_model(tmp_path / "run" / "step_3").eval()
    for task in ("passkey", "multikey_needle"):
        r = on_disk["retrieval"][task]
        assert r["lengths"] == lengths and r["depths"] == depths
        for j, length in enumerate(lengths):
            for i, depth in enumerate(depths):
                samples = retrieval_samples(TOK, task, length, depth, 2, 0)
                predicted = [_greedy_without_cache(model, p, len(a)) for p, a in samples]
                assert r["examples"][f"{length}/{depth}"] == [[TOK.decode(p), TOK.decode(a)]
                                                              for p, (_, a) in zip(predicted, samples)]
                assert r["accuracy"][i][j] == sum(p == list(a) for p, (_, a) in zip(predicted, samples)) / 2
    docs = heldout_documents(TOK, "python-stdlib-packages", max(lengths), 1, 0)
    p = on_disk["perplexity"]
    assert p["lengths"] == lengths and p["documents"] == 1
    for j, length in enumerate(lengths):
        d = docs[0][:length]
        nll = F.cross_entropy(_dense_logits(model, d)[:-1], torch.tensor(d[1:]))
        assert p["ppl"][j] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert on_disk["layout"]["full_layers"] == [1] and on_disk["streaming_llm"] is None
    png = (out / "run_retrieval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_eval_refuses_a_model_with_non_finite_logits_and_writes_nothing(tmp_path, monkeypatch):
    """NaN is no perplexity and no valid JSON: the eval stops, naming the problem, before writing anything."""
    import recipes.longgen_eval as ev

    model = longgen_tiny(vocab_size=259, max_seq_len=1024).eval()
    with torch.no_grad():
        model.layers[2].mlp.w1.weight[0, 0] = float("nan")
    monkeypatch.setattr(ev, "build_model", lambda cfg, ckpt, device, dtype, log: model)
    with pytest.raises(FloatingPointError, match="logits are NaN or infinite"):
        ev.evaluate(_cfg(output_dir=str(tmp_path / "eval"), lengths=[500]))
    assert not list((tmp_path / "eval").iterdir())  # checked writable before the work, nothing written
    docs = [torch.randint(0, 256, (200,)).tolist()]
    with pytest.raises(FloatingPointError, match=r"perplexity at length 100: .* NaN or infinite at 99 of 99"):
        ev.evaluate_perplexity(model, docs, [100])


def test_streaming_llm_switches_every_layer_to_sink_window_ring_caches(tmp_path):
    from recipes.longgen_eval import build_model, resolve_checkpoint

    _tiny_checkpoint(tmp_path)
    cfg = _cfg(checkpoint_dir=str(tmp_path), streaming_llm={"sink": 8, "window": 40})
    model = build_model(cfg, resolve_checkpoint(cfg.checkpoint_dir), torch.device("cpu"), torch.float32)
    assert all(layer.attn.pattern == AttnSink(8, 40) for layer in model.layers)
    cache = ModelCache(model, 1, 700, torch.float32, "cpu")
    assert [c.slots for c in cache.layers.values()] == [48] * len(model.layers)  # ring of sink + window, not 700
    # weights are the checkpoint's, untouched
    ref = hf.load_model(tmp_path / "step_3")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_quantized_eval_runs_on_int8_weights_and_names_its_result_apart(tmp_path):
    """quantize=int8wo: the checkpoint is evaluated with int8 weights (its perplexity moves, by less than 1%), the JSON
    says so, and its default name ends in _int8wo, beside the unquantized result's."""
    from recipes.longgen_eval import evaluate

    _tiny_checkpoint(tmp_path / "run")
    out = tmp_path / "eval"
    cells = dict(checkpoint_dir=str(tmp_path / "run"), output_dir=str(out), tasks=["passkey"], lengths=[200],
                 depths=[0.5], samples_per_cell=1, perplexity_documents=1)
    plain, got = evaluate(_cfg(**cells)), evaluate(_cfg(**cells, quantize="int8wo"))
    assert (plain["name"], got["name"]) == ("run", "run_int8wo") and (plain["quantize"], got["quantize"]) == (None,
                                                                                                         "int8wo")
    assert json.loads((out / "run_int8wo.json").read_text())["quantize"] == "int8wo" and (out / "run.json").is_file()
    ppl, ppl_q = plain["perplexity"]["ppl"][0], got["perplexity"]["ppl"][0]
    assert ppl != ppl_q and abs(ppl_q / ppl - 1) < 0.01


def _oracle(prompts, max_new):
    """A perfect reader: finds the asked-for value in the prompt text by regex, independent of the task code."""
    outs = []
    for p in prompts:
        text = TOK.decode(p)
        if "pass key" in text:
            value = re.search(r"The pass key is (\d+)\.", text).group(1)
        else:
            key = re.search(r"special magic number for (\S+)\? ", text).group(1)
            value = re.search(rf"magic numbers for {re.escape(key)} is: (\d+)\.", text).group(1)
        outs.append(TOK.encode(f" {value}.", add_bos=False, add_eos=False) + [TOK.eos_id])
    return outs


def test_exact_match_scoring_on_oracle_and_wrong_stubs():
    from recipes.longgen_eval import evaluate_retrieval

    grid = dict(tasks=["passkey", "multikey_needle"], lengths=[500, 700], depths=[0.0, 0.3, 1.0],
                samples_per_cell=3, seed=5)
    right = evaluate_retrieval(_oracle, TOK, **grid)
    assert all(a == 1.0 for r in right.values() for row in r["accuracy"] for a in row)
    wrong = evaluate_retrieval(lambda ps, n: [TOK.encode(" 00000.", add_bos=False, add_eos=False)] * len(ps),
                               TOK, **grid)
    assert all(a == 0.0 for r in wrong.values() for row in r["accuracy"] for a in row)

    def off_by_one_digit(ps, n):  # right except its last digit: not an exact match
        return [o[:-3] + [(o[-3] - 48 + 1) % 10 + 48] + o[-2:] for o in _oracle(ps, n)]
    near = evaluate_retrieval(off_by_one_digit, TOK, **grid)
    assert all(a == 0.0 for r in near.values() for row in r["accuracy"] for a in row)
    # token accuracy tells a near miss (one token of " 12345." / " 1234567." wrong) from a guess
    assert all(t == 1.0 for r in right.values() for row in r["token_accuracy"] for t in row)
    assert all(t == round(6 / 7, 4) for row in near["passkey"]["token_accuracy"] for t in row)
    assert all(t == round(8 / 9, 4) for row in near["multikey_needle"]["token_accuracy"] for t in row)
    pred, true = near["passkey"]["examples"]["700/0.3"][0]
    assert len(near["passkey"]["examples"]) == 6 and pred != true and pred[:-2] == true[:-2] and pred[-1] == "."


def test_accuracy_by_length_carries_its_wilson_interval():
    """A reader right on exactly the first 2 of each cell's 3 prompts: 6 of 9 per length (3 depths), with the
    interval of 6/9 beside it; all right and all wrong give the intervals of 9/9 and 0/9."""
    from recipes.longgen_eval import evaluate_retrieval

    from flexgen_long.stats import wilson_interval

    grid = dict(tasks=["passkey"], lengths=[500, 700], depths=[0.0, 0.3, 1.0], samples_per_cell=3, seed=5)

    def two_of_three(ps, n):
        return _oracle(ps[:2], n) + [TOK.encode(" 00000.", add_bos=False, add_eos=False)] * (len(ps) - 2)
    r = evaluate_retrieval(two_of_three, TOK, **grid)["passkey"]
    assert r["correct_by_length"] == [6, 6] and r["prompts_by_length"] == 9
    assert r["interval_by_length"] == [[round(x, 4) for x in wilson_interval(6, 9)]] * 2
    assert r["mean_by_length"] == pytest.approx([6 / 9, 6 / 9])
    assert evaluate_retrieval(_oracle, TOK, **grid)["passkey"]["interval_by_length"][0] == \
        [round(x, 4) for x in wilson_interval(9, 9)]


def test_perplexity_equals_exp_mean_nll_of_an_independent_forward():
    from recipes.longgen_eval import evaluate_perplexity

    model = longgen_tiny(vocab_size=259, max_seq_len=256).eval()  # layer 1 full, others AttnSink(4, 60)
    docs = [torch.randint(0, 256, (200,)).tolist(), torch.randint(0, 256, (200,)).tolist()]
    got = evaluate_perplexity(model, docs, [80, 200])
    for j, L in enumerate([80, 200]):
        nll, second = [], []
        for d in docs:
            x = torch.tensor(d[:L])[None]
            with torch.no_grad():  # no cache, dense bool masks of the same patterns: a different code path
                ms = MaskSet([layer.attn.pattern for layer in model.layers], L, num_heads=4, num_kv_heads=2,
                             device="cpu", kind="dense")
                logp = model(x, mask=ms)[0].log_softmax(-1)
            per_tok = [-logp[t, d[t + 1]].item() for t in range(L - 1)]
            nll += per_tok
            second += [v for t, v in enumerate(per_tok) if t + 1 >= L // 2]
        assert got["ppl"][j] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
        assert got["ppl_second_half"][j] == pytest.approx(math.exp(sum(second) / len(second)), rel=1e-5)


@pytest.mark.parametrize("overrides,message", [
    ({"learning_rate": 1}, r"unknown config key 'learning_rate'"),
    ({"length": [512]}, r"unknown config key 'length' \(did you mean 'lengths'\?\)"),
    ({"lengths": [63]}, r"config field 'lengths': must be a non-empty list of distinct ints >= 64, got \[63\]"),
    ({"lengths": [512, 512]}, r"config field 'lengths': must be a non-empty list of distinct ints >= 64"),
    ({"depths": [-0.01]}, r"config field 'depths': must be a non-empty list of numbers in \[0, 1\]"),
    ({"perplexity_documents": -1}, r"config field 'perplexity_documents': must be an int >= 0, got -1"),
    ({"prefill_chunk": 0}, r"config field 'prefill_chunk': must be null or an int >= 1, got 0"),
    ({"lengths": []}, r"config field 'lengths': must be a non-empty list of distinct ints >= 64"),
    ({"depths": [0.5, 2.0]}, r"config field 'depths'"),
    ({"tasks": ["sudoku"]}, r"config field 'tasks'"),
    ({"streaming_llm": {"sink": 4}}, r"config field 'streaming_llm.window': is required"),
    ({"streaming_llm": {"sink": 4, "window": 0}}, r"config field 'streaming_llm': AttnSink.window"),
    ({"lengths": [1020]}, r"config field 'lengths': max\(lengths\)=1020 \+ 16 answer tokens exceeds"),
    ({"lengths": [100]}, r"config field 'lengths': 100 is too short for the passkey task"),
    ({"checkpoint_dir": "/nonexistent/run"}, r"config field 'checkpoint_dir': '/nonexistent/run' does not exist"),
    ({"samples_per_cell": "abc"}, r"config field 'samples_per_cell': must be an int >= 1, got 'abc'"),
    ({"seed": "abc"}, r"config field 'seed': must be an int >= 0, got 'abc'"),
    ({"device": "tpu"}, r"config field 'device': must be 'cpu', 'cuda' or 'cuda:<index>', got 'tpu'"),
    ({"quantize": "int8_weight_only"}, r"config field 'quantize': must be null or one of \['int8wo', 'fp8', 'int4wo'\]"),
    ({"quantize": "fp8"}, r"config field 'quantize': scheme 'fp8' needs (a CUDA device of capability|CUDA capability"
                          r"|bf16 weights)"),
    ({"model": {"_component_": "flexgen_long.models.longgen_tiny", "max_seq_len": "long"}},
     r"config field 'model.max_seq_len': must be an int, got 'long'"),
    *([] if torch.cuda.is_available() else [({"device": "cuda"}, r"config field 'device': 'cuda' was requested")]),
])
def test_bad_eval_config_names_the_field(tmp_path, overrides, message):
    from recipes.longgen_eval import evaluate

    with pytest.raises(ValueError, match=message):
        evaluate(_cfg(output_dir=str(tmp_path), **overrides))
    assert not list(tmp_path.iterdir())


# -- the reproduction's configs and driver -----------------------------------------------------------------------------
def _tune_cfg(config: str, overrides: list[str]):
    """The config exactly as `tune run ... --config config overrides` builds it (torchtune's own merge, with ~key)."""
    from torchtune.config._parse import TuneRecipeArgumentParser
    from torchtune.config._utils import _merge_yaml_and_cli_args

    yaml_args, cli_args = TuneRecipeArgumentParser(description="").parse_known_args(["--config", config, *overrides])
    return _merge_yaml_and_cli_args(yaml_args, cli_args)


sys.path.insert(0, str(REPO / "analysis" / "repro"))
import run_stage  # noqa: E402


@pytest.mark.parametrize("variant", [None, *run_stage.VARIANTS, "b_upper_mid", "c_upper_mid"])
def test_repro_training_configs_validate(variant, tmp_path):
    from recipes.longgen_finetune import validate_config, validate_model
    from torchtune import config

    name = "s1_pretrain" if variant is None else "s2_extend"
    over = [] if variant is None else [f"checkpoint.base_dir={tmp_path}", *run_stage.layout_overrides(variant)]
    # a GPU config: device=cuda is refused on a machine without one (tests/test_recipes.py), the rest checked here
    on_this_machine = [] if torch.cuda.is_available() else ["device=cpu"]
    cfg = _tune_cfg(str(REPO / run_stage.CONFIGS / f"{name}.yaml"), over + on_this_machine)
    if variant is not None:  # a base model directory as s1 leaves it: config.json of the model's shape, weights
        with torch.device("meta"):
            s1 = config.instantiate(_tune_cfg(str(REPO / run_stage.CONFIGS / "s1_pretrain.yaml"), []).model)
        (tmp_path / "config.json").write_text(json.dumps(checkpoint_io.hf_config(s1)))
        (tmp_path / "model.safetensors").write_bytes(b"")
    validate_config(cfg)
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    validate_model(model, cfg)
    full = [i for i, layer in enumerate(model.layers) if type(layer.attn.pattern).__name__ == "Full"]
    want = {None: range(8), "a": range(8), "b": [2, 3, 4], "c": [2, 3, 4], "d": [], "e_bottom": [0, 1, 2],
            "e_top": [5, 6, 7], "e_interleave": [1, 4, 7], "b_upper_mid": [3, 4, 5], "c_upper_mid": [3, 4, 5]}[variant]
    assert full == list(want)
    if variant in ("c", "c_upper_mid"):
        assert type(model.layers[0].attn.pattern).__name__ == "BlockSparse"
    assert model.max_seq_len >= cfg.seq_len
    assert sum(p.numel() for p in model.parameters()) < 30e6  # bf16 weights stay under 60 MB (carried between calls)


def test_repro_eval_config_validates(tmp_path):
    from recipes.longgen_eval import validate_config

    cfg = _tune_cfg(str(REPO / run_stage.CONFIGS / "eval.yaml"), [
        f"checkpoint_dir={tmp_path}", "streaming_llm.sink=64", "streaming_llm.window=448",
        *([] if torch.cuda.is_available() else ["device=cpu"])])
    validate_config(cfg)
    s2 = OmegaConf.load(REPO / run_stage.CONFIGS / "s2_extend.yaml")
    assert max(cfg.lengths) + 16 <= s2.model.max_seq_len  # the longest prompt and its answer fit the RoPE table


def test_repro_driver_stages_end_to_end_toy(tmp_path):
    """s1 -> s2 (a and d, two at a time) -> s3 (f: StreamingLLM on a) -> table, as documented, at toy size on CPU."""
    out, res = tmp_path / "out", tmp_path / "res"

    def stage(*args, env=None):
        r = subprocess.run([sys.executable, "analysis/repro/run_stage.py", *args, "--toy", "--outputs", str(out),
                            "--results", str(res)], cwd=REPO, capture_output=True, text=True, timeout=300,
                           env=None if env is None else {**os.environ, **env})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    stage("s1")
    assert checkpoint_io.latest_checkpoint(out / "s1").name == "step_2"
    # GPU g of the driver is the g-th device of its CUDA_VISIBLE_DEVICES: two drivers can share a machine
    log = stage("s2", "a,d", "--gpus", "1", "--jobs-per-gpu", "2", env={"CUDA_VISIBLE_DEVICES": "3"})
    assert "[s2 a] started on GPU 3" in log and "[s2 d] started on GPU 3" in log
    assert log.index("[s2 d] started") < log.index("[s2 a] done")  # side by side
    assert "[s2 a] done" in log and "[s2 d] done" in log
    log = (out / "logs" / "s2_a.driver.log").read_text()
    assert f"checkpoint.base_dir={out / 's1' / 'step_2'}" in log and "model.full_layers=all" in log
    assert "model.full_layers=none" in (out / "logs" / "s2_d.driver.log").read_text()
    assert json.loads((res / "train_s2_d.json").read_text())["logged_steps"] == [1, 2]
    train = json.loads((res / "train_s2_a.json").read_text())
    assert train["logged_steps"] == [1, 2] and train["tokens_per_s"] > 0
    # retrieval heads of s1 -> b_heads puts AttnSink's full layers on them
    stage("heads", "s1")
    heads = json.loads((res / "heads_s1.json").read_text())
    assert heads["recompute_max_rel_error"] < 1e-4 and len(heads["copy_score"]) == 8
    chosen = heads["suggested_full_layers"]["contiguous"]
    assert len(chosen) == 3 and chosen == list(range(chosen[0], chosen[0] + 3))
    stage("s2", "b_heads")
    assert f"model.full_layers={json.dumps(chosen).replace(' ', '')}" in \
        json.loads((res / "train_s2_b_heads.json").read_text())["overrides"]
    stage("s3", "f")
    f = json.loads((res / "f.json").read_text())
    assert f["layout"]["full_layers"] == [] and f["streaming_llm"] == {"sink": 4, "window": 28}
    assert f["checkpoint"] == str(out / "s2_a" / "step_2") and (res / "f_retrieval.png").exists()
    stage("s3", "f,a", "--step", "2", "--jobs-per-gpu", "2")  # an intermediate checkpoint: results in step_2/
    assert json.loads((res / "step_2" / "f.json").read_text())["checkpoint"] == str(out / "s2_a" / "step_2")
    assert (res / "step_2" / "a_retrieval.png").exists()
    bad = subprocess.run([sys.executable, "analysis/repro/run_stage.py", "s3", "a,zz"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "'all' or a comma list" in bad.stderr and "'a,zz'" in bad.stderr
    table = stage("table")
    assert "| f | full [] + StreamingLLM |" in table and (res / "table.md").read_text() in table + "\n"
    assert "![heads_s1](heads_s1.png)" in table
    assert (res / "summary.png").stat().st_size > 10_000 and "accuracy over training" in table
    assert (res / "steps.png").stat().st_size > 10_000


def test_heldout_documents_join_the_files_of_a_directory_beyond_the_longest_file(tmp_path):
    """perplexity_join_files: a document is the files of one directory joined in sorted order until it holds the
    length; without it, documents shorter than the length are skipped (and none at all is an error naming the fix)."""
    from flexgen_long import recipe_config as rc
    from recipes.longgen_eval import heldout_documents

    for pkg in ("p1", "p2"):
        (tmp_path / pkg).mkdir()
        for i in range(4):
            (tmp_path / pkg / f"m{i}.py").write_text(f"# {pkg} {i}\n" + "x = 1\n" * 20)   # 129 bytes each
    docs = heldout_documents(TOK, str(tmp_path), 300, 2, 0, join_files=True)
    assert len(docs) == 2 and all(len(d) == 300 and d[0] == TOK.bos_id for d in docs)
    texts = {TOK.decode(d) for d in docs}
    assert any(t.startswith("# p1 0\n") for t in texts) and any(t.startswith("# p2 0\n") for t in texts)
    assert all("# p1 1\n" in t or "# p2 1\n" in t for t in texts)  # the next file of the same package follows
    with pytest.raises(rc.ConfigError, match="perplexity_join_files=true"):
        heldout_documents(TOK, str(tmp_path), 300, 2, 0)


# -- outputs: checked before the work, written whole, never over another checkpoint's result ---------------------------
FAST = {"lengths": [256], "depths": [0.0], "tasks": ["passkey"], "perplexity_documents": 0}


def test_a_result_never_silently_replaces_another_checkpoints(tmp_path):
    """Two runs named alike (.../a/run/step_3 and .../b/run/step_3 both default to 'run'): the second is refused
    before any work, naming both; the same checkpoint again replaces its own result; overwrite=true replaces."""
    from recipes.longgen_eval import evaluate

    a, b = _tiny_checkpoint(tmp_path / "a" / "run"), _tiny_checkpoint(tmp_path / "b" / "run")
    out = tmp_path / "eval"
    evaluate(_cfg(output_dir=str(out), checkpoint_dir=str(a), **FAST))
    first = (out / "run.json").read_bytes()
    with pytest.raises(ValueError, match=rf"config field 'name': '{out}/run.json' holds the result of {a}, not of "
                                         rf"{b}; choose another name .* overwrite=true"):
        evaluate(_cfg(output_dir=str(out), checkpoint_dir=str(b), **FAST))
    assert (out / "run.json").read_bytes() == first
    evaluate(_cfg(output_dir=str(out), checkpoint_dir=str(a), **FAST))  # its own result: replaced
    evaluate(_cfg(output_dir=str(out), checkpoint_dir=str(b), overwrite=True, **FAST))
    assert json.loads((out / "run.json").read_text())["checkpoint"] == str(b)
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "run_retrieval.png"]  # no temp files left


def test_an_unwritable_output_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    import recipes.longgen_eval as ev

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(ev, "build_model", lambda *a: pytest.fail("the model was built before the output was checked"))
    with pytest.raises(OSError) as info:
        ev.evaluate(_cfg(output_dir=str(tmp_path / "file" / "eval"), **FAST))
    assert str(tmp_path / "file") in str(info.value)
