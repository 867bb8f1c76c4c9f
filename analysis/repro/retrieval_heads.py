"""Retrieval heads of a checkpoint, as a figure and JSON: which layers' attention heads copy the passkey out of the
needle (flexgen_long.retrieval: copy score and needle mass per layer and query head, each layer scored under its own
pattern, the recomputed attention checked against the layer's real output).

Used by the pipelines to see where retrieval lives before and after length extension; a user choosing full layers
runs ``python recipes/longgen_layers.py MODEL_DIR`` (the same scores, the ranking and the config line) or the
finetuning recipe with ``model.full_layers=retrieval``.

    python analysis/repro/retrieval_heads.py CHECKPOINT_DIR --out analysis/results/repro/heads_s1 [--length 1008]
    python analysis/repro/retrieval_heads.py outputs/smollm2/train_b/step_150 --out heads_b \
        --tokenizer-dir outputs/smollm2-135m-instruct      # a finetuned HF-tokenizer model (checkpoints hold none)

Tokenizer: ``--tokenizer-dir`` (an HF directory, ``flexgen_long.tokenizers.hf_tokenizer``), else the checkpoint's own
when it holds one (tokenizer.json / tokenizer.model: a plain HF model directory), else bytes (the repro's models).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from flexgen_long import hf  # noqa: E402
from flexgen_long.recipe_config import TOKENIZER_FILES  # noqa: E402
from flexgen_long.retrieval import choose_full_layers, default_length, retrieval_scores  # noqa: E402
from flexgen_long.tokenizers import byte_tokenizer, hf_tokenizer  # noqa: E402
from recipes.longgen_eval import layout_summary  # noqa: E402


def best_window(layer_scores: list[float], n: int) -> list[int]:
    """The ``n`` contiguous layers with the largest summed score (the first such window on ties): LongGen's contiguous
    block, placed on the retrieval heads (the byte-level repro's b_heads variant)."""
    if not 1 <= n <= len(layer_scores):
        raise ValueError(f"n must be in [1, {len(layer_scores)}], got {n}")
    sums = [sum(layer_scores[i:i + n]) for i in range(len(layer_scores) - n + 1)]
    start = max(range(len(sums)), key=lambda i: (sums[i], -i))
    return list(range(start, start + n))


def pick_tokenizer(checkpoint, tokenizer_dir=None):
    """``tokenizer_dir``'s HF tokenizer; else the checkpoint's own if it holds one; else bytes (see the docstring)."""
    if tokenizer_dir is not None:
        if not any((Path(tokenizer_dir) / f).is_file() for f in TOKENIZER_FILES):
            raise SystemExit(f"--tokenizer-dir {tokenizer_dir}: holds none of {list(TOKENIZER_FILES)}")
        return hf_tokenizer(tokenizer_dir)
    if any((Path(checkpoint) / f).is_file() for f in TOKENIZER_FILES):
        return hf_tokenizer(checkpoint)
    return byte_tokenizer()


def plot(result: dict, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    full = set(result["layout"]["full_layers"])
    for ax, key, label in zip(axes, ("copy_score", "needle_mass"), ("copy score", "attention mass on the needle")):
        m = torch.tensor(result[key])
        im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")  # fractions
        ax.set_xlabel("query head")
        ax.set_ylabel("layer (F = full attention)")
        ax.set_yticks(range(m.shape[0]), [f"{i} F" if i in full else str(i) for i in range(m.shape[0])])
        ax.set_xticks(range(m.shape[1]))
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                val = m[i, j].item()
                ax.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if val < 0.6 else "black")
        ax.set_title(label)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a recipe checkpoint directory (step_N, with config.json)")
    ap.add_argument("--out", required=True, help="output path without suffix: writes OUT.json and OUT.png")
    ap.add_argument("--length", type=int, default=None,
                    help="prompt length in tokens (default: min(4096, the model's max_seq_len - 16), room for the answer)")
    ap.add_argument("--samples", type=int, default=8, help="prompts per needle depth (5 depths; default 8)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--name", default=None, help="title of the figure (default: the checkpoint path)")
    ap.add_argument("--tokenizer-dir", default=None,
                    help="HF directory whose tokenizer to use (default: the checkpoint's own, else bytes)")
    args = ap.parse_args(argv)
    if args.length is not None and args.length < 128:
        ap.error(f"--length must be >= 128 (a passkey prompt needs ~120 tokens), got {args.length}")
    if args.samples < 1:
        ap.error(f"--samples must be >= 1, got {args.samples}")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = hf.load_model(args.checkpoint, device=args.device, dtype=dtype).eval()
    if args.length is None:
        args.length = default_length(model)
    if args.length + 16 > model.max_seq_len:
        ap.error(f"--length {args.length} leaves no room for the answer: at most max_seq_len - 16 = "
                 f"{model.max_seq_len - 16}")
    tokenizer = pick_tokenizer(args.checkpoint, args.tokenizer_dir)
    scores = retrieval_scores(model, tokenizer, args.length, args.samples)  # RecomputeMismatch if the check fails
    top = choose_full_layers(scores, "retrieval").layers  # as many full layers as LongGen's "middle third" has
    result = {**scores.to_dict(), "checkpoint": str(args.checkpoint),
              "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "layout": layout_summary(model), "suggested_full_layers": {
                  "n": len(top), "top": top, "contiguous": best_window(scores.layer_copy_score, len(top))}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, f"retrieval heads: {args.name or args.checkpoint} ({args.length} tokens, {result['card']})",
         out.with_suffix(".png"))
    per_layer = ", ".join(f"{i}:{x:.2f}" for i, x in enumerate(result["layer_copy_score"]))
    print(f"retrieval heads ({args.length} tokens, {result['prompts']} prompts): best copy score per layer {per_layer}; "
          f"suggested full layers {result['suggested_full_layers']}; recompute check "
          f"{result['recompute_max_rel_error']:.2e}; {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
