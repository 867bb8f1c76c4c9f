"""flexgen_long.checkpoint_io under faults: the order of its filesystem operations (recorded, not timed), a full disk
and other write errors in the middle of a save, damaged files found by their checksums, non-finite weights, atomic
single-file writes and the up-front writability check."""

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

from flexgen_long import checkpoint_io as ckpt
from flexgen_long import hf
from flexgen_long.models import longgen_tiny

CFG = {"_component_": "flexgen_long.models.longgen_tiny", "vocab_size": 259}


@pytest.fixture(scope="module")
def model():
    return longgen_tiny(vocab_size=259)


def _save(out, step, model, state=None):
    return ckpt.save_checkpoint(out, step, model.state_dict(), ckpt.hf_config(model, CFG),
                                {"global_step": step} if state is None else state)


class Recorder:
    """Records fsync (by path), rename and rmtree calls in order, then performs them."""

    def __init__(self, monkeypatch, root: Path):
        self.events, self.root, paths = [], root, {}
        real_open, real_close, real_fsync = os.open, os.close, os.fsync
        real_rename, real_rmtree = os.rename, shutil.rmtree

        def rel(p):
            return str(Path(p).relative_to(root))

        def open_(path, *a, **k):
            fd = real_open(path, *a, **k)
            paths[fd] = path
            return fd

        def close(fd):
            paths.pop(fd, None)
            return real_close(fd)

        def fsync(fd):
            self.events.append(("fsync", rel(paths[fd]) if fd in paths else f"fd {fd}"))
            return real_fsync(fd)

        def rename(a, b):
            self.events.append(("rename", rel(a), rel(b)))
            return real_rename(a, b)

        def rmtree(p, *a, **k):
            self.events.append(("rmtree", rel(p)))
            return real_rmtree(p, *a, **k)

        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "close", close)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(shutil, "rmtree", rmtree)

    def index(self, *event) -> int:
        assert event in self.events, (event, self.events)
        return self.events.index(event)


def test_write_then_fsync_then_rename_then_fsync_the_parent(tmp_path, model, monkeypatch):
    rec = Recorder(monkeypatch, tmp_path)
    path = _save(tmp_path, 3, model)
    tmp = f".step_3.tmp-{os.getpid()}"
    files = sorted(p.name for p in path.iterdir())
    assert files == sorted([ckpt.WEIGHTS_FILE, ckpt.CONFIG_FILE, ckpt.STATE_FILE, hf.CHECKSUM_FILE])
    rename = rec.index("rename", tmp, "step_3")
    for name in files:  # every file fsync'ed (under its temp name) before the rename makes it visible
        assert rec.index("fsync", f"{tmp}/{name}") < rename, name
    assert rec.index("fsync", tmp) < rename  # the directory's entries too
    assert rec.events[rename + 1:] == [("fsync", ".")]  # then the parent, which holds the rename


def test_resave_renames_the_old_copy_aside_before_the_new_one_in_and_deletes_it_last(tmp_path, model, monkeypatch):
    _save(tmp_path, 3, model)
    rec = Recorder(monkeypatch, tmp_path)
    _save(tmp_path, 3, model, {"global_step": 3, "again": True})
    pid = os.getpid()
    aside = rec.index("rename", "step_3", f".step_3.old-{pid}")
    into = rec.index("rename", f".step_3.tmp-{pid}", "step_3")
    assert aside < into < rec.index("rmtree", f".step_3.old-{pid}")


def test_deletion_renames_before_it_removes(tmp_path, model, monkeypatch):
    path = _save(tmp_path, 1, model)
    rec = Recorder(monkeypatch, tmp_path)
    ckpt.remove_checkpoint(path)
    hidden = f".step_1.deleting-{os.getpid()}"
    assert rec.events == [("rename", "step_1", hidden), ("rmtree", hidden)]


@pytest.mark.parametrize("where,fault", [
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1472 vs 1366 "
                                "PytorchStreamWriter failed writing file data/0: file write failed")),
    ("safetensors", OSError(errno.ENOSPC, "No space left on device")),
    ("fsync", OSError(errno.EIO, "Input/output error")),
    ("rename", OSError(errno.EXDEV, "Invalid cross-device link")),
])
def test_a_failed_save_is_one_error_naming_the_path_and_leaves_nothing(tmp_path, model, monkeypatch, where, fault):
    """A full disk (torch reports it as a zip-writer RuntimeError: the free space names the cause), a failing write,
    fsync or rename: one OSError naming the checkpoint and the cause, the temp directory removed, the earlier
    checkpoint untouched, and the next save works once the fault is gone."""
    import safetensors.torch

    first = _save(tmp_path, 1, model)
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def broken(*a, **k):
        raise fault

    target = {"torch.save": (torch, "save"), "safetensors": (safetensors.torch, "save_file"),
              "fsync": (os, "fsync"), "rename": (os, "rename")}[where]
    with monkeypatch.context() as m:
        m.setattr(*target, broken)
        if where == "torch.save":  # what a full disk looks like from here
            m.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
        with pytest.raises(OSError) as info:
            _save(tmp_path, 2, model)
    e = info.value
    assert "step_2" in str(e.filename) and "writing checkpoint step_2" in e.strerror, e
    cause = {"torch.save": "No space left on device", "safetensors": "No space left on device",
             "fsync": "Input/output error", "rename": "Invalid cross-device link"}[where]
    assert e.strerror.startswith(cause), e
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]  # no temp directory left behind
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert _save(tmp_path, 2, model).is_dir()


def test_the_cli_error_of_a_failed_save_is_one_line(tmp_path, model, monkeypatch):
    from flexgen_long.recipe_config import user_errors

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit) as info, user_errors():
        _save(tmp_path, 4, model)
    message = str(info.value.code)
    assert message.startswith(f"error: {tmp_path}/step_4") and "no space left on device" in message
    assert "\n" not in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e5])
def test_weights_a_load_would_refuse_are_never_saved(tmp_path, model, value):
    _save(tmp_path, 1, model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["layers.0.mlp.w1.weight"][0, 0] = value
    with pytest.raises(FloatingPointError, match=r"step 2: weights layers.0.mlp.w1.weight hold NaN, Inf or values "
                                                 r"beyond 10000: the run is diverging"):
        ckpt.save_checkpoint(tmp_path, 2, sd, ckpt.hf_config(model, CFG))
    assert [p.name for p in tmp_path.iterdir()] == ["step_1"]


@pytest.mark.parametrize("name", [ckpt.WEIGHTS_FILE, ckpt.CONFIG_FILE, ckpt.STATE_FILE])
def test_a_flipped_bit_is_found_and_the_file_named(tmp_path, model, name):
    path = _save(tmp_path, 1, model)
    f = path / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(hf.CheckpointError, match=rf"{f}: its SHA-256 differs from the one recorded"):
        hf.verify_checksums(path)  # every file: what a resumed run checks
    if name == ckpt.STATE_FILE:  # a load of the model (generate, eval) reads config.json and the weights only
        hf.load_model(path)
    else:
        with pytest.raises(hf.CheckpointError, match=rf"{f}: its SHA-256 differs"):
            hf.load_model(path)


def test_a_missing_listed_file_is_named(tmp_path, model):
    path = _save(tmp_path, 1, model)
    (path / ckpt.STATE_FILE).unlink()
    with pytest.raises(hf.CheckpointError, match=rf"{path / ckpt.STATE_FILE}: missing, but checksums.sha256 lists"):
        hf.load_hf_state_dict(path)


def test_write_atomic_keeps_the_old_content_when_the_write_fails(tmp_path):
    target = tmp_path / "result.json"
    ckpt.write_atomic(target, b'{"a": 1}\n')

    def half_then_fail(tmp):
        tmp.write_bytes(b'{"a": ')
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError, match="No space left"):
        ckpt.write_atomic(target, half_then_fail)
    assert target.read_bytes() == b'{"a": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_check_writable_fails_before_work_naming_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as info:
        ckpt.check_writable(tmp_path / "file" / "out")
    assert str(tmp_path / "file") in str(info.value)
    assert ckpt.check_writable(tmp_path / "new" / "dir").is_dir()
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # the probe is gone
