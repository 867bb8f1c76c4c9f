"""Write a LongGen model as a transformers directory that ``AutoModelForCausalLM.from_pretrained`` loads (after
``import flexgen_long.hf_model``)::

    python -m flexgen_long.export_hf outputs/run/step_1000 outputs/run-hf          # a finetune checkpoint (or run dir)
    python -m flexgen_long.export_hf outputs/smollm2-135m-instruct outputs/smollm2-longgen-hf \\
        --full-layers middle --sink 64 --window 448                                # an HF Llama + a layout

CHECKPOINT is a checkpoint written by recipes/longgen_finetune.py (its layout is recorded in its config.json; a run's
output_dir means its latest step) or any HF Llama directory, to which the layout options apply as in the recipes'
``model`` section (``--full-layers`` as flexgen_long.layout's ``full_layers``; ``--sink/--window`` for AttnSink,
``--block-sparse`` for BlockSparse; default: the middle third full, ``DEFAULT_SPARSE_PATTERN`` elsewhere).

OUT receives ``config.json`` (model_type ``flexgen_long_llama``: the Llama fields plus the layout; see
flexgen_long.hf_model), ``model.safetensors``, ``generation_config.json`` when the source has one, and the tokenizer:
the source's own, the one a finetune run recorded, or ``--tokenizer DIR``. It is written under a temporary name and
renamed when complete (flexgen_long.checkpoint_io.write_dir_atomic); a non-empty OUT is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from . import checkpoint_io, hf
from .layout import DEFAULT_SPARSE_PATTERN, layer_patterns
from .patterns import AttnSink, BlockSparse
from .recipe_config import DTYPES

__all__ = ["export_hf", "resolve_checkpoint", "main"]

#: --dtype: the recipes' dtypes (flexgen_long.recipe_config.DTYPES) and fp16, which an inference export may use.
_DTYPES = {**DTYPES, "fp16": torch.float16}
#: config.json fields of the source that the exported config does not take over (ours replace them or they name the
#: source's own class / recipe).
_DROPPED = {"flexgen_long", "architectures", "model_type", "auto_map", "quantization_config", "transformers_version",
            "layer_types", "sliding_window", "attention_sink_size", "block_sparse", "attn_implementation",
            "torch_dtype", "dtype"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory: ``path`` itself when it holds config.json, else the latest ``step_<N>`` of a finetune
    output_dir."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"CHECKPOINT {str(p)!r} is not a directory")
    if (p / hf.CONFIG_FILE).is_file():
        return p
    latest = checkpoint_io.latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"CHECKPOINT {str(p)!r} holds neither {hf.CONFIG_FILE} (an HF model directory or a "
                                "finetune checkpoint) nor step_<N> checkpoints (a finetune output_dir)")
    return latest


def _tokenizer_source(src: Path, config: dict, tokenizer) -> Path | None:
    if tokenizer is not None:
        tok = Path(tokenizer)
        if not any((tok / f).is_file() for f in _TOKENIZER_FILES):
            raise FileNotFoundError(f"--tokenizer {str(tok)!r} holds none of {list(_TOKENIZER_FILES)}")
        return tok
    if any((src / f).is_file() for f in _TOKENIZER_FILES):
        return src
    recorded = ((config.get("flexgen_long") or {}).get("recipe") or {}).get("tokenizer") or {}
    base = recorded.get("checkpoint_dir")  # flexgen_long.tokenizers.hf_tokenizer's directory, as the run recorded it
    if base and any((Path(base) / f).is_file() for f in _TOKENIZER_FILES):
        return Path(base)
    return None


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, *, full_layers=None, sparse_pattern=None,
              tokenizer: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
              overwrite: bool = False, log=print) -> Path:
    """Write ``checkpoint`` (see the module docstring) as a transformers directory ``out``; returns ``out``.
    ``full_layers`` / ``sparse_pattern`` give a plain HF Llama directory its layout (a finetune checkpoint keeps the
    one it was trained with); ``dtype`` converts the weights (default: the checkpoint's)."""
    from .hf_model import LongGenLlamaConfig, LongGenLlamaForCausalLM, layout_fields

    src = resolve_checkpoint(checkpoint)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"OUT {str(out)!r} exists and is not empty; choose another directory or pass --overwrite")
    config = hf.read_config(src)
    trained = hf.is_recipe_checkpoint(config)
    if trained and (full_layers is not None or sparse_pattern is not None):
        raise ValueError(f"{src} is a finetune checkpoint: its layout is the one it was trained with; the layout "
                         "options (--full-layers, --sink/--window, --block-sparse) are for plain HF Llama directories")
    tok_dir = _tokenizer_source(src, config, tokenizer)

    # The checkpoint's files hold HF Llama names (a finetune checkpoint is written with them): every tensor is checked
    # and written as it is, cast only to ``dtype``. The layout comes from the model the checkpoint describes, built
    # on the meta device: a finetune checkpoint's recorded model config, or the layout options.
    hf.verify_checksums(src)
    with torch.device("meta"):
        layers = hf.architecture(src, config)().layers
    patterns = [layer.attn.pattern for layer in layers] if trained else list(layer_patterns(
        len(layers), "middle" if full_layers is None else full_layers,
        DEFAULT_SPARSE_PATTERN if sparse_pattern is None else sparse_pattern))
    weights, _ = hf.load_hf_state_dict(src, config, verify=False, hf_names=True)  # verified above
    if dtype is not None:
        weights = {k: v.to(dtype) for k, v in weights.items()}
    weight_dtype = next(iter(weights.values())).dtype
    fields = {k: v for k, v in config.items() if k not in _DROPPED}
    hf_config = LongGenLlamaConfig(**fields, **layout_fields(patterns), dtype=weight_dtype,
                                   architectures=["LongGenLlamaForCausalLM"])
    with torch.device("meta"):
        hf_model = LongGenLlamaForCausalLM(hf_config)
    missing, unexpected = hf_model.load_state_dict(weights, strict=False, assign=True)
    tied = ["lm_head.weight"] if hf_config.tie_word_embeddings else []
    if sorted(missing) != tied or unexpected:
        raise RuntimeError(f"{src}: weights do not fit the exported model: missing {missing}, unexpected {unexpected}")
    hf_model.tie_weights()
    del weights

    def fill(tmp: Path) -> None:
        hf_model.save_pretrained(str(tmp))
        if (src / "generation_config.json").is_file():
            shutil.copy2(src / "generation_config.json", tmp / "generation_config.json")
        if tok_dir is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(tmp))
        LongGenLlamaConfig.from_pretrained(str(tmp)).patterns()  # read back: the file describes this layout

    checkpoint_io.write_dir_atomic(out, fill, replace=overwrite)
    full = [i for i, t in enumerate(hf_config.layer_types) if t == "full_attention"]
    tok = f"from {tok_dir}" if tok_dir else "none (pass --tokenizer DIR)"
    kinds = sorted({repr(p) for p in patterns})
    log(f"Exported {src} -> {out}: {len(patterns)} layers, full {full}, patterns {kinds}, {weight_dtype}, "
        f"tokenizer {tok}")
    return out


def _full_layers(text: str):
    """--full-layers: a flexgen_long.layout name, a fraction, or comma-separated layer indices."""
    if "," in text or text.strip().isdigit():
        try:
            return [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--full-layers: {text!r} is not a list of layer indices") from None
    try:
        return float(text)
    except ValueError:
        return text


def _sparse_pattern(args, parser):
    given = [n for n in ("sink", "window") if getattr(args, n) is not None]
    if given and args.block_sparse:
        parser.error("give --sink/--window (AttnSink) or --block-sparse (BlockSparse), not both")
    if given:
        if len(given) != 2:
            parser.error("--sink and --window go together (AttnSink(sink, window))")
        return AttnSink(args.sink, args.window)
    if args.block_sparse:
        parts = args.block_sparse.split(",")
        if len(parts) not in (3, 4) or not all(p.strip().isdigit() for p in parts[:3]) \
                or (len(parts) == 4 and parts[3].strip() not in ("per_head", "shared")):
            parser.error(f"--block-sparse must be BLOCK,LOCAL_BLOCKS,VERTICAL_STRIDE[,per_head|shared], got "
                         f"{args.block_sparse!r}")
        return BlockSparse(*(int(p) for p in parts[:3]), per_head=len(parts) == 4 and parts[3].strip() == "per_head")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexgen_long.export_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a finetune checkpoint, a finetune output_dir (its latest step) or an HF Llama directory")
    parser.add_argument("out", metavar="OUT", help="the transformers directory to write")
    parser.add_argument("--full-layers", type=_full_layers, default=None,
                        help="HF Llama sources: the full-attention layers (middle, bottom, top, all, none, "
                             "interleave:k, a fraction or indices like 10,11,12; default middle)")
    parser.add_argument("--sink", type=int, help="HF Llama sources: AttnSink sink tokens")
    parser.add_argument("--window", type=int, help="HF Llama sources: AttnSink window (keys per query, itself "
                                                   "included)")
    parser.add_argument("--block-sparse", metavar="B,L,S[,per_head]",
                        help="HF Llama sources: BlockSparse(block, local_blocks, vertical_stride[, per_head])")
    parser.add_argument("--tokenizer", help="the directory whose tokenizer to include (default: the source's, or the "
                                            "one a finetune run recorded)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), help="convert the weights (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        pattern = _sparse_pattern(args, parser)
        export_hf(args.checkpoint, args.out, full_layers=args.full_layers, sparse_pattern=pattern,
                  tokenizer=args.tokenizer, dtype=_DTYPES.get(args.dtype), overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, hf.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Done in {time.perf_counter() - t0:.0f} s. Load it with: import flexgen_long.hf_model; "
          f"AutoModelForCausalLM.from_pretrained({args.out!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
