"""Long-context evaluation of a LongGen (or full-attention) checkpoint: retrieval accuracy over a grid of context
lengths x needle depths, and perplexity vs context length on held-out long documents.

Run from the repository root::

    tune run recipes/longgen_eval.py --config recipes/configs/eval/tiny.yaml [key=value ...]
    tune run recipes/longgen_eval.py --config recipes/configs/repro/eval.yaml \\
        checkpoint_dir=outputs/repro/s2_a name=f_streaming_llm streaming_llm.sink=64 streaming_llm.window=448

Steps, top to bottom:

1. Model: ``checkpoint_dir`` -- an HF model directory, a checkpoint of recipes/longgen_finetune.py, or its
   output_dir (the latest step is taken) -- loaded with ``flexgen_long.hf.load_model`` (weights checked): a finetune
   checkpoint is rebuilt as trained; a plain HF directory in the architecture of the ``model`` section when given
   (``flexgen_long.models.from_hf_config`` with a LongGen layout applied at inference), else the original model.
   Without ``checkpoint_dir``, the ``model`` section with random weights (smoke tests). The tokenizer must fit the
   model's vocabulary (``flexgen_long.tokenizers.check_fits``). With ``streaming_llm: {sink, window}`` every layer is
   switched to ``AttnSink(sink, window)`` at inference (``flexgen_long.models.relayout``): the StreamingLLM baseline,
   a model trained with full attention whose KV caches keep only sink + window keys per layer (ring caches,
   flexgen_long.cache). With ``quantize`` its weights are quantized by torchao (``flexgen_long.quantize``).
2. Retrieval: for each task (``passkey``, ``multikey_needle`` -- flexgen_long.data's generators), context length L
   and depth d, ``samples_per_cell`` prompts of exactly L tokens with the asked-for needle at depth d (seeded by
   (seed, task, L, d): every model sees the same prompts). Scoring: the answer is greedy-decoded with
   ``flexgen_long.generation.generate`` (compact caches, exactly as deployment would run it) for as many tokens as
   the true answer has; a sample counts only when those tokens equal the answer's token ids exactly
   (" 12345." for a passkey). Accuracy per cell = the fraction of exact matches. For diagnosis the JSON also holds
   each cell's token accuracy (the fraction of answer tokens right, position by position: near misses vs no
   retrieval) and its first ``examples_per_cell`` decoded answers next to the true ones.
3. Perplexity: ``perplexity_documents`` held-out documents (``perplexity_source``, default the standard library's
   subpackages, disjoint from the training corpus ``python-stdlib``) with at least max(lengths) tokens; at each L,
   the NLL of tokens 1..L-1 of the same documents given their prefix, through the same cached prefill as
   generation (so the StreamingLLM baseline is scored with its ring caches). ppl = exp(mean NLL); also over the
   second half of the positions alone, where context beyond a sparse window matters most. For lengths beyond the
   longest files, ``perplexity_join_files: true`` makes each document the files of one directory joined in order.
4. Writes ``<output_dir>/<name>.json`` and ``<output_dir>/<name>_retrieval.png`` (a heatmap per task); the default
   name of a quantized model's result ends in ``_<quantize>``.
"""

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import utils

from flexgen_long import checkpoint_io, cli, hf
from flexgen_long import recipe_config as rc
from flexgen_long.engine import Engine
from flexgen_long.data import (ANSWER_ROOM, PYTHON_STDLIB_PACKAGES, SYNTHETIC_TASKS, joined_documents, read_text_file,
                               task_samples, text_files)
from flexgen_long.generation import generate
from flexgen_long.policy import Policy
from flexgen_long.models import relayout
from flexgen_long.patterns import AttnSink, Full
from flexgen_long.stats import format_rate, wilson_interval
from flexgen_long.recipe_config import REQUIRED, key, section

log = utils.get_logger("INFO")

SCORING = ("greedy decoding (flexgen_long.generation.generate, temperature 0) of as many tokens as the answer has; "
           "exact match of the answer's token ids")
_fail = rc.fail


def _check_streaming_llm(cfg: DictConfig, name: str) -> None:
    """``streaming_llm`` makes a valid ``AttnSink`` (its own checks: sink >= 0, window >= 1)."""
    s = cfg[name]
    if s is not None:
        try:
            AttnSink(sink=s.sink, window=s.window)
        except ValueError as e:
            _fail(name, str(e))


@dataclass(kw_only=True)
class StreamingLLMConfig:
    """``streaming_llm``: every layer ``AttnSink(sink, window)`` at inference."""
    sink: int = key(REQUIRED, "the first keys every layer keeps (attention sinks)")
    window: int = key(REQUIRED, "the most recent keys every layer keeps")


@dataclass(kw_only=True)
class EvalConfig(rc.RuntimeKeys, rc.InferenceModelKeys):  # --help: the model's keys, the device's, then these
    """The recipe's keys: the one source of its checks, its --help and its documentation."""
    checkpoint_dir: Optional[str] = key(None, "a finetuning checkpoint or output_dir (its latest step), or an HF model "
                                              "directory; null: the model section with random weights")
    output_dir: str = key(REQUIRED, "where <name>.json and <name>_retrieval.png go")
    name: Optional[str] = key(None, "the files' name; null: the checkpoint's run directory name (or 'random')")
    streaming_llm: Optional[StreamingLLMConfig] = section(
        Optional[StreamingLLMConfig], "every layer AttnSink(sink, window) at inference (the StreamingLLM baseline); "
        "null: the model's own layout", check=_check_streaming_llm)
    tasks: list[Literal[tuple(SYNTHETIC_TASKS)]] = key(list(SYNTHETIC_TASKS), "retrieval tasks (may be empty)",
                                                         unique=True)
    lengths: list[int] = key(REQUIRED, f"prompt lengths in tokens; max + {ANSWER_ROOM} must fit the model's "
                             "max_seq_len", min=64, nonempty=True, unique=True)
    depths: list[float] = key([0.0, 0.5, 1.0], "where the asked-for needle sits (0 = first, 1 = last)",
                              min=0, max=1, nonempty=True)
    samples_per_cell: int = key(1, "prompts per (task, length, depth), decoded as one batch", min=1)
    perplexity_source: str = key(PYTHON_STDLIB_PACKAGES, "held-out text: a directory, a glob, a file, or "
                                                         "python-stdlib-packages")
    perplexity_documents: int = key(1, "documents with >= max(lengths) tokens; 0: no perplexity", min=0)
    perplexity_join_files: bool = key(False, "a document = one directory's files joined (longer than any one file)")
    prefill_chunk: Optional[int] = key(None, "tokens per prefill chunk; null: whole prompts", min=1)
    kv_cache_dtype: Optional[Literal["fp8"]] = key(None, "fp8: the full layers' KV caches in float8 e4m3 with a "
                                                         "scale per token and head; null: the model's dtype")
    overwrite: bool = key(False, "replace an existing <name>.json that holds another checkpoint's result")
    seed: int = key(0, "seeds the prompts and the documents' choice", min=0)


def validate_config(cfg: DictConfig) -> None:
    """Every field that needs no model: the schema (unknown keys, types, ranges, defaults filled in; the device, the
    StreamingLLM override), the checkpoint directory and the model and tokenizer sections."""
    rc.check(cfg, EvalConfig)
    # an output_dir without a checkpoint yet passes here (a pipeline validates its evals before it trains); it is
    # refused when evaluate resolves it
    rc.check_model_sections(cfg, resolve_checkpoint(cfg.checkpoint_dir, required=False))


# -- model ---------------------------------------------------------------------------------------------------------------
def resolve_checkpoint(path, required: bool = True) -> Path | None:
    """``checkpoint_dir``: None for null; a checkpoint directory (holds config.json); a finetuning output_dir: its
    latest step_<N> -- when it has none, an error, or (not ``required``) the output_dir itself."""
    if path is None:
        return None
    p = rc.existing_dir("checkpoint_dir", str(path), "an HF model directory, a checkpoint or a finetuning output_dir")
    if (p / hf.CONFIG_FILE).is_file():
        return p
    latest = checkpoint_io.latest_checkpoint(p)
    if latest is None and required:
        _fail("checkpoint_dir", f"{str(path)!r} is neither a checkpoint (no {hf.CONFIG_FILE}) nor an "
                                "output_dir with step_<N> checkpoints")
    return latest or p


def build_model(cfg: DictConfig, ckpt: Path | None, device: torch.device, dtype: torch.dtype,
                log=log.info) -> nn.Module:
    """The model to evaluate (``ckpt``: ``resolve_checkpoint``'s), in eval mode, with the StreamingLLM override
    applied when configured."""
    model = rc.build_model(cfg, ckpt, device, dtype, log=log)
    s = cfg.streaming_llm
    if s is not None:
        relayout(model, "none", AttnSink(sink=s["sink"], window=s["window"]))
    return model.eval()


def layout_summary(model: nn.Module) -> dict:
    patterns = [layer.attn.pattern for layer in model.layers]
    return {"num_layers": len(patterns), "full_layers": [i for i, p in enumerate(patterns) if p.is_full],
            "patterns": [repr(p) for p in patterns]}


# -- retrieval -----------------------------------------------------------------------------------------------------------
def retrieval_samples(tokenizer, task: str, length: int, depth: float, n: int, seed: int):
    """``n`` (prompt ids, answer ids) of ``task`` with prompts of exactly ``length`` tokens and the asked-for needle
    at ``depth`` (``flexgen_long.data.task_samples``, the answer without its EOS). Seeded by (seed, task, length,
    depth), so every model and every run sees the same prompts."""
    samples = task_samples(tokenizer, task, length, depth, n, f"{seed}/{task}/{length}/{depth}")
    if any(len(s.prompt) != length for s in samples):
        _fail("lengths", f"{length} is too short for the {task} task's intro, needles and question")
    return [(s.prompt, s.answer) for s in samples]


def exact_matches(predicted: list[list[int]], answers: list[list[int]]) -> int:
    """How many predictions have their first len(answer) tokens equal to the answer."""
    if len(predicted) != len(answers) or not answers:
        raise ValueError(f"exact_matches needs one prediction per answer, got {len(predicted)} for {len(answers)}")
    return sum(list(p[:len(a)]) == list(a) for p, a in zip(predicted, answers))


def token_accuracy(predicted: list[list[int]], answers: list[list[int]]) -> float:
    """Fraction of answer tokens predicted right, position by position (a near miss scores high, a guess ~0.1)."""
    if len(predicted) != len(answers) or not answers:
        raise ValueError(f"token_accuracy needs one prediction per answer, got {len(predicted)} for {len(answers)}")
    right = sum(sum(x == y for x, y in zip(p, a)) for p, a in zip(predicted, answers))
    return right / sum(map(len, answers))


AnswerFn = Callable[[list[list[int]], int], list[list[int]]]


def greedy_answers(model: nn.Module, policy: Policy | None = None) -> AnswerFn:
    """(prompts, max_new_tokens) -> generated ids: one batch through flexgen_long.generation.generate, greedy, under
    ``policy`` (default: whole prompts). No CUDA graphs: an answer is a handful of tokens, fewer than a graph
    capture's warm-up costs."""
    policy = (policy or Policy(prefill_chunk=None)).replace(cuda_graphs=False)

    def answer(prompts, max_new_tokens):
        outs = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0, policy=policy)
        return [o.tokens for o in outs]
    return answer


def evaluate_retrieval(answer_fn: AnswerFn, tokenizer, tasks, lengths, depths, samples_per_cell: int, seed: int,
                       bar=None, examples_per_cell: int = 2) -> dict:
    """accuracy[task][depth index][length index] over the grid, each cell one batch of samples_per_cell prompts;
    also token_accuracy (same indexing) and, per cell "L/depth", the first examples_per_cell [predicted, true]. Per
    length, over its depths: mean_by_length, correct_by_length (exact matches), prompts_by_length and
    interval_by_length (the 95% Wilson interval, flexgen_long.stats)."""
    results = {}
    for task in tasks:
        acc = [[None] * len(lengths) for _ in depths]
        tok_acc = [[None] * len(lengths) for _ in depths]
        correct = [0] * len(lengths)
        examples = {}
        for j, length in enumerate(lengths):
            for i, depth in enumerate(depths):
                samples = retrieval_samples(tokenizer, task, length, depth, samples_per_cell, seed)
                answers = [a for _, a in samples]
                predicted = answer_fn([p for p, _ in samples], max(map(len, answers)))
                k = exact_matches(predicted, answers)
                acc[i][j] = k / len(answers)
                correct[j] += k
                tok_acc[i][j] = round(token_accuracy(predicted, answers), 4)
                examples[f"{length}/{depth}"] = [[tokenizer.decode(list(p[:len(a)])), tokenizer.decode(list(a))]
                                                 for p, a in list(zip(predicted, answers))[:examples_per_cell]]
                if bar is not None:
                    bar.set_description(f"{task} L={length} depth={depth}: {acc[i][j]:.2f}")
                    bar.update(1)
        n = samples_per_cell * len(depths)
        results[task] = {"lengths": list(lengths), "depths": list(depths), "accuracy": acc,
                         "mean_by_length": [sum(acc[i][j] for i in range(len(depths))) / len(depths)
                                            for j in range(len(lengths))],
                         "correct_by_length": correct, "prompts_by_length": n,
                         "interval_by_length": [[round(x, 4) for x in wilson_interval(k, n)] for k in correct],
                         "samples_per_cell": samples_per_cell, "token_accuracy": tok_acc,
                         "examples": examples}
    return results


# -- perplexity ----------------------------------------------------------------------------------------------------------
def heldout_documents(tokenizer, source: str, min_tokens: int, n: int, seed: int,
                      join_files: bool = False) -> list[list[int]]:
    """``n`` documents of ``source`` with at least ``min_tokens`` tokens (BOS + text), chosen by a seeded shuffle of
    the sorted file list; their first ``min_tokens`` tokens. ``join_files``: a document is the files of one directory
    (in sorted order) joined until it holds ``min_tokens`` tokens (``flexgen_long.data.joined_documents``), the
    directories in a seeded shuffle -- for lengths beyond the longest single files."""
    try:
        files = text_files(source)
    except (FileNotFoundError, ValueError) as e:
        _fail("perplexity_source", str(e))

    def read(f):
        try:
            return read_text_file(f, field="")
        except ValueError as e:
            _fail("perplexity_source", str(e))

    if join_files:
        groups: dict[Path, list[Path]] = {}
        for f in files:
            groups.setdefault(f.parent, []).append(f)
        order = sorted(groups)
        random.Random(seed).shuffle(order)
        candidates = (ids for d in order for ids in joined_documents(tokenizer, map(read, groups[d]), min_tokens))
    else:
        files = list(files)
        random.Random(seed).shuffle(files)
        candidates = (tokenizer.encode(read(f), add_bos=True, add_eos=False) for f in files)
    docs = []
    for ids in candidates:
        if len(ids) >= min_tokens:
            docs.append(ids[:min_tokens])
            if len(docs) == n:
                break
    if not docs:
        _fail("perplexity_source", f"{source!r} has no document of at least max(lengths)={min_tokens} tokens; lower "
                                   "lengths, set perplexity_join_files=true or point perplexity_source at longer "
                                   "documents")
    return docs


@torch.inference_mode()
def sequence_nll(model: nn.Module, tokens: list[int], policy: Policy | None = None) -> torch.Tensor:
    """NLL [n-1] of tokens[1:] given their prefix, through the model's cached prefill (generation's code path) under
    ``policy`` (default: the whole sequence in one chunk)."""
    engine = Engine(model, (policy or Policy(prefill_chunk=None)).replace(compile_prefill=False))
    engine.reserve(1, len(tokens))
    x = torch.tensor(tokens, device=engine.device)
    logits = engine.prefill(x, row=0, all_logits=True)
    return F.cross_entropy(logits[:-1].float(), x[1:], reduction="none")


def evaluate_perplexity(model: nn.Module, docs: list[list[int]], lengths, policy: Policy | None = None,
                        bar=None) -> dict:
    ppl, ppl_half, nll = [], [], []
    for length in lengths:
        losses = torch.stack([sequence_nll(model, d[:length], policy) for d in docs])  # [docs, L-1]
        if not torch.isfinite(losses).all():  # NaN is no perplexity (and not valid JSON): stop, say where
            bad = (~torch.isfinite(losses)).sum(dim=1)
            raise FloatingPointError(
                f"perplexity at length {length}: the model's loss is NaN or infinite at {int(bad.sum())} of "
                f"{losses.numel()} positions (documents {[i for i, n in enumerate(bad.tolist()) if n]}): its logits "
                "are not finite, so its weights are damaged or overflow in this dtype; nothing was written")
        # loss index t scores token t+1: the second half of the positions is t+1 >= length // 2
        half = losses[:, max(length // 2 - 1, 0):]
        nll.append(losses.mean().item())
        ppl.append(math.exp(nll[-1]))
        ppl_half.append(math.exp(half.mean().item()))
        if bar is not None:
            bar.set_description(f"perplexity L={length}: {ppl[-1]:.3f}")
            bar.update(1)
    return {"lengths": list(lengths), "documents": len(docs), "nll": nll, "ppl": ppl, "ppl_second_half": ppl_half}


@torch.inference_mode()
def check_finite_logits(model: nn.Module, tokenizer, ckpt: Path | None) -> None:
    """One short forward before the grid: a model whose logits are NaN or infinite would decode garbage (and score 0)
    and give a NaN perplexity; say so instead, naming the checkpoint."""
    ids = tokenizer.encode("def main():\n    return 0\n", add_bos=True, add_eos=False)
    x = torch.tensor([ids], device=next(model.parameters()).device)
    logits = model(x)
    if not torch.isfinite(logits).all():
        raise FloatingPointError(f"{ckpt or 'the model'}: its logits are NaN or infinite on a short prompt "
                                 f"({int((~torch.isfinite(logits)).sum())} of {logits.numel()} values): its weights "
                                 "are damaged or overflow in this dtype; nothing was evaluated")


# -- output --------------------------------------------------------------------------------------------------------------
def plot_heatmaps(retrieval: dict, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(retrieval)
    width = 2.0 + (1.0 + 0.9 * len(retrieval[tasks[0]]["lengths"])) * len(tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(width, 2.0 + 0.45 * len(retrieval[tasks[0]]["depths"])),
                             squeeze=False, layout="constrained")
    for ax, task in zip(axes[0], tasks):
        r = retrieval[task]
        im = ax.imshow(r["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(r["lengths"])), [str(L) for L in r["lengths"]])
        ax.set_yticks(range(len(r["depths"])), [f"{d:g}" for d in r["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{task} (n={r['samples_per_cell']}/cell)")
        for i, row in enumerate(r["accuracy"]):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="exact-match accuracy")
    fig.suptitle(title)
    checkpoint_io.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def result_name(cfg: DictConfig, ckpt: Path | None) -> str:
    """``name``, else the run directory of a finetune checkpoint (``<run>/step_<N>``), else the model directory's own
    name, else ``random`` -- followed by ``_<quantize>`` for quantized weights (a quantized model's result never
    takes the unquantized one's default name)."""
    if cfg.name:
        return cfg.name
    name = "random" if ckpt is None else ckpt.parent.name if ckpt.name.startswith("step_") else ckpt.name
    return f"{name}_{cfg.quantize}" if cfg.quantize else name


def check_output(out_dir: Path, name: str, ckpt: Path | None, overwrite: bool) -> Path:
    """Before any work: ``out_dir`` exists and takes a file (written and removed), and ``<name>.json`` there is not
    another checkpoint's result (replaced only with ``overwrite=true``). Returns the JSON's path."""
    checkpoint_io.check_writable(out_dir)
    path = out_dir / f"{name}.json"
    if path.exists() and not overwrite:
        try:
            previous = json.loads(path.read_text()).get("checkpoint")
        except (OSError, ValueError, AttributeError):
            previous = "<unreadable>"
        if previous != (str(ckpt) if ckpt else None):
            _fail("name", f"{str(path)!r} holds the result of {previous or 'random weights'}, not of "
                          f"{ckpt or 'random weights'}; choose another name (name=...) or output_dir, or replace it "
                          "with overwrite=true")
    return path


def evaluate(cfg: DictConfig) -> dict:
    """The whole recipe (steps 1-4 of the module docstring); returns what it wrote to JSON."""
    validate_config(cfg)
    lengths, tasks, depths, chunk = list(cfg.lengths), list(cfg.tasks), [float(d) for d in cfg.depths], \
        cfg.prefill_chunk
    ckpt = resolve_checkpoint(cfg.checkpoint_dir)
    name = result_name(cfg, ckpt)
    json_path = check_output(Path(cfg.output_dir), name, ckpt, cfg.overwrite)

    model, tokenizer, device, _ = rc.load_for_inference(cfg, ckpt, build=build_model, log=log.info)
    if max(lengths) + ANSWER_ROOM > model.max_seq_len:
        _fail("lengths", f"max(lengths)={max(lengths)} + {ANSWER_ROOM} answer tokens exceeds the model's "
                         f"max_seq_len={model.max_seq_len} (its RoPE table); drop the longer lengths")
    for task in tasks:  # a length too short for a task fails here, before any model work
        for length in lengths:
            retrieval_samples(tokenizer, task, length, 0.0, 1, cfg.seed)
    check_finite_logits(model, tokenizer, ckpt)
    layout = layout_summary(model)
    log.info(f"Evaluating {name}: {ckpt or 'random weights'}; full layers {layout['full_layers']}, "
             f"sparse: {sorted(set(layout['patterns']) - {repr(Full())}) or 'none'}")

    docs = heldout_documents(tokenizer, cfg.perplexity_source, max(lengths), cfg.perplexity_documents, cfg.seed,
                             cfg.perplexity_join_files) if cfg.perplexity_documents else []
    t0 = time.perf_counter()
    bar = cli.progress(len(tasks) * len(lengths) * len(depths) + (len(lengths) if docs else 0), "eval")
    policy = Policy(prefill_chunk=chunk, kv_cache_dtype=cfg.kv_cache_dtype)
    retrieval = evaluate_retrieval(greedy_answers(model, policy), tokenizer, tasks, lengths, depths,
                                   cfg.samples_per_cell, cfg.seed, bar)
    perplexity = evaluate_perplexity(model, docs, lengths, policy, bar) if docs else None
    bar.close()

    result = {"name": name, "checkpoint": str(ckpt) if ckpt else None, "layout": layout,
              "streaming_llm": OmegaConf.to_container(cfg.streaming_llm) if cfg.streaming_llm else None,
              "quantize": cfg.quantize,
              "scoring": SCORING, "retrieval": retrieval, "perplexity": perplexity,
              "perplexity_source": cfg.perplexity_source if docs else None,
              "perplexity_join_files": cfg.perplexity_join_files if docs else None,
              "kv_cache_dtype": cfg.kv_cache_dtype, "seed": cfg.seed, "device": str(device), "card": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "dtype": cfg.dtype, "torch": torch.__version__,
              "seconds": round(time.perf_counter() - t0, 2)}
    # strict JSON (never a NaN), written whole or not at all
    checkpoint_io.write_atomic(json_path, (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    written = [json_path]
    if retrieval:
        written.append(json_path.with_name(f"{name}_retrieval.png"))
        plot_heatmaps(retrieval, f"{name}: retrieval accuracy", written[-1])
    for task, r in retrieval.items():  # the results on stdout, the written files' paths last
        print(f"{task}: exact match by length ({r['prompts_by_length']} prompts each, 95% interval) "
              + ", ".join(f"{L}: {format_rate(k, r['prompts_by_length'])}"
                          for L, k in zip(r["lengths"], r["correct_by_length"])))
    if perplexity:
        print("perplexity by length " + ", ".join(f"{L}: {p:.2f}" for L, p in zip(lengths, perplexity["ppl"])))
    for path in written:
        print(f"Wrote {path}", flush=True)
    return result


@cli.parse(EvalConfig, __file__, configs="eval")
def recipe_main(cfg: DictConfig) -> None:
    """Long-context evaluation: retrieval accuracy and perplexity by length on stdout, then the files written."""
    evaluate(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
