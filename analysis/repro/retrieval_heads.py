"""Retrieval heads of a checkpoint, as a figure and JSON: which layers' attention heads copy the passkey out of the
needle (flexgen_long.retrieval: copy score and needle mass per layer and query head, each layer scored under its own
pattern, the recomputed attention checked against the layer's real output).

Used by the pipelines to see where retrieval lives before and after length extension; a user choosing full layers
runs ``python recipes/longgen_layers.py MODEL_DIR`` (the same scores, the ranking and the config line) or the
finetuning recipe with ``model.full_layers=retrieval``.

    python analysis/repro/retrieval_heads.py MODEL_DIR --out analysis/results/repro/heads_s1 --tokenizer bytes
    python analysis/repro/retrieval_heads.py outputs/smollm2/train_b/step_150 --out heads_b \
        --tokenizer outputs/smollm2-135m-instruct      # a finetuned HF-tokenizer model (checkpoints hold none)

The model is loaded and scored by ``flexgen_long.retrieval.score_model_dir`` and the tokenizer chosen as
recipes/longgen_layers.py chooses it (``tokenizer_for``): ``--tokenizer DIR`` (an HF directory), ``--tokenizer bytes``
(the repro's byte-level models), else the checkpoint's own (a plain HF model directory holds one); a checkpoint
without one is refused, naming ``--tokenizer``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from flexgen_long import recipe_config as rc  # noqa: E402
from flexgen_long.data import ANSWER_ROOM  # noqa: E402
from flexgen_long.patterns import Full  # noqa: E402
from flexgen_long.retrieval import choose_full_layers, score_model_dir  # noqa: E402
from recipes.longgen_layers import tokenizer_for  # noqa: E402


def best_window(layer_scores: list[float], n: int) -> list[int]:
    """The ``n`` contiguous layers with the largest summed score (the first such window on ties): LongGen's contiguous
    block, placed on the retrieval heads (the byte-level repro's b_heads variant)."""
    if not 1 <= n <= len(layer_scores):
        raise ValueError(f"n must be in [1, {len(layer_scores)}], got {n}")
    sums = [sum(layer_scores[i:i + n]) for i in range(len(layer_scores) - n + 1)]
    start = max(range(len(sums)), key=lambda i: (sums[i], -i))
    return list(range(start, start + n))


def layout(patterns: list[str]) -> dict:
    """The layout the heads were scored under, from the scored layers' patterns (``HeadScores.patterns``): as
    recipes/longgen_eval.py's ``layout_summary`` reports a model's."""
    return {"num_layers": len(patterns), "full_layers": [i for i, p in enumerate(patterns) if p == repr(Full())],
            "patterns": list(patterns)}


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
    ap.add_argument("checkpoint", metavar="MODEL_DIR",
                    help="a recipe checkpoint directory (step_N, with config.json) or an HF model directory")
    ap.add_argument("--out", required=True, help="output path without suffix: writes OUT.json and OUT.png")
    ap.add_argument("--length", type=int, default=None,
                    help=f"prompt length in tokens (default: min(4096, the model's max_seq_len - {ANSWER_ROOM}), room "
                         "for the answer)")
    ap.add_argument("--samples", type=int, default=8, help="prompts per needle depth (5 depths; default 8)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--name", default=None, help="title of the figure (default: the checkpoint path)")
    ap.add_argument("--tokenizer", default=None,
                    help="an HF directory whose tokenizer to use, or 'bytes' (default: the checkpoint's own)")
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    with rc.user_errors():
        tokenizer = tokenizer_for(Path(args.checkpoint), args.tokenizer)
        try:  # RecomputeMismatch (not a user error) if the recompute check fails
            scores = score_model_dir(args.checkpoint, tokenizer, device=args.device, dtype=dtype, length=args.length,
                                     samples_per_depth=args.samples)
        except ValueError as e:  # a tokenizer, length or sample count the model cannot take
            raise rc.ConfigError(str(e)) from None
    top = choose_full_layers(scores, "retrieval").layers  # as many full layers as LongGen's "middle third" has
    result = {**scores.to_dict(), "checkpoint": str(args.checkpoint),
              "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "layout": layout(scores.patterns), "suggested_full_layers": {
                  "n": len(top), "top": top, "contiguous": best_window(scores.layer_copy_score, len(top))}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, f"retrieval heads: {args.name or args.checkpoint} ({scores.length} tokens, {result['card']})",
         out.with_suffix(".png"))
    per_layer = ", ".join(f"{i}:{x:.2f}" for i, x in enumerate(result["layer_copy_score"]))
    print(f"retrieval heads ({scores.length} tokens, {result['prompts']} prompts): best copy score per layer "
          f"{per_layer}; suggested full layers {result['suggested_full_layers']}; recompute check "
          f"{result['recompute_max_rel_error']:.2e}; {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
