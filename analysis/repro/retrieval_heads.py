"""Retrieval heads of a checkpoint: which layers' attention heads copy the passkey out of the needle.

Why: LongGen keeps a fixed *middle* third of the layers full. Retrieval heads (Wu et al. 2024, "Retrieval Head
Mechanistically Explains Long-Context Factuality") are few, form in pretraining and stay the same heads through context
extension, so a hybrid keeps retrieval only if its full layers hold them -- and where they are is a property of the
pretrained model. This tool measures it, so that the full layers are placed on evidence rather than on a rule found on
Llama-2-7B.

Method (teacher forcing, no generation): passkey prompts (flexgen_long.data.passkey_task, the eval's prompts) followed
by their answer; one forward pass in which every layer's post-RoPE queries and keys at the answer positions are
captured; each layer's attention probabilities are recomputed in fp32 under that layer's own pattern (a sparse layer
is scored on the keys it can see). Per query head:

* **copy score** (Wu et al.'s retrieval score): the fraction of answer tokens for which the head's most attended key
  lies in the needle and holds the very token being produced -- the head is copying it;
* **needle mass**: the mean attention probability on the needle sentence.

The recomputed attention is checked against the layer's real output (probabilities @ V vs the kernel's result): a
wrong mask, scale or RoPE would fail that check instead of producing plausible-looking scores.

    python analysis/repro/retrieval_heads.py CHECKPOINT_DIR --out analysis/results/repro/heads_s1 [--length 1008]
    python analysis/repro/retrieval_heads.py outputs/smollm2/train_b/step_150 --out heads_b \
        --tokenizer-dir outputs/smollm2-135m-instruct      # a finetuned HF-tokenizer model (checkpoints hold none)

Tokenizer: ``--tokenizer-dir`` (an HF directory, ``flexgen_long.tokenizers.hf_tokenizer``), else the checkpoint's own
when it holds one (tokenizer.json / tokenizer.model: a plain HF model directory), else bytes (the repro's models).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from flexgen_long import hf  # noqa: E402
from flexgen_long.attention import HybridAttention  # noqa: E402
from flexgen_long.data import passkey_task  # noqa: E402
from flexgen_long.layout import full_layer_indices  # noqa: E402
from flexgen_long.tokenizers import byte_tokenizer, hf_tokenizer  # noqa: E402
from recipes.longgen_eval import layout_summary  # noqa: E402


def needle_positions(tokens: list[int], needle: list[int]) -> range:
    """Where ``needle`` (the needle sentence's ids) lies in ``tokens``; it must occur exactly once."""
    n = len(needle)
    hits = [i for i in range(len(tokens) - n + 1) if tokens[i:i + n] == needle]
    if len(hits) != 1:
        raise ValueError(f"the needle occurs {len(hits)} times in the prompt, expected exactly once")
    return range(hits[0], hits[0] + n)


def score_heads(probs: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, needle: range) -> tuple:
    """probs [H, A, S]: attention of the A answer-producing queries over S keys; tokens [S]: the sequence;
    targets [A]: the token each query produces. -> (copy [H], mass [H]): per head, the fraction of queries whose
    argmax key is in ``needle`` and holds the target token, and the mean probability mass on ``needle``."""
    top = probs.argmax(dim=-1)                                   # [H, A]
    in_needle = (top >= needle.start) & (top < needle.stop)
    copy = (in_needle & (tokens[top] == targets[None, :])).float().mean(dim=-1)
    mass = probs[..., needle.start:needle.stop].sum(dim=-1).mean(dim=-1)
    return copy, mass


def best_window(layer_scores: list[float], n: int) -> list[int]:
    """The ``n`` contiguous layers with the largest summed score (the first such window on ties)."""
    if not 1 <= n <= len(layer_scores):
        raise ValueError(f"n must be in [1, {len(layer_scores)}], got {n}")
    sums = [sum(layer_scores[i:i + n]) for i in range(len(layer_scores) - n + 1)]
    start = max(range(len(sums)), key=lambda i: (sums[i], -i))
    return list(range(start, start + n))


class _Capture:
    """Wraps every HybridAttention.attend: keeps q (answer rows), k, v and the output rows of each layer."""

    def __init__(self, model, rows: torch.Tensor):
        self.layers = [m for m in model.modules() if isinstance(m, HybridAttention)]
        self.rows, self.seen, self._orig = rows, {}, []
        for i, attn in enumerate(self.layers):
            orig = attn.attend
            self._orig.append((attn, orig))

            def attend(q, k, v, masks, _i=i, _orig=orig):
                out = _orig(q, k, v, masks)
                self.seen[_i] = (q[:, :, self.rows].float(), k.float(), v.float(), out[:, :, self.rows].float())
                return out
            attn.attend = attend

    def close(self):
        for attn, orig in self._orig:
            attn.attend = orig


def layer_probs(attn: HybridAttention, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[Hq, A, S] attention probabilities of the query rows under the layer's pattern (causal, GQA-expanded)."""
    hq, hkv, S = q.shape[1], k.shape[1], k.shape[2]
    group = hq // hkv
    logits = torch.einsum("had,hsd->has", q[0], k[0].repeat_interleave(group, dim=0)) / math.sqrt(q.shape[-1])
    kpos = torch.arange(S, device=q.device)
    pattern = attn.pattern.bind_heads(hkv)  # BlockSparse(per_head) shifts its stride per KV head
    visible = torch.stack([pattern.visible(rows[:, None], kpos[None, :], h // group) for h in range(hq)])
    return logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)


@torch.no_grad()
def retrieval_heads(model, tokenizer, length: int, samples: int, depths=(0.1, 0.3, 0.5, 0.7, 0.9),
                    seed: int = 0) -> dict:
    """Copy score and needle mass per (layer, query head), averaged over ``samples`` passkey prompts of ``length``
    tokens per depth; plus the recomputation check's worst error."""
    device = next(model.parameters()).device
    L = len([m for m in model.modules() if isinstance(m, HybridAttention)])
    copy = torch.zeros(L, model.layers[0].attn.num_heads)
    mass, worst, count = torch.zeros_like(copy), 0.0, 0
    for depth in depths:
        rng = random.Random(f"heads/{seed}/{length}/{depth}")
        for _ in range(samples):
            ids, trained = passkey_task(tokenizer, length, rng, depth=depth, prompt_only=True)
            ids = ids[:-1]                                  # prompt + answer, without EOS
            P = trained.index(True)                         # first answer token
            answer = ids[P:]
            key = tokenizer.decode(answer).strip().rstrip(".")
            # passkey_task's needle sentence, as _task encodes it (needle_positions fails loudly if that text changes)
            needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ",
                                      add_bos=False, add_eos=False)
            span = needle_positions(ids, needle)
            rows = torch.arange(P - 1, len(ids) - 1, device=device)   # the queries that produce the answer tokens
            tokens = torch.tensor(ids, device=device)
            cap = _Capture(model, rows)
            try:
                model(tokens[None])
            finally:
                cap.close()
            for i, attn in enumerate(cap.layers):
                q, k, v, out = cap.seen[i]
                p = layer_probs(attn, q, k, rows)
                group = p.shape[0] // v.shape[1]
                recomputed = torch.einsum("has,hsd->had", p, v[0].repeat_interleave(group, dim=0))
                scale = out.abs().max().clamp_min(1e-6)
                worst = max(worst, ((recomputed - out[0]).abs().max() / scale).item())
                c, m = score_heads(p, tokens, tokens[rows + 1], span)
                copy[i] += c.cpu()
                mass[i] += m.cpu()
            count += 1
    copy, mass = copy / count, mass / count
    return {"length": length, "depths": list(depths), "samples_per_depth": samples, "prompts": count,
            "copy_score": copy.tolist(), "needle_mass": mass.tolist(),
            "layer_copy_score": copy.max(dim=1).values.tolist(), "layer_needle_mass": mass.max(dim=1).values.tolist(),
            "recompute_max_rel_error": worst}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


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
    room = model.max_seq_len - 16  # the answer (" 12345." = 7 tokens) follows the prompt
    if args.length is None:
        args.length = min(4096, room)
    if args.length > room:
        ap.error(f"--length {args.length} leaves no room for the answer: at most max_seq_len - 16 = {room}")
    tokenizer = pick_tokenizer(args.checkpoint, args.tokenizer_dir)
    result = retrieval_heads(model, tokenizer, args.length, args.samples)
    L = len(model.layers)
    n = len(full_layer_indices(L, "middle"))  # as many full layers as LongGen's "middle third" has
    result.update({"checkpoint": str(args.checkpoint), "dtype": args.dtype,
                   "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                   "layout": layout_summary(model),
                   "suggested_full_layers": {
                       "n": n, "contiguous": best_window(result["layer_copy_score"], n),
                       "top": sorted(sorted(range(L), key=lambda i: -result["layer_copy_score"][i])[:n])}})
    # bf16 kernels vs an fp32 recomputation from bf16 q/k/v: a few percent is rounding, a wrong mask is O(1)
    tol = 0.1 if dtype == torch.bfloat16 else 1e-3
    if result["recompute_max_rel_error"] > tol:
        raise SystemExit(f"recomputed attention differs from the layers' output by {result['recompute_max_rel_error']:.3g} "
                         f"(> {tol}): the scores would not describe this model")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, f"retrieval heads: {args.name or args.checkpoint} ({args.length} tokens, {result['card']})",
         out.with_suffix(".png"))
    per_layer = ", ".join(f"{i}:{s:.2f}" for i, s in enumerate(result["layer_copy_score"]))
    print(f"retrieval heads ({args.length} tokens, {result['prompts']} prompts): best copy score per layer {per_layer}; "
          f"suggested full layers {result['suggested_full_layers']}; recompute check "
          f"{result['recompute_max_rel_error']:.2e}; {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
