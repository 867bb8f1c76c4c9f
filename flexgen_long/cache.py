"""Per-layer KV caches laid out by each layer's pattern, and the memory plan that sizes them before allocation.

A cache is a set of *slots*: ``k``/``v`` [B, Hkv, slots, D] plus ``pos`` [B, Hp, slots] int32, the absolute position each
slot holds (-1 = empty; Hp = Hkv for a head-dependent pattern, else 1), in the pattern's layout (flexgen_long.patterns).
Under ``Policy(kv_cache_dtype="fp8")`` a full layer's ``k``/``v`` are float8 e4m3 with fp32 ``k_scale``/``v_scale``
[B, Hkv, slots] (flexgen_long.kv_fp8).
Keys are stored after RoPE at absolute positions, and attention masks slots by the pattern's token rule on ``pos``:
stale slots are never copied or cleared. The memory plan: ``plan_cache`` (exact), the activation estimates (they err
high; their attention term is the route table's ``Route.bytes``), ``choose_prefill_chunk``, ``serving_capacity``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import HybridAttention, attention_layers
from .kv_fp8 import FP8, dequantize, quantize, stored_bytes
from .masks import position_mask
from .patterns import Pattern
from .policy import Policy
from .quantize import dequantized_transient_bytes, weight_bytes
from .routes import route

__all__ = ["LayerCache", "ModelCache", "CachePlan", "LayerPlan", "plan_cache", "free_memory_bytes", "check_fits",
           "prefill_activation_bytes", "choose_prefill_chunk", "PREFILL_CHUNK_MULTIPLE", "decode_activation_bytes",
           "serving_capacity"]


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    pattern: Pattern
    slots: int
    bytes: int  # k + v (+ their scales) + pos
    fp8: bool = False


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
        rows += [f"  layer {lp.layer:3d} {type(lp.pattern).__name__:11s} {lp.slots:>9d} slots "
                 f"{lp.bytes / 2**20:10.2f} MiB{' fp8' if lp.fp8 else ''}" for lp in self.layers]
        rows.append(f"  total {self.total_bytes / 2**30:.3f} GiB ({self.total_bytes} bytes)")
        return "\n".join(rows)


def _positive(name: str, val) -> None:
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        raise ValueError(f"{name} must be an int >= 1, got {val!r}")


def _itemsize(dtype) -> int:
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


def plan_cache(model: nn.Module, batch_size: int, max_len: int, dtype: torch.dtype = torch.bfloat16,
               policy: Policy | None = None) -> CachePlan:
    """Bytes per layer and in total of the caches for ``batch_size`` sequences of up to ``max_len`` tokens, from
    shapes only (the model may live on the meta device); ``policy.kv_cache_dtype`` picks the full layers' storage."""
    _positive("batch_size", batch_size)
    _positive("max_len", max_len)
    a, policy = _itemsize(dtype), policy or Policy()
    plans = []
    for i, at in enumerate(attention_layers(model)):
        p = at.pattern.bind_heads(at.num_kv_heads)
        slots, hp, fp8 = p.cache_slots(max_len), at.num_kv_heads if p.head_dependent else 1, policy.stores_fp8(p)
        per_head = stored_bytes(at.head_dim) if fp8 else 2 * at.head_dim * a
        plans.append(LayerPlan(i, at.pattern, slots, batch_size * slots * (at.num_kv_heads * per_head + hp * 4), fp8))
    return CachePlan(tuple(plans), batch_size, max_len, dtype)


def free_memory_bytes(device) -> int:
    """Memory a new allocation on ``device`` can use: on GPUs the driver's free memory plus what PyTorch's allocator holds
    reserved but unallocated (after a large computation most of the card sits there); on the host MemAvailable."""
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
    """MemoryError, with the numbers, when the plan plus ``reserve_bytes`` exceeds ``free_bytes`` (default: free
    memory on ``device``)."""
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    need = plan.total_bytes + reserve_bytes
    if need > free:
        raise MemoryError(f"KV caches need {plan.total_bytes} bytes ({plan.total_bytes / 2**30:.2f} GiB) + "
                          f"{reserve_bytes} reserved = {need / 2**30:.2f} GiB, but only {free} bytes "
                          f"({free / 2**30:.2f} GiB) are free on {device} (batch {plan.batch_size}, max_len "
                          f"{plan.max_len}); lower batch size / max_len or use sparser layers")


#: ``choose_prefill_chunk`` picks chunks in multiples of this many tokens (the flex block size and bucket step).
PREFILL_CHUNK_MULTIPLE = 128
#: Headroom on top of the estimates: allocator rounding and fragmentation, kernels' own small workspaces.
PREFILL_SAFETY_FACTOR = 1.5
PREFILL_SLACK_BYTES = 64 * 2**20


def _chunk_bytes(model: nn.Module, C: int, T: int, cache_len: int, a: int, device, policy: Policy) -> int:
    """Peak transient bytes of one prefill chunk of C queries ending at T (inference mode): see
    prefill_activation_bytes."""
    E, V = model.tok_embeddings.embedding_dim, model.tok_embeddings.num_embeddings
    peak = 0
    for layer in model.layers:
        at, F = layer.attn, layer.mlp.w1.out_features
        H, Hkv, D = at.num_heads, at.num_kv_heads, at.head_dim
        p = at.pattern.bind_heads(Hkv)
        r = route(p, "first" if T == C else "later", device=device, policy=policy, q_len=C, offset=T - C, chunk=C,
                  slots=p.cache_slots(cache_len), heads=(H, Hkv, D), itemsize=a)
        attention = (C * (H + 2 * Hkv) * D * a + 3 * C * H * D * 4  # q, k, v; RoPE in fp32
                     + 2 * C * H * D * a + C * E * a + 2 * Hkv * C * D * a  # output, its copy, its projection; writes
                     + r.bytes)
        ffn = 2 * C * E * a + 3 * C * F * a  # mlp_norm(h) and w2's output; w1 / w3 / their product
        peak = max(peak, 3 * C * E * a + max(2 * C * E * 4, attention, ffn))  # + x, x + attn, output; RMSNorm in fp32
    return peak + C * E * a + C * 16 + V * (a + 4)  # + the chunk's embedding, ids / positions, the last logits


def _paths(device, policy: Policy | None) -> list:
    """(device, resolved policy) pairs to estimate over: ``device``'s, or the worse of a CPU's and a GPU's."""
    return [(d, (policy or Policy()).on(d)) for d in (("cpu", "cuda") if device is None else (device,))]


def prefill_activation_bytes(model: nn.Module, chunk_len: int, dtype: torch.dtype = torch.bfloat16,
                             prompt_len: int | None = None, cache_len: int | None = None, device=None,
                             policy: Policy | None = None) -> int:
    """Estimated peak transient memory of prefilling a ``prompt_len``-token prompt (default: one chunk) ``chunk_len``
    tokens at a time into caches of ``cache_len`` (default ``prompt_len``), beyond weights and caches, on ``device``'s
    routes (None: the worse of CPU and GPU). Shapes only. The worse of the first chunk and the last full one; per layer
    the residual stream plus the largest of RMSNorm (fp32), attention (q/k/v, RoPE in fp32, output and projection,
    cache write, ``Route.bytes``) and the MLP (``_chunk_bytes``); plus a quantized product's dequantized weight
    (``quantize.dequantized_transient_bytes``). Times ``PREFILL_SAFETY_FACTOR``, plus
    ``PREFILL_SLACK_BYTES``; tests/test_cache.py checks it bounds the CPU allocator's measured peak."""
    _positive("chunk_len", chunk_len)
    prompt_len = chunk_len if prompt_len is None else prompt_len
    _positive("prompt_len", prompt_len)
    cache_len = prompt_len if cache_len is None else cache_len
    _positive("cache_len", cache_len)
    a = _itemsize(dtype)
    attention_layers(model)
    first, need = min(chunk_len, prompt_len), 0
    for dev, pol in _paths(device, policy):
        need = max(need, _chunk_bytes(model, first, first, cache_len, a, dev, pol))
        if prompt_len > chunk_len:
            need = max(need, _chunk_bytes(model, chunk_len, prompt_len, cache_len, a, dev, pol))
    need += dequantized_transient_bytes(model, dtype)
    return int(need * PREFILL_SAFETY_FACTOR) + PREFILL_SLACK_BYTES


def choose_prefill_chunk(model: nn.Module, prompt_len: int, free_bytes: int, dtype: torch.dtype = torch.bfloat16,
                         cache_len: int | None = None, device=None, policy: Policy | None = None) -> int | None:
    """The prefill chunk for a ``prompt_len``-token prompt given ``free_bytes`` for activations: None (whole) when its
    activations fit, else the largest multiple of ``PREFILL_CHUNK_MULTIPLE`` below ``prompt_len`` whose chunks fit;
    MemoryError, with the numbers, when not even one multiple does."""
    _positive("prompt_len", prompt_len)
    if not isinstance(free_bytes, int) or isinstance(free_bytes, bool):
        raise ValueError(f"free_bytes must be an int, got {free_bytes!r}")
    est = lambda c: prefill_activation_bytes(model, c, dtype, prompt_len, cache_len, device, policy)  # noqa: E731
    whole = est(prompt_len)
    if whole <= free_bytes:
        return None
    m = PREFILL_CHUNK_MULTIPLE
    lo, hi = 1, (prompt_len - 1) // m  # chunks of lo*m .. hi*m tokens; the estimate grows with the chunk
    smallest = est(m) if hi >= 1 else whole
    if hi < 1 or smallest > free_bytes:
        raise MemoryError(f"prefill of a {prompt_len}-token prompt does not fit: its activations need about {whole} "
                          f"bytes ({whole / 2**30:.2f} GiB) whole and {smallest} bytes ({smallest / 2**30:.2f} GiB) "
                          f"in chunks of {m} tokens, but only {free_bytes} bytes ({free_bytes / 2**30:.2f} GiB) are "
                          "free after the KV caches; lower batch size / max_new_tokens / the prompt length, or use "
                          "sparser layers")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if est(mid * m) <= free_bytes else (lo, mid - 1)
    return lo * m


def decode_activation_bytes(model: nn.Module, batch_size: int, max_len: int, dtype: torch.dtype = torch.bfloat16,
                            policy: Policy | None = None, device=None) -> int:
    """Estimated peak transient bytes of a decode step of ``batch_size`` rows over caches of ``max_len`` on
    ``device``'s routes (None: the worse of a CPU's and a GPU's): per layer the residual stream and MLP, q/k/v and the
    route's bytes (every layer assumed masked); then the logits. Times ``PREFILL_SAFETY_FACTOR``, plus
    ``PREFILL_SLACK_BYTES``."""
    _positive("batch_size", batch_size)
    _positive("max_len", max_len)
    a, B = _itemsize(dtype), batch_size
    E, V = model.tok_embeddings.embedding_dim, model.tok_embeddings.num_embeddings
    peak = 0
    for dev, pol in _paths(device, policy):
        for layer in model.layers:
            at, F = layer.attn, layer.mlp.w1.out_features
            H, Hkv, D = at.num_heads, at.num_kv_heads, at.head_dim
            p = at.pattern.bind_heads(Hkv)
            r = route(p, "decode", device=dev, policy=pol, q_len=1, slots=p.cache_slots(max_len), lo=-1, batch=B,
                      heads=(H, Hkv, D), itemsize=a)
            attention = B * (H + 2 * Hkv) * D * a + 2 * B * H * D * a + r.bytes
            peak = max(peak, 3 * B * E * a + max(attention, 3 * B * F * a + 2 * B * E * 4))
    peak += B * V * (a + 8) + dequantized_transient_bytes(model, dtype)
    return int(peak * PREFILL_SAFETY_FACTOR) + PREFILL_SLACK_BYTES


def serving_capacity(model: nn.Module, prompt_len: int, new_tokens: int, budget_bytes: int,
                     dtype: torch.dtype = torch.bfloat16, prefill_chunk: int | None = 8192, device="cuda",
                     policy: Policy | None = None) -> dict:
    """The largest batch of ``prompt_len``-token prompts, each generating ``new_tokens``, that fits ``budget_bytes``:
    weights + caches + the larger of the prefill's activations (a row at a time, ``prefill_chunk`` tokens at a time,
    None = whole) and a decode step's. Weights: ``quantize.weight_bytes`` (the bytes the model's tensors hold,
    quantized ones as stored; plain ones as if in ``dtype``). Shapes only; errs high. Returns ``batch`` (0: none fits)
    and every term."""
    _positive("prompt_len", prompt_len)
    _positive("new_tokens", new_tokens)
    _positive("budget_bytes", budget_bytes)
    if prefill_chunk is not None:
        _positive("prefill_chunk", prefill_chunk)
    weights = weight_bytes(model, dtype)
    max_len = prompt_len + new_tokens
    chunk = min(prefill_chunk or prompt_len, prompt_len)
    prefill = prefill_activation_bytes(model, chunk, dtype, prompt_len, max_len, device, policy)
    kv_row = plan_cache(model, 1, max_len, dtype, policy).total_bytes  # every cache term is linear in the batch

    def need(b: int) -> tuple[int, int]:  # (total, decode activations) of a batch of b
        dec = decode_activation_bytes(model, b, max_len, dtype, policy, device)
        return weights + b * kv_row + max(prefill, dec), dec

    lo, hi = 0, max(1, (budget_bytes - weights) // max(kv_row, 1) + 1)
    while lo < hi:  # the largest b with need(b) <= budget (need grows with b)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid)[0] <= budget_bytes else (lo, mid - 1)
    total, dec = need(max(lo, 1))
    return {"batch": lo, "budget_bytes": budget_bytes, "weights_bytes": weights, "kv_per_row_bytes": kv_row,
            "prefill_activation_bytes": prefill, "prefill_chunk": prefill_chunk, "decode_activation_bytes": dec,
            "total_bytes": total}


class LayerCache:
    """The slots of one layer: ``write_prefill`` stores a chunk of one sequence, ``write_step`` one token per sequence
    (static shapes, device-side positions: CUDA-graph safe)."""

    def __init__(self, pattern: Pattern, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device, fp8: bool = False):
        self.pattern = pattern.bind_heads(num_kv_heads)
        self.max_len, self.num_kv_heads, self.fp8 = max_len, num_kv_heads, fp8
        self.slots = self.pattern.cache_slots(max_len)
        hp = num_kv_heads if self.pattern.head_dependent else 1
        shape = (batch_size, num_kv_heads, self.slots, head_dim)
        self.k = torch.zeros(shape, dtype=FP8 if fp8 else dtype, device=device)
        self.v = torch.zeros_like(self.k)
        # FP8: one fp32 scale per slot and KV head (ones: an unwritten slot dequantises to zeros)
        self.k_scale = torch.ones(shape[:3], dtype=torch.float32, device=device) if fp8 else None
        self.v_scale = torch.ones_like(self.k_scale) if fp8 else None
        self.pos = torch.full((batch_size, hp, self.slots), -1, dtype=torch.int32, device=device)
        self._heads = torch.arange(hp, device=device) if self.pattern.head_dependent else 0  # per-head rules

    @property
    def tensors(self) -> list[Tensor]:
        """Every tensor of the cache (the values, their scales under FP8, the positions)."""
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale, self.pos) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def _stored(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """What a write stores: k/v as given, or under FP8 their e4m3 values (as uint8: index_copy_ and scatter_ take
        no float8) and scales."""
        if not self.fp8:
            return k, v, None, None
        (k8, ks), (v8, vs) = quantize(k), quantize(v)
        return k8.view(torch.uint8), v8.view(torch.uint8), ks, vs

    def _targets(self) -> tuple[Tensor, Tensor]:
        return (self.k.view(torch.uint8), self.v.view(torch.uint8)) if self.fp8 else (self.k, self.v)

    def prefix(self, row: int, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Row ``row``'s first ``n`` slots of K and V [1, Hkv, n, D] in ``dtype`` (dequantised under FP8)."""
        k, v = self.k[row:row + 1, :, :n], self.v[row:row + 1, :, :n]
        if not self.fp8:
            return k, v
        return (dequantize(k, self.k_scale[row:row + 1, :, :n], dtype),
                dequantize(v, self.v_scale[row:row + 1, :, :n], dtype))

    def slot_of(self, p: Tensor) -> Tensor:
        """Slots of positions ``p`` (any shape [...]) -> [..., Hp] (one column per KV head of a per-head pattern)."""
        return self.pattern.slot_of(p.long().unsqueeze(-1), self._heads).expand(*p.shape, self.pos.shape[1])

    def write_prefill(self, row: int, k: Tensor, v: Tensor, offset: int) -> None:
        """Store a chunk k/v [1, Hkv, C, D] of sequence ``row`` at positions offset .. offset+C-1, keeping only what
        later queries see (``Pattern.kept``). Prefill only: may select on the host."""
        C = k.shape[2]
        if offset + C > self.max_len:
            raise ValueError(f"positions up to {offset + C} exceed the cache's max_len={self.max_len}")
        p = torch.arange(offset, offset + C, device=k.device)
        slot = self.slot_of(p)  # [C, Hp]
        kept = self.pattern.kept(p.unsqueeze(-1), offset + C, self._heads).expand_as(slot)
        hp = slot.shape[1]
        k, v, ks, vs = self._stored(k, v)
        tk, tv = self._targets()
        for h in range(hp):
            sel = kept[:, h].nonzero().squeeze(1)
            s = slot[sel, h]
            heads = slice(None) if hp == 1 else slice(h, h + 1)
            tk[row, heads].index_copy_(1, s, k[0, heads][:, sel])
            tv[row, heads].index_copy_(1, s, v[0, heads][:, sel])
            if self.fp8:
                self.k_scale[row, heads].index_copy_(1, s, ks[0, heads][:, sel])
                self.v_scale[row, heads].index_copy_(1, s, vs[0, heads][:, sel])
            self.pos[row, h].index_copy_(0, s, p[sel].to(torch.int32))

    def write_step(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Store one token per sequence: k/v [B, Hkv, 1, D] at positions ``pos`` [B] (a device tensor; no host sync)."""
        slot = self.slot_of(pos)  # [B, Hp]
        B, Hkv, _, D = k.shape
        idx = (slot.expand(B, Hkv) if slot.shape[1] == 1 else slot).view(B, Hkv, 1, 1).expand(B, Hkv, 1, D)
        k, v, ks, vs = self._stored(k, v)
        tk, tv = self._targets()
        tk.scatter_(2, idx, k)
        tv.scatter_(2, idx, v)
        if self.fp8:
            self.k_scale.scatter_(2, idx[..., 0], ks)
            self.v_scale.scatter_(2, idx[..., 0], vs)
        self.pos.scatter_(2, slot.unsqueeze(-1), pos.view(-1, 1, 1).expand(B, slot.shape[1], 1).to(torch.int32))

    def visible(self, qpos: Tensor, kpos: Tensor) -> Tensor:
        """Bool [B, Hp, Q, S] from query positions [B, Q] and key positions [B, Hp, S] (``masks.position_mask``)."""
        return position_mask(self.pattern, qpos, kpos)


class ModelCache:
    """One LayerCache per attention layer of a model, planned and checked against free memory before allocation."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, dtype: torch.dtype, device,
                 check_memory: bool = True, policy: Policy | None = None):
        if max_len > model.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds model.max_seq_len={model.max_seq_len} (the RoPE table length)")
        self.plan = plan_cache(model, batch_size, max_len, dtype, policy)
        if check_memory:
            check_fits(self.plan, device)  # before a single byte is allocated
        self.batch_size, self.max_len = batch_size, max_len
        self.layers = {a: LayerCache(a.pattern, batch_size, a.num_kv_heads, a.head_dim, max_len, dtype, device,
                                     fp8=lp.fp8) for a, lp in zip(attention_layers(model), self.plan.layers)}

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers.values())

    @torch.inference_mode()
    def copy_row(self, src: int, dst: int) -> None:
        """Make row ``dst`` of every layer a copy of row ``src`` (a prompt prefilled once, decoded as many rows)."""
        for c in self.layers.values():
            for t in c.tensors:
                t[dst].copy_(t[src])

    def __getitem__(self, layer: HybridAttention) -> LayerCache:
        return self.layers[layer]
