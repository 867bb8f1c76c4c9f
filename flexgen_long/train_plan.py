"""The training memory plan: what one GPU holds when recipes/longgen_finetune.py trains a model at a given world size,
worked out from shapes alone (the model may live on the meta device) before any GPU exists. ``python
recipes/longgen_plan.py --config <yaml> --world-size N`` prints it for a config; the recipe logs its headline.

The setup planned is the recipe's: the model built in the config's ``dtype`` (b bytes per value), so gradients and torch
AdamW's two states take that dtype too; with world size W > 1, FSDP2 through ``torchtune.training.shard_model`` with one
unit per ``TransformerSelfAttentionLayer`` and the root (embeddings, final norm, output) -- every parameter sharded on
dim 0, padded to a multiple of W rows; packed batches (document ids, RoPE positions per document).

Per rank, in bytes (D model dim, F FFN dim, V vocabulary, Hq query heads, Dq = Hq * hd and Dkv the query and key/value
widths, hd the head dim, L layers, T = batch_size * seq_len tokens on each rank, Tp the same at the shape policy's
padded length -- flexgen_long.shapes.padded_len, equal to seq_len on a bucket rung such as 32K, 64K, 128K):

state
  parameters, gradients  b * P_r each, P_r = sum over parameters of ceil(rows / W) * values per row
  optimizer              AdamW / Adam (torch): 2 * b * P_r.  AdamW8bit / Adam8bit (torchao): for a parameter shard of
                         n >= 4096 values with n % 256 == 0, 2 * (n + 4 n / 256 + 1024) (uint8 codes, an fp32 scale per
                         256-value block, the 256-entry fp32 code map), else 2 * b * n.  Plus 4 bytes (``step``) per
                         parameter tensor
  FSDP2 (W > 1)          b * (root + 3 * largest layer), unsharded sizes, in the layer phase: the root's parameters,
                         one layer's gathered parameters plus the all-gather buffer of the next, and one layer's
                         unsharded gradient before its reduce-scatter. None in the head phase: every unit, the root
                         too, is resharded after forward (torchtune passes reshard_after_forward=True) and gathered
                         again only when its backward starts, after the loss's -- except the root with
                         ChunkedLinearCrossEntropy (below)
  buffers and inputs     the model's buffers (RoPE tables) + 28 T (tokens, labels, positions int64; doc ids int32)
activations (an estimate: eager kernels, as with ``compile: false``; with ``compile: true`` inductor saves less)
  kept per layer         b * T * D with activation checkpointing (the layer's input); without it, the layer's saved set
  a layer's saved set    T * (2 * (8 D + 4 + b D) + 4 b F + 8 hd) + Tp * (2 b (Dq + Dkv) + 4 Hq): per RMSNorm its fp32
                         input, fp32 normalised copy and fp32 rstd (torchtune's norm runs F.rms_norm on x.float() with
                         the b weight, which the fused kernel refuses, so the composite saves all three) and its b
                         output; the MLP's w1 and w3 outputs, silu output and product; RoPE's tables gathered at the
                         packed positions (q and k, fp32); attention's q, k, v, output and fp32 log-sum-exp
  a layer's backward     b * T * (2 F + D) beyond its saved set (the widest MLP gradients and the residual's)
  head                   T * (8 D + 4 + b D) (the final norm) + the loss: ``torch.nn.CrossEntropyLoss`` as the recipe
                         calls it 12 T V (fp32 logits' log-softmax, saved, and two fp32 gradients of its size);
                         torchtune's ``CEWithChunkedOutputLoss`` with C chunks: b T V + 4 T V + 4 T V / C (every
                         chunk's logits in b, every chunk's saved fp32 log-softmax, one chunk's fp32 copy);
                         ``flexgen_long.losses.ChunkedLinearCrossEntropy`` with C chunks of at most n = ceil(T / C)
                         tokens: 12 n V + b T D, at its peak in a chunk's backward -- the chunk's recomputed fp32
                         log-softmax (saved), its fp32 gradient and the fp32 gradient of the logits (the chunk's b
                         logits and their fp32 copy, made first, are gone by then; no other chunk's logits exist),
                         and the hidden states' gradient gathered over the chunks. The hidden states the chunks keep
                         for their recompute are the final norm's b output, counted in the norm's term. This loss
                         also puts two parts in the head phase that the others do not (their peak falls at the end
                         of forward): the output projection's gradient, b V D (gathered, not sharded: FSDP2
                         reduce-scatters it at the end of backward), and with W > 1 the root unit gathered, b * root
                         (the recipe keeps it so through the loss, which calls the root's output module after the
                         model's forward)
peak = max over three phases (gradients are set to None at each step's start, optimizer states exist from step 1 on):
  head phase             parameters + optimizer + buffers + every layer's kept activations + head (+ with
                         ChunkedLinearCrossEntropy, the output projection's gradient and the gathered root above)
  layer phase            the same + FSDP2 without the head, at the layer i of the backward (L-1 down to 0) that
                         needs most: kept activations of layers 0..i, gradients of layers i..L-1 and of the root,
                         one layer's saved set and backward
  optimizer step         parameters + gradients + optimizer + buffers

Checked two ways (tests/test_train_plan.py): against torch's own memory trackers (``MemTracker``, and
``FSDPMemTracker`` over a fake process group) on a small model trained on the CPU -- parameters and optimizer states
exactly, the peak slightly above, in each phase; and against the GPU peaks of ``analysis/results/finetune_*.json``
(every one of them in the head phase; the comparison is in analysis/README.md, "Finetuning on GPUs"). The layer phase
has no GPU measurement behind it yet, nor has ChunkedLinearCrossEntropy's head; every GPU record ran the other
losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torchtune.modules import TransformerSelfAttentionLayer

from . import recipe_config as rc
from .attention import attention_layers
from .shapes import padded_len

__all__ = ["ModelShape", "Unit", "TrainPlan", "plan_training", "plan_from_config", "check_fits", "headline",
           "OPTIMIZERS", "LOSSES", "LOSS_CHUNKS", "H200_GIB"]

GiB = 2**30
#: What torch reports for an H200 (``total capacity of 139.80 GiB`` in the out-of-memory message recorded in
#: analysis/results/bench_hf_llama2_7b_NVIDIA_H200.json); an 80 GB H100 reports about 79 GiB.
H200_GIB = 139.8
#: Optimizers whose state the plan knows: component path -> kind.
OPTIMIZERS = {"torch.optim.AdamW": "adam", "torch.optim.Adam": "adam",
              "torchao.optim.AdamW8bit": "adam8bit", "torchao.optim.Adam8bit": "adam8bit"}
#: Losses the plan knows (the recipe calls any loss without ``num_output_chunks`` on the whole fp32 logits, except
#: flexgen_long's own, which takes the hidden states and projects them a chunk at a time).
LOSSES = ("torch.nn.CrossEntropyLoss", "torchtune.modules.loss.CEWithChunkedOutputLoss",
          "flexgen_long.losses.ChunkedLinearCrossEntropy")
#: Each loss's chunk-count field in a config, and its default when the config leaves it out (the classes' own).
LOSS_CHUNKS = {LOSSES[1]: ("num_output_chunks", 8), LOSSES[2]: ("num_chunks", 8)}
_BLOCK_8BIT, _MIN_8BIT, _QMAP_BYTES = 256, 4096, 256 * 4  # torchao.optim's block size, threshold and code map


@dataclass(frozen=True)
class Unit:
    """One FSDP2 unit: its name, its parameters' values (unsharded, padded to W rows) and its values per rank."""
    name: str
    values: int
    per_rank: int


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from a model: widths, the layout, and each parameter's dim-0 rows and values, per unit."""
    num_layers: int
    dim: int
    ffn_dim: int
    vocab: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    full_layers: tuple[int, ...]
    sparse: tuple[str, ...]
    params: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]  # (unit name, ((rows, values), ...)), layers first
    buffer_bytes: int

    @classmethod
    def of(cls, model: nn.Module) -> "ModelShape":
        layers = [m for m in model.modules() if isinstance(m, TransformerSelfAttentionLayer)]
        attn = attention_layers(model)
        if not layers or len(attn) != len(layers):
            raise ValueError("the training plan needs a model built by flexgen_long.models (one HybridAttention per "
                             f"TransformerSelfAttentionLayer), got {type(model).__name__}")
        seen, units = set(), []
        for name, module in [(n, m) for n, m in model.named_modules() if m in layers] + [("root", model)]:
            shapes = []
            for p in module.parameters():
                if id(p) not in seen:  # each parameter belongs to the innermost unit that holds it (tied: once)
                    seen.add(id(p))
                    shapes.append((p.shape[0] if p.dim() else 1, p.numel()))
            units.append((name, tuple(shapes)))
        a, mlp = attn[0], layers[0].mlp
        return cls(num_layers=len(layers), dim=a.embed_dim, ffn_dim=mlp.w1.weight.shape[0],
                   vocab=model.tok_embeddings.num_embeddings, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads,
                   head_dim=a.head_dim, full_layers=tuple(i for i, x in enumerate(attn) if x.pattern.is_full),
                   sparse=tuple(dict.fromkeys(repr(x.pattern) for x in attn if not x.pattern.is_full)),
                   params=tuple(units),
                   buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()))

    @property
    def num_params(self) -> int:
        return sum(v for _, shapes in self.params for _, v in shapes)


def _shard(rows: int, values: int, world_size: int) -> int:
    """Values per rank of one parameter under FSDP2 (dim 0 in ceil(rows / W)-row chunks, padded)."""
    return -(-rows // world_size) * (values // rows)


def _optimizer_bytes(kind: str, shard_values: list[int], b: int) -> int:
    if kind == "adam":
        return sum(2 * b * n + 4 for n in shard_values)
    return sum(4 + (2 * (n + 4 * n // _BLOCK_8BIT + _QMAP_BYTES) if n >= _MIN_8BIT and n % _BLOCK_8BIT == 0
                    else 2 * b * n) for n in shard_values)


@dataclass(frozen=True)
class TrainPlan:
    """Bytes per rank of each part in each phase (``phases``: name -> {part: bytes}); ``peak`` is the largest total."""
    shape: ModelShape
    world_size: int
    seq_len: int
    batch_size: int
    dtype: torch.dtype
    optimizer: str
    loss_chunks: int  # 0: the whole logits at once (torch.nn.CrossEntropyLoss)
    activation_checkpointing: bool
    cpu_offload: bool
    units: tuple[Unit, ...]
    phases: dict = field(compare=False)
    host_bytes: int = 0  # parameters, gradients and optimizer states offloaded to the host (fsdp_cpu_offload)
    layer_at: int = 0  # the layer at which the layer phase peaks
    alternative: tuple | None = None  # (optimizer, peak bytes) with the other optimizer kind
    loss: str = LOSSES[0]  # one of LOSSES

    @property
    def totals(self) -> dict:
        return {name: sum(parts.values()) for name, parts in self.phases.items()}

    @property
    def peak(self) -> int:
        return max(self.totals.values())

    @property
    def peak_phase(self) -> str:
        t = self.totals
        return max(t, key=t.get)

    def describe(self, gpu_memory_gib: float | None = None) -> str:
        s, w = self.shape, self.world_size
        full = _ranges(s.full_layers)
        layout = ("all layers full" if len(s.full_layers) == s.num_layers else
                  f"full attention in {full or 'none'}; {', '.join(s.sparse)} elsewhere")
        loss = (f"{self.loss.rsplit('.', 1)[1]} ({self.loss_chunks} chunks)" if self.loss_chunks else
                "CrossEntropyLoss on the whole logits")
        rows = [f"Training memory plan: an estimate per GPU, from shapes alone (nothing allocated)",
                f"  model   {s.num_params / 1e6:.1f}M parameters, {s.num_layers} layers ({layout}); dim {s.dim}, FFN "
                f"{s.ffn_dim}, {s.num_heads}/{s.num_kv_heads} heads of {s.head_dim}, vocab {s.vocab}",
                f"  run     world size {w}; {self.batch_size} x {self.seq_len} tokens per rank (packed); "
                f"{str(self.dtype).replace('torch.', '')}; activation checkpointing "
                f"{'on' if self.activation_checkpointing else 'off'}; {loss}; {self.optimizer}"
                + ("; FSDP2 CPU offload" if self.cpu_offload else "")]
        if w == 1:
            rows.append("  sharding: none (world size 1: the recipe runs without FSDP)")
        else:
            rows.append(f"  FSDP2 units (torchtune.training.shard_model: one per TransformerSelfAttentionLayer, then "
                        f"the root; dim 0 sharded over {w} ranks, padded):")
            layer_units = [u for u in self.units if u.name != "root"]
            for (values, per_rank), names in _group(layer_units).items():
                rows.append(f"    {_names(names):<14s} {len(names):3d} unit{'s' if len(names) > 1 else ' '} x "
                            f"{values / 1e6:8.2f}M values -> {per_rank / 1e6:7.2f}M per rank")
            root = self.units[-1]
            rows.append(f"    {'root':<14s}   1 unit  x {root.values / 1e6:8.2f}M values -> "
                        f"{root.per_rank / 1e6:7.2f}M per rank (tok_embeddings, norm, output)")
        names = list(self.phases)
        parts = list(dict.fromkeys(p for ph in self.phases.values() for p in ph))
        rows.append(f"  GiB per rank {'':<31s}" + "".join(f"{n:>15s}" for n in names))
        for p in parts:
            rows.append(f"    {p:<40s}" + "".join(f"{self.phases[n].get(p, 0) / GiB:15.2f}" if p in self.phases[n]
                                                 else f"{'-':>15s}" for n in names))
        rows.append(f"    {'total':<40s}" + "".join(f"{t / GiB:15.2f}" for t in self.totals.values()))
        if self.host_bytes:
            rows.append(f"  on the host (CPU offload): {self.host_bytes / GiB:.2f} GiB per rank")
        peak = f"  peak (estimate): {self.peak / GiB:.2f} GiB per GPU, in the {self.peak_phase}"
        if self.peak_phase == "layer phase":
            peak += f" (backward at layer {self.layer_at})"
        if gpu_memory_gib is not None:
            spare = gpu_memory_gib - self.peak / GiB
            peak += (f"; fits {gpu_memory_gib:g} GiB with {spare:.1f} to spare" if spare >= 0 else
                     f"; DOES NOT FIT {gpu_memory_gib:g} GiB")
            if 0 <= spare < 0.25 * self.peak / GiB:
                peak += (" (tight: the measured runs reserved 14-25% more than their allocated peak, "
                         "analysis/results/finetune_*.json)")
        rows.append(peak)
        if self.alternative:
            rows.append(f"  with optimizer._component_={self.alternative[0]}: peak {self.alternative[1] / GiB:.2f} GiB")
        rows.append("  formula: flexgen_long/train_plan.py (module docstring); activations counted for eager kernels "
                    "(compile: false); with compile: true they are an upper bound")
        return "\n".join(rows)

    __str__ = describe


def _ranges(idx) -> str:
    out, idx = [], list(idx)
    while idx:
        j = 0
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(f"{idx[0]}" if j == 0 else f"{idx[0]}-{idx[j]}")
        idx = idx[j + 1:]
    return ", ".join(out)


def _group(units):
    groups: dict = {}
    for u in units:
        groups.setdefault((u.values, u.per_rank), []).append(u.name)
    return groups


def _names(names) -> str:
    idx = [int(n.rsplit(".", 1)[1]) for n in names]
    return f"layers.{_ranges(idx)}" if len(idx) < 3 or idx == list(range(idx[0], idx[-1] + 1)) else \
        f"{len(idx)} layers"


def plan_training(model: nn.Module | ModelShape, *, seq_len: int, world_size: int = 1, batch_size: int = 1,
                  dtype: torch.dtype = torch.bfloat16, optimizer: str = "torch.optim.AdamW", loss_chunks: int = 0,
                  activation_checkpointing: bool = True, cpu_offload: bool = False,
                  alternative: bool = True, loss: str | None = None) -> TrainPlan:
    """The plan (module docstring) for ``model`` (any device, meta included) trained by the finetuning recipe.
    ``loss``: one of ``LOSSES``; by default torch's CrossEntropyLoss when ``loss_chunks`` is 0, else torchtune's
    CEWithChunkedOutputLoss with that many chunks."""
    shape = model if isinstance(model, ModelShape) else ModelShape.of(model)
    for name, v, low in (("seq_len", seq_len, 1), ("world_size", world_size, 1), ("batch_size", batch_size, 1),
                         ("loss_chunks", loss_chunks, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    loss = loss or LOSSES[1 if loss_chunks else 0]
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    if (loss == LOSSES[0]) != (loss_chunks == 0):
        raise ValueError(f"loss_chunks must be 0 with {LOSSES[0]} and >= 1 with the chunked losses, got "
                         f"{loss_chunks} with {loss}")
    b, w, s = dtype.itemsize, world_size, shape
    D, F, V, hd = s.dim, s.ffn_dim, s.vocab, s.head_dim
    dq, dkv = s.num_heads * hd, s.num_kv_heads * hd
    T, Tp = batch_size * seq_len, batch_size * padded_len(seq_len)

    units, shard_values, unit_shards = [], [], []
    for name, shapes in s.params:
        per = [_shard(r, v, w) for r, v in shapes]
        shard_values += per
        unit_shards.append(sum(per))
        units.append(Unit(name, sum(-(-r // w) * w * (v // r) for r, v in shapes), sum(per)))
    P_r = sum(shard_values)
    kind = OPTIMIZERS[optimizer]
    params, grads, opt = b * P_r, b * P_r, _optimizer_bytes(kind, shard_values, b)
    layer_grads, root_grads = [b * x for x in unit_shards[:-1]], b * unit_shards[-1]
    largest = max(u.values for u in units[:-1])
    fsdp = b * (units[-1].values + 3 * largest) if w > 1 else 0
    fixed = s.buffer_bytes + 28 * T

    norm = T * (8 * D + 4 + b * D)
    saved = 2 * norm + T * (4 * b * F + 8 * hd) + Tp * (2 * b * (dq + dkv) + 4 * s.num_heads)
    backward = b * T * (2 * F + D)
    kept = b * T * D if activation_checkpointing else saved
    working = (saved if activation_checkpointing else 0) + backward
    head_grads = head_fsdp = 0
    if loss == LOSSES[0]:
        loss_bytes = 12 * T * V
    elif loss == LOSSES[1]:
        loss_bytes = b * T * V + 4 * T * V + 4 * T * V // loss_chunks
    else:
        loss_bytes = 12 * -(-T // loss_chunks) * V + b * T * D
        head_grads = b * V * D  # the output projection's gradient, accumulated over the chunks, gathered
        head_fsdp = b * units[-1].values if w > 1 else 0  # the root kept gathered through the loss
    L = s.num_layers

    def at(i):  # layer phase at layer i: kept 0..i, gradients of i..L-1 and the root
        return (i + 1) * kept + sum(layer_grads[i:]) + root_grads

    layer_at = max(range(L), key=at)
    host = 0
    if cpu_offload and w > 1:  # FSDP2's CPUOffloadPolicy: sharded parameters, gradients, optimizer states on the host
        host, params, grads, opt = params + grads + opt, 0, 0, 0
        layer_grads, root_grads = [0] * L, 0
    P, G, O = (f"parameters ({str(dtype).replace('torch.', '')})", "gradients", f"optimizer ({optimizer})")
    phases = {
        "head phase": {P: params, G: head_grads, O: opt, "FSDP2 buffers": head_fsdp, "buffers + inputs": fixed,
                       "kept activations": L * kept, "head (final norm + loss)": norm + loss_bytes},
        "layer phase": {P: params, G: sum(layer_grads[layer_at:]) + root_grads, O: opt, "FSDP2 buffers": fsdp,
                        "buffers + inputs": fixed, "kept activations": (layer_at + 1) * kept,
                        "one layer (saved + backward)": working},
        "optimizer step": {P: params, G: grads, O: opt, "buffers + inputs": s.buffer_bytes},
    }
    plan = TrainPlan(shape=s, world_size=w, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                     optimizer=optimizer, loss_chunks=loss_chunks, activation_checkpointing=activation_checkpointing,
                     cpu_offload=cpu_offload, units=tuple(units), phases=phases, host_bytes=host, layer_at=layer_at,
                     loss=loss)
    if alternative:
        other = next(o for o, k in OPTIMIZERS.items() if k != kind and ("AdamW" in o) == ("AdamW" in optimizer))
        alt = plan_training(s, seq_len=seq_len, world_size=w, batch_size=batch_size, dtype=dtype, optimizer=other,
                            loss_chunks=loss_chunks, activation_checkpointing=activation_checkpointing,
                            cpu_offload=cpu_offload, alternative=False, loss=loss)
        plan = replace(plan, alternative=(other, alt.peak))
    return plan


def _component_path(section: str, cfg, allowed) -> str:
    """The config's ``<section>._component_`` as the allowed path naming the same object, or a ConfigError."""
    from torchtune.config._utils import _get_component_from_path

    path = rc.get(cfg, f"{section}._component_")
    try:
        obj = _get_component_from_path(path)
    except Exception:  # noqa: BLE001 -- named in the error below
        obj = None
    for name in allowed:
        if path == name or (obj is not None and obj is _get_component_from_path(name)):
            return name
    rc.fail(f"{section}._component_", f"the memory plan knows {list(allowed)}, got {path!r}")


def plan_from_config(cfg, world_size: int, model: nn.Module | None = None) -> TrainPlan:
    """The plan of the finetuning recipe's config ``cfg`` (its fields as the recipe reads them) at ``world_size``;
    ``model`` is the config's model (built here on the meta device when not given). Errors name the field."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise rc.ConfigError(f"world size (--world-size, or torchrun's --nproc_per_node) must be an int >= 1, got "
                             f"{world_size!r}")
    seq_len = rc.integer(cfg, "seq_len", minimum=2)
    batch_size = rc.integer(cfg, "batch_size", minimum=1)
    dtype = rc.dtype_field(cfg)
    loss = _component_path("loss", cfg, LOSSES) if "loss" in cfg else LOSSES[0]
    chunks = 0
    if loss in LOSS_CHUNKS:
        key, default = LOSS_CHUNKS[loss]
        chunks = rc.integer(cfg, f"loss.{key}", default, minimum=1)
    if model is None:
        with torch.device("meta"):
            model = rc.instantiate("model", cfg.model)
    return plan_training(model, seq_len=seq_len, world_size=world_size, batch_size=batch_size, dtype=dtype,
                         optimizer=_component_path("optimizer", cfg, OPTIMIZERS), loss_chunks=chunks, loss=loss,
                         activation_checkpointing=rc.boolean(cfg, "enable_activation_checkpointing", False),
                         cpu_offload=rc.boolean(cfg, "fsdp_cpu_offload", False))


def _largest_fitting(fits, lo: int, hi: int):
    """Largest x in [lo, hi] with fits(x) (fits monotone: true up to some x), or None."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def check_fits(plan: TrainPlan, gpu_memory_gib: float) -> None:
    """ConfigError naming ``seq_len`` and what would fit, when the plan's peak exceeds ``gpu_memory_gib`` (one GPU)."""
    if not isinstance(gpu_memory_gib, (int, float)) or isinstance(gpu_memory_gib, bool) or not gpu_memory_gib > 0:
        raise rc.ConfigError(f"GPU memory (--gpu-memory-gib) must be a number > 0, got {gpu_memory_gib!r}")
    cap = gpu_memory_gib * GiB
    if plan.peak <= cap:
        return
    kw = dict(world_size=plan.world_size, batch_size=plan.batch_size, dtype=plan.dtype, optimizer=plan.optimizer,
              loss_chunks=plan.loss_chunks, loss=plan.loss, activation_checkpointing=plan.activation_checkpointing,
              cpu_offload=plan.cpu_offload, alternative=False)
    blocks = _largest_fitting(lambda n: plan_training(plan.shape, seq_len=128 * n, **kw).peak <= cap, 1,
                              plan.seq_len // 128)
    options = [f"seq_len <= {128 * blocks} (multiples of 128)" if blocks else
               "no seq_len at this world size (the training state alone does not fit)"]
    kw.pop("world_size")
    worlds = [w for w in (2, 4, 8, 16, 32, 64, 128, 256, 512) if w > plan.world_size and
              plan_training(plan.shape, seq_len=plan.seq_len, world_size=w, **kw).peak <= cap]
    if worlds:
        options.append(f"world size >= {worlds[0]}")
    if plan.alternative and plan.alternative[1] <= cap:
        options.append(f"optimizer._component_={plan.alternative[0]} ({plan.alternative[1] / GiB:.1f} GiB)")
    if not plan.activation_checkpointing:
        options.append("enable_activation_checkpointing=true")
    raise rc.ConfigError(
        f"config field 'seq_len': {plan.seq_len} x batch_size {plan.batch_size} needs an estimated "
        f"{plan.peak / GiB:.1f} GiB per GPU at world size {plan.world_size} (in the {plan.peak_phase}), more than the "
        f"{gpu_memory_gib:g} GiB of one GPU (--gpu-memory-gib); what fits: " + "; or ".join(options))


def headline(cfg, model: nn.Module, world_size: int, device) -> str:
    """One log line for a run: the plan's peak and its parts, against the GPU's memory when on one. Never raises for a
    config the plan does not know (the run does not depend on the plan)."""
    try:
        plan = plan_from_config(cfg, world_size, model)
    except (rc.ConfigError, ValueError) as e:
        return f"Memory plan: not estimated ({e})"
    device = torch.device(device)
    cap = (torch.cuda.get_device_properties(device).total_memory / GiB if device.type == "cuda"
           and torch.cuda.is_available() else None)
    parts = plan.phases[plan.peak_phase]
    where = "GPU" if device.type == "cuda" else "rank"
    return (f"Memory plan (estimate; python recipes/longgen_plan.py prints it whole): {_size(plan.peak)} per {where} "
            f"at world size {world_size}, in the {plan.peak_phase} ("
            + ", ".join(f"{k} {_size(v)}" for k, v in parts.items() if v) + ")"
            + (f", of {cap:.1f} GiB" if cap else ""))


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"
