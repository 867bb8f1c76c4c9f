"""Per-layer KV caches sized by each layer's pattern, and the memory plan that sizes them before anything is allocated.

Every cache is a set of *slots*: ``k``/``v`` [B, Hkv, slots, D] plus ``pos`` [B, Hp, slots] int32, the absolute
position held by each slot (-1 = empty), Hp = Hkv for a head-dependent pattern (BlockSparse per_head) else 1. Keys are
stored after RoPE at their absolute positions (as the model was trained; no StreamingLLM re-rotation), so a slot's key is
valid for every later query whatever slot it sits in. Attention over a cache masks slots by the pattern's own token rule
evaluated on ``pos`` -- which makes stale slots (a block that left the local window, an overwritten ring slot) invisible
without ever copying or clearing them.

=============  ==========================================  =================================================================
pattern        slots                                       slot of position p (one write per token, O(1), no roll/copy)
=============  ==========================================  =================================================================
Full           max_len                                     p
AttnSink       min(max_len, sink + window)                 p if p < sink else sink + (p - sink) % window  (a ring)
BlockSparse    local_blocks*block (off-stride ring)        off-stride for head h: ring slot (kb % local_blocks)*block + p%block
               + ceil(nblocks / stride)*block (on-stride)  on-stride: local_blocks*block + (kb // stride)*block + p%block
=============  ==========================================  =================================================================

Why each is exact: AttnSink's ring slot for p was last held by p - window, which no query >= p sees. BlockSparse's
off-stride ring slot for block kb was last held by block kb - local_blocks, outside every later query's local window;
on-stride blocks (per KV head: ``(kb + shift(h)) % stride == 0``) have a slot each, forever. So after any write the slots
hold every key a later query may see. A full ring (AttnSink at q >= sink + window - 1) holds *exactly* the visible keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import HybridAttention, slot_part_len
from .patterns import AttnSink, BlockSparse, Full, Pattern
from .shapes import padded_len

__all__ = ["LayerCache", "ModelCache", "CachePlan", "LayerPlan", "plan_cache", "cache_slots", "free_memory_bytes",
           "check_fits", "prefill_activation_bytes", "choose_prefill_chunk", "PREFILL_CHUNK_MULTIPLE",
           "decode_activation_bytes", "serving_capacity"]


def cache_slots(pattern: Pattern, max_len: int) -> int:
    """Number of slots a layer with ``pattern`` needs for sequences of up to ``max_len`` tokens."""
    if isinstance(pattern, Full):
        return max_len
    if isinstance(pattern, AttnSink):
        return min(max_len, pattern.sink + pattern.window)
    if isinstance(pattern, BlockSparse):
        nblocks = -(-max_len // pattern.block)
        local = 0 if pattern.vertical_stride == 1 else pattern.local_blocks * pattern.block  # stride 1: all on-stride
        return local + (-(-nblocks // pattern.vertical_stride)) * pattern.block
    raise ValueError(f"pattern must be Full, AttnSink or BlockSparse, got {type(pattern).__name__}")


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    pattern: Pattern
    slots: int
    bytes: int  # k + v + pos


@dataclass(frozen=True)
class CachePlan:
    layers: tuple[LayerPlan, ...]
    batch_size: int
    max_len: int
    dtype: torch.dtype

    @property
    def total_bytes(self) -> int:
        return sum(lp.bytes for lp in self.layers)

    def __str__(self) -> str:
        rows = [f"KV cache plan: batch {self.batch_size}, max_len {self.max_len}, {self.dtype}"]
        for lp in self.layers:
            rows.append(f"  layer {lp.layer:3d} {type(lp.pattern).__name__:11s} {lp.slots:>9d} slots "
                        f"{lp.bytes / 2**20:10.2f} MiB")
        rows.append(f"  total {self.total_bytes / 2**30:.3f} GiB ({self.total_bytes} bytes)")
        return "\n".join(rows)


def _attn_layers(model: nn.Module) -> list[HybridAttention]:
    attn = [m for m in model.modules() if isinstance(m, HybridAttention)]
    if not attn:
        raise ValueError("model has no HybridAttention layers (build it with flexgen_long.models)")
    return attn


def _check_positive(name: str, val) -> None:
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        raise ValueError(f"{name} must be an int >= 1, got {val!r}")


def _layer_bytes(pattern, batch_size, num_kv_heads, head_dim, slots, dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    hp = num_kv_heads if pattern.bind_heads(num_kv_heads).head_dependent else 1
    return 2 * batch_size * num_kv_heads * slots * head_dim * itemsize + batch_size * hp * slots * 4


def plan_cache(model: nn.Module, batch_size: int, max_len: int, dtype: torch.dtype = torch.bfloat16) -> CachePlan:
    """Bytes per layer and in total of the caches for ``batch_size`` sequences of up to ``max_len`` tokens. Computed
    from shapes only (the model may live on the meta device); nothing is allocated."""
    _check_positive("batch_size", batch_size)
    _check_positive("max_len", max_len)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
    plans = []
    for i, a in enumerate(_attn_layers(model)):
        slots = cache_slots(a.pattern.bind_heads(a.num_kv_heads), max_len)
        plans.append(LayerPlan(i, a.pattern, slots, _layer_bytes(a.pattern, batch_size, a.num_kv_heads, a.head_dim,
                                                                  slots, dtype)))
    return CachePlan(tuple(plans), batch_size, max_len, dtype)


def free_memory_bytes(device) -> int:
    """Memory a new allocation on ``device`` can use. On GPUs: what the driver reports free (cudaMemGetInfo) plus what
    PyTorch's caching allocator holds reserved but unallocated -- after any large computation most of the card sits in
    that cache, and the driver alone would call it taken. On the host: MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    if device.type == "meta":
        return 1 << 62
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits(plan: CachePlan, device, reserve_bytes: int = 0, free_bytes: int | None = None) -> None:
    """Raise MemoryError, with the numbers, when the plan (plus ``reserve_bytes`` for activations) exceeds free memory
    (``free_bytes``, default ``free_memory_bytes(device)``)."""
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    need = plan.total_bytes + reserve_bytes
    if need > free:
        raise MemoryError(f"KV caches need {plan.total_bytes} bytes ({plan.total_bytes / 2**30:.2f} GiB) + "
                          f"{reserve_bytes} reserved = {need / 2**30:.2f} GiB, but only {free} bytes "
                          f"({free / 2**30:.2f} GiB) are free on {device} (batch {plan.batch_size}, max_len "
                          f"{plan.max_len}); lower batch size / max_len or use sparser layers")


#: ``choose_prefill_chunk`` picks chunks in multiples of this many tokens (the flex block size and bucket step).
PREFILL_CHUNK_MULTIPLE = 128
#: Headroom on top of the estimate below: allocator rounding and fragmentation, kernels' own small workspaces.
PREFILL_SAFETY_FACTOR = 1.5
PREFILL_SLACK_BYTES = 64 * 2**20
#: Bytes per element of a [C, K] mask built from positions: an int64 difference of positions and three bools (the
#: rule's comparisons and the mask itself); SDPA then adds a float copy of the mask in the model's dtype.
MASK_BUILD_BYTES = 8 + 3


def _kernel_bytes(at: HybridAttention, C: int, T: int, first: bool, cache_len: int, a: int, cpu: bool) -> int:
    """Transient bytes of one layer's attention kernel path (HybridAttention._attend_cached) for a prefill chunk of C
    queries over T = offset + C keys; ``first``: the chunk at offset 0; ``cpu``: the CPU path, else the GPU one.
    Masked SDPA (CPU flash, CUDA memory-efficient) takes the bool mask plus a float copy of it and no score matrix
    (measured on CPU: a [1, 1, C, K] bool mask costs C*K*4 bytes more in fp32, an is_causal call nothing); building
    a mask from positions (the pattern's token rule) passes through int64 differences and a few bool temporaries."""
    H, Hkv, D = at.num_heads, at.num_kv_heads, at.head_dim
    pattern = at.pattern.bind_heads(Hkv)
    lse = H * padded_len(C) * 4                              # flash / cuDNN / flex log-sum-exp rows
    flex = lambda pq, pk: (2 * H * pq + 2 * Hkv * pk) * D * a + lse  # noqa: E731  padded q, k, v and output
    if isinstance(pattern, Full):
        if first:                                            # causal SDPA over the cache's views, GQA unexpanded
            return lse
        if cpu:                                              # lower-right causal SDPA: K/V expanded to H heads, the
            return 2 * H * T * D * a + C * T * (2 + 2 * a)   # [C, T] mask materialised (bools + two float copies)
        return flex(padded_len(C), padded_len(T))            # flex: K/V copied to the key bucket, q padded
    Hm = H if pattern.head_dependent else 1                  # the mask's heads (broadcast when the rule is per layer)
    if first:
        if cpu and C <= 2048:                                # SDPA with the dense bool mask (attention.MaskSet)
            return Hm * C * C * (MASK_BUILD_BYTES + a)
        return flex(padded_len(C), padded_len(C))
    if not cpu:  # flex over [slots in use, padded ; the chunk, padded] (HybridAttention._chunk_over_slots_flex),
        # GQA unexpanded, the key positions [Hp, keys] int32: no dense mask
        pc, ps = padded_len(C), slot_part_len(pattern, cache_slots(pattern, max(T - C, 1)))
        return flex(pc, ps + pc) + (Hkv if pattern.head_dependent else 1) * (ps + pc) * 4
    K = cache_slots(pattern, cache_len) + C                  # CPU: [all cached slots ; the chunk's own keys], masked
    return (2 * Hkv + (2 * H if H > Hkv else 0)) * K * D * a + K * 12 + Hm * C * K * (MASK_BUILD_BYTES + a) + lse


def _chunk_bytes(model: nn.Module, C: int, T: int, first: bool, cache_len: int, a: int, cpu: bool) -> int:
    """Peak transient bytes of one prefill chunk forward (inference mode): see prefill_activation_bytes."""
    E, V = model.tok_embeddings.embedding_dim, model.tok_embeddings.num_embeddings
    peak = 0
    for layer in model.layers:
        at, mlp = layer.attn, layer.mlp
        H, Hkv, D, F = at.num_heads, at.num_kv_heads, at.head_dim, mlp.w1.out_features
        resident = 3 * C * E * a                             # the layer's input x, h = x + attn, the output forming
        norm = 2 * C * E * 4                                 # RMSNorm computes in fp32: x.float() and its result
        attention = (C * (H + 2 * Hkv) * D * a               # q, k, v
                     + 3 * C * H * D * 4                     # RoPE in fp32: x.float(), its products, the stacked result
                     + 2 * C * H * D * a + C * E * a         # kernel output, its transposed copy, output_proj's
                     + 2 * Hkv * C * D * a                   # write_prefill's selected k / v
                     + _kernel_bytes(at, C, T, first, cache_len, a, cpu))
        ffn = 2 * C * E * a + 3 * C * F * a                  # mlp_norm(h) and w2's output; w1 / w3 / their product
        peak = max(peak, resident + max(norm, attention, ffn))
    return peak + C * E * a + C * 16 + V * (a + 4)           # + the chunk's embedding, ids / positions, last logits


def prefill_activation_bytes(model: nn.Module, chunk_len: int, dtype: torch.dtype = torch.bfloat16,
                             prompt_len: int | None = None, cache_len: int | None = None, device=None) -> int:
    """Estimated peak transient memory (bytes) of prefilling a ``prompt_len``-token prompt (default ``chunk_len``: one
    chunk, the whole prompt) ``chunk_len`` tokens at a time, under inference mode, on top of the weights and the KV
    caches (``cache_len``: the caches' max_len, default ``prompt_len``), on ``device``'s kernel paths (None: the worse
    of the CPU and GPU paths). Shapes only: the model may live on the meta device.

    The worst of the first chunk (offset 0, C = min(chunk_len, prompt_len) queries and keys) and, when the prompt has
    more than one chunk, its last full chunk (C = chunk_len queries over T = prompt_len keys: key copies grow with the
    offset). With E = embed_dim, H / Hkv = query / KV heads, D = head_dim, F = the MLP's hidden_dim (torchtune
    FeedForward: w2(silu(w1(x)) * w3(x))), V = vocab, a = itemsize(dtype), 4 = fp32, a chunk costs the peak over
    layers of

        3CEa (residual stream: x, x + attn, the output)
        + max(2CE*4                                          RMSNorm, computed in fp32
              C(H + 2Hkv)Da + 3CHD*4 + 2CHDa + CEa + 2HkvCDa + kernel
                                                             q/k/v, RoPE in fp32, the attention output with its
                                                             transposed copy and projection, the cache write
              2CEa + 3CFa)                                   the MLP: its norm, w1 / w3 / product, w2's output

    plus the chunk's embedding CEa and the last token's logits only, V(a + 4). ``kernel`` (``_kernel_bytes``) is the
    attention path's own: LSE rows H pad(C) 4 (pad = flexgen_long.shapes.padded_len); flex's padded copies
    (2H pad(C) + 2Hkv pad(T))Da; on CPU a full layer's later chunk expands K/V to H heads and materialises its
    lower-right mask, 2HTDa + CT(2 + 2a); a sparse layer's later chunk runs flex on GPU over [the slots in use,
    padded to Ps ; the chunk, padded] (Ps = sink + window rounded up to a block for AttnSink, else the bucket of the
    slots in use), with the key positions as int32; on CPU it concatenates [cached slots ; chunk] keys (K =
    slots + C), expands them to H heads and masks them, (2Hkv + 2H)KDa + Hm C K (11 + a) (Hm = H for a per-head
    pattern, else 1; 11 = ``MASK_BUILD_BYTES``: building a mask from positions goes through an int64 difference and
    bools; SDPA adds a float copy); a sparse first chunk on CPU of <= 2048 tokens uses a dense mask, Hm C^2 (11 + a).
    The sum is multiplied by ``PREFILL_SAFETY_FACTOR`` (1.5) and ``PREFILL_SLACK_BYTES`` (64 MiB) is added for
    allocator rounding and fragmentation and kernels' small workspaces. Meant to err on the high side: against the
    CPU allocator's measured peak (tests/test_cache.py) the estimate before the slack is 1.4-4.5x the peak."""
    _check_positive("chunk_len", chunk_len)
    prompt_len = chunk_len if prompt_len is None else prompt_len
    _check_positive("prompt_len", prompt_len)
    cache_len = prompt_len if cache_len is None else cache_len
    _check_positive("cache_len", cache_len)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
    _attn_layers(model)
    a = torch.empty((), dtype=dtype).element_size()
    paths = (True, False) if device is None else (torch.device(device).type == "cpu",)
    first = min(chunk_len, prompt_len)
    need = 0
    for cpu in paths:
        need = max(need, _chunk_bytes(model, first, first, True, cache_len, a, cpu))
        if prompt_len > chunk_len:
            need = max(need, _chunk_bytes(model, chunk_len, prompt_len, False, cache_len, a, cpu))
    return int(need * PREFILL_SAFETY_FACTOR) + PREFILL_SLACK_BYTES


def choose_prefill_chunk(model: nn.Module, prompt_len: int, free_bytes: int, dtype: torch.dtype = torch.bfloat16,
                         cache_len: int | None = None, device=None) -> int | None:
    """The prefill chunk for a ``prompt_len``-token prompt given ``free_bytes`` left for activations (free memory
    after the KV caches; ``cache_len`` and ``device`` as in ``prefill_activation_bytes``): None (the whole prompt at
    once) when its activations fit (``prefill_activation_bytes``), else the largest multiple of
    ``PREFILL_CHUNK_MULTIPLE`` (128) below ``prompt_len`` whose chunks fit. Raises MemoryError, with the numbers, when
    not even a 128-token chunk fits."""
    _check_positive("prompt_len", prompt_len)
    if not isinstance(free_bytes, int) or isinstance(free_bytes, bool):
        raise ValueError(f"free_bytes must be an int, got {free_bytes!r}")
    whole = prefill_activation_bytes(model, prompt_len, dtype, prompt_len, cache_len, device)
    if whole <= free_bytes:
        return None
    m = PREFILL_CHUNK_MULTIPLE
    lo, hi = 1, (prompt_len - 1) // m  # chunks of lo*m .. hi*m tokens; the estimate grows with the chunk
    smallest = prefill_activation_bytes(model, m, dtype, prompt_len, cache_len, device) if hi >= 1 else whole
    if hi < 1 or smallest > free_bytes:
        raise MemoryError(f"prefill of a {prompt_len}-token prompt does not fit: its activations need about {whole} "
                          f"bytes ({whole / 2**30:.2f} GiB) whole and {smallest} bytes ({smallest / 2**30:.2f} GiB) "
                          f"in chunks of {m} tokens, but only {free_bytes} bytes ({free_bytes / 2**30:.2f} GiB) are "
                          "free after the KV caches; lower batch size / max_new_tokens / the prompt length, or use "
                          "sparser layers")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prefill_activation_bytes(model, mid * m, dtype, prompt_len, cache_len, device) <= free_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo * m


def decode_activation_bytes(model: nn.Module, batch_size: int, max_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Estimated peak transient bytes of one decode step of ``batch_size`` rows over caches of ``max_len`` (shapes
    only). Per layer: the residual stream and the MLP's intermediates for B tokens, q/k/v, and the bool mask
    [B, H, 1, slots] that a layer whose cache is not exactly the visible keys builds from positions (with its int64
    comparisons: 11 bytes per element, as in ``prefill_activation_bytes``); then the logits [B, vocab] in the model's
    dtype and in fp32 for sampling. Times ``PREFILL_SAFETY_FACTOR``, plus ``PREFILL_SLACK_BYTES``."""
    _check_positive("batch_size", batch_size)
    _check_positive("max_len", max_len)
    a = torch.empty((), dtype=dtype).element_size()
    B, E, V = batch_size, model.tok_embeddings.embedding_dim, model.tok_embeddings.num_embeddings
    peak = 0
    for layer in model.layers:
        at, F = layer.attn, layer.mlp.w1.out_features
        H, Hkv, D = at.num_heads, at.num_kv_heads, at.head_dim
        slots = cache_slots(at.pattern.bind_heads(Hkv), max_len)
        attention = B * (H + 2 * Hkv) * D * a + 2 * B * H * D * a + B * H * slots * MASK_BUILD_BYTES
        peak = max(peak, 3 * B * E * a + max(attention, 3 * B * F * a + 2 * B * E * 4))
    return int((peak + B * V * (a + 8)) * PREFILL_SAFETY_FACTOR) + PREFILL_SLACK_BYTES


def serving_capacity(model: nn.Module, prompt_len: int, new_tokens: int, budget_bytes: int,
                     dtype: torch.dtype = torch.bfloat16, prefill_chunk: int | None = 8192, device="cuda") -> dict:
    """The largest batch of ``prompt_len``-token prompts, each generating ``new_tokens``, that ``generate()`` can hold
    in ``budget_bytes`` of device memory -- the trimmed caches' serving gain, from shapes only (the model may live on
    the meta device; nothing is allocated). Memory of a batch of B: the weights (every parameter, in ``dtype``) + the
    KV caches (``plan_cache(B, prompt_len + new_tokens)``) + the larger of the prefill's activations (rows are
    prefilled one at a time, so they do not grow with B; ``prefill_chunk`` tokens at a time, None = whole prompts;
    ``prefill_activation_bytes`` on ``device``'s paths) and a decode step's (``decode_activation_bytes``). An
    estimate: the activation terms err on the high side. Returns a dict with ``batch`` (0 when not even one fits) and
    every term in bytes."""
    _check_positive("prompt_len", prompt_len)
    _check_positive("new_tokens", new_tokens)
    _check_positive("budget_bytes", budget_bytes)
    if prefill_chunk is not None:
        _check_positive("prefill_chunk", prefill_chunk)
    a = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() for p in model.parameters()) * a
    max_len = prompt_len + new_tokens
    chunk = min(prefill_chunk or prompt_len, prompt_len)
    prefill = prefill_activation_bytes(model, chunk, dtype, prompt_len, max_len, device)
    kv_row = plan_cache(model, 1, max_len, dtype).total_bytes  # every cache term is linear in the batch

    def need(b: int) -> tuple[int, int]:  # (total, decode activations) of a batch of b
        dec = decode_activation_bytes(model, b, max_len, dtype)
        return weights + b * kv_row + max(prefill, dec), dec

    lo, hi = 0, max(1, (budget_bytes - weights) // max(kv_row, 1) + 1)
    while lo < hi:  # the largest b with need(b) <= budget (need grows with b)
        mid = (lo + hi + 1) // 2
        if need(mid)[0] <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    total, dec = need(max(lo, 1))
    return {"batch": lo, "budget_bytes": budget_bytes, "weights_bytes": weights, "kv_per_row_bytes": kv_row,
            "prefill_activation_bytes": prefill, "prefill_chunk": prefill_chunk, "decode_activation_bytes": dec,
            "total_bytes": total}


class LayerCache:
    """The slots of one layer (see the module docstring). ``write_prefill`` stores a chunk of one sequence,
    ``write_step`` one token per sequence (static shapes, device-side positions: CUDA-graph safe)."""

    def __init__(self, pattern: Pattern, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device):
        self.pattern = pattern.bind_heads(num_kv_heads)
        self.max_len = max_len
        self.num_kv_heads = num_kv_heads
        self.slots = cache_slots(self.pattern, max_len)
        hp = num_kv_heads if self.pattern.head_dependent else 1
        self.k = torch.zeros(batch_size, num_kv_heads, self.slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch_size, hp, self.slots), -1, dtype=torch.int32, device=device)
        self._heads = torch.arange(hp, device=device).view(hp, 1)  # [Hp, 1] KV-head index for per-head rules

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes

    def reset(self) -> None:
        self.pos.fill_(-1)  # empty slots are masked by pos < 0; k/v need no clearing

    # -- where a position goes -----------------------------------------------------------------------------------------
    def slot_of(self, p: Tensor) -> Tensor:
        """Slots of positions ``p`` (any shape [...]) -> [..., Hp] (one column per KV head of a per-head pattern)."""
        p = p.long().unsqueeze(-1)
        pat = self.pattern
        if isinstance(pat, Full):
            return p
        if isinstance(pat, AttnSink):
            return torch.where(p < pat.sink, p, pat.sink + torch.remainder(p - pat.sink, pat.window))
        bs, L, V = pat.block, pat.local_blocks, pat.vertical_stride
        if V == 1:  # every block is on the stride: the store is a plain buffer
            return p
        kb, off = p // bs, p % bs
        on = pat._on_stride(kb, self._heads.view(-1) if pat.head_dependent else 0)
        return torch.where(on, L * bs + (kb // V) * bs + off, (kb % L) * bs + off)

    def used_slots(self, end: int) -> int:
        """How many slots positions ``0 .. end-1`` can occupy: they all land in the prefix ``[0, n)`` of the layout,
        n = ``cache_slots(pattern, end)`` <= ``slots`` (sinks and ring slots fill from 0; the stride store's block
        slot of block kb is kb // stride; a plain buffer holds p at p). So a chunk at offset ``end`` needs only that
        prefix, whatever ``max_len`` the cache was allocated for. Host arithmetic."""
        if not isinstance(end, int) or isinstance(end, bool) or not 1 <= end <= self.max_len:
            raise ValueError(f"end must be an int in [1, max_len={self.max_len}], got {end!r}")
        return cache_slots(self.pattern, end)

    def _kept(self, p: Tensor, end: int) -> Tensor:
        """[n, Hp] whether position p of a write ending at ``end`` is still needed by queries >= end (a write of many
        tokens into a ring keeps only the last occupant of each slot, so no scatter ever has duplicate targets)."""
        pat = self.pattern
        p2 = p.long().unsqueeze(-1)
        if isinstance(pat, Full):
            return torch.ones_like(p2, dtype=torch.bool)
        if isinstance(pat, AttnSink):
            return (p2 < pat.sink) | (p2 >= end - pat.window)
        kb = p2 // pat.block
        h = self._heads.view(-1) if pat.head_dependent else 0
        return pat._on_stride(kb, h) | (kb > (end - 1) // pat.block - pat.local_blocks) | (pat.vertical_stride == 1)

    # -- writes ---------------------------------------------------------------------------------------------------------
    def write_prefill(self, row: int, k: Tensor, v: Tensor, offset: int) -> None:
        """Store a chunk k/v [1, Hkv, C, D] of sequence ``row`` at positions offset .. offset+C-1 (slots keep only what
        later queries need). Prefill only: may select on the host."""
        C = k.shape[2]
        if offset + C > self.max_len:
            raise ValueError(f"positions up to {offset + C} exceed the cache's max_len={self.max_len}")
        p = torch.arange(offset, offset + C, device=k.device)
        slot, kept = self.slot_of(p), self._kept(p, offset + C)  # [C, Hp]
        hp = slot.shape[1]
        for h in range(hp):
            sel = kept[:, h].nonzero().squeeze(1)
            s = slot[sel, h]
            heads = slice(None) if hp == 1 else slice(h, h + 1)
            self.k[row, heads].index_copy_(1, s, k[0, heads][:, sel])
            self.v[row, heads].index_copy_(1, s, v[0, heads][:, sel])
            self.pos[row, h].index_copy_(0, s, p[sel].to(torch.int32))

    def write_step(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Store one token per sequence: k/v [B, Hkv, 1, D] at positions ``pos`` [B] (a device tensor; no host sync)."""
        slot = self.slot_of(pos)  # [B, Hp]
        B, Hkv, _, D = k.shape
        idx = slot.expand(B, Hkv) if slot.shape[1] == 1 else slot
        idx = idx.view(B, Hkv, 1, 1).expand(B, Hkv, 1, D)
        self.k.scatter_(2, idx, k)
        self.v.scatter_(2, idx, v)
        self.pos.scatter_(2, slot.unsqueeze(-1), pos.view(-1, 1, 1).expand(B, slot.shape[1], 1).to(torch.int32))

    # -- visibility ------------------------------------------------------------------------------------------------------
    def visible(self, qpos: Tensor, kpos: Tensor) -> Tensor:
        """Bool [B, Hp, Q, S] from query positions [B, Q] and key positions [B, Hp, S], by the pattern's token rule."""
        h = self._heads.view(1, -1, 1, 1) if self.pattern.head_dependent else 0
        q, k = qpos[:, None, :, None].long(), kpos[:, :, None, :].long()
        return (k >= 0) & self.pattern.visible(q, k, h)


class ModelCache:
    """One LayerCache per attention layer of a model."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, dtype: torch.dtype, device,
                 check_memory: bool = True):
        if max_len > model.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds model.max_seq_len={model.max_seq_len} (the RoPE table length)")
        self.plan = plan_cache(model, batch_size, max_len, dtype)
        if check_memory:
            check_fits(self.plan, device)  # before a single byte is allocated
        self.batch_size, self.max_len = batch_size, max_len
        self.layers = {a: LayerCache(a.pattern, batch_size, a.num_kv_heads, a.head_dim, max_len, dtype, device)
                       for a in _attn_layers(model)}

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers.values())

    def reset(self) -> None:
        for c in self.layers.values():
            c.reset()

    def __getitem__(self, layer: HybridAttention) -> LayerCache:
        return self.layers[layer]
