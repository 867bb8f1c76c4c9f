"""Checkpoint I/O of the finetuning recipe -- what torchtune 0.6.1 lacks: HF-format checkpoints written atomically,
with the recipe state beside them. Reading them back (and any other HF checkpoint) is flexgen_long.hf's
(``load_model``, ``load_hf_state_dict``: every file and tensor checked).

A checkpoint is a directory ``<output_dir>/step_<N>/``::

    model.safetensors    weights under HF Llama names (torchtune.models.convert_weights.tune_to_hf)
    config.json          HF LlamaConfig fields + "flexgen_long": {"model": <the recipe's model config>, "step": N}
    recipe_state.pt      optimizer, LR schedule, data position, RNG (absent in weights-only exports)
    checksums.sha256     each file's SHA-256 (``sha256sum`` format), checked before a file is read: those a load
                         reads (flexgen_long.hf), all of them when a run resumes from the checkpoint

It is written into a hidden sibling ``.step_<N>.tmp-<pid>``, every file fsync'ed, then renamed into place (rename is
atomic on POSIX) and the parent directory fsync'ed (``write_dir_atomic``). A kill at any moment leaves either the
complete directory or an ignored temp directory -- never a half-written ``step_<N>``; ``latest_checkpoint`` only ever
sees complete ones.

With every layer full (``full_layers: all``) the directory is a plain Llama checkpoint that
``transformers.LlamaForCausalLM.from_pretrained`` loads.

The output directory is claimed before a run touches it (``claim_output_dir``): a lock file ``.lock`` (owner pid,
host, start time) stops a second job from writing into the same directory, and a fresh run refuses a directory that
already holds something unless it was told to resume from it or to overwrite its checkpoints. A run deletes only
checkpoints it wrote itself (``keep_last_n``), or old ones it was explicitly told to overwrite.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torchtune.models.convert_weights import tune_to_hf

from .hf import CHECKSUM_FILE, CONFIG_FILE, MAX_ABS_WEIGHT, MODEL_FIELDS, model_sizes, sha256_file

__all__ = ["hf_config", "save_checkpoint", "write_dir_atomic", "write_atomic", "check_writable", "latest_checkpoint",
           "list_checkpoints", "claim_output_dir", "OutputDirLock", "OutputDirInUse", "OutputDirNotEmpty",
           "recover_interrupted_writes", "remove_checkpoint", "STATE_FILE", "WEIGHTS_FILE", "CONFIG_FILE", "LOCK_FILE"]

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "recipe_state.pt"
LOCK_FILE = ".lock"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# -- HF config -----------------------------------------------------------------------------------------------------------
def hf_config(model: nn.Module, model_cfg: dict | None = None, dtype: torch.dtype = torch.float32,
              recipe: dict | None = None) -> dict:
    """HF ``LlamaConfig`` fields read off a torchtune-structured Llama (ours or torchtune's), plus the recipe's model
    config under ``"flexgen_long"`` so that ``flexgen_long.hf.load_model`` can rebuild the hybrid layout, and
    ``recipe``: what else a resumed run must keep equal (data, tokenizer, batch geometry), compared before it
    resumes."""
    layer = model.layers[0]
    rope = layer.attn.pos_embeddings
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{MODEL_FIELDS[name]: value for name, value in model_sizes(model).items()},
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": layer.sa_norm.eps,
        "rope_theta": float(rope.base),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if hasattr(rope, "scale_factor"):  # torchtune's Llama3ScaledRoPE
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": float(rope.scale_factor),
                               "low_freq_factor": float(rope.low_freq_factor),
                               "high_freq_factor": float(rope.high_freq_factor),
                               "original_max_position_embeddings": int(rope.old_context_len)}
    if model_cfg is not None:
        cfg["flexgen_long"] = {"model": model_cfg}
    if recipe is not None:
        cfg.setdefault("flexgen_long", {})["recipe"] = recipe
    return cfg


# -- writing ------------------------------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomic(final: str | os.PathLike, fill: Callable[[Path], None], *, replace: bool = True) -> Path:
    """Write the directory ``final`` whole or not at all and return it: ``fill`` writes the files into the empty
    hidden sibling ``.<name>.tmp-<pid>`` it is given (a leftover of this pid is removed first); every file and
    directory in it is fsync'ed, the temp directory is renamed to ``final`` and the parent fsync'ed. An existing
    ``final`` (with ``replace``; else ``FileExistsError``, unless it is an empty directory) is first renamed aside to
    ``.<name>.old-<pid>``, and deleted after the new one is in place: a kill between the two renames leaves no
    ``final`` and the old copy under its hidden name, never a torn directory. On any error the temp directory is
    removed and the error re-raised."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden(final, "tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        fill(tmp)
        for f in [*sorted(tmp.rglob("*"), key=lambda p: -len(p.parts)), tmp]:  # write -> fsync -> rename
            _fsync_path(f)
        if os.path.lexists(final):
            if not replace and not (final.is_dir() and not any(final.iterdir())):
                raise FileExistsError(errno.EEXIST, "exists and is not an empty directory", str(final))
            old = _hidden(final, "old")
            os.rename(final, old)
            os.rename(tmp, final)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(tmp, final)
        _fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _hidden(path: Path, kind: str) -> Path:
    """The hidden sibling ``.<name>.<kind>-<pid>`` of ``path`` (a temp copy, one moved aside, one being deleted)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[Path], None]) -> Path:
    """Write the file ``path`` whole or not at all: ``data`` (bytes, or a function that writes the file it is given)
    goes to a hidden temp file beside it, is fsync'ed and renamed over ``path``; on any error the temp file is removed
    and ``path`` keeps its previous content."""
    path = Path(path)
    tmp = _hidden(path, "tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)
    return path


def check_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` (with its parents) and write and remove a probe file in it: a read-only, full or missing
    location fails here, before any work, as an ``OSError`` naming the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    finally:
        probe.unlink(missing_ok=True)
    return directory


def save_checkpoint(output_dir: str | os.PathLike, step: int, tune_state_dict: dict[str, torch.Tensor],
                    config: dict, recipe_state: dict | None = None) -> Path:
    """Write ``<output_dir>/step_<step>`` atomically (see the module docstring) and return it. ``tune_state_dict`` is
    a full (unsharded) torchtune-keyed state dict; ``config`` comes from ``hf_config``.

    Weights that are not all finite and within ``flexgen_long.hf.MAX_ABS_WEIGHT`` (what a load accepts) are refused
    (``FloatingPointError``): a diverging run must not replace good checkpoints with ones that cannot be loaded. Any failure while writing (a full disk, a read-only or vanished directory) removes the temp
    directory and raises an ``OSError`` naming the file and the cause; nothing half-written stays behind."""
    from safetensors.torch import save_file

    bad = [k for k, v in tune_state_dict.items()  # what flexgen_long.hf would refuse to load
           if v.is_floating_point() and not (torch.isfinite(v).all() and v.abs().max() <= MAX_ABS_WEIGHT)]
    if bad:
        raise FloatingPointError(f"step {step}: weights {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold "
                                 f"NaN, Inf or values beyond {MAX_ABS_WEIGHT:g}: the run is diverging; no checkpoint "
                                 f"written (those in {output_dir} are kept)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"step_{step}"

    def fill(tmp: Path) -> None:
        hf_sd = tune_to_hf(tune_state_dict, num_heads=config["num_attention_heads"],
                           num_kv_heads=config["num_key_value_heads"], dim=config["hidden_size"],
                           head_dim=config["head_dim"])
        # safetensors refuses shared or non-contiguous storage; tied output weights are not in torchtune's state dict
        save_file({k: v.detach().contiguous() for k, v in hf_sd.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        written = dict(config, flexgen_long=dict(config.get("flexgen_long", {}), step=step))
        (tmp / CONFIG_FILE).write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
        if recipe_state is not None:
            torch.save(recipe_state, tmp / STATE_FILE)
        files = sorted(tmp.iterdir())
        (tmp / CHECKSUM_FILE).write_text("".join(f"{sha256_file(f)}  {f.name}\n" for f in files))

    try:
        # re-saving a step (a resumed run reaching it again) replaces it: the old copy is moved aside first
        return write_dir_atomic(final, fill, replace=True)
    except Exception as e:
        raise _write_error(e, _hidden(final, "tmp"), final) from None


def _write_error(e: Exception, tmp: Path, final: Path) -> Exception:
    """The error of a failed checkpoint write as an ``OSError`` naming the file and the cause. torch.save reports a
    full disk as a zip-writer ``RuntimeError`` ("file write failed"): the free space tells that cause."""
    where = str(getattr(e, "filename", None) or final).replace(str(tmp), str(final))
    cause = (e.strerror or str(e)) if isinstance(e, OSError) else " ".join(str(e).split())[:200]
    try:
        if shutil.disk_usage(final.parent).free < (1 << 20):
            cause = "No space left on device"
    except OSError:
        pass
    return OSError(getattr(e, "errno", None) or errno.EIO, f"{cause} (writing checkpoint {final.name}; its temp "
                   "directory was removed, earlier checkpoints are untouched)", where)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories of ``output_dir``, oldest step first (temp directories are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint directory without ever leaving a half-deleted ``step_<N>`` in view: it is renamed to a
    hidden ``.step_<N>.deleting-<pid>`` first (atomic), then removed; ``recover_interrupted_writes`` finishes a
    deletion that a kill interrupted."""
    path = Path(path)
    hidden = _hidden(path, "deleting")
    os.rename(path, hidden)
    shutil.rmtree(hidden)


def recover_interrupted_writes(output_dir: str | os.PathLike, log: Callable[[str], None] = print) -> None:
    """Clean up after writes that a kill interrupted (call it only while holding the directory's lock: then no writer
    is alive). ``.step_<N>.old-<pid>`` is a complete checkpoint that was being replaced: it is put back as
    ``step_<N>`` if the kill came between the two renames (so nothing complete is ever lost), else it is the superseded
    copy and is removed. ``.step_<N>.tmp-<pid>`` is a write that never finished: removed. Each action is logged."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    for p in sorted(output_dir.glob(".step_*.old-*")):
        final = output_dir / p.name[1:].split(".old-")[0]
        if final.exists():
            shutil.rmtree(p)
            log(f"Removed {p.name}: the superseded copy of {final.name}, left by a write that was interrupted")
        else:
            os.rename(p, final)
            log(f"Restored {final.name} from {p.name}: a re-save of it was interrupted between its two renames")
    for p in sorted(output_dir.glob(".step_*.tmp-*")):
        shutil.rmtree(p)
        log(f"Removed {p.name}: an unfinished checkpoint write of a run that was killed (never a complete step_<N>)")
    for p in sorted(output_dir.glob(".step_*.deleting-*")):
        shutil.rmtree(p)
        log(f"Removed {p.name}: a checkpoint whose deletion (checkpoint.keep_last_n) a kill interrupted")


# -- the output directory: one job at a time, nothing deleted that the run did not write ---------------------------------
class OutputDirInUse(RuntimeError):
    """Another live job holds the output directory's lock."""


class OutputDirNotEmpty(ValueError):
    """A fresh run was pointed at a directory that already holds something."""


def _proc_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with the pid, it identifies a
    process even after its pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class OutputDirLock:
    """``<output_dir>/.lock``, held with ``flock`` for the life of the run and holding the owner's pid, host and start.

    ``flock`` is released by the kernel when its holder exits in any way (SIGKILL included), so a lock is never stale
    in effect: a new job acquires it at once. The owner record stays behind in that case, which is how a new job knows
    (and logs) that the previous one died without releasing it. On release the record is emptied, not the file
    removed: unlinking a flock'ed file lets a third job lock a fresh inode while a second one holds the old one."""

    def __init__(self, output_dir: str | os.PathLike, log: Callable[[str], None] = print):
        self.path = Path(output_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._read(fd)
            os.close(fd)
            who = (f"pid {owner.get('pid')} on host {owner.get('host')} (started {owner.get('started')}, "
                   f"command {' '.join(owner.get('argv', []))[:200]!r})") if owner else "another process"
            raise OutputDirInUse(f"output_dir {str(self.path.parent)!r} is in use by {who}: its lock {self.path} is "
                                 "held. Two jobs in one output_dir would overwrite and delete each other's "
                                 "checkpoints; wait for that job to end, or choose another output_dir") from None
        previous = self._read(fd)
        if previous:  # a record without a holder: its owner died before release (the kernel dropped its flock)
            pid = previous.get("pid")
            gone = previous.get("host") == socket.gethostname() and isinstance(pid, int) \
                and _proc_start_time(pid) != previous.get("start_time")  # same pid, other start: a reused pid
            pid_state = ", whose process no longer exists" if gone else ""
            log(f"Lock {self.path}: taking over a stale lock of pid {previous.get('pid')} on host "
                f"{previous.get('host')} (started {previous.get('started')}{pid_state}): that job ended without "
                "releasing it (killed or crashed)")
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _proc_start_time(os.getpid()),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": list(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.owner) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd: int | None = fd

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            text = os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace").strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {"pid": "?", "host": "?", "started": "? (unreadable lock record)"}

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # a clean release: the next owner finds no record
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_output_dir(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool,
                     log: Callable[[str], None] = print) -> OutputDirLock:
    """Lock ``output_dir`` for this run and make sure the run cannot lose data it did not write.

    * another live job holds the lock: ``OutputDirInUse`` (nothing touched);
    * ``resume``: interrupted writes are recovered (``recover_interrupted_writes``); the caller resumes from the
      latest checkpoint, or starts at step 0 if there is none;
    * fresh (neither flag) and the directory holds anything besides the lock: ``OutputDirNotEmpty`` naming what is
      there and both ways forward;
    * ``overwrite``: the old ``step_<N>`` checkpoints (and leftovers of interrupted writes) are deleted -- the user
      asked for it -- each one logged; other files (logs) stay.

    Returns the held lock; release it when the run ends (the kernel does if the process dies)."""
    if resume and overwrite:
        raise OutputDirNotEmpty("config fields 'checkpoint.resume' and 'checkpoint.overwrite' are both true: choose "
                                "one (resume continues from the latest checkpoint in output_dir; overwrite deletes "
                                "its checkpoints and starts from step 0)")
    lock = OutputDirLock(output_dir, log)
    try:
        output_dir = Path(output_dir)
        if resume:
            recover_interrupted_writes(output_dir, log)
            return lock
        held = sorted(p.name for p in output_dir.iterdir() if p.name != LOCK_FILE)
        if held and not overwrite:
            shown = ", ".join(held[:8]) + (f", ... ({len(held)} entries)" if len(held) > 8 else "")
            raise OutputDirNotEmpty(
                f"config field 'output_dir': {str(output_dir)!r} is not empty ({shown}) and this is a fresh run "
                "(checkpoint.resume=false). A fresh run does not write over or delete what it did not write. Set "
                "checkpoint.resume=true to continue from its latest checkpoint, checkpoint.overwrite=true to delete "
                "its step_<N> checkpoints and start from step 0, or choose another output_dir")
        if overwrite:
            old = list_checkpoints(output_dir) + sorted(p for p in output_dir.glob(".step_*") if p.is_dir())
            for p in old:
                if p.name.startswith("step_"):
                    remove_checkpoint(p)
                else:
                    shutil.rmtree(p)
            if old:
                log(f"checkpoint.overwrite=true: deleted {len(old)} old checkpoint(s) in {output_dir}: "
                    f"{', '.join(p.name for p in old)}")
        return lock
    except BaseException:
        lock.release()
        raise
