"""recipes/longgen_finetune.py: the CLI exactly as a user types it, exact resume, checkpoints that reload (into our
model and into transformers), and bad configs refused before any training."""

import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from flexgen_long import checkpoint_io as ckpt
from flexgen_long import hf

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")  # the venv's console script, as the README's setup installs it
TINY = "recipes/configs/tiny_longgen.yaml"
# The tiny job, shrunk to seconds: shorter sequences, fewer tokens, every step logged.
SMALL = ["seq_len=256", "model.max_seq_len=256", "dataset.max_tokens=30000", "dataset.synthetic_length=200",
         "dataset.synthetic_tasks=[passkey]",  # 4 multi-key needles alone outgrow a 256-token sequence
         "batch_size=2", "gradient_accumulation_steps=2", "log_every_n_steps=1", "lr_scheduler.num_warmup_steps=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tune(*args, timeout=300, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user's shell: no PYTHONPATH
    if "--nproc_per_node" in args:  # torchrun's rendezvous port (--master-port via its PET_ variable): a free one, so
        env["PET_MASTER_PORT"] = str(_free_port())  # that tests in parallel processes (pytest -n) never share 29500
    return subprocess.run([TUNE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _losses(text: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"Step (\d+) \| loss:([0-9.]+)", text)}


def _cfg(out: Path, *overrides):
    cfg = OmegaConf.load(REPO / TINY)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"output_dir={out}", *SMALL, *overrides]))


def _run(cfg):
    from recipes.longgen_finetune import LongGenFinetuneRecipe

    recipe = LongGenFinetuneRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.release()  # the output_dir lock, as recipe_main does
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
    # stdout: results, then the written paths last; stderr (a pipe here): progress as whole lines, no redraws
    assert r.stdout.strip().splitlines()[-2:] == [f"Wrote {out}/step_6", f"Wrote {out}/step_12"]
    assert "\r" not in r.stderr and re.search(r"^step 12 loss [0-9.]+: 12/12 \(\d+ s\)$", r.stderr, re.M), r.stderr
    assert "Skipping import of cpp extensions" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("recipe,schema", [("longgen_finetune", "FinetuneConfig"),
                                           ("longgen_generate", "GenerateConfig"), ("longgen_eval", "EvalConfig")])
def test_help_lists_every_key_of_the_recipe_schema(recipe, schema, capsys):
    """--help is drawn from the same schema the checks use: every key, its default, what it allows, its meaning."""
    import importlib

    from flexgen_long import recipe_config as rc

    module = importlib.import_module(f"recipes.{recipe}")
    assert module.recipe_main(["--help"]) == 0
    out = capsys.readouterr().out
    keys = list(rc.fields(getattr(module, schema)))
    assert len(keys) > 10
    for name, tp, f in keys:
        assert re.search(rf"^  {re.escape(name)} = ", out, re.M), name
        assert f"{f.metadata['help']} [{rc.describe(tp, dict(f.metadata))}]" in out, name


def test_progress_is_periodic_lines_off_a_terminal(monkeypatch, capsys):
    from flexgen_long import cli

    now = [0.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: now[0])
    bar = cli.progress(10, "train")
    for step in range(1, 11):
        now[0] += 4  # 4 s per step: a line once 10 s have passed since the last one
        bar.set_description(f"step {step}")
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["step 3: 3/10 (12 s, 28 s left)", "step 6: 6/10 (24 s, 16 s left)",
                     "step 9: 9/10 (36 s, 4 s left)", "step 10: 10/10 (40 s)"]


def test_save_final_false_trains_without_writing_the_last_checkpoint(tmp_path):
    """checkpoint.save_final=false (speed benchmarks): the periodic checkpoints are written, the one at the end is not,
    and a non-boolean value is refused naming the field."""
    cfg = _cfg(tmp_path, "max_steps=4", "checkpoint.save_every_n_steps=2", "checkpoint.save_final=false")
    _run(cfg)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_2"]
    from recipes.longgen_finetune import validate_config
    with pytest.raises(ValueError, match="checkpoint.save_final"):
        validate_config(_cfg(tmp_path / "x", "checkpoint.save_final=sometimes"))


def test_tune_run_torchrun_from_another_folder_with_absolute_paths(tmp_path):
    # `tune run --nproc_per_node N <recipe>` launches `python -m recipes.longgen_finetune` through torchrun; with an
    # absolute recipe path from another folder (which torchtune itself cannot turn into a module name) as well
    r = _tune("run", "--nproc_per_node", "1", str(REPO / "recipes" / "longgen_finetune.py"), "--config",
              str(REPO / TINY), f"output_dir={tmp_path / 'run'}", *SMALL, "max_steps=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Running with torchrun" in r.stdout and _losses(r.stdout).keys() == {1}
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_1"


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
    model = hf.load_model(tmp_path / "step_2")
    batch = recipe._batch(0)
    recipe._model.eval()
    with torch.no_grad():
        want = recipe._model(batch["tokens"], doc_ids=batch["doc_ids"])
        got = model(batch["tokens"], doc_ids=batch["doc_ids"])
    assert torch.equal(want, got)


@pytest.mark.parametrize("single_document", [True, False])
def test_batches_of_one_document_per_row_drop_the_document_mask(tmp_path, single_document):
    """Long-document data (every row one document) trains without doc_ids, so full layers get SDPA's causal kernel;
    the loss is the one the document mask gives. Packed short files keep their doc_ids."""
    data = ["dataset.synthetic_share=0", "dataset.min_document_tokens=30000"] if single_document else []
    cfg = _cfg(tmp_path, "max_steps=1", *data)
    from recipes.longgen_finetune import LongGenFinetuneRecipe

    recipe = LongGenFinetuneRecipe(cfg)
    try:
        recipe.setup(cfg)
        kept = 0
        for i in range(min(recipe._batches_per_epoch, 12)):
            batch = recipe._batch(i)
            if batch["doc_ids"] is not None:  # kept only where some row holds more than one document
                assert any(len(torch.unique(row)) > 1 for row in batch["doc_ids"]), i
                kept += 1
                continue
            with torch.no_grad():
                without = recipe._loss(batch)
                with_ids = recipe._loss({**batch, "doc_ids": torch.zeros_like(batch["tokens"], dtype=torch.int32)})
            assert torch.allclose(without, with_ids, rtol=1e-6, atol=1e-6), (i, without, with_ids)
        assert (kept == 0) if single_document else (kept > 0)
    finally:
        recipe.release()
    recipe.cleanup()


def test_full_attention_checkpoint_loads_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    _run(_cfg(tmp_path, "max_steps=2", "model.full_layers=all"))
    ours = hf.load_model(tmp_path / "step_2").eval()
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "step_2", attn_implementation="eager").eval()
    tokens = torch.randint(0, 256, (2, 200))
    with torch.no_grad():
        want, got = ours(tokens), theirs(tokens).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# -- nothing lost: reruns, two jobs in one folder, kills --------------------------------------------------------------------
def test_rerun_never_deletes_what_it_did_not_write(tmp_path, caplog):
    out = tmp_path / "run"
    _run(_cfg(out, "max_steps=2"))
    weights = (out / "step_2" / "model.safetensors").read_bytes()
    # the same command again (checkpoint.resume defaults to false): refused, naming what is there and both ways on
    with pytest.raises(ckpt.OutputDirNotEmpty, match=r"is not empty \(step_2, torchtune_config.yaml\) and this is a fresh run .* "
                                                     r"checkpoint.resume=true .* checkpoint.overwrite=true"):
        _run(_cfg(out, "max_steps=2"))
    # a field that used to be read only at step 1 (after the old checkpoints were gone) is refused before anything
    with pytest.raises(ValueError, match=r"config field 'clip_grad_norm': must be null or a number > 0, got 'abc'"):
        _run(_cfg(out, "max_steps=2", "checkpoint.overwrite=true", "clip_grad_norm=abc"))
    assert sorted(p.name for p in out.iterdir()) == [ckpt.LOCK_FILE, "step_2", "torchtune_config.yaml"]
    assert (out / "step_2" / "model.safetensors").read_bytes() == weights
    # resume continues next to it
    caplog.set_level("INFO")
    _run(_cfg(out, "max_steps=3", "checkpoint.resume=true"))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_2", "step_3"] and "Resumed from" in caplog.text
    assert (out / "step_2" / "model.safetensors").read_bytes() == weights
    # only an explicit overwrite deletes them, and says so
    _run(_cfg(out, "max_steps=1", "checkpoint.overwrite=true"))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_1"]
    assert "checkpoint.overwrite=true: deleted 2 old checkpoint(s)" in caplog.text and "step_2, step_3" in caplog.text


def test_resume_with_another_model_or_data_is_refused_naming_the_keys(tmp_path):
    _run(_cfg(tmp_path, "max_steps=2"))
    files = {p: p.read_bytes() for p in (tmp_path / "step_2").iterdir()}
    for change, named in [(["model.full_layers=none"], r"model.full_layers: 'middle' in step_2, 'none' now"),
                          (["model.sparse_pattern.window=50"], r"model.sparse_pattern.window: 60 in step_2, 50 now"),
                          (["dataset.max_tokens=20000"], r"dataset.max_tokens: 30000 in step_2, 20000 now"),
                          (["batch_size=1", "seq_len=128", "model.max_seq_len=128", "dataset.synthetic_length=100"],
                           r"batch_size: 2 in step_2, 1 now; .*seq_len: 256 in step_2, 128 now")]:
        with pytest.raises(ValueError, match=r"config field 'checkpoint.resume': .* was trained with a different "
                                             r"config.*" + named):
            _run(_cfg(tmp_path, "max_steps=4", "checkpoint.resume=true", *change))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_2"]
    assert {p: p.read_bytes() for p in (tmp_path / "step_2").iterdir()} == files


def test_output_dir_lock_names_its_owner_and_takes_over_from_a_dead_one(tmp_path, caplog):
    lock = ckpt.OutputDirLock(tmp_path)
    with pytest.raises(ckpt.OutputDirInUse, match=rf"in use by pid {os.getpid()} on host "):
        ckpt.OutputDirLock(tmp_path)  # a second holder, even in the same process
    lock.release()
    ckpt.OutputDirLock(tmp_path).release()  # a clean release leaves no record behind: no warning
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, with the record a killed owner leaves behind (its flock died with it)
    record = {"pid": dead.pid, "host": __import__("socket").gethostname(), "start_time": "1", "started": "earlier"}
    (tmp_path / ckpt.LOCK_FILE).write_text(json.dumps(record))
    messages = []
    ckpt.OutputDirLock(tmp_path, log=messages.append).release()
    assert messages == [f"Lock {tmp_path / ckpt.LOCK_FILE}: taking over a stale lock of pid {dead.pid} on host "
                        f"{record['host']} (started earlier, whose process no longer exists): that job ended without "
                        "releasing it (killed or crashed)"]


STEPS = 12  # checkpoints at every step, the last two kept: kills land in training steps, writes and deletions
KILL_RUN = ["checkpoint.save_every_n_steps=1", "checkpoint.keep_last_n=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The losses and final weights of the run that the killed runs must reproduce after resuming."""
    root = tmp_path_factory.mktemp("uninterrupted")
    recipe = _run(_cfg(root / "run", f"max_steps={STEPS}", *KILL_RUN, *_disk(root / "log")))
    return _disk_losses(root / "log"), {k: v.clone() for k, v in recipe._model.state_dict().items()}


# The recipe in a child process, as `python -m recipes.longgen_finetune` would run it. With a kill point k > 0 it
# SIGKILLs itself at the k-th I/O call of its checkpoint writes and deletions (before the call): every file write,
# fsync, rename and removal is a point, so a random k lands anywhere inside them -- the kernel's SIGKILL, no cleanup.
CHILD = r"""
import os, shutil, signal, sys
import safetensors.torch, torch
from flexgen_long import checkpoint_io

kill_at, calls, inside = int(sys.argv[1]), [0], [False]

def point(fn):
    def wrapped(*args, **kwargs):
        if inside[0]:
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapped

def io_region(fn):
    def wrapped(*args, **kwargs):
        inside[0] = True
        try:
            return fn(*args, **kwargs)
        finally:
            inside[0] = False
    return wrapped

if kill_at:
    os.fsync, os.rename, shutil.rmtree = point(os.fsync), point(os.rename), point(shutil.rmtree)
    torch.save, safetensors.torch.save_file = point(torch.save), point(safetensors.torch.save_file)
    checkpoint_io.save_checkpoint = io_region(checkpoint_io.save_checkpoint)
    checkpoint_io.remove_checkpoint = io_region(checkpoint_io.remove_checkpoint)
sys.argv = ["recipes/longgen_finetune.py", *sys.argv[2:]]
from recipes.longgen_finetune import recipe_main
recipe_main()
"""


def _child(out: Path, log_dir: Path, kill_at: int) -> subprocess.Popen:
    args = ["--config", TINY, f"output_dir={out}", *SMALL, f"max_steps={STEPS}", *KILL_RUN, *_disk(log_dir)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(kill_at), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _assert_every_checkpoint_whole(out: Path, why: str) -> None:
    """What a kill may leave: complete step_<N> directories (and hidden leftovers), never a torn one."""
    from safetensors.torch import load_file

    for p in ckpt.list_checkpoints(out):
        assert {f.name for f in p.iterdir()} == {ckpt.WEIGHTS_FILE, ckpt.CONFIG_FILE, ckpt.STATE_FILE,
                                                 hf.CHECKSUM_FILE}, (why, p)
        assert hf.verify_checksums(p), (why, p)
        step = json.loads((p / ckpt.CONFIG_FILE).read_text())["flexgen_long"]["step"]
        assert p.name == f"step_{step}" and load_file(p / ckpt.WEIGHTS_FILE), (why, p)
        assert torch.load(p / ckpt.STATE_FILE, weights_only=False)["global_step"] == step, (why, p)


def _resume_and_compare(out: Path, log_dir: Path, uninterrupted, why: str) -> None:
    straight, final = uninterrupted
    start = int(ckpt.latest_checkpoint(out).name.split("_")[1]) if ckpt.latest_checkpoint(out) else 0
    recipe = _run(_cfg(out, f"max_steps={STEPS}", *KILL_RUN, "checkpoint.resume=true", *_disk(log_dir)))
    again = _disk_losses(log_dir)
    assert again == {s: straight[s] for s in range(start + 1, STEPS + 1)}, why  # identical floats
    for k, v in recipe._model.state_dict().items():
        assert torch.equal(v, final[k]), (why, k)


def test_sigkill_at_a_random_point_of_a_checkpoint_write_then_resume(tmp_path, uninterrupted, caplog):
    seed = int.from_bytes(os.urandom(4), "little")
    kill_at = random.Random(seed).randint(1, 8 * STEPS)  # a save is 8 points; deletions add 2 each
    why = f"killed at I/O point {kill_at} (seed {seed})"
    child = _child(tmp_path / "run", tmp_path / "log_child", kill_at)
    output = child.communicate(timeout=300)[0]
    assert child.returncode == -signal.SIGKILL, (why, output[-3000:])  # 8 * STEPS < the points of a whole run
    _assert_every_checkpoint_whole(tmp_path / "run", why)
    caplog.set_level("INFO")
    _resume_and_compare(tmp_path / "run", tmp_path / "log_resumed", uninterrupted, why)
    assert f"taking over a stale lock of pid {child.pid}" in caplog.text, why
    assert not list((tmp_path / "run").glob(".step_*")), why  # leftovers recovered or removed, each logged


def test_two_jobs_one_folder_then_sigkill_at_a_random_time(tmp_path, uninterrupted, caplog):
    """A second job in a running job's output_dir is refused, naming the first; after the first is SIGKILLed (at a
    random moment) the second takes over its stale lock, resumes, and ends exactly where an uninterrupted run ends."""
    seed = int.from_bytes(os.urandom(4), "little")
    delay = random.Random(seed).uniform(0.0, 1.5)
    why = f"killed {delay:.2f} s after its first checkpoint (seed {seed})"
    out = tmp_path / "run"
    child = _child(out, tmp_path / "log_child", 0)
    try:
        deadline = time.monotonic() + 240
        while not (out / "step_1").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "step_1").exists(), child.communicate()[0][-3000:] if child.poll() is not None else "timeout"
        child.send_signal(signal.SIGSTOP)  # paused, still holding its lock, while the second job tries
        for mode in ("checkpoint.resume=true", "checkpoint.overwrite=true"):
            with pytest.raises(ckpt.OutputDirInUse, match=rf"in use by pid {child.pid} on host .*wait for that job "
                                                          "to end, or choose another output_dir"):
                _run(_cfg(out, f"max_steps={STEPS}", *KILL_RUN, mode))
        child.send_signal(signal.SIGCONT)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
    finally:
        output = child.communicate(timeout=60)[0]
    assert child.returncode in (-signal.SIGKILL, 0), (why, output[-3000:])
    # a kill during the interpreter's exit, after the run released its lock (emptied its record), leaves nothing stale
    lock = out / ckpt.LOCK_FILE
    stale = lock.exists() and lock.stat().st_size > 0
    _assert_every_checkpoint_whole(out, why)
    caplog.set_level("INFO")
    _resume_and_compare(out, tmp_path / "log_resumed", uninterrupted, why)
    if stale:
        assert f"taking over a stale lock of pid {child.pid}" in caplog.text, why


# -- bad configs: a clear error naming the field, before anything is touched ----------------------------------------------
BAD = [
    (["learning_rate=1e-3"], ValueError, r"^unknown config key 'learning_rate'; the recipe's --help lists every key$"),
    (["max_step=300"], ValueError, r"^unknown config key 'max_step' \(did you mean 'max_steps'\?\)"),
    (["checkpoint.keep_last=1"], ValueError,
     r"^unknown config key 'checkpoint.keep_last' \(did you mean 'checkpoint.keep_last_n'\?\)"),
    (["checkpoint.every=5"], ValueError, r"unknown config key 'checkpoint.every'"),
    (["dataset.source=/nonexistent/corpus"], FileNotFoundError, r"dataset.source='/nonexistent/corpus': no such file"),
    (["seq_len=512"], ValueError, r"config field 'seq_len': 512 exceeds model.max_seq_len=256"),
    (["model.sparse_pattern.window=300"], ValueError,
     r"config field 'model.sparse_pattern': AttnSink\(sink=4, window=300\).*sees every key"),
    (["model.num_layerz=3"], ValueError, r"config field 'model.num_layerz': is not an argument of "
                                         r"flexgen_long.models.longgen_tiny"),
    (["model.sparse_pattern.sink=four"], ValueError, r"config field 'model.sparse_pattern.sink': must be an int, "
                                                     r"got 'four'"),
    (["max_steps=0"], ValueError, r"config field 'max_steps': must be an int >= 1, got 0"),
    (["model.rope_base=-1"], ValueError, r"config field 'model.rope_base': must be a number > 0, got -1"),
    (["model.rope_base=0"], ValueError, r"config field 'model.rope_base': must be a number > 0, got 0"),
    (["lr_scheduler.num_warmup_steps=-1"], ValueError,
     r"config field 'lr_scheduler.num_warmup_steps': must be an int >= 0, got -1"),
    (["lr_scheduler.num_warmup_steps=1e6"], ValueError,
     r"config field 'lr_scheduler.num_warmup_steps': must be an int, got 1000000.0"),
    (["on_nonfinite=ignore"], ValueError, r"config field 'on_nonfinite': must be one of \['stop', 'skip'\]"),
    (["dataset.source=python-stdlib", "dataset.max_tokens=100"], ValueError,
     r"dataset.max_tokens must be null or an int >= seq_len=256, got 100"),
    (["max_steps=abc"], ValueError, r"config field 'max_steps': must be an int >= 1, got 'abc'"),
    (["checkpoint.base_dir=/nonexistent/llama"], ValueError,
     r"config field 'checkpoint.base_dir': '/nonexistent/llama' does not exist"),
    (["clip_grad_norm=abc"], ValueError, r"config field 'clip_grad_norm': must be null or a number > 0, got 'abc'"),
    (["seed=abc"], ValueError, r"config field 'seed': must be null or an int in \[0, 4294967295\], got 'abc'"),
    (["seed=-1"], ValueError, r"config field 'seed': must be null or an int in \[0, 4294967295\], got -1"),
    (["seed=4294967296"], ValueError, r"config field 'seed': must be null or an int in \[0, 4294967295\], got 42"),
    (["clip_grad_norm=0"], ValueError, r"config field 'clip_grad_norm': must be null or a number > 0, got 0"),
    (["clip_grad_norm=.nan"], ValueError, r"config field 'clip_grad_norm': must be null or a number > 0, got nan"),
    (["batch_size=true"], ValueError, r"config field 'batch_size': must be an int >= 1, got True"),
    (["gradient_accumulation_steps=0"], ValueError, r"'gradient_accumulation_steps': must be an int >= 1, got 0"),
    (["batch_size=1.5"], ValueError, r"config field 'batch_size': must be an int >= 1, got 1.5"),
    (["checkpoint.keep_last_n=0"], ValueError, r"'checkpoint.keep_last_n': must be null or an int >= 1, got 0"),
    (["checkpoint.save_every_n_steps=0"], ValueError, r"'checkpoint.save_every_n_steps': must be null or an int >= 1"),
    (["optimizer.betas=[0.9]"], ValueError, r"config field 'optimizer.betas': must be a list of 2 numbers, got"),
    (["optimizer.lr=abc"], ValueError, r"config field 'optimizer.lr': must be a number, got 'abc'"),
    (["optimizer.lr=.nan"], ValueError, r"config field 'optimizer.lr': must be a number, got nan"),
    (["optimizer.lr=-1"], ValueError, r"config section 'optimizer': Invalid learning rate: -1"),
    (["optimizer._component_=torch.optim.AdamWW"], ValueError,
     r"config field 'optimizer._component_': 'torch.optim.AdamWW' cannot be imported"),
    (["lr_scheduler.num_warmup_steps=abc"], ValueError,
     r"config field 'lr_scheduler.num_warmup_steps': must be an int, got 'abc'"),
    (["lr_scheduler.num_training_steps=5"], ValueError,
     r"config field 'lr_scheduler.num_training_steps': is set by the recipe from max_steps"),
    (["checkpoint.resume=maybe"], ValueError, r"config field 'checkpoint.resume': must be true or false, got 'maybe'"),
    (["checkpoint.resume=true", "checkpoint.overwrite=true"], ValueError,
     r"config field 'checkpoint.overwrite': is true together with checkpoint.resume=true: choose one"),
    (["dataset.on_invalid_utf8=ignore"], ValueError,
     r"config field 'dataset.on_invalid_utf8': must be one of \['error', 'skip'\], got 'ignore'"),
    (["dataset.synthetic_share=1.5"], ValueError, r"dataset.synthetic_share must be a number in \[0, 1\), got 1.5"),
    (["dataset.min_document_tokens=1"], ValueError,
     r"config field 'dataset.min_document_tokens': must be null \(one file = one document\) or an int >= 2"),
    (["device=tpu"], ValueError, r"config field 'device': must be 'cpu', 'cuda' or 'cuda:<index>', got 'tpu'"),
    (["dtype=fp16"], ValueError, r"config field 'dtype': must be one of \['fp32', 'bf16'\], got 'fp16'"),
    (["flex_backend=cudnn"], ValueError, r"config field 'flex_backend': must be null or one of \['triton', 'flash'\], got 'cudnn'"),
    (["log_peak_memory_stats=2"], ValueError, r"config field 'log_peak_memory_stats': must be true or false, got 2"),
    (["metric_logger._component_=torchtune.training.metric_logging.DiskLogger"], ValueError,
     r"config field 'metric_logger': torchtune.training.metric_logging.DiskLogger needs log_dir, which the section "
     r"does not give \(add metric_logger.log_dir=<value>\)"),
    (["metric_logger._component_=torchtune.nope.Logger"], ValueError,
     r"config field 'metric_logger._component_': 'torchtune.nope.Logger' cannot be imported"),
    (["model.vocab_size=256"], ValueError, r"config section 'tokenizer': the tokenizer has 259 ids \(0..258\) but the "
                                           r"model's vocabulary has 256"),
]
if not torch.cuda.is_available():
    BAD.append((["flex_backend=flash"], ValueError, r"config field 'flex_backend': 'flash' cannot run on cpu: the model is on cpu"))
    BAD.append((["device=cuda"], ValueError, r"config field 'device': 'cuda' was requested but this machine has no "
                                             r"usable CUDA device"))


@pytest.mark.parametrize("overrides,exc,message", BAD, ids=["+".join(b[0]) for b in BAD])
def test_bad_config_is_refused_before_anything_is_touched(tmp_path, overrides, exc, message):
    with pytest.raises(exc, match=message):
        _run(_cfg(tmp_path / "run", *overrides))
    assert not (tmp_path / "run").exists()  # not even output_dir was created


def test_cli_prints_the_error_not_a_traceback(tmp_path):
    """From another folder, with absolute paths (tune run imports the recipe file from its own folder), a bad field
    ends the command with exit code 1 and one line naming it -- no traceback through library code."""
    r = _tune("run", str(REPO / "recipes" / "longgen_finetune.py"), "--config", str(REPO / TINY),
              f"output_dir={tmp_path / 'run'}", "optimizer.lr=abc", cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: config field 'optimizer.lr': must be a number, got 'abc'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("pattern,message", [
    ({"block": 128, "local_blocks": 1, "vertical_stride": 2}, r"BlockSparse\(block=128.* of layer 0: its block=128 "
                                                              r"must divide seq_len=192"),
    ({"block": 64, "local_blocks": 3, "vertical_stride": 2}, r"of layer 0 sees every key of a seq_len=192 sequence"),
])
def test_block_sparse_that_does_not_fit_is_refused(tmp_path, pattern, message):
    cfg = _cfg(tmp_path, "seq_len=192", "dataset.synthetic_length=128")
    cfg.model.sparse_pattern = {"_component_": "flexgen_long.patterns.BlockSparse", **pattern}
    with pytest.raises(ValueError, match=r"config field 'model.sparse_pattern': .*" + message):
        _run(cfg)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "recipes" / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(name, tmp_path, request):
    """Each config against what it really needs: keys, types, model shape (built on the meta device: no memory at
    7B), RoPE length and pattern fit, and -- for the Llama configs -- a base model directory whose config.json has the
    model's shape, its weights file and the tokenizer file the config points to, and a data source. Each missing or
    mismatched requirement is refused, naming its field. A config whose model and tokenizer read the base directory
    (from_hf_config, hf_tokenizer) gets the real one (SmolLM2) and must fit it."""
    from recipes.longgen_finetune import validate_config, validate_model
    from torchtune import config

    from flexgen_long.tokenizers import check_fits

    cfg = OmegaConf.load(REPO / "recipes" / "configs" / f"{name}.yaml")
    reads_base = cfg.model.get("_component_") == "flexgen_long.models.from_hf_config"
    if reads_base:  # the model section reads the base directory's config.json: it must exist before instantiating
        base = request.getfixturevalue("smollm2_dir")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"checkpoint.base_dir={base}"]))
    # the GPU configs say device: cuda, which is refused on a machine without one (tested below); check the rest here
    on_this_machine = [] if cfg.device == "cpu" or torch.cuda.is_available() else ["device=cpu"]
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    full = [i for i, layer in enumerate(model.layers) if type(layer.attn.pattern).__name__ == "Full"]
    n = len(model.layers)
    if "_full_" in name:
        assert full == list(range(n))
    else:  # LongGen: the middle third full, the rest sparse
        assert 0 < len(full) < n and full[0] > 0 and full[-1] < n - 1
    if not OmegaConf.is_missing(cfg.checkpoint, "base_dir") and cfg.checkpoint.base_dir is None:  # the tiny job: random init, stdlib text, byte tokenizer
        validate_config(cfg)
        validate_model(model, cfg)
        return
    if reads_base:  # the real base directory: its config.json fits the model, its tokenizer the model's vocabulary
        validate_config(cfg)
        validate_model(model, cfg)
        check_fits(config.instantiate(cfg.tokenizer), model.tok_embeddings.num_embeddings)
        return
    if on_this_machine:
        with pytest.raises(ValueError, match="config field 'device': 'cuda' was requested but this machine has no"):
            validate_config(cfg)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("long text\n")
    with pytest.raises(ValueError, match=r"config field 'checkpoint.base_dir': is required \(the config leaves it"):
        validate_config(OmegaConf.merge(cfg, OmegaConf.from_dotlist([*on_this_machine, f"dataset.source={corpus}"])))

    def base_dir(path, **change):
        path.mkdir()
        (path / "config.json").write_text(json.dumps({**ckpt.hf_config(model), **change}))
        (path / "model.safetensors").write_bytes(b"")  # present; reading it is the loader's business
        for tok in ("tokenizer.model", "original/tokenizer.model"):
            (path / tok).parent.mkdir(exist_ok=True)
            (path / tok).write_bytes(b"")
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist([*on_this_machine, f"checkpoint.base_dir={path}",
                                                            f"dataset.source={corpus}"]))

    good = base_dir(tmp_path / "base")
    no_data = good.copy()
    no_data.dataset.source = "???"  # as shipped
    with pytest.raises(ValueError, match=r"config field 'dataset.source': is required"):
        validate_config(no_data)
    validate_config(good)
    validate_model(model, good)
    other = base_dir(tmp_path / "other", num_hidden_layers=n + 1)
    with pytest.raises(ValueError, match=rf"config section 'model' builds a model that does not fit "
                                         rf".*other/config.json: num_layers={n} \(config.json num_hidden_layers="
                                         rf"{n + 1}\)"):
        validate_model(model, other)
    Path(good.tokenizer.path).unlink()
    with pytest.raises(ValueError, match=r"config field 'tokenizer.path': '.*tokenizer.model' does not exist"):
        validate_config(good)
    (tmp_path / "base" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"config field 'checkpoint.base_dir': .*: no \*.safetensors weight files"):
        validate_config(good)


def test_base_checkpoint_of_other_sizes_is_refused_before_training(tmp_path, smollm2_dir):
    """The tiny model section over a real base directory: refused from config.json alone, naming the fields."""
    with pytest.raises(ValueError, match=r"config section 'model' builds a model that does not fit .*config.json: "
                                         r"vocab_size=259 \(config.json vocab_size=49152\); num_layers=4"):
        _run(_cfg(tmp_path / "run", f"checkpoint.base_dir={smollm2_dir}"))
    assert not (tmp_path / "run").exists()  # not even output_dir was created


@pytest.mark.parametrize("overrides", [["seed=0"], ["seed=4294967295"], ["seed=null"], ["lr_scheduler.num_warmup_steps=0"],
                                       ["lr_scheduler.num_warmup_steps=100"], ["clip_grad_norm=1e-9"],
                                       ["checkpoint.keep_last_n=1", "checkpoint.save_every_n_steps=1"],
                                       ["gradient_accumulation_steps=1"], ["on_nonfinite=skip"], ["checkpoint=null"]])
def test_range_boundaries_are_accepted(tmp_path, overrides):
    """The other side of every boundary the refused values above sit on."""
    from recipes.longgen_finetune import validate_config

    validate_config(_cfg(tmp_path / "run", "max_steps=100", *overrides))
    assert not (tmp_path / "run").exists()


# -- faults: divergence, interrupts, damaged files, failures after the claim -----------------------------------------------
def _diverge_at(monkeypatch, step: int):
    """The loss of training step ``step`` (1-based) becomes NaN, as a diverging run's would."""
    from recipes.longgen_finetune import LongGenFinetuneRecipe

    real = LongGenFinetuneRecipe._loss

    def loss(self, batch):
        out = real(self, batch)
        return out * float("nan") if self.global_step + 1 == step else out

    monkeypatch.setattr(LongGenFinetuneRecipe, "_loss", loss)


def test_divergence_stops_naming_the_step_and_keeps_the_finite_checkpoints(tmp_path, monkeypatch):
    _diverge_at(monkeypatch, 4)
    cfg = _cfg(tmp_path, "max_steps=6", "checkpoint.save_every_n_steps=1", "checkpoint.keep_last_n=1")
    with pytest.raises(FloatingPointError, match=r"training diverged at step 4: loss nan, grad norm nan; stopped before "
                                                 rf"its update.*last complete checkpoint: {tmp_path}/step_3"):
        _run(cfg)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_3"]
    model = hf.load_model(tmp_path / "step_3")  # finite, loads (checked), and the lock was released:
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ckpt.OutputDirLock(tmp_path).release()


def test_an_infinite_gradient_under_a_finite_loss_stops_too(tmp_path):
    """The loss alone is not enough: a gradient that overflows (here one parameter's, at step 3) while the loss stays
    finite stops the run before the update, and the weights stay finite."""
    from recipes.longgen_finetune import LongGenFinetuneRecipe

    cfg = _cfg(tmp_path, "max_steps=5", "clip_grad_norm=null")
    recipe = LongGenFinetuneRecipe(cfg)
    try:
        recipe.setup(cfg)
        weight = recipe._model.tok_embeddings.weight
        weight.register_hook(lambda g: g * float("inf") if recipe.global_step == 2 else g)
        with pytest.raises(FloatingPointError, match=r"training diverged at step 3: loss [0-9.]+, grad norm (inf|nan)"):
            recipe.train()
        assert all(torch.isfinite(p).all() for p in recipe._model.parameters())
    finally:
        recipe.release()
    recipe.cleanup()


def test_on_nonfinite_skip_skips_the_update_and_goes_on(tmp_path, monkeypatch, caplog):
    _diverge_at(monkeypatch, 2)
    caplog.set_level("WARNING")
    recipe = _run(_cfg(tmp_path, "max_steps=3", "on_nonfinite=skip"))
    assert "step 2: loss nan, grad norm nan: update skipped (on_nonfinite=skip)" in caplog.text
    assert recipe.global_step == 3 and all(torch.isfinite(p).all() for p in recipe._model.parameters())


def test_a_real_divergence_is_caught(tmp_path):
    """No injection: a learning rate of 1e4 ends in one error -- a NaN loss, or weights past what a load accepts at
    the next save -- and every checkpoint left loads."""
    with pytest.raises(FloatingPointError, match=r"training diverged at step \d+|step \d+: weights .* the run is "
                                                 r"diverging"):
        _run(_cfg(tmp_path, "max_steps=40", "optimizer.lr=10000", "clip_grad_norm=null",
                  "checkpoint.save_every_n_steps=1", "checkpoint.keep_last_n=1"))
    for p in ckpt.list_checkpoints(tmp_path):
        hf.load_hf_state_dict(p)  # every weight finite (and |w| plausible), or CheckpointError


def test_resume_deletes_only_what_it_wrote(tmp_path):
    """keep_last_n applies to this run's checkpoints; the earlier run's and its saved config stay as they were."""
    _run(_cfg(tmp_path, "max_steps=2", "checkpoint.save_every_n_steps=1", "checkpoint.keep_last_n=null"))
    before = {p: p.read_bytes() for p in [*tmp_path.glob("step_*/*"), tmp_path / "torchtune_config.yaml"]}
    _run(_cfg(tmp_path, "max_steps=5", "checkpoint.save_every_n_steps=1", "checkpoint.keep_last_n=1",
              "checkpoint.resume=true"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_1", "step_2", "step_5"]
    assert {p: p.read_bytes() for p in before} == before
    assert (tmp_path / "torchtune_config.resumed_at_step_2.yaml").is_file()


def test_resume_from_a_damaged_checkpoint_names_the_file(tmp_path):
    _run(_cfg(tmp_path, "max_steps=2"))
    state = tmp_path / "step_2" / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[:-100])  # truncated
    with pytest.raises(hf.CheckpointError, match=rf"{state}: its SHA-256 differs"):
        _run(_cfg(tmp_path, "max_steps=3", "checkpoint.resume=true"))
    (tmp_path / "step_2" / hf.CHECKSUM_FILE).unlink()  # without checksums: still one error naming the file
    with pytest.raises(hf.CheckpointError, match=rf"{state}: not readable"):
        _run(_cfg(tmp_path, "max_steps=3", "checkpoint.resume=true"))


def test_resume_checks_every_file_before_reading_any(tmp_path):
    """A damaged config.json or weights file is refused, naming it, before the run reads it (config.json is read
    first of all: the resume's config comparison)."""
    _run(_cfg(tmp_path, "max_steps=2"))
    for name in (ckpt.CONFIG_FILE, ckpt.WEIGHTS_FILE):
        f = tmp_path / "step_2" / name
        good = f.read_bytes()
        f.write_bytes(good[:len(good) // 2] + bytes([good[len(good) // 2] ^ 0x10]) + good[len(good) // 2 + 1:])
        with pytest.raises(hf.CheckpointError, match=rf"{f}: its SHA-256 differs"):
            _run(_cfg(tmp_path, "max_steps=3", "checkpoint.resume=true"))
        f.write_bytes(good)


def test_a_failure_after_the_claim_leaves_nothing_that_blocks_the_corrected_rerun(tmp_path):
    with pytest.raises(ValueError, match=r"config field 'batch_size': 200 x 1 rank\(s\) exceeds the dataset's"):
        _run(_cfg(tmp_path, "max_steps=1", "batch_size=200"))
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.LOCK_FILE]  # released (empty record), nothing else
    _run(_cfg(tmp_path, "max_steps=1"))  # the corrected command, unchanged otherwise
    assert ckpt.latest_checkpoint(tmp_path).name == "step_1"


def test_an_unwritable_output_dir_fails_before_any_data_or_weights(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as info:
        _run(_cfg(tmp_path / "file" / "run", "max_steps=1"))
    assert str(tmp_path / "file") in str(info.value)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_is_one_line_naming_the_step_checkpoint_and_resume_command(tmp_path, sig):
    out = tmp_path / "run"
    args = ["--config", TINY, f"output_dir={out}", *SMALL, "max_steps=200", "checkpoint.save_every_n_steps=2"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # SIGINT at its default: a shell starts background jobs with it ignored, and children inherit that
    child = subprocess.Popen([sys.executable, "recipes/longgen_finetune.py", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    deadline = time.monotonic() + 240
    while not (out / "step_2").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(sig)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    name = "SIGTERM" if sig == signal.SIGTERM else r"Ctrl-C \(SIGINT\)"
    latest = ckpt.latest_checkpoint(out)
    assert re.fullmatch(rf"error: stopped by {name} at step \d+ of 200; last complete checkpoint: {latest}; continue "
                        rf"with: tune run recipes/longgen_finetune.py .* checkpoint.resume=true", last), last
    assert "Traceback" not in stderr
    resume = shlex.split(last.split("continue with: ")[1])
    assert resume[:3] == ["tune", "run", "recipes/longgen_finetune.py"] and resume[3:-1] == args
    ckpt.OutputDirLock(out).release()  # the lock was released (a held one raises OutputDirInUse)
    _run(_cfg(out, "max_steps=" + str(int(latest.name.split("_")[1]) + 1), "checkpoint.save_every_n_steps=2",
              "checkpoint.resume=true"))


def test_missing_config_file_and_help_from_the_command_line(tmp_path):
    r = _tune("run", "recipes/longgen_finetune.py", "--config", "recipes/configs/tiny_longgen.yml")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
        "error: --config 'recipes/configs/tiny_longgen.yml': no such file") and "Traceback" not in r.stderr
    r = _tune("run", "longgen_finetune", "--config", "tiny_longgen", "--help")  # torchtune's short form
    assert r.returncode == 0 and "  max_steps = 100 (default: required)" in r.stdout
    assert "Skipping import of cpp extensions" not in r.stderr
    r = _tune("run", "recipes/longgen_finetune.py", "--config", "tiny_longgen", "max_step=3")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: unknown config key 'max_step' (did you mean 'max_steps'?); the recipe's --help lists every key"]


def test_a_full_disk_during_a_save_then_resume_once_space_is_back(tmp_path, monkeypatch):
    """ENOSPC in the middle of the step-2 checkpoint (torch.save's view of it): one OSError naming that checkpoint and
    the cause, step_1 untouched, no temp directory left, the lock released; resuming afterwards reaches the end."""
    import errno

    real_save = torch.save

    def full_at_step_2(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("global_step") == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    common = ["checkpoint.save_every_n_steps=1", "checkpoint.keep_last_n=null"]
    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_at_step_2)
        with pytest.raises(OSError) as info:
            _run(_cfg(tmp_path, "max_steps=3", *common))
    assert info.value.filename == str(tmp_path / "step_2") and info.value.strerror.startswith("No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LOCK_FILE, "step_1", "torchtune_config.yaml"]
    _run(_cfg(tmp_path, "max_steps=3", *common, "checkpoint.resume=true"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_1", "step_2", "step_3"]
