"""The full layers that ``model.full_layers: retrieval`` would give a model, without training: its layers ranked by
the copy score of their best retrieval head (flexgen_long.retrieval), and the config line that fixes that choice.

    python recipes/longgen_layers.py MODEL_DIR [--full-layers retrieval[:n|:f]] [--device cpu|cuda] [--dtype fp32|bf16]
        [--length N] [--samples N] [--batch-size N] [--tokenizer DIR|bytes] [--json OUT]

MODEL_DIR: an HF Llama directory (scored as it is: every layer full) or a checkpoint of recipes/longgen_finetune.py
(scored under the layout it was trained with). The tokenizer is MODEL_DIR's own unless ``--tokenizer`` names another
directory (a finetuning checkpoint holds none: give its base model's) or ``bytes`` (byte-level models). The finetuning
recipe makes the same choice, on the same prompts, for ``model.full_layers=retrieval`` with ``checkpoint.base_dir``
set to MODEL_DIR (at its defaults: 8 prompts per depth, 4096 tokens or less where the model's RoPE table is shorter).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flexgen_long import hf
from flexgen_long import recipe_config as rc
from flexgen_long import retrieval
from flexgen_long.data import ANSWER_ROOM
from flexgen_long.layout import retrieval_budget
from flexgen_long.tokenizers import byte_tokenizer, hf_tokenizer


def tokenizer_for(model_dir: Path, choice: str | None):
    """``--tokenizer``: a directory's HF tokenizer, ``bytes``, or (None) MODEL_DIR's own."""
    if choice == "bytes":
        return byte_tokenizer()
    d = Path(choice) if choice is not None else model_dir
    if not any((d / f).is_file() for f in rc.TOKENIZER_FILES):
        where = f"--tokenizer {choice}" if choice is not None else f"{model_dir} (MODEL_DIR)"
        raise rc.ConfigError(f"{where} holds neither {' nor '.join(rc.TOKENIZER_FILES)}: give --tokenizer DIR (for "
                             "a finetuning checkpoint, its base model's directory) or --tokenizer bytes")
    return hf_tokenizer(str(d))


def main(argv=None) -> retrieval.FullLayerChoice:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="an HF Llama directory or a finetuning checkpoint")
    ap.add_argument("--full-layers", default="retrieval",
                    help="the budget: retrieval (as many as the middle third), retrieval:<n> or retrieval:<f>")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(rc.DTYPES), help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--length", type=int, default=None,
                    help=f"prompt length in tokens (default 4096, or the model's max_seq_len - {ANSWER_ROOM} if "
                         "shorter)")
    ap.add_argument("--samples", type=int, default=8, help="prompts per needle depth (5 depths; default 8)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    ap.add_argument("--tokenizer", default=None, help="an HF directory whose tokenizer to use, or 'bytes'")
    ap.add_argument("--json", default=None, help="also write the choice and every head's scores to this file")
    a = ap.parse_args(argv)
    with rc.user_errors():
        try:
            retrieval_budget(a.full_layers, None)
        except ValueError as e:
            raise rc.ConfigError(f"--full-layers: {e}") from None
        try:
            device = rc.device_field({"device": a.device}, "device")
        except rc.ConfigError as e:
            raise rc.ConfigError(str(e).replace("config field 'device'", "--device")) from None
        dtype = rc.DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
        d = Path(a.model_dir)
        hf.read_config(d)  # a directory without a readable config.json is named before anything loads
        tokenizer = tokenizer_for(d, a.tokenizer)
        try:
            scores = retrieval.score_model_dir(d, tokenizer, device=device, dtype=dtype, length=a.length,
                                               samples_per_depth=a.samples, batch_size=a.batch_size)
            choice = retrieval.choose_full_layers(scores, a.full_layers, source=str(d.resolve()))
        except ValueError as e:  # a tokenizer or length the model cannot hold, a budget above its layer count, ...
            raise rc.ConfigError(str(e)) from None
    print(f"Retrieval scores of {d}: {len(scores.copy_score)} layers ({', '.join(sorted(set(scores.patterns)))}), "
          f"{scores.prompts} passkey prompts of {scores.length} tokens, {scores.device} {scores.dtype}, "
          f"{scores.seconds:.1f} s; recompute check {scores.recompute_max_rel_error:.1e}")
    print(choice.table())
    print(choice.summary())
    if a.json:
        Path(a.json).write_text(json.dumps({"choice": choice.to_dict(), "scores": scores.to_dict()}, indent=2) + "\n")
        print(f"Wrote {a.json}")
    print(choice.config_line())
    return choice


if __name__ == "__main__":
    main()
    sys.exit(0)
