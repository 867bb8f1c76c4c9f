"""recipes/longgen_finetune.py: the CLI exactly as a user types it, exact resume, checkpoints that reload (into our
model and into transformers), and bad configs refused before any training."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from flexgen_long import checkpoint_io as ckpt

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")  # the venv's console script, as the README's setup installs it
TINY = "recipes/configs/tiny_longgen.yaml"
# The tiny job, shrunk to seconds: shorter sequences, fewer tokens, every step logged.
SMALL = ["seq_len=256", "model.max_seq_len=256", "dataset.max_tokens=30000", "dataset.synthetic_length=200",
         "dataset.synthetic_tasks=[passkey]",  # 4 multi-key needles alone outgrow a 256-token sequence
         "batch_size=2", "gradient_accumulation_steps=2", "log_every_n_steps=1", "lr_scheduler.num_warmup_steps=2"]


def _tune(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user's shell: no PYTHONPATH
    return subprocess.run([TUNE, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _losses(text: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"Step (\d+) \| loss:([0-9.]+)", text)}


def _cfg(out: Path, *overrides):
    cfg = OmegaConf.load(REPO / TINY)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"output_dir={out}", *SMALL, *overrides]))


def _run(cfg):
    from recipes.longgen_finetune import LongGenFinetuneRecipe

    recipe = LongGenFinetuneRecipe(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()
    return recipe


def _disk_losses(log_dir: Path) -> dict[int, float]:
    return _losses("".join(p.read_text() for p in sorted(log_dir.glob("*.txt"))))


def _disk(log_dir):
    return ["metric_logger._component_=torchtune.training.metric_logging.DiskLogger", f"metric_logger.log_dir={log_dir}"]


# -- the command line --------------------------------------------------------------------------------------------------
def test_tune_run_tiny_config_as_typed(tmp_path):
    out = tmp_path / "run"
    r = _tune("run", "recipes/longgen_finetune.py", "--config", TINY, f"output_dir={out}", *SMALL, "max_steps=12",
              "checkpoint.save_every_n_steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _losses(r.stdout)
    assert sorted(losses) == list(range(1, 13))
    first, last = sum(losses[s] for s in (1, 2)) / 2, sum(losses[s] for s in (11, 12)) / 2
    assert last < first - 0.5, losses  # bytes start near ln(259) = 5.56; unigram statistics alone take > 0.5 off
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_6", "step_12"]
    assert {"model.safetensors", "config.json", "recipe_state.pt"} <= {p.name for p in (out / "step_12").iterdir()}


def test_tune_run_torchrun_path_resolves(tmp_path):
    # `tune run --nproc_per_node N <recipe>` launches `python -m recipes.longgen_finetune` through torchrun
    r = _tune("run", "--nproc_per_node", "1", "recipes/longgen_finetune.py", "--config", TINY,
              f"output_dir={tmp_path}", *SMALL, "max_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Running with torchrun" in r.stdout and _losses(r.stdout).keys() == {1}
    assert ckpt.latest_checkpoint(tmp_path).name == "step_1"


def test_cli_refuses_unknown_key(tmp_path):
    r = _tune("run", "recipes/longgen_finetune.py", "--config", TINY, f"output_dir={tmp_path}", "learning_rate=1e-3")
    assert r.returncode != 0
    assert "unknown config key(s) ['learning_rate']" in r.stderr
    assert not ckpt.list_checkpoints(tmp_path)


def test_torchtune_builtins_unaffected(tmp_path):
    r = _tune("ls", timeout=120)
    assert r.returncode == 0 and "full_finetune_single_device" in r.stdout
    # where no project `recipes` exists, `import recipes` still reaches torchtune's stub and its own message
    r = subprocess.run([sys.executable, "-c", "import recipes"], cwd=tmp_path, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode != 0 and "The torchtune recipes directory isn't a package" in r.stderr


# -- resume and checkpoints (in-process: no interpreter start-ups) --------------------------------------------------------
def test_resume_continues_the_same_loss_curve(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["max_steps=6", "checkpoint.save_every_n_steps=3", "checkpoint.keep_last_n=null"]
    full = _run(_cfg(a, *common, *_disk(tmp_path / "log_a")))
    straight = _disk_losses(tmp_path / "log_a")
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    # a run killed right after its step-3 checkpoint: its output_dir holds exactly that checkpoint
    b.mkdir()
    shutil.copytree(a / "step_3", b / "step_3")
    resumed = _run(_cfg(b, *common, "checkpoint.resume=true", *_disk(tmp_path / "log_b")))
    again = _disk_losses(tmp_path / "log_b")
    assert again == {s: straight[s] for s in (4, 5, 6)}  # identical floats, not approximately equal
    for (k, v), (k2, v2) in zip(full._model.state_dict().items(), resumed._model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_checkpoint_reloads_into_our_model(tmp_path):
    recipe = _run(_cfg(tmp_path, "max_steps=2"))
    model = ckpt.load_model(tmp_path / "step_2")
    batch = recipe._batch(0)
    recipe._model.eval()
    with torch.no_grad():
        want = recipe._model(batch["tokens"], doc_ids=batch["doc_ids"])
        got = model(batch["tokens"], doc_ids=batch["doc_ids"])
    assert torch.equal(want, got)


def test_full_attention_checkpoint_loads_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    _run(_cfg(tmp_path, "max_steps=2", "model.full_layers=all"))
    ours = ckpt.load_model(tmp_path / "step_2").eval()
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "step_2", attn_implementation="eager").eval()
    tokens = torch.randint(0, 256, (2, 200))
    with torch.no_grad():
        want, got = ours(tokens), hf(tokens).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_killed_checkpoint_write_leaves_latest_intact(tmp_path, monkeypatch):
    recipe = _run(_cfg(tmp_path, "max_steps=1"))
    before = (tmp_path / "step_1" / "model.safetensors").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt.torch, "save", killed)  # recipe_state.pt is written after the weights
    recipe.global_step = 2
    with pytest.raises(KeyboardInterrupt):
        recipe.save_checkpoint(epoch=0)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_1"
    assert (tmp_path / "step_1" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.glob(".step_2.tmp-*")]  # the torn write is only a hidden temp dir
    assert ckpt.remove_stale_temp_dirs(tmp_path) and not list(tmp_path.glob(".step_*"))


# -- bad configs: a clear error naming the field, before any training --------------------------------------------------------
BAD = [
    (["learning_rate=1e-3"], ValueError, r"unknown config key\(s\) \['learning_rate'\]"),
    (["checkpoint.every=5"], ValueError, r"unknown config key\(s\) \['checkpoint.every'\]"),
    (["dataset.source=/nonexistent/corpus"], FileNotFoundError, r"dataset.source='/nonexistent/corpus': no such file"),
    (["seq_len=512"], ValueError, r"config field 'seq_len': 512 exceeds model.max_seq_len=256"),
    (["model.sparse_pattern.window=300"], ValueError,
     r"config field 'model.sparse_pattern': AttnSink\(sink=4, window=300\).*sees every key"),
    (["model.num_layerz=3"], ValueError, r"config section 'model'.*num_layerz"),
    (["max_steps=0"], ValueError, r"config field 'max_steps': must be an int >= 1"),
    (["checkpoint.base_dir=/nonexistent/llama"], ValueError, r"config field 'checkpoint.base_dir'"),
]


@pytest.mark.parametrize("overrides,exc,message", BAD, ids=[b[0][0].split("=")[0] for b in BAD])
def test_bad_config_is_refused_before_training(tmp_path, overrides, exc, message):
    with pytest.raises(exc, match=message):
        _run(_cfg(tmp_path, *overrides))
    assert not ckpt.list_checkpoints(tmp_path)


@pytest.mark.parametrize("pattern,message", [
    ({"block": 128, "local_blocks": 1, "vertical_stride": 2}, r"BlockSparse.block=128 of layer 0 must divide "
                                                              r"seq_len=192"),
    ({"block": 64, "local_blocks": 3, "vertical_stride": 2}, r"local_blocks \* block < seq_len"),
])
def test_block_sparse_that_does_not_fit_is_refused(tmp_path, pattern, message):
    cfg = _cfg(tmp_path, "seq_len=192")
    cfg.model.sparse_pattern = {"_component_": "flexgen_long.patterns.BlockSparse", **pattern}
    with pytest.raises(ValueError, match=r"config field 'model.sparse_pattern': .*" + message):
        _run(cfg)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "recipes" / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(name, tmp_path):
    """Keys, model shape (built on the meta device: no memory at 7B), RoPE length and pattern fit of each config."""
    from recipes.longgen_finetune import validate_config, validate_model
    from torchtune import config

    cfg = OmegaConf.load(REPO / "recipes" / "configs" / f"{name}.yaml")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"checkpoint.base_dir={tmp_path}"]))
    validate_config(cfg)
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    validate_model(model, cfg.seq_len)
    full = [i for i, layer in enumerate(model.layers) if type(layer.attn.pattern).__name__ == "Full"]
    n = len(model.layers)
    if "_full_" in name:
        assert full == list(range(n))
    else:  # LongGen: the middle third full, the rest sparse
        assert 0 < len(full) < n and full[0] > 0 and full[-1] < n - 1

