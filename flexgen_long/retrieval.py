"""Where a pretrained model's retrieval lives, and full layers placed there.

LongGen keeps a fixed block of layers full (the middle third). Retrieval heads (Wu et al. 2024, "Retrieval Head
Mechanistically Explains Long-Context Factuality") are few, form in pretraining and stay the same heads through context
extension, so a hybrid keeps retrieval only if its full layers hold them -- and where they are is a property of the
pretrained model, measured here::

    scores = retrieval_scores(model, tokenizer)                 # copy score and needle mass per layer and head
    choice = choose_full_layers(scores, "retrieval", source=d)  # the budget's layers, best first, and the ranking

**Scoring** (teacher forcing, no generation): passkey prompts (``flexgen_long.data.task_samples``, the evaluation's
prompts) followed by their answer go through the model in batches. A forward hook on every layer's attention module
recomputes, from the module's own input with its own projections and RoPE, the attention of the queries that produce
the answer tokens in fp32 under the layer's own pattern (a sparse layer is scored on the keys it can see), then per
query head:

* **copy score** (Wu et al.'s retrieval score): the fraction of answer tokens for which the head's most attended key
  lies in the needle and holds the very token being produced -- the head is copying it;
* **needle mass**: the mean attention probability on the needle sentence.

The recomputed attention, put through the layer's output projection, must reproduce the module's real output at those
rows; a wrong mask, scale or RoPE fails the run (``RecomputeMismatch``) instead of producing plausible-looking scores.

**Ranking**: layers by their best head's copy score, then by their best head's needle mass, then by index.
**Choice**: the ``n`` best layers for ``full_layers = "retrieval"`` (``n`` = as many as ``"middle"``),
``"retrieval:<n>"`` or ``"retrieval:<f>"`` (``flexgen_long.layout.retrieval_budget``).

**In the finetuning recipe** (``model.full_layers: retrieval``): ``choose_for_run`` scores ``checkpoint.base_dir``
once, before training, writes ``<output_dir>/full_layers.json`` (the choice and every head's scores) and returns the
choice, which the recipe stores in every checkpoint's config.json; a resumed run takes the layers from there, never
from a new scoring. ``python recipes/longgen_layers.py MODEL_DIR`` prints the same ranking and config line without
training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import ANSWER_ROOM, task_samples
from .layout import is_retrieval, retrieval_budget

__all__ = ["HeadScores", "FullLayerChoice", "RecomputeMismatch", "retrieval_scores", "choose_full_layers",
           "rank_layers", "copy_and_mass", "layer_probs", "passkey_prompts", "score_model_dir", "default_length",
           "provisional_model_cfg", "check_config", "choose_for_run", "DEFAULT_DEPTHS", "CHOICE_FILE",
           "CHECKPOINT_KEY"]

#: Needle depths of the scoring prompts (fractions of the filler), 8 prompts each by default: 40 prompts.
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
#: Prompt length by default: this, or the model's max_seq_len - ANSWER_ROOM (flexgen_long.data) when that is shorter.
DEFAULT_LENGTH = 4096
#: Largest recompute error accepted, relative to the layer output's largest value: fp32 models agree to rounding; a
#: bf16 model's kernels round q/k/v and the output to bf16 (a wrong mask or RoPE is an O(1) error).
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.05}
#: The recipe's record of a choice: <output_dir>/full_layers.json, and this key under config.json's recipe section.
CHOICE_FILE = "full_layers.json"
CHECKPOINT_KEY = "full_layers_choice"


class RecomputeMismatch(RuntimeError):
    """The attention recomputed for scoring does not reproduce a layer's output: the scores would not describe it."""


# -- prompts -------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """One passkey prompt followed by its answer: ``ids`` (no EOS), ``answer_start`` (index of the first answer token)
    and ``needle`` (the needle sentence's token positions)."""

    ids: list[int]
    answer_start: int
    needle: range


def passkey_prompts(tokenizer, length: int, samples_per_depth: int, depths: Sequence[float] = DEFAULT_DEPTHS,
                    seed: int = 0) -> list[Prompt]:
    """``samples_per_depth`` passkey prompts of ``length`` tokens per needle depth, each followed by its answer;
    seeded by (seed, length, depth), so every model is scored on the same prompts."""
    return [Prompt(s.prompt + s.answer, len(s.prompt), s.needle) for depth in depths
            for s in task_samples(tokenizer, "passkey", length, depth, samples_per_depth,
                                  f"heads/{seed}/{length}/{depth}")]


# -- scores of one layer ---------------------------------------------------------------------------------------------------
def layer_probs(pattern, q: Tensor, k: Tensor, rows: Tensor) -> Tensor:
    """Attention probabilities (fp32) of queries at positions ``rows`` [B, A] over all keys under ``pattern``:
    q [B, Hq, A, D] (after RoPE), k [B, Hkv, S, D] (after RoPE) -> [B, Hq, A, S]. GQA: query head h reads KV head
    h // (Hq / Hkv), whose pattern it uses (BlockSparse per head shifts its stride per KV head)."""
    B, hq, A, d = q.shape
    hkv, S = k.shape[1], k.shape[2]
    group = hq // hkv
    logits = torch.einsum("bkgad,bksd->bkgas", q.float().view(B, hkv, group, A, d), k.float()) / math.sqrt(d)
    bound = pattern.bind_heads(hkv)
    kpos = torch.arange(S, device=q.device).view(1, 1, 1, S)
    heads = torch.arange(hkv, device=q.device).view(1, hkv, 1, 1)
    visible = torch.broadcast_to(bound.visible(rows.view(B, 1, A, 1), kpos, heads), (B, hkv, A, S))
    return logits.masked_fill(~visible[:, :, None], float("-inf")).softmax(dim=-1).view(B, hq, A, S)


def copy_and_mass(probs: Tensor, tokens: Tensor, targets: Tensor, valid: Tensor, needle: Tensor) -> tuple[Tensor, Tensor]:
    """probs [B, H, A, S]: attention of the A answer-producing queries of each prompt; tokens [B, S]; targets [B, A]:
    the token each query produces; valid [B, A]: which queries are real (answers differ in length); needle [B, S]:
    the needle's positions. -> (copy [B, H], mass [B, H]): per prompt and head, the fraction of valid queries whose
    most attended key is in the needle and holds the target token, and the mean probability mass on the needle."""
    B, H, A, _ = probs.shape
    top = probs.argmax(dim=-1).view(B, H * A)
    hit = needle.gather(1, top) & (tokens.gather(1, top) == targets.repeat(1, H))
    hit = hit.view(B, H, A) & valid[:, None, :]
    count = valid.sum(dim=-1, keepdim=True).float()
    copy = hit.sum(dim=-1).float() / count
    mass = (probs * needle[:, None, None, :]).sum(dim=-1)
    return copy, (mass * valid[:, None, :]).sum(dim=-1) / count


def _score_attention(attn: nn.Module, x: Tensor, out: Tensor, batch: dict) -> tuple[Tensor, Tensor, float]:
    """Recompute one attention module's output at the answer rows from its input ``x`` [B, S, E] -- q, k, v and RoPE
    by the module's own projections, in its dtype, as its forward computes them; the attention in fp32 under its
    pattern -- compare it with the real ``out`` [B, S, E], and score its heads. -> (copy [B, Hq], mass [B, Hq],
    relative error)."""
    B, S, _ = x.shape
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rows, valid = batch["rows"], batch["valid"]
    b = torch.arange(B, device=x.device)[:, None]
    q = attn.q_proj(x[b, rows]).view(B, -1, hq, d)
    k = attn.k_proj(x).view(B, S, hkv, d)
    v = attn.v_proj(x).view(B, S, hkv, d)
    q = attn.pos_embeddings(q, input_pos=rows).transpose(1, 2)  # the model's positions: 0..S-1 (no packing)
    k = attn.pos_embeddings(k).transpose(1, 2)
    probs = layer_probs(attn.pattern, q, k, rows)                                      # [B, Hq, A, S]
    o = torch.einsum("bkgas,bksd->bkgad", probs.view(B, hkv, hq // hkv, -1, S), v.transpose(1, 2).float())
    o = F.linear(o.reshape(B, hq, -1, d).transpose(1, 2).reshape(B, -1, hq * d), attn.output_proj.weight.float())
    real = out[b, rows].float()
    scale = real[valid].abs().max().clamp_min(1e-6)
    error = ((o - real)[valid].abs().max() / scale).item()
    copy, mass = copy_and_mass(probs, batch["tokens"], batch["targets"], valid, batch["needle"])
    return copy, mass, error


# -- scores of a model --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadScores:
    """Per layer and query head (``[layer][head]``): copy score and needle mass, averaged over ``prompts`` passkey
    prompts of ``length`` tokens; the layers' patterns when scored, and the recompute check's worst error."""

    copy_score: list[list[float]]
    needle_mass: list[list[float]]
    length: int
    prompts: int
    depths: list[float]
    seed: int
    patterns: list[str]
    recompute_max_rel_error: float
    seconds: float
    device: str
    dtype: str

    @property
    def layer_copy_score(self) -> list[float]:
        """Each layer's best head's copy score."""
        return [max(row) for row in self.copy_score]

    @property
    def layer_needle_mass(self) -> list[float]:
        """Each layer's best head's needle mass."""
        return [max(row) for row in self.needle_mass]

    def ranking(self) -> list[int]:
        return rank_layers(self.layer_copy_score, self.layer_needle_mass)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "layer_copy_score": self.layer_copy_score,
                "layer_needle_mass": self.layer_needle_mass, "ranking": self.ranking()}

    @classmethod
    def from_dict(cls, d: dict) -> "HeadScores":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def rank_layers(layer_copy_score: Sequence[float], layer_needle_mass: Sequence[float]) -> list[int]:
    """Layer indices, best first: by copy score, then needle mass (higher first), then index (lower first)."""
    if len(layer_copy_score) != len(layer_needle_mass):
        raise ValueError(f"one copy score and one needle mass per layer, got {len(layer_copy_score)} and "
                         f"{len(layer_needle_mass)}")
    return sorted(range(len(layer_copy_score)), key=lambda i: (-layer_copy_score[i], -layer_needle_mass[i], i))


def default_length(model: nn.Module) -> int:
    """The scoring prompts' length for ``model``: 4096 tokens, or less where its RoPE table is shorter."""
    return min(DEFAULT_LENGTH, model.max_seq_len - ANSWER_ROOM)


@torch.no_grad()
def retrieval_scores(model: nn.Module, tokenizer, length: int | None = None, samples_per_depth: int = 8,
                     depths: Sequence[float] = DEFAULT_DEPTHS, seed: int = 0, batch_size: int = 8,
                     progress: bool = True) -> HeadScores:
    """Copy score and needle mass of every (layer, query head) of ``model`` (see the module docstring), on the device
    and in the dtype the model is in; ``samples_per_depth`` prompts of ``length`` tokens (default ``default_length``)
    per depth, ``batch_size`` prompts per forward pass. ``progress``: ``flexgen_long.cli.progress`` on stderr (a bar
    on a terminal, periodic lines elsewhere). Raises ``RecomputeMismatch`` when the recomputed attention misses a
    layer's output by more than the dtype's ``TOLERANCE``."""
    from .attention import attention_layers  # torch's flex attention: imported only when a model is scored
    from .cli import progress as progress_bar

    layers = attention_layers(model)
    length = default_length(model) if length is None else length
    if length < 128 or length + ANSWER_ROOM > model.max_seq_len:
        raise ValueError(f"length must be >= 128 (a passkey prompt needs ~120 tokens) and leave {ANSWER_ROOM} tokens "
                         f"for the answer within max_seq_len={model.max_seq_len}, got {length}")
    for name, v in (("samples_per_depth", samples_per_depth), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    prompts = passkey_prompts(tokenizer, length, samples_per_depth, depths, seed)
    L, H = len(layers), layers[0].num_heads
    copy, mass = torch.zeros(L, H, device=device), torch.zeros(L, H, device=device)
    worst = torch.zeros(L)
    state: dict = {}

    def hook(index):
        def fn(module, args, kwargs, out):
            if kwargs.get("input_pos") is not None:
                raise ValueError("retrieval_scores runs unpacked prompts; the model passed input_pos")
            x = args[0] if args else kwargs["x"]
            c, m, err = _score_attention(module, x, out, state)
            copy[index] += c.sum(dim=0)
            mass[index] += m.sum(dim=0)
            worst[index] = max(worst[index].item(), err)
        return fn

    handles = [a.register_forward_hook(hook(i), with_kwargs=True) for i, a in enumerate(layers)]
    skip = getattr(model, "skip_output_layer", None)
    if skip is not None:
        model.skip_output_layer = True  # the final hidden states instead of [B, S, vocab] logits: scoring needs none
    bar = progress_bar(len(prompts), f"retrieval scores ({length} tokens, {device.type})", enabled=progress)
    t0 = time.perf_counter()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            state.update(_batch(chunk, device))
            model(state["tokens"])
            bar.update(len(chunk))
    finally:
        for h in handles:
            h.remove()
        if skip is not None:
            model.skip_output_layer = skip
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    error = float(worst.max())
    tol = TOLERANCE.get(dtype, 0.1)
    if error > tol:
        bad = [i for i in range(L) if worst[i] > tol]
        raise RecomputeMismatch(f"the attention recomputed for scoring differs from the output of layer(s) {bad} by up "
                                f"to {error:.3g} of its largest value (> {tol} for {dtype}): the scores would not "
                                "describe this model")
    n = len(prompts)
    return HeadScores(copy_score=(copy / n).tolist(), needle_mass=(mass / n).tolist(), length=length, prompts=n,
                      depths=list(depths), seed=seed, patterns=[repr(a.pattern) for a in layers],
                      recompute_max_rel_error=error, seconds=round(time.perf_counter() - t0, 2), device=str(device),
                      dtype=str(dtype).removeprefix("torch."))


def _batch(prompts: list[Prompt], device) -> dict:
    """Tensors of one batch: tokens [B, S] (right-padded: causal attention never looks at the padding), the answer
    rows [B, A] (the queries that produce answer tokens, padded by repeating the last one), valid [B, A], targets
    [B, A], needle [B, S]."""
    S = max(len(p.ids) for p in prompts)
    A = max(len(p.ids) - p.answer_start for p in prompts)
    tokens = torch.zeros(len(prompts), S, dtype=torch.long)
    needle = torch.zeros(len(prompts), S, dtype=torch.bool)
    rows = torch.zeros(len(prompts), A, dtype=torch.long)
    valid = torch.zeros(len(prompts), A, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, :len(p.ids)] = torch.tensor(p.ids)
        needle[i, p.needle.start:p.needle.stop] = True
        r = list(range(p.answer_start - 1, len(p.ids) - 1))
        rows[i] = torch.tensor(r + [r[-1]] * (A - len(r)))
        valid[i, :len(r)] = True
    targets = tokens.gather(1, rows + 1)
    return {k: v.to(device) for k, v in dict(tokens=tokens, needle=needle, rows=rows, valid=valid,
                                             targets=targets).items()}


# -- the choice ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FullLayerChoice:
    """Full layers chosen for ``spec`` (``"retrieval[:n or :f]"``) from a model's retrieval scores: ``layers``
    (sorted), the ``ranking`` they were taken from (every layer, best first) and its per-layer scores; ``source``: the
    scored model's directory. What the finetuning recipe records in output_dir and in every checkpoint."""

    spec: str
    layers: list[int]
    ranking: list[int]
    layer_copy_score: list[float]
    layer_needle_mass: list[float]
    prompts: int
    length: int
    source: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FullLayerChoice":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def config_line(self) -> str:
        """The override that builds this layout without scoring: ``model.full_layers=[...]``."""
        return "model.full_layers=" + json.dumps(self.layers).replace(" ", "")

    def table(self) -> str:
        """The ranking as text: rank, layer, best-head copy score and needle mass, chosen or not."""
        chosen = set(self.layers)
        lines = ["rank  layer  copy   needle mass  full"]
        for r, i in enumerate(self.ranking, 1):
            lines.append(f"{r:>4}  {i:>5}  {self.layer_copy_score[i]:.3f}  {self.layer_needle_mass[i]:.3f}"
                         f"        {'yes' if i in chosen else ''}")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: the budget, the layers, and the scores they were chosen on."""
        L = len(self.ranking)
        return (f"full_layers {self.spec!r}: {len(self.layers)} of {L} layers {self.layers}, the best by the copy "
                f"score of their best head ({self.prompts} passkey prompts of {self.length} tokens"
                + (f" on {self.source}" if self.source else "") + f"); ranking {self.ranking}")


def choose_full_layers(scores: HeadScores, spec: str = "retrieval", source: str | None = None) -> FullLayerChoice:
    """The ``retrieval_budget(spec)`` best layers of ``scores.ranking()``."""
    L = len(scores.copy_score)
    n = retrieval_budget(spec, L)
    ranking = scores.ranking()
    return FullLayerChoice(spec=spec, layers=sorted(ranking[:n]), ranking=ranking,
                           layer_copy_score=[round(x, 4) for x in scores.layer_copy_score],
                           layer_needle_mass=[round(x, 4) for x in scores.layer_needle_mass],
                           prompts=scores.prompts, length=scores.length, source=source)


def score_model_dir(model_dir, tokenizer, *, device="cpu", dtype: torch.dtype = torch.float32, length: int | None = None,
                    samples_per_depth: int = 8, batch_size: int = 8, seed: int = 0,
                    progress: bool = True) -> HeadScores:
    """``retrieval_scores`` of the model in an HF directory (``flexgen_long.hf.load_model``: a plain HF model with
    every layer full, a finetuning checkpoint as it was trained), freed afterwards. A tokenizer whose ids reach past
    the model's embedding table is refused (``flexgen_long.tokenizers.check_fits``, a ``ValueError``)."""
    from . import hf
    from .tokenizers import check_fits

    model = hf.load_model(model_dir, device=device, dtype=dtype).eval()
    try:
        check_fits(tokenizer, model.tok_embeddings.num_embeddings)
        return retrieval_scores(model, tokenizer, length, samples_per_depth, seed=seed, batch_size=batch_size,
                                progress=progress)
    finally:
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


# -- the finetuning recipe's model.full_layers: retrieval -------------------------------------------------------------
def provisional_model_cfg(model_cfg):
    """``model_cfg`` (a torchtune model section) as the recipe checks it before the layers are chosen: with
    ``full_layers: retrieval[...]`` replaced by as many full layers in the middle (the same count, so the same
    shapes, sparse patterns and memory plan); any other section unchanged. A budget the model cannot hold is refused
    naming ``model.full_layers``."""
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    from .recipe_config import fail

    spec = model_cfg.get("full_layers")
    if not is_retrieval(spec):
        return model_cfg
    with torch.device("meta"):
        L = len(tt_config.instantiate(OmegaConf.merge(model_cfg, {"full_layers": "none"})).layers)
    try:
        n = retrieval_budget(spec, L)
    except ValueError as e:
        fail("model.full_layers", str(e))
    start = (L - n) // 2  # placed as layout's "middle" places its layers
    return OmegaConf.merge(model_cfg, {"full_layers": list(range(start, start + n))})


def check_config(cfg) -> None:
    """The recipe's check of ``model.full_layers: retrieval[...]`` before any work: its form and a pretrained base
    model to score (``checkpoint.base_dir``); the ``retrieval_scoring`` section's keys are the recipe schema's."""
    from .recipe_config import fail, get

    spec = get(cfg, "model.full_layers", None)
    if not is_retrieval(spec):
        return
    try:
        retrieval_budget(spec, None)
    except ValueError as e:
        fail("model.full_layers", str(e))
    if get(cfg, "checkpoint.base_dir", None) is None:
        fail("model.full_layers", f"{spec!r} places the full layers on a pretrained model's retrieval heads, but "
                                  "checkpoint.base_dir is null (random init has none): set checkpoint.base_dir to an "
                                  "HF model directory, or choose another full_layers (e.g. middle)")


def choose_for_run(spec: str, *, base_dir, tokenizer, output_dir, resume: bool, resume_from, device, dtype,
                   log: Callable[[str], None] = print, length: int | None, samples_per_depth: int,
                   batch_size: int) -> FullLayerChoice:
    """The layers of one finetuning run, chosen once:

    * resuming from a checkpoint: the choice recorded in its config.json (``CHECKPOINT_KEY`` under the recipe
      section), which must be for the same ``spec`` -- never a new scoring;
    * resuming before the first checkpoint: ``<output_dir>/full_layers.json`` when it was made for the same ``spec``
      and ``base_dir`` with the same scoring arguments;
    * else: ``base_dir``'s model scored (``score_model_dir`` with ``length``, ``samples_per_depth``, ``batch_size``)
      on ``device`` in ``dtype``, the choice written to ``<output_dir>/full_layers.json`` (with every head's scores
      and the seconds it took, loading included).

    A checkpoint trained with other layers is refused, naming ``model.full_layers``."""
    from . import hf
    from .checkpoint_io import write_atomic
    from .recipe_config import fail

    if resume_from is not None:
        saved = hf.read_config(resume_from).get("flexgen_long") or {}
        record = (saved.get("recipe") or {}).get(CHECKPOINT_KEY)
        trained = (saved.get("model") or {}).get("full_layers")
        if record is None or record.get("spec") != spec or record.get("layers") != trained:
            how = f"chosen for {record['spec']!r}" if record else "not chosen from retrieval heads"
            fail("model.full_layers", f"is {spec!r} but {resume_from} was trained with full_layers {trained!r} ({how}); "
                                      "a resumed run keeps the layers it was trained with: give the value it was "
                                      "trained with, or start a fresh run in another output_dir")
        choice = FullLayerChoice.from_dict(record)
        log(f"Full layers from {resume_from} (no new scoring): {choice.summary()}")
        return choice
    path = Path(output_dir) / CHOICE_FILE
    source = str(Path(base_dir).resolve())
    if resume and path.is_file():
        try:
            choice = FullLayerChoice.from_dict(json.loads(path.read_text())["choice"])
        except (ValueError, KeyError, TypeError):
            choice = None  # unreadable (e.g. cut off mid-write by a kill): scored again and rewritten
        same = choice is not None and (choice.spec, choice.source) == (spec, source) and \
            choice.prompts == samples_per_depth * len(DEFAULT_DEPTHS) and length in (None, choice.length)
        if same:
            log(f"Full layers from {path} (no new scoring): {choice.summary()}")
            return choice
    t0 = time.perf_counter()
    scores = score_model_dir(base_dir, tokenizer, device=device, dtype=dtype, length=length,
                             samples_per_depth=samples_per_depth, batch_size=batch_size)
    seconds = round(time.perf_counter() - t0, 2)
    choice = choose_full_layers(scores, spec, source=source)
    log(f"Retrieval scores of {base_dir}: {seconds:.1f} s with loading (recompute check "
        f"{scores.recompute_max_rel_error:.1e}):\n{choice.table()}")
    log(f"Full layers: {choice.summary()}")
    record = {"choice": choice.to_dict(), "scores": scores.to_dict(), "seconds_with_loading": seconds}
    write_atomic(path, (json.dumps(record, indent=2) + "\n").encode())
    return choice
