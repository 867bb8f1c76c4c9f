"""``python -m flexgen_long.export_hf``: the README's lines as typed, the layout a checkpoint records or the options
give, and the refusals (a non-empty OUT, layout options for a trained checkpoint, bad options) -- each in one line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flexgen_long import checkpoint_io, hf
from flexgen_long.export_hf import export_hf, main
from flexgen_long.models import longgen_tiny, relayout
from flexgen_long.patterns import AttnSink, BlockSparse

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _tiny_run(root: Path, steps=(50, 100)) -> Path:
    """outputs/tiny_longgen as the README's finetuning command leaves it (a random tiny model, two checkpoints)."""
    cfg = {"_component_": "flexgen_long.models.longgen_tiny", "vocab_size": 259}
    model = longgen_tiny(vocab_size=259)
    for step in steps:
        checkpoint_io.save_checkpoint(root / "outputs" / "tiny_longgen", step, model.state_dict(),
                                      checkpoint_io.hf_config(model, cfg))
    return root / "outputs" / "tiny_longgen"


def test_readme_section_runs_as_typed(tmp_path):
    section = README.split("## As a transformers model", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).split("  #")[0].split()
    code = re.search(r"```py\n(.*?)```", section, re.S).group(1)
    _tiny_run(tmp_path)
    # this checkout's package, as an installed one would be found from any directory
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    assert command[:3] == ["python", "-m", "flexgen_long.export_hf"]
    r = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step_100" in r.stdout  # a run's output_dir means its latest checkpoint
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 -- the README's own code
    finally:
        os.chdir(cwd)
    model = namespace["model"]
    assert type(model).__name__ == "LongGenLlamaForCausalLM"
    assert model.config.layer_types == ["sink_attention", "full_attention", "sink_attention", "sink_attention"]
    ours = hf.load_model(tmp_path / "outputs" / "tiny_longgen" / "step_100").eval()
    x = torch.randint(0, 259, (1, 150))  # longer than sink + window (4 + 60)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        assert (model(x).logits - ours(x)).abs().max().item() < 1e-4


def test_a_non_empty_out_is_refused_unless_overwrite(tmp_path, capsys):
    run = _tiny_run(tmp_path, steps=(1,))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([str(run), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "OUT" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"  # nothing touched
    assert main([str(run), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".hf.tmp-*"))  # the temporary directory became OUT


def test_a_finetune_checkpoint_keeps_its_layout(tmp_path, capsys):
    run = _tiny_run(tmp_path, steps=(1,))
    assert main([str(run / "step_1"), str(tmp_path / "hf"), "--sink", "4", "--window", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "finetune checkpoint" in err and "layout options" in err


LLAMA3_TIED = dict(tie_word_embeddings=True, rope_theta=500_000.0, rope_scaling={
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64})


@pytest.mark.parametrize("kw, options, pattern, fields", [
    ({}, ["--block-sparse", "16,2,3,per_head"], BlockSparse(16, 2, 3, per_head=True),
     {"block_sparse": {"block": 16, "local_blocks": 2, "vertical_stride": 3, "per_head": True}}),
    (LLAMA3_TIED, ["--sink", "4", "--window", "16"], AttnSink(4, 16),
     {"attention_sink_size": 4, "sliding_window": 16}),
], ids=["block-sparse", "sink-llama3-rope-tied"])
def test_an_hf_llama_exports_with_the_layout_options(tmp_path, kw, options, pattern, fields):
    """A Llama written by transformers itself, exported with a layout, equals our model of the same directory relaid
    out the same way (RoPE scaling and tied embeddings carried over)."""
    from transformers import AutoModelForCausalLM

    import flexgen_long.hf_model  # noqa: F401 -- registers the model type

    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **kw)
                     ).save_pretrained(tmp_path / "llama")
    assert main([str(tmp_path / "llama"), str(tmp_path / "hf"), "--full-layers", "1", *options]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    kind = "block_sparse_attention" if isinstance(pattern, BlockSparse) else "sink_attention"
    assert cfg["layer_types"] == [kind, "full_attention", kind]
    assert {k: cfg[k] for k in fields} == fields
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = relayout(hf.load_model(tmp_path / "llama").eval(), [1], pattern)
    x = torch.randint(0, 256, (1, 100))  # past original_max_position_embeddings: the llama3 scaling matters
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        assert (theirs(x).logits - ours(x)).abs().max().item() < 1e-4


@pytest.mark.parametrize("argv, message", [
    (["--sink", "4"], "--sink and --window go together"),
    (["--sink", "4", "--window", "8", "--block-sparse", "16,2,3"], "not both"),
    (["--block-sparse", "16,2"], "--block-sparse must be BLOCK,LOCAL_BLOCKS,VERTICAL_STRIDE"),
])
def test_bad_layout_options_fail_naming_the_option(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), str(tmp_path / "hf"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "hf")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        export_hf(tmp_path / "empty", tmp_path / "hf")


def test_dtype_converts_the_weights(tmp_path):
    from safetensors import safe_open

    run = _tiny_run(tmp_path, steps=(1,))
    assert main([str(run), str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
