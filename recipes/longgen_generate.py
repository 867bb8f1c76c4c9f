"""Generation with a LongGen hybrid model over compact per-layer KV caches (flexgen_long.generation), streaming text.

Run from the repository root::

    tune run recipes/longgen_generate.py --config recipes/configs/generate/tiny.yaml [key=value ...]
    tune run recipes/longgen_generate.py --config recipes/configs/generate/smollm2_135m.yaml    # a real model

Steps: build the model and load its weights (see ``build_model``), lay out its q/k/v and gate/up weights as one
matrix each (``models.fuse_projections``: one matrix product per group), check that the tokenizer fits the model's
vocabulary, print the KV-cache memory plan (checked against free memory before anything is allocated), tokenize the
prompts (starting as the tokenizer starts plain text: SmolLM2 adds no BOS), generate them as one batch, print each
prompt's text as its tokens arrive, then the speed: the batch's prefill time, its decode rate over all rows (every
row's tokens after its first, over the batch's decode wall time) and each row's own rate (a row that hit a stop token
stops its clock there).

``prefill_chunk``: ``auto`` (the default) prefills each prompt whole when its activations fit in the memory the KV
caches leave, else in the largest multiple of 128 tokens that fits (flexgen_long.cache.choose_prefill_chunk); null:
each prompt whole; an int: that many tokens per chunk.

``compile``: null (the default) lets ``generate()`` decide -- on a GPU it compiles each layer's work around attention
for the prefill and the decode step (faster from the first long prompt on; the first call pays the compilation, some
seconds), on the CPU it does not; true / false force it either way.
"""

from __future__ import annotations

import sys

import torch
from omegaconf import DictConfig, ListConfig
from torchtune import config, utils

from flexgen_long import recipe_config as rc
from flexgen_long.cache import plan_cache
from flexgen_long.generation import batch_decode_s, batch_tokens_per_s, generate
from flexgen_long.models import fuse_projections
from flexgen_long.policy import Policy

log = utils.get_logger("INFO")

RECIPE_KEYS = {"checkpoint_dir", "model", "tokenizer", "prompts", "max_new_tokens", "temperature", "top_k", "top_p",
               "stop_on_eos", "prefill_chunk", "compile", "seed", "device", "dtype"}


def validate_config(cfg: DictConfig) -> None:
    """Every field, before a model is built (flexgen_long.recipe_config: errors name the field, value and allowed)."""
    rc.check_keys(cfg, RECIPE_KEYS, required=("tokenizer", "prompts"))
    prompts = rc.get(cfg, "prompts")
    if not isinstance(prompts, (list, ListConfig)) or not prompts \
            or not all(isinstance(p, str) and p for p in prompts):
        rc.fail("prompts", "must be a non-empty list of non-empty strings (on the command line: "
                           f"prompts='[\"def main(\", \"import os\"]'), got {prompts!r}")
    rc.integer(cfg, "max_new_tokens", 64, minimum=1)
    rc.number(cfg, "temperature", 0.0, minimum=0)
    rc.integer(cfg, "top_k", None, minimum=1, nullable=True)
    top_p = rc.number(cfg, "top_p", None, positive=True, nullable=True)
    if top_p is not None and top_p > 1:
        rc.fail("top_p", f"must be null or a number in (0, 1], got {top_p!r}")
    rc.boolean(cfg, "stop_on_eos", True)
    prefill_chunk_field(cfg)
    compile_field(cfg)
    rc.integer(cfg, "seed", 0, minimum=0)
    rc.device_field(cfg)
    rc.dtype_field(cfg)
    rc.check_component("tokenizer", rc.get(cfg, "tokenizer"))
    rc.check_model_sections(cfg, rc.checkpoint_dir_field(cfg))


def prefill_chunk_field(cfg: DictConfig) -> int | str | None:
    """``prefill_chunk``: 'auto' (default), null or an int >= 1 (see the module docstring)."""
    v = rc.get(cfg, "prefill_chunk", "auto")
    if v == "auto" or v is None:
        return v
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        rc.fail("prefill_chunk", "must be 'auto' (the whole prompt if its activations fit next to the KV caches, "
                                 "else a chunk chosen from the memory plan), null (the whole prompt) or an int >= 1, "
                                 f"got {v!r}")
    return v


def compile_field(cfg: DictConfig) -> bool | None:
    """``compile``: null (generate()'s default: on for CUDA, off elsewhere), true or false."""
    v = rc.get(cfg, "compile", None)
    if v is not None and not isinstance(v, bool):
        rc.fail("compile", f"must be null (generate()'s default: compiled layers on a GPU, eager on the CPU), true or "
                           f"false, got {v!r}")
    return v


def generate_text(cfg: DictConfig) -> None:
    """The whole recipe (see the module docstring)."""
    validate_config(cfg)
    torch.manual_seed(cfg.get("seed", 0))
    device, dtype = rc.device_field(cfg), rc.dtype_field(cfg)
    compiled = compile_field(cfg)
    model = rc.build_model(cfg, rc.checkpoint_dir_field(cfg), device, dtype, log=log.info)
    # one q/k/v and one gate/up matrix product per layer (same weights, no extra memory; this recipe saves nothing):
    # with the compiled layers, 10.3 ms per token at 128K on an H200, Llama-2-7B shape (analysis/README.md)
    fuse_projections(model)
    tokenizer = rc.instantiate("tokenizer", cfg.tokenizer)
    rc.tokenizer_fits(tokenizer, model.tok_embeddings.num_embeddings)
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
                    stop_tokens=(getattr(tokenizer, "stop_tokens", None) or [tokenizer.eos_id])
                    if cfg.get("stop_on_eos", True) else None,
                    on_token=on_token, policy=Policy(prefill_chunk=prefill_chunk_field(cfg),
                                                     compile_decode=compiled, compile_prefill=compiled))
    for i, (p, o) in enumerate(zip(cfg.prompts, outs)):
        print(f"\n=== [{i}] {p}{tokenizer.decode(o.tokens)}", flush=True)
    log.info(speed_report(outs))


def speed_report(outs) -> str:
    """The speed line: the batch's prefill (and the chunk it used), the batch's decode rate over all rows, each row's
    own rate."""
    o = outs[0]
    chunk = "whole prompts" if o.prefill_chunk is None else f"chunks of {o.prefill_chunk} tokens"
    rows = ", ".join(f"[{i}] {r.decode_tokens} in {r.decode_s:.3f} s = {r.tokens_per_s:.1f}"
                     for i, r in enumerate(outs))
    return (f"prefill {o.prefill_s:.3f} s ({chunk}); decode {batch_decode_s(outs):.3f} s, "
            f"{batch_tokens_per_s(outs):.1f} tokens/s over the batch of {len(outs)} "
            f"({sum(r.decode_tokens for r in outs)} tokens after each row's first); per row tokens/s: {rows}")


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    with rc.user_errors():
        generate_text(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
