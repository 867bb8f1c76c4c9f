"""HF Llama weights in and out of the hybrid model, through torchtune's own HF checkpointer.

The hybrid model's state-dict keys are torchtune's llama keys, so torchtune's ``FullModelHFCheckpointer`` converts HF
checkpoints (Llama-2, Llama-3.x; q/k RoPE permutation included) with no help from us. In a recipe YAML use it directly::

    checkpointer:
      _component_: torchtune.training.FullModelHFCheckpointer
      checkpoint_dir: /models/Llama-2-7b-hf
      checkpoint_files: [model-00001-of-00002.safetensors, model-00002-of-00002.safetensors]
      model_type: LLAMA2
      output_dir: outputs/

These helpers only fill in the file list and model type for scripts and tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn
from torchtune.training import FullModelHFCheckpointer

__all__ = ["hf_checkpointer", "load_hf_weights", "save_hf_weights"]


def hf_checkpointer(checkpoint_dir, output_dir, model_type: str | None = None) -> FullModelHFCheckpointer:
    """torchtune's HF checkpointer over every ``*.safetensors`` (else ``*.bin``) file in ``checkpoint_dir``.
    ``model_type`` defaults to LLAMA3_2 for tied embeddings, else LLAMA3 (LLAMA2 converts identically)."""
    ckpt = Path(checkpoint_dir)
    cfg_path = ckpt / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"checkpoint_dir must hold an HF config.json, none in {ckpt}")
    files = sorted(p.name for p in ckpt.glob("*.safetensors")) or sorted(p.name for p in ckpt.glob("*.bin"))
    if not files:
        raise ValueError(f"checkpoint_dir {ckpt} holds no *.safetensors or *.bin weight files")
    if model_type is None:
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("model_type") != "llama":
            raise ValueError(f"config.json model_type must be 'llama' to infer model_type, got {cfg.get('model_type')!r}"
                             "; pass model_type explicitly")
        model_type = "LLAMA3_2" if cfg.get("tie_word_embeddings") else "LLAMA3"
    return FullModelHFCheckpointer(checkpoint_dir=str(ckpt), checkpoint_files=files, model_type=model_type,
                                   output_dir=str(output_dir))


def load_hf_weights(model: nn.Module, checkpointer: FullModelHFCheckpointer) -> None:
    """Load the checkpoint into ``model`` (strict: every key must match)."""
    model.load_state_dict(checkpointer.load_checkpoint()["model"], strict=True)


def save_hf_weights(model: nn.Module, checkpointer: FullModelHFCheckpointer, epoch: int = 0) -> Path:
    """Write ``model`` back in HF format (``output_dir/epoch_{epoch}``, with config.json); returns that folder.
    The checkpointer must have loaded a checkpoint first (it remembers the HF config and file layout)."""
    checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=epoch)
    return Path(checkpointer._output_dir) / f"epoch_{epoch}"
