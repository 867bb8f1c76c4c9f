"""Generation with a LongGen hybrid model over compact per-layer KV caches (flexgen_long.generation), streaming text.

Run from the repository root::

    tune run recipes/longgen_generate.py --config recipes/configs/generate/tiny.yaml [key=value ...]
    tune run recipes/longgen_generate.py --config recipes/configs/generate/smollm2_135m.yaml    # a real model

Steps: build the model and load its weights (see ``build_model``), lay out its q/k/v and gate/up weights as one
matrix each (``models.fuse_projections``: one matrix product per group), quantize its weights when ``quantize`` says
so (``flexgen_long.quantize``: the fused matrices as they are), check that the tokenizer fits the model's
vocabulary, print the KV-cache memory plan (checked against free memory before anything is allocated), tokenize the
prompts (starting as the tokenizer starts plain text: SmolLM2 adds no BOS), generate them as one batch, print each
prompt with its continuation (stdout), then the speed (stderr): the batch's prefill time, its decode rate over all
rows (every row's tokens after its first, over the batch's decode wall time) and each row's own rate (a row that hit a
stop token stops its clock there). Every key: ``GenerateConfig`` (``--help``).
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from omegaconf import DictConfig
from torch import nn
from torchtune import utils

from flexgen_long import cli
from flexgen_long import recipe_config as rc
from flexgen_long.recipe_config import REQUIRED, key
from flexgen_long.cache import plan_cache
from flexgen_long.generation import batch_decode_s, batch_tokens_per_s, generate
from flexgen_long.models import fuse_projections
from flexgen_long.policy import Policy

log = utils.get_logger("INFO")



@dataclass(kw_only=True)
class GenerateConfig(rc.RuntimeKeys, rc.InferenceModelKeys):  # --help: the model's keys, the device's, then these
    """The recipe's keys: the one source of its checks, its --help and its documentation."""
    prompts: list[str] = key(REQUIRED, "the prompts, generated as one batch", nonempty=True,
                             hint='on the command line: prompts=\'["def main(", "import os"]\'')
    max_new_tokens: int = key(64, "tokens generated per prompt (fewer where a stop token comes first)", min=1)
    temperature: float = key(0.0, "sampling temperature; 0: greedy", min=0)
    top_k: Optional[int] = key(None, "sample among the k most likely tokens; null: all", min=1)
    top_p: Optional[float] = key(None, "sample within the smallest set of tokens of probability >= p; null: all",
                                 above=0, max=1)
    stop_on_eos: bool = key(True, "stop a row at the tokenizer's end-of-text token")
    prefill_chunk: Union[Literal["auto"], None, int] = key("auto", "tokens per prefill chunk: auto (whole prompts "
                                                                   "if they fit next to the KV caches), null (whole)",
                                                           min=1)
    compile: Optional[bool] = key(None, "compile each layer's work around attention; null: on a GPU, not on a CPU")
    kv_cache_dtype: Optional[Literal["fp8"]] = key(None, "fp8: the full layers' KV caches in float8 e4m3 with a "
                                                         "scale per token and head (half their bytes); null: the "
                                                         "model's dtype")
    seed: int = key(0, "seeds the sampling (and random weights)", min=0)


def validate_config(cfg: DictConfig) -> Path | None:
    """Every field, before a model is built (the schema, the device, the model and tokenizer sections); returns
    checkpoint_dir (None: random weights)."""
    rc.check(cfg, GenerateConfig)
    checkpoint = rc.checkpoint_dir_field(cfg)
    rc.check_model_sections(cfg, checkpoint)
    return checkpoint


def build_fused(cfg: DictConfig, checkpoint: Path | None, device, dtype, log) -> nn.Module:
    """``rc.build_model``, then one q/k/v and one gate/up matrix product per layer (same weights, no extra memory; this
    recipe saves nothing): the fastest measured decode with the compiled layers (analysis/README.md, "The user's
    path"). Before ``quantize``, which then quantizes the fused matrices."""
    return fuse_projections(rc.build_model(cfg, checkpoint, device, dtype, log))


def generate_text(cfg: DictConfig) -> None:
    """The whole recipe (see the module docstring)."""
    checkpoint = validate_config(cfg)
    compiled = cfg.compile
    model, tokenizer, _, dtype = rc.load_for_inference(cfg, checkpoint, build=build_fused, log=log.info)
    prompts = [tokenizer.encode(p, add_bos=True, add_eos=False) for p in cfg.prompts]
    max_new = cfg.max_new_tokens
    policy = Policy(prefill_chunk=cfg.prefill_chunk, compile_decode=compiled, compile_prefill=compiled,
                    kv_cache_dtype=cfg.kv_cache_dtype)
    log.info("\n" + str(plan_cache(model, len(prompts), max(map(len, prompts)) + max_new, dtype, policy)))

    # The results on stdout: each prompt with its continuation. On a terminal, one prompt's tokens are also shown on
    # stderr as they arrive (a batch decodes its rows together, token by token across rows: no readable stream).
    live = len(prompts) == 1 and sys.stderr.isatty()

    def stream(row: int, token: int) -> None:
        print(tokenizer.decode([token]), end="", file=sys.stderr, flush=True)

    if live:
        print(cfg.prompts[0], end="", file=sys.stderr, flush=True)
    outs = generate(model, prompts, max_new_tokens=max_new, temperature=cfg.temperature,
                    top_k=cfg.top_k, top_p=cfg.top_p,
                    stop_tokens=(getattr(tokenizer, "stop_tokens", None) or [tokenizer.eos_id])
                    if cfg.stop_on_eos else None,
                    on_token=stream if live else None,
                    policy=policy)
    if live:
        print(file=sys.stderr, flush=True)
    for i, (p, o) in enumerate(zip(cfg.prompts, outs)):
        print(f"=== [{i}] {p}{tokenizer.decode(o.tokens)}", flush=True)
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


@cli.parse(GenerateConfig, __file__, configs="generate")
def recipe_main(cfg: DictConfig) -> None:
    """Generation over compact KV caches: the prompts' text on stdout, the memory plan and speed on stderr."""
    generate_text(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
