"""Generation with a LongGen hybrid model over compact per-layer KV caches (flexgen_long.generation), streaming text.

Run from the repository root::

    tune run recipes/longgen_generate.py --config recipes/configs/generate/tiny.yaml [key=value ...]

Steps: build the model (from ``checkpoint_dir``, a checkpoint written by recipes/longgen_finetune.py, or from the
``model`` section with random weights), print the KV-cache memory plan (checked against free memory before anything is
allocated), tokenize the prompts, generate them as one batch, print each prompt's text as its tokens arrive, then the
speed.
"""

from __future__ import annotations

import sys

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, utils

from flexgen_long import checkpoint_io
from flexgen_long.cache import plan_cache
from flexgen_long.generation import generate

log = utils.get_logger("INFO")

RECIPE_KEYS = {"checkpoint_dir", "model", "tokenizer", "prompts", "max_new_tokens", "temperature", "top_k", "top_p",
               "stop_on_eos", "prefill_chunk", "seed", "device", "dtype"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def validate_config(cfg: DictConfig) -> None:
    unknown = sorted(set(cfg.keys()) - RECIPE_KEYS)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; the recipe reads: {sorted(RECIPE_KEYS)}")
    prompts = cfg.get("prompts")
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"config field 'prompts': must be a non-empty list of non-empty strings, got {prompts!r}")
    if cfg.get("dtype", "fp32") not in DTYPES:
        raise ValueError(f"config field 'dtype': must be one of {sorted(DTYPES)}, got {cfg.get('dtype')!r}")
    if cfg.get("checkpoint_dir") is None and "model" not in cfg:
        raise ValueError("config needs 'checkpoint_dir' (a finetuned checkpoint) or a 'model' section")


def build_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    if cfg.get("checkpoint_dir"):
        return checkpoint_io.load_model(cfg.checkpoint_dir, device=device, dtype=dtype).eval()
    with torch.device(device):
        model = config.instantiate(cfg.model)
    return model.to(dtype=dtype).eval()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    validate_config(cfg)
    torch.manual_seed(cfg.get("seed", 0))
    device = torch.device(cfg.get("device", "cpu"))
    dtype = DTYPES[cfg.get("dtype", "fp32")]
    model = build_model(cfg, device, dtype)
    tokenizer = config.instantiate(cfg.tokenizer)
    prompts = [tokenizer.encode(p, add_bos=True, add_eos=False) for p in cfg.prompts]
    max_new = cfg.get("max_new_tokens", 64)
    log.info("\n" + str(plan_cache(model, len(prompts), max(map(len, prompts)) + max_new, dtype)))

    # Stream: the batch decodes together, so each token is printed under its prompt's tag as it arrives.
    def on_token(row: int, token: int) -> None:
        text = tokenizer.decode([token])
        if len(prompts) == 1:
            print(text, end="", flush=True)
        else:
            print(f"[{row}] {text!r}", flush=True)

    for i, p in enumerate(cfg.prompts):
        print(f"prompt [{i}]: {p}", flush=True)
    outs = generate(model, prompts, max_new_tokens=max_new, temperature=cfg.get("temperature", 0.0),
                    top_k=cfg.get("top_k"), top_p=cfg.get("top_p"),
                    stop_tokens=[tokenizer.eos_id] if cfg.get("stop_on_eos", True) else None,
                    prefill_chunk=cfg.get("prefill_chunk"), on_token=on_token)
    for i, (p, o) in enumerate(zip(cfg.prompts, outs)):
        print(f"\n=== [{i}] {p}{tokenizer.decode(o.tokens)}", flush=True)
    o = outs[0]
    log.info(f"prefill {o.prefill_s:.3f} s; decode {o.decode_s:.3f} s, {o.tokens_per_s:.1f} tokens/s per sequence "
             f"({o.tokens_per_s * len(outs):.1f} batch)")


if __name__ == "__main__":
    sys.exit(recipe_main())
