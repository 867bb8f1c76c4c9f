"""Reading Hugging Face Llama checkpoint directories, checked: ``config.json`` and ``*.safetensors`` weights.

This is the one reader of HF checkpoints in the project -- a hub download, a directory written by
``python -m flexgen_long.import_gguf``, or a checkpoint written by recipes/longgen_finetune.py (which adds the recipe's
model config to config.json under ``"flexgen_long"``)::

    config = read_config(d)                   # parsed config.json; a damaged file is named in the error
    llama_args(config, d)                     # -> flexgen_long.models.longgen_llama arguments (sizes, RoPE, norm eps)
    sd, config = load_hf_state_dict(d)        # torchtune-keyed weights, every tensor checked against config.json
    model = load_model(d)                     # rebuild + load: a recipe checkpoint as trained, else the original model

Nothing is loaded unchecked: a file that is not valid JSON / safetensors (truncated, overwritten) raises
``CheckpointError`` naming the file; so do a missing, unexpected or wrongly shaped tensor, a dtype other than the one
config.json declares, and values that are not finite or implausibly large (``MAX_ABS_WEIGHT``) -- which is how bytes
overwritten inside the tensor data show up.

Why not torchtune's ``FullModelHFCheckpointer``: it needs an output directory it writes into and a ``model_type``, and
it checks nothing of the above; the recipes only read base models here and write their own atomic checkpoints
(flexgen_long.checkpoint_io). The conversion itself is torchtune's (``convert_weights.hf_to_tune``: key names and the q/k
RoPE permutation).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

__all__ = ["CheckpointError", "CONFIG_FILE", "CHECKSUM_FILE", "sha256_file", "verify_checksums", "MAX_ABS_WEIGHT", "read_config", "llama_args", "weight_files",
           "load_hf_state_dict", "check_model", "architecture", "load_model", "is_recipe_checkpoint", "model_sizes", "MODEL_FIELDS"]

CONFIG_FILE = "config.json"
#: Written by flexgen_long.checkpoint_io beside a checkpoint's files: one ``<sha256>  <file name>`` line per file (the
#: format of ``sha256sum``; ``sha256sum -c checksums.sha256`` checks it by hand). HF directories without it are read
#: unchecked.
CHECKSUM_FILE = "checksums.sha256"
INDEX_FILE = "model.safetensors.index.json"
#: Largest |weight| accepted. Trained Llama-family weights stay far below it (SmolLM2-135M-Instruct: max 9.25, in
#: layer 27's gate_proj; measured on the import_gguf conversion), while bytes overwritten inside fp32 / bf16 tensor data
#: decode to values whose 8-bit exponents are about uniformly random: ~45% of them exceed 1e4 (and ~1/256 are Inf/NaN).
MAX_ABS_WEIGHT = 1e4
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ROPE_TYPES = ("default", "llama3")


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be used; the message names the file."""


# -- integrity ----------------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """The file's SHA-256, read in chunks (a checkpoint's weights can be larger than the memory left)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_checksums(checkpoint_dir: str | os.PathLike, which: Callable[[str], bool] | None = None) -> bool:
    """Check the files that ``checksums.sha256`` lists against their recorded SHA-256: every one, or those whose
    name ``which`` accepts (the files a caller reads: ``load_model`` hashes no optimizer state it does not read). A
    missing, changed or damaged file is a ``CheckpointError`` naming it. False when the directory has no checksum
    file (not ours)."""
    d = Path(checkpoint_dir)
    listing = d / CHECKSUM_FILE
    if not listing.is_file():
        return False
    for line in listing.read_text(encoding="utf-8", errors="replace").splitlines():
        want, _, name = line.partition("  ")
        if not name or len(want) != 64:
            raise CheckpointError(f"{listing}: not a sha256sum listing (line {line[:80]!r}); the file is damaged")
        if which is not None and not which(name):
            continue
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing, but {listing.name} lists it; the checkpoint is incomplete")
        if sha256_file(f) != want:
            raise CheckpointError(f"{f}: its SHA-256 differs from the one recorded in {listing.name} when it was "
                                  "written; the file is damaged (or was changed), so the checkpoint is not used")
    return True


# -- config.json ----------------------------------------------------------------------------------------------------------
def read_config(checkpoint_dir: str | os.PathLike) -> dict:
    """config.json of ``checkpoint_dir``, parsed. Raises ``CheckpointError`` naming the directory or file when it is
    missing, not valid JSON (truncated, damaged) or not a JSON object."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {str(d)!r} does not exist (or is not a directory)")
    path = d / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{d}: no {CONFIG_FILE} (expected an HF model directory: {CONFIG_FILE} + *.safetensors)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is truncated or damaged") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _int(config: Mapping, key: str, where, default=None) -> int:
    val = config.get(key) if config.get(key) is not None else default
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        raise CheckpointError(f"{where}: {key} must be an int >= 1, got {val!r}")
    return val


def _rope(config: Mapping, where) -> tuple[float, dict | None]:
    """(theta, llama3 scaling dict or None) from transformers 5's ``rope_parameters`` or 4's ``rope_theta`` +
    ``rope_scaling``."""
    params = config.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise CheckpointError(f"{where}: rope_parameters must be an object, got {params!r}")
    scaling = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10_000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise CheckpointError(f"{where}: rope_theta must be a number > 0, got {theta!r}")
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise CheckpointError(f"{where}: RoPE type {rope_type!r} is not supported; allowed: {list(_ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in merged]
    if missing:
        raise CheckpointError(f"{where}: llama3 RoPE scaling lacks {missing}")
    return float(theta), {"rope_type": "llama3", **{k: merged[k] for k in keys}}


def llama_args(config: Mapping, where: str | os.PathLike = CONFIG_FILE) -> dict:
    """``flexgen_long.models.longgen_llama`` arguments (everything but the layout) from an HF Llama config.json:
    sizes, head_dim, RoPE theta and llama3 scaling, norm eps, tied embeddings. Refuses what the Llama builder does not
    have (biases, other activations, other RoPE scalings), naming the field and the allowed values."""
    if config.get("model_type") != "llama":
        raise CheckpointError(f"{where}: model_type must be 'llama' (a Llama-family checkpoint), got "
                              f"{config.get('model_type')!r}")
    for key, default, allowed in (("hidden_act", "silu", ("silu",)), ("attention_bias", False, (False,)),
                                  ("mlp_bias", False, (False,))):  # defaults: transformers' LlamaConfig
        if config.get(key, default) not in allowed:
            raise CheckpointError(f"{where}: {key}={config.get(key)!r} is not supported; allowed: {list(allowed)}")
    heads = _int(config, "num_attention_heads", where)
    dim = _int(config, "hidden_size", where)
    theta, scaling = _rope(config, where)
    eps = config.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise CheckpointError(f"{where}: rms_norm_eps must be a number in (0, 1), got {eps!r}")
    tie = config.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise CheckpointError(f"{where}: tie_word_embeddings must be true or false, got {tie!r}")
    return {
        "vocab_size": _int(config, "vocab_size", where),
        "num_layers": _int(config, "num_hidden_layers", where),
        "num_heads": heads,
        "num_kv_heads": _int(config, "num_key_value_heads", where, heads),
        "embed_dim": dim,
        "intermediate_dim": _int(config, "intermediate_size", where),
        "max_seq_len": _int(config, "max_position_embeddings", where),
        "rope_base": theta,
        "norm_eps": float(eps),
        "rope_scaling": scaling,
        "tie_word_embeddings": tie,
        "head_dim": _int(config, "head_dim", where, dim // heads),
    }


# -- weights --------------------------------------------------------------------------------------------------------------
def weight_files(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: those of ``model.safetensors.index.json`` when it exists (sharded hub
    checkpoints), else every ``*.safetensors`` in the directory."""
    d = Path(checkpoint_dir)
    index = d / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({d / name for name in weight_map.values()})
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names weight files that do not exist: {missing}")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        extra = " (only PyTorch *.bin files: convert them with transformers' save_pretrained(safe_serialization="\
                "True))" if any(d.glob("*.bin")) else ""
        raise CheckpointError(f"{d}: no *.safetensors weight files{extra}")
    return files


def _expected_shapes(args: Mapping) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a Llama with ``llama_args``."""
    v, d, f, hd = args["vocab_size"], args["embed_dim"], args["intermediate_dim"], args["head_dim"]
    q, kv = args["num_heads"] * hd, args["num_kv_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not args["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for i in range(args["num_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f)}
    return shapes


def _declared_dtype(config: Mapping, where) -> torch.dtype | None:
    name = config.get("dtype", config.get("torch_dtype"))  # transformers 5 writes "dtype", 4 "torch_dtype"
    if name is None:
        return None
    if name not in _DTYPES:
        raise CheckpointError(f"{where}: dtype {name!r} is not supported; allowed: {sorted(_DTYPES)}")
    return _DTYPES[name]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); the file is truncated or damaged") \
            from None


def load_hf_state_dict(checkpoint_dir: str | os.PathLike, config: Mapping | None = None, *,
                       max_abs: float = MAX_ABS_WEIGHT, verify: bool = True,
                       hf_names: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Torchtune-keyed state dict and the config of an HF Llama directory (one or several ``*.safetensors``);
    ``hf_names``: the same checked tensors under their HF names, as the files hold them (no conversion).

    Checks, each failure a ``CheckpointError`` naming the file: readable files; no tensor in two files; exactly the
    tensors a Llama of config.json's sizes has (``rotary_emb.inv_freq`` buffers of old exports are ignored, as
    transformers does; a tied checkpoint may carry ``lm_head.weight``, which tying ignores), each of its shape; one
    floating dtype, the one config.json declares; every value finite and ``|w| <= max_abs``."""
    from torchtune.models.convert_weights import hf_to_tune

    d = Path(checkpoint_dir)
    if verify:  # every file against the checksums the checkpoint was written with (verify_checksums)
        verify_checksums(d)
    config = dict(read_config(d) if config is None else config)
    where = d / CONFIG_FILE
    args = llama_args(config, where)
    declared = _declared_dtype(config, where)
    expected = _expected_shapes(args)
    hf_sd: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}
    for f in weight_files(d):
        for key, t in _read_safetensors(f).items():
            if key in hf_sd:
                raise CheckpointError(f"{f}: tensor {key!r} is also in {source[key]}")
            if "rotary_emb.inv_freq" in key or (key == "lm_head.weight" and args["tie_word_embeddings"]):
                continue
            hf_sd[key], source[key] = t, f
    missing = sorted(set(expected) - set(hf_sd))
    unexpected = sorted(set(hf_sd) - set(expected))
    if missing or unexpected:
        files = sorted({str(p) for p in source.values()}) or [str(d)]
        raise CheckpointError(f"{', '.join(files)}: tensors do not match {where} (a Llama with {args['num_layers']} "
                              f"layers): missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected "
                              f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    dtypes = {}
    for key, t in hf_sd.items():
        f = source[key]
        if tuple(t.shape) != expected[key]:
            raise CheckpointError(f"{f}: tensor {key!r} has shape {tuple(t.shape)}, but {where} implies "
                                  f"{expected[key]}")
        if t.dtype not in _DTYPES.values():
            raise CheckpointError(f"{f}: tensor {key!r} has dtype {t.dtype}; allowed: float32, float16, bfloat16 "
                                  "(quantized checkpoints are not supported)")
        if declared is not None and t.dtype != declared:
            raise CheckpointError(f"{f}: tensor {key!r} is {t.dtype}, but {where} declares dtype {declared}")
        dtypes.setdefault(t.dtype, key)
        finite = torch.isfinite(t)
        if not finite.all():
            bad = (~finite).sum().item()
            raise CheckpointError(f"{f}: tensor {key!r} holds {bad} non-finite value(s) (NaN/Inf): the file is "
                                  "damaged")
        peak = t.abs().amax().item() if t.numel() else 0.0
        if peak > max_abs:
            raise CheckpointError(f"{f}: tensor {key!r} holds a value of magnitude {peak:.3g} > {max_abs:g}, "
                                  "implausible for trained weights: the file is damaged")
    if len(dtypes) > 1:
        raise CheckpointError(f"{d}: tensors of several dtypes: " + ", ".join(f"{k!r} is {t}" for t, k in
                                                                               dtypes.items()))
    if hf_names:
        return hf_sd, config
    sd = hf_to_tune(hf_sd, num_heads=args["num_heads"], num_kv_heads=args["num_kv_heads"], dim=args["embed_dim"],
                    head_dim=args["head_dim"])
    return sd, config


# -- model against config ------------------------------------------------------------------------------------------------
MODEL_FIELDS = {  # llama_args key -> config.json field
    "vocab_size": "vocab_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads", "embed_dim": "hidden_size", "intermediate_dim": "intermediate_size",
    "head_dim": "head_dim", "tie_word_embeddings": "tie_word_embeddings"}


def model_sizes(model: nn.Module) -> dict:
    """The sizes of a torchtune-structured Llama (ours or torchtune's) under ``llama_args``' names: what config.json
    records of it (``MODEL_FIELDS`` maps them to config.json's names)."""
    from torchtune.modules import TiedLinear

    attn = model.layers[0].attn
    missing = [a for a in ("num_heads", "num_kv_heads", "head_dim", "embed_dim") if not hasattr(attn, a)]
    if missing:
        raise ValueError(f"model.layers[0].attn lacks {missing}: not a torchtune-style Llama attention")
    return {"vocab_size": model.tok_embeddings.num_embeddings, "num_layers": len(model.layers),
            "num_heads": attn.num_heads, "num_kv_heads": attn.num_kv_heads, "embed_dim": attn.embed_dim,
            "intermediate_dim": model.layers[0].mlp.w1.out_features, "head_dim": attn.head_dim,
            "tie_word_embeddings": isinstance(model.output, TiedLinear)}


def check_model(model: nn.Module, config: Mapping, where: str | os.PathLike, section: str = "model") -> None:
    """Refuse a model whose sizes differ from the checkpoint's config.json, naming every differing field (before any
    weights are read; the model may live on the meta device). RoPE settings and max_seq_len may differ: length
    extension changes them."""
    want = llama_args(config, where)
    have = model_sizes(model)
    diff = [f"{k}={have[k]!r} (config.json {MODEL_FIELDS[k]}={want[k]!r})" for k in MODEL_FIELDS if have[k] != want[k]]
    if diff:
        raise CheckpointError(f"config section '{section}' builds a model that does not fit {where}: "
                              + "; ".join(diff) + ". For an HF checkpoint use model._component_="
                              "flexgen_long.models.from_hf_config with model.checkpoint_dir=<the directory>, or omit "
                              "the model section")


def _model_file(name: str) -> bool:
    """Whether loading a checkpoint's model reads its file ``name``: config.json and the weights do; a finetuning
    checkpoint's recipe_state.pt (optimizer state, read only by a resumed run, which checks it) does not."""
    return name in (CONFIG_FILE, INDEX_FILE) or name.endswith(".safetensors")


def load_model(checkpoint_dir: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, model_cfg: Mapping | None = None) -> nn.Module:
    """The model of an HF checkpoint directory with its weights (checked, strict).

    Architecture: ``model_cfg`` when given (a torchtune ``_component_`` config, e.g. ``from_hf_config`` with a LongGen
    layout; its sizes must match config.json -- ``check_model``); else a checkpoint written by
    recipes/longgen_finetune.py is rebuilt as trained (the model config saved in its config.json, layout included), and
    any other HF Llama directory is ``flexgen_long.models.from_hf_config``: the original model, every layer full. The
    model is first built on the meta device, so a mismatch fails before any memory is allocated."""
    d = Path(checkpoint_dir)
    verify_checksums(d, _model_file)  # the files it reads, before anything is read from them
    config = read_config(d)
    build = architecture(d, config, model_cfg)
    sd, _ = load_hf_state_dict(d, config, verify=False)  # verified above
    with torch.device(device):
        model = build()
    model.load_state_dict(sd, strict=True)
    return model.to(dtype=dtype) if dtype is not None else model


def architecture(checkpoint_dir: str | os.PathLike, config: Mapping,
                 model_cfg: Mapping | None = None) -> Callable[[], nn.Module]:
    """The function that builds the model of a checkpoint directory without its weights (see ``load_model``):
    ``model_cfg`` when given, else a recipe checkpoint's recorded model config, else ``from_hf_config``. It is first
    built on the meta device and checked against ``config`` (``check_model``), so a mismatch fails here, before any
    memory is allocated."""
    from omegaconf import DictConfig, OmegaConf
    from torchtune import config as tt_config

    from .models import from_hf_config  # models builds on this module; imported here, not at the top

    d = Path(checkpoint_dir)
    if model_cfg is None and is_recipe_checkpoint(config):
        model_cfg = config["flexgen_long"]["model"]

    def build():
        if model_cfg is None:
            return from_hf_config(d)
        return tt_config.instantiate(model_cfg if isinstance(model_cfg, DictConfig) else OmegaConf.create(model_cfg))

    with torch.device("meta"):
        check_model(build(), config, d / CONFIG_FILE)
    return build


def is_recipe_checkpoint(config: Mapping) -> bool:
    """Whether config.json was written by recipes/longgen_finetune.py (it records the model config it trained)."""
    return (config.get("flexgen_long") or {}).get("model") is not None

