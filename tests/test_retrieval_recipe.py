"""model.full_layers: retrieval in recipes/longgen_finetune.py and recipes/longgen_layers.py, on a base model with a
copy head planted by hand in layer 4 of 6 (tests/reference.py): the recipe chooses that layer (the middle-third rule
would take layer 2), logs the ranking, records the choice in output_dir and in every checkpoint's config.json; a
resumed run and every later load use the same layers without scoring again; bad values fail in one line naming the
field before anything is touched."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flexgen_long import checkpoint_io as ckpt
from flexgen_long import hf
from flexgen_long import retrieval as rt
from flexgen_long.patterns import Full

from reference import planted_copy_model
from scripts import load_script
from test_recipes import _run  # the recipe as recipe_main runs it

REPO = Path(__file__).resolve().parents[1]
TINY = "recipes/configs/tiny_longgen.yaml"
SMALL = ["seq_len=256", "dataset.max_tokens=30000", "dataset.synthetic_length=200", "dataset.synthetic_tasks=[passkey]",
         "batch_size=1", "log_every_n_steps=1", "lr_scheduler.num_warmup_steps=1", "checkpoint.save_every_n_steps=1",
         "checkpoint.keep_last_n=null", "optimizer.lr=1e-4"]


@pytest.fixture(scope="module")
def planted_base(tmp_path_factory) -> Path:
    """The planted model as a plain HF directory (config.json + model.safetensors, no recipe section): a base model."""
    model = planted_copy_model(copy_layer=4, prev_layer=1)
    return ckpt.save_checkpoint(tmp_path_factory.mktemp("planted"), 0, model.state_dict(), ckpt.hf_config(model))


def _cfg(out: Path, base: Path | None, *overrides):
    cfg = OmegaConf.load(REPO / TINY)
    cfg.model = {"_component_": "flexgen_long.models.from_hf_config", "checkpoint_dir": str(base) if base else "x",
                 "max_seq_len": 256, "full_layers": "retrieval:1",
                 "sparse_pattern": {"_component_": "flexgen_long.patterns.AttnSink", "sink": 4, "window": 60}}
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"output_dir={out}", f"checkpoint.base_dir={base}", *SMALL,
                                                        *overrides]))


def _full(model) -> list[int]:
    return [i for i, layer in enumerate(model.layers) if layer.attn.pattern == Full()]


def test_retrieval_layers_are_chosen_once_and_survive_save_load_resume(planted_base, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    caplog.set_level("INFO")
    _run(_cfg(out, planted_base, "max_steps=2"))
    assert "Full layers: full_layers 'retrieval:1': 1 of 6 layers [4]" in caplog.text
    assert "rank  layer  copy   needle mass  full" in caplog.text          # the ranking is logged
    record = json.loads((out / rt.CHOICE_FILE).read_text())
    assert record["choice"]["layers"] == [4] and record["choice"]["ranking"][0] == 4
    assert record["choice"]["source"] == str(planted_base.resolve())
    assert len(record["scores"]["copy_score"]) == 6 and record["scores"]["recompute_max_rel_error"] < 1e-3
    assert record["scores"]["length"] == 1008 and record["seconds_with_loading"] > 0  # 1024 - 16: the base's RoPE
    for step in ("step_1", "step_2"):
        saved = hf.read_config(out / step)["flexgen_long"]
        assert saved["model"]["full_layers"] == [4]
        assert saved["recipe"][rt.CHECKPOINT_KEY] == record["choice"]
        assert _full(hf.load_model(out / step)) == [4]                   # every later load: the same layers

    # resume: the layers come from the checkpoint; scoring again would fail the test
    def no_scoring(*a, **k):
        raise AssertionError("scored again")
    monkeypatch.setattr(rt, "score_model_dir", no_scoring)
    caplog.clear()
    resumed = _run(_cfg(out, planted_base, "max_steps=3", "checkpoint.resume=true"))
    assert f"Full layers from {out / 'step_2'} (no new scoring)" in caplog.text
    assert _full(resumed._model) == [4] and _full(hf.load_model(out / "step_3")) == [4]
    assert hf.read_config(out / "step_3")["flexgen_long"]["recipe"][rt.CHECKPOINT_KEY] == record["choice"]

    # a run killed after scoring, before its first checkpoint: resume reads output_dir's record
    early = tmp_path / "early"
    early.mkdir()
    (early / rt.CHOICE_FILE).write_text((out / rt.CHOICE_FILE).read_text())
    caplog.clear()
    again = _run(_cfg(early, planted_base, "max_steps=1", "checkpoint.resume=true"))
    assert f"Full layers from {early / rt.CHOICE_FILE} (no new scoring)" in caplog.text and _full(again._model) == [4]
    # ... unless it was scored with other arguments: then it is scored again (here: refused by the stub)
    (tmp_path / "early2").mkdir()
    (tmp_path / "early2" / rt.CHOICE_FILE).write_text((out / rt.CHOICE_FILE).read_text())
    with pytest.raises(AssertionError, match="scored again"):
        _run(_cfg(tmp_path / "early2", planted_base, "max_steps=1", "checkpoint.resume=true",
                  "retrieval_scoring.samples_per_depth=2"))

    # resuming with another budget, or with the layers given another way, is refused naming the field
    with pytest.raises(ValueError, match=r"config field 'model.full_layers': is 'retrieval:2' but .*step_3 was "
                                         r"trained with full_layers \[4\] \(chosen for 'retrieval:1'\)"):
        _run(_cfg(out, planted_base, "max_steps=4", "checkpoint.resume=true", "model.full_layers=retrieval:2"))


BAD = [
    (["model.full_layers=retrieval:0"], r"config field 'model.full_layers': full_layers 'retrieval:0': the layer "
                                        r"count must be an int >= 1"),
    (["model.full_layers=retrieval:7"], r"config field 'model.full_layers': full_layers 'retrieval:7': the layer "
                                        r"count must be an int in \[1, 6\]"),
    (["model.full_layers=retrieval:abc"], r"config field 'model.full_layers': full_layers 'retrieval:abc': expected "
                                          r"'retrieval'"),
    (["model.full_layers=retrieval:1.5"], r"config field 'model.full_layers': .*'retrieval:<f>' \(a fraction in"),
    (["checkpoint.base_dir=null", "model._component_=flexgen_long.models.longgen_tiny", "~model.checkpoint_dir",
      "~model.max_seq_len"],
     r"config field 'model.full_layers': 'retrieval:1' places the full layers on a pretrained model's retrieval "
     r"heads, but checkpoint.base_dir is null \(random init has none\)"),
    (["retrieval_scoring.length=64"], r"config field 'retrieval_scoring.length': must be null or an int >= 128, got 64"),
    (["retrieval_scoring.batch=4"], r"unknown config key 'retrieval_scoring.batch' \(did you mean "
                                    r"'retrieval_scoring.batch_size'\?\)"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_retrieval_values_fail_in_one_line_before_anything_is_touched(planted_base, tmp_path, overrides,
                                                                          message):
    cfg = _cfg(tmp_path / "run", planted_base)
    from torchtune.config._utils import _merge_yaml_and_cli_args
    from argparse import Namespace
    cfg = _merge_yaml_and_cli_args(Namespace(**OmegaConf.to_container(cfg)), overrides)
    with pytest.raises(ValueError, match=message) as e:
        _run(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # not even output_dir was created


def test_plan_counts_as_many_full_layers(planted_base, capsys):
    """recipes/longgen_plan.py checks and plans a retrieval config without scoring: as many full layers."""
    from recipes.longgen_plan import main
    plan = main(["--config", str(REPO / TINY), "--world-size", "1", "model._component_=flexgen_long.models."
                 "from_hf_config", f"model.checkpoint_dir={planted_base}", f"checkpoint.base_dir={planted_base}",
                 "~model.vocab_size", "model.full_layers=retrieval:1", "model.max_seq_len=1024",
                 "model.sparse_pattern.window=60"])
    assert len(plan.shape.full_layers) == 1


def test_layers_command_prints_the_ranking_and_the_config_line(planted_base, tmp_path, capsys):
    cli = load_script("recipes/longgen_layers.py", "longgen_layers")
    out = tmp_path / "choice.json"
    choice = cli.main([str(planted_base), "--full-layers", "retrieval:1", "--tokenizer", "bytes", "--device", "cpu",
                       "--samples", "2", "--json", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "model.full_layers=[4]" and choice.layers == [4]
    assert lines[0].startswith(f"Retrieval scores of {planted_base}: 6 layers (Full()), 10 passkey prompts of 1008 "
                               "tokens, cpu float32")
    assert lines[2].split()[:2] == ["1", "4"] and lines[2].split()[-1] == "yes"
    assert json.loads(out.read_text())["choice"] == choice.to_dict()
    with pytest.raises(SystemExit, match=r"^error: .*\(MODEL_DIR\) holds neither tokenizer.json nor tokenizer.model: "
                                         r"give --tokenizer DIR"):
        cli.main([str(planted_base), "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"^error: --full-layers: full_layers 'middle' is not a retrieval budget"):
        cli.main([str(planted_base), "--full-layers", "middle"])
    with pytest.raises(SystemExit, match=r"^error: --device: must be 'cpu', 'cuda' or 'cuda:<index>', got 'tpu'"):
        cli.main([str(planted_base), "--device", "tpu"])
    with pytest.raises(SystemExit, match=r"^error: length must be >= 128"):
        cli.main([str(planted_base), "--tokenizer", "bytes", "--device", "cpu", "--length", "100"])
