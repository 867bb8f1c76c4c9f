"""Checkpoint I/O of the finetuning recipe -- what torchtune 0.6.1 lacks: HF-format checkpoints written atomically,
with the recipe state beside them, and a loader that rebuilds our model from such a directory.

A checkpoint is a directory ``<output_dir>/step_<N>/``::

    model.safetensors    weights under HF Llama names (torchtune.models.convert_weights.tune_to_hf)
    config.json          HF LlamaConfig fields + "flexgen_long": {"model": <the recipe's model config>, "step": N}
    recipe_state.pt      optimizer, LR schedule, data position, RNG (absent in weights-only exports)

It is written into a hidden sibling ``.step_<N>.tmp-<pid>``, every file fsync'ed, then renamed into place (rename is
atomic on POSIX) and the parent directory fsync'ed. A kill at any moment leaves either the complete directory or an
ignored temp directory -- never a half-written ``step_<N>``; ``latest_checkpoint`` only ever sees complete ones.

With every layer full (``full_layers: all``) the directory is a plain Llama checkpoint that
``transformers.LlamaForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchtune.models.convert_weights import hf_to_tune, tune_to_hf

__all__ = ["hf_config", "save_checkpoint", "latest_checkpoint", "list_checkpoints", "load_hf_state_dict",
           "load_model", "STATE_FILE", "WEIGHTS_FILE", "CONFIG_FILE"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "recipe_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# -- HF config -----------------------------------------------------------------------------------------------------------
def _attn_shape(model: nn.Module) -> dict:
    attn = model.layers[0].attn
    missing = [a for a in ("num_heads", "num_kv_heads", "head_dim", "embed_dim") if not hasattr(attn, a)]
    if missing:
        raise ValueError(f"model.layers[0].attn lacks {missing}: not a torchtune-style Llama attention")
    return dict(num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim, dim=attn.embed_dim)


def hf_config(model: nn.Module, model_cfg: dict | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """HF ``LlamaConfig`` fields read off a torchtune-structured Llama (ours or torchtune's), plus the recipe's model
    config under ``"flexgen_long"`` so that ``load_model`` can rebuild the hybrid layout."""
    from torchtune.modules import TiedLinear

    shape = _attn_shape(model)
    layer = model.layers[0]
    rope = layer.attn.pos_embeddings
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.tok_embeddings.num_embeddings,
        "hidden_size": shape["dim"],
        "intermediate_size": layer.mlp.w1.out_features,
        "num_hidden_layers": len(model.layers),
        "num_attention_heads": shape["num_heads"],
        "num_key_value_heads": shape["num_kv_heads"],
        "head_dim": shape["head_dim"],
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": layer.sa_norm.eps,
        "rope_theta": float(rope.base),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": isinstance(model.output, TiedLinear),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if hasattr(rope, "scale_factor"):  # torchtune's Llama3ScaledRoPE
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": float(rope.scale_factor),
                               "low_freq_factor": float(rope.low_freq_factor),
                               "high_freq_factor": float(rope.high_freq_factor),
                               "original_max_position_embeddings": int(rope.old_context_len)}
    if model_cfg is not None:
        cfg["flexgen_long"] = {"model": model_cfg}
    return cfg


# -- writing ------------------------------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(output_dir: str | os.PathLike, step: int, tune_state_dict: dict[str, torch.Tensor],
                    config: dict, recipe_state: dict | None = None) -> Path:
    """Write ``<output_dir>/step_<step>`` atomically (see the module docstring) and return it. ``tune_state_dict`` is
    a full (unsharded) torchtune-keyed state dict; ``config`` comes from ``hf_config``."""
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"step_{step}"
    tmp = output_dir / f".step_{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    hf_sd = tune_to_hf(tune_state_dict, num_heads=config["num_attention_heads"],
                       num_kv_heads=config["num_key_value_heads"], dim=config["hidden_size"],
                       head_dim=config["head_dim"])
    # safetensors refuses shared or non-contiguous storage; tied output weights are not in torchtune's state dict
    save_file({k: v.detach().contiguous() for k, v in hf_sd.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    config = dict(config)
    config["flexgen_long"] = dict(config.get("flexgen_long", {}), step=step)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if recipe_state is not None:
        torch.save(recipe_state, tmp / STATE_FILE)
    for f in tmp.iterdir():
        _fsync_path(f)
    _fsync_path(tmp)
    if final.exists():
        # Re-saving a step (e.g. a resumed run reaching it again): move the old one aside first. If killed between
        # the two renames, step_<N> is missing and the previous checkpoint is the latest -- still never a torn one.
        old = output_dir / f".step_{step}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_path(output_dir)
    return final


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


def remove_stale_temp_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Delete ``.step_*.tmp-*`` / ``.old-*`` leftovers of killed writes; returns what was removed."""
    output_dir = Path(output_dir)
    stale = [p for p in output_dir.glob(".step_*") if p.is_dir()] if output_dir.is_dir() else []
    for p in stale:
        shutil.rmtree(p)
    return stale


# -- reading ------------------------------------------------------------------------------------------------------------
def load_hf_state_dict(checkpoint_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Torchtune-keyed state dict and the HF config of an HF Llama directory (ours, or a hub download with one or
    several ``*.safetensors`` files).

    Read-only on purpose: torchtune's FullModelHFCheckpointer (flexgen_long.checkpoint, for scripts that want it) needs
    an output directory it writes into and a model_type; the recipe only reads a base model here and writes its own
    atomic checkpoints (save_checkpoint), so it uses the same conversion (hf_to_tune) without the checkpointer."""
    from safetensors.torch import load_file

    d = Path(checkpoint_dir)
    if not (d / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{d}: no {CONFIG_FILE} (expected an HF model directory)")
    config = json.loads((d / CONFIG_FILE).read_text())
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no *.safetensors weights")
    hf_sd: dict[str, torch.Tensor] = {}
    for f in files:
        hf_sd.update(load_file(str(f)))
    num_heads = config["num_attention_heads"]
    sd = hf_to_tune(hf_sd, num_heads=num_heads, num_kv_heads=config.get("num_key_value_heads", num_heads),
                    dim=config["hidden_size"], head_dim=config.get("head_dim"))
    if config.get("tie_word_embeddings"):
        sd.pop("output.weight", None)  # TiedLinear holds no weight of its own
    return sd, config


def load_model(checkpoint_dir: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the model a recipe checkpoint was trained with (the model config saved in config.json) and load its
    weights (strict: every key must match)."""
    from torchtune import config as tt_config
    from omegaconf import OmegaConf

    sd, config = load_hf_state_dict(checkpoint_dir)
    model_cfg = config.get("flexgen_long", {}).get("model")
    if model_cfg is None:
        raise ValueError(f"{checkpoint_dir}: config.json has no flexgen_long.model (not written by a flexgen_long "
                         "recipe); build the model yourself and load_hf_state_dict()")
    with torch.device(device):
        model = tt_config.instantiate(OmegaConf.create(model_cfg))
    model.load_state_dict(sd, strict=True)
    return model.to(dtype=dtype) if dtype is not None else model
