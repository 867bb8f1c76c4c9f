"""One attention layer of the hybrid model: torchtune's projections and RoPE, GQA, a pattern, and the kernels that the
route table (flexgen_long.routes) picks for it. Without a cache a layer gets the forward's ``MaskSet`` (one route and
mask per distinct pattern); over KV caches a ``KVStep`` (the caches and where the new tokens go). Either way it runs
``KERNELS[route.kernel]``.

The flex guard: uncompiled ``flex_attention`` materialises the whole score matrix. Inside compiled code
``torch.compiler.is_compiling()`` folds to True; when dynamo did not compile a call, ``_flex`` sees False and refuses
sequences longer than ``FLEX_EAGER_MAX_LEN``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torchtune.modules import MultiHeadAttention, TransformerSelfAttentionLayer

from . import kv_fp8
from .flex_backend import BACKENDS, check_call, kernel_options, train_backend
from .masks import build_block_mask, build_cached_block_mask, dense_mask, position_mask
from .patterns import Documents, Full, Pattern, check_doc_ids
from .policy import Policy
from .routes import BUFFER_KERNELS, Route, flex_route_backend, route
from .shapes import BLOCK, compiled, flex_graph_key, pad_seq, padded_len

__all__ = ["HybridAttention", "HybridLayer", "MaskSet", "KVStep", "KERNELS", "FlexNotCompiledError",
           "FLEX_EAGER_MAX_LEN", "flex_attend", "attention_layers", "positions_in_documents", "run_layer"]

#: Longest query or key length flex may run uncompiled (its eager path allocates every score): a limit, not a setting.
FLEX_EAGER_MAX_LEN = 2048


class FlexNotCompiledError(RuntimeError):
    """flex_attention was about to run uncompiled on a long sequence."""


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, backend: str = "triton") -> Tensor:
    if not torch.compiler.is_compiling() and max(q.shape[-2], k.shape[-2]) > FLEX_EAGER_MAX_LEN:
        raise FlexNotCompiledError(
            f"flex_attention would run uncompiled on q_len={q.shape[-2]}, kv_len={k.shape[-2]} (> "
            f"FLEX_EAGER_MAX_LEN={FLEX_EAGER_MAX_LEN}), materialising the full score matrix: compilation is disabled "
            "or was abandoned for this call (run with TORCH_LOGS=recompiles,graph_breaks)")
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=kernel_options(backend))


def flex_attend(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, backend: str = "triton") -> Tensor:
    """Compiled flex attention under the shape policy: q [B, Hq, S, D], k/v [B, Hkv, T, D] zero-padded to the
    BlockMask's lengths, the compiled graph of the call's shape key and ``backend`` (``"triton"`` or ``"flash"``,
    flexgen_long.flex_backend), the output cut back to S rows. Inside an outer compiled region flex is traced into
    that region's graph instead."""
    if backend not in BACKENDS:
        raise ValueError(f"flex backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "flash":
        check_call(q, k, v, block_mask)
    pq, pk = block_mask.seq_lengths
    S, T = q.shape[-2], k.shape[-2]
    if S > pq or T > pk:
        raise ValueError(f"BlockMask is for {pq} queries x {pk} keys, got {S} x {T}")
    q, k, v = pad_seq(q, pq), pad_seq(k, pk), pad_seq(v, pk)
    if torch.compiler.is_compiling():
        out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=kernel_options(backend))
    else:
        out = compiled(_flex, flex_graph_key(q, k, v, block_mask, backend), dynamic=False, fullgraph=True)(
            q, k, v, block_mask, backend)
    return out if S == pq else out[:, :, :S]


def attention_layers(model: nn.Module) -> list["HybridAttention"]:
    """The model's attention layers, in order (the one walk over a model's modules)."""
    attn = [m for m in model.modules() if isinstance(m, HybridAttention)]
    if not attn:
        raise ValueError(f"{type(model).__name__} has no HybridAttention layers (build it with flexgen_long.models)")
    return attn


def positions_in_documents(doc_ids: Tensor) -> Tensor:
    """[B, S] (or [S] -> [1, S]) RoPE positions that restart at 0 at every document start."""
    docs = Documents.from_ids(doc_ids)
    pos = torch.arange(docs.start.shape[1], device=docs.start.device, dtype=torch.int32)
    return (pos - docs.start).long()


def _sequence_mask(pattern: Pattern, kernel: str, seq_len: int, num_heads: int, num_kv_heads: int, device,
                   doc_ids: Tensor | None = None) -> Tensor | BlockMask | None:
    """The mask a no-cache kernel needs over ``seq_len`` tokens: a BlockMask padded to the bucket (the shape policy)
    for flex, the token rule's bool mask for SDPA, none for causal SDPA."""
    if kernel == "flex":
        return build_block_mask(pattern, seq_len, seq_len, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                block_size=BLOCK, device=device, doc_ids=doc_ids,
                                padded_lengths=(padded_len(seq_len),) * 2)
    if kernel == "sdpa_dense_mask":
        return dense_mask(pattern, seq_len, seq_len, num_heads=num_heads, num_kv_heads=num_kv_heads,
                          doc_ids=doc_ids).to(device)
    return None


class MaskSet:
    """The routes and masks of one no-cache forward: per distinct pattern its route (phase "train" when ``grad``, else
    "first") and the mask it needs (a BlockMask for flex, a bool mask for SDPA, none for causal SDPA). ``kind``
    overrides every masked pattern's kernel: ``"block"`` (flex) or ``"dense"`` (SDPA with the bool mask).
    ``dtype`` / ``head_dim``: the layers' q / k / v dtype and head dim. They choose a flex route's backend: FLASH takes
    16-bit dtypes only (the default, float32, keeps Triton), and trains where its backward passes a check at these
    (flexgen_long.flex_backend)."""

    def __init__(self, patterns: Iterable[Pattern], seq_len: int, *, num_heads: int, num_kv_heads: int, device,
                 doc_ids: Tensor | None = None, kind: str | None = None, grad: bool = False,
                 policy: Policy | None = None, dtype: torch.dtype = torch.float32, head_dim: int = 128):
        if kind not in (None, "block", "dense"):
            raise ValueError(f"MaskSet kind must be None (the route table's choice), 'block' or 'dense', got {kind!r}")
        if doc_ids is not None:
            doc_ids = check_doc_ids(doc_ids, seq_len).to(device)
        self.seq_len, self.doc_ids, self.num_heads = seq_len, doc_ids, num_heads
        policy = (policy or Policy()).on(device)
        self.routes: dict[Pattern, tuple[Route, Tensor | BlockMask | None]] = {}
        for p in dict.fromkeys(patterns):  # distinct, in layer order
            r = route(p.bind_heads(num_kv_heads), "train" if grad else "first", device=device, policy=policy,
                      q_len=seq_len, packed=doc_ids is not None, heads=(num_heads, num_kv_heads, 1),
                      itemsize=dtype.itemsize)
            if kind is not None and r.kernel != "sdpa_causal":
                r = Route("flex", r.shape, r.bytes, flex_route_backend(policy, dtype.itemsize)) if kind == "block" \
                    else Route("sdpa_dense_mask", r.shape, r.bytes)
            if grad and r.backend == "flash":
                rows = None if doc_ids is None else doc_ids.reshape(-1, seq_len).shape[0]  # [S] is one row
                r = dataclasses.replace(r, backend=train_backend(
                    p.bind_heads(num_kv_heads), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                    dtype=dtype, device=device, doc_batch=rows))
            self.routes[p] = (r, _sequence_mask(p, r.kernel, seq_len, num_heads, num_kv_heads, device, doc_ids))

    def route(self, pattern: Pattern) -> Route:
        if pattern not in self.routes:
            raise KeyError(f"no route for {pattern!r} in this MaskSet (built for {list(self.routes)})")
        return self.routes[pattern][0]

    def __getitem__(self, pattern: Pattern):
        """The mask of ``pattern`` (None for causal SDPA)."""
        self.route(pattern)  # raises for a pattern it does not hold
        return self.routes[pattern][1]


class KVStep:
    """One forward over KV caches as every layer sees it: the ``cache`` (a ModelCache), the ``phase`` ("first" /
    "later": a chunk of row ``row`` at ``offset``, ``chunk`` the nominal size; "decode": a token per row at device
    positions ``pos``, ``lo`` the lowest), the resolved ``policy``, ``last_only`` (last token's logits only). Routes and
    masks are made once per step and pattern (its layers hold the same positions)."""

    def __init__(self, cache, phase: str, policy: Policy, *, row: int = 0, offset: int = 0, chunk: int | None = None,
                 pos: Tensor | None = None, lo: int = 0, last_only: bool = False, layer_fn=None):
        self.cache, self.phase, self.policy, self.row, self.offset, self.chunk = cache, phase, policy, row, offset, chunk
        self.pos, self.lo, self.last_only = pos, lo, last_only
        self.layer_fn = layer_fn or run_layer  # how the decoder runs each layer: eager, or compiled by the engine
        self._memo: dict = {}

    def memo(self, key, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def route(self, attn: "HybridAttention", q_len: int, itemsize: int) -> Route:
        c = self.cache[attn]
        return self.memo(("route", c.pattern, c.slots, attn.num_heads, q_len), lambda: route(
            c.pattern, self.phase, device=c.k.device, policy=self.policy, q_len=q_len, offset=self.offset,
            chunk=self.chunk, slots=c.slots, lo=self.lo, batch=c.k.shape[0], itemsize=itemsize,
            heads=(attn.num_heads, attn.num_kv_heads, attn.head_dim)))


def run_layer(layer: nn.Module, h: Tensor, input_pos: Tensor, kv: KVStep) -> Tensor:
    """One decoder layer over the caches (the function the engine compiles, shared by every layer)."""
    return layer(h, input_pos=input_pos, kv=kv)


def _expand_kv(q: Tensor, *kv: Tensor) -> list[Tensor]:
    """K/V repeated to q's heads, for the masked SDPA paths (with enable_gqa they may fall back to the math kernel)."""
    return [t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in kv]


def _sdpa_lower_right(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal SDPA of the last S positions over T keys: square, ``is_causal`` with GQA unexpanded; else
    ``causal_lower_right``."""
    if q.shape[-2] == k.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, *_expand_kv(q, k, v), attn_mask=causal_lower_right(q.shape[-2], k.shape[-2]))


# -- the kernels: (layer, q, k, v, context, route) -> output; q [B, Hq, C, D], k/v [B, Hkv, C, D] after RoPE ------------

def _keys_so_far(at, k, v, ctx, n: int | None = None) -> tuple[Tensor, Tensor]:
    """A full layer's keys and values at positions 0 .. offset + C - 1 as its cache holds them (the chunk was written
    before): the buffer's first ``n`` slots (default offset + C), or under FP8 the first offset + C dequantised -- so
    a prefill attends to what every later step reads, and chunking changes memory, not results."""
    c, T = ctx.cache[at], ctx.offset + k.shape[2]
    if c.fp8:
        return c.prefix(ctx.row, T, k.dtype)
    return c.k[ctx.row:ctx.row + 1, :, :n or T], c.v[ctx.row:ctx.row + 1, :, :n or T]


def _causal(at, q, k, v, ctx, r):
    """Causal SDPA over the keys so far: the sequence's own, or the cache's (``_keys_so_far``)."""
    if isinstance(ctx, KVStep):
        k, v = _keys_so_far(at, k, v, ctx)
    return _sdpa_lower_right(q, k, v)


def _dense(at, q, k, v, ctx, r):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(at, q, ctx, r), enable_gqa=True)


def _flex_seq(at, q, k, v, ctx, r):
    return flex_attend(q, k, v, _mask(at, q, ctx, r), r.backend)


def _mask(at, q, ctx, r):
    """The first chunk's mask from a KVStep (made once per step and pattern) or the forward's MaskSet."""
    if isinstance(ctx, MaskSet):
        return ctx[at.pattern]
    C = q.shape[2]
    return ctx.memo(("first", at.pattern, r.kernel, C), lambda: _sequence_mask(
        at.pattern, r.kernel, C, at.num_heads, at.num_kv_heads, q.device))


def _flex_full_chunk(at, q, k, v, ctx, r):
    (pq, pk), C = r.shape, q.shape[2]
    bm = ctx.memo(("full_chunk", pq, pk), lambda: build_block_mask(
        Full(), C, ctx.offset + C, q_offset=ctx.offset, num_heads=at.num_heads, num_kv_heads=at.num_kv_heads,
        block_size=BLOCK, device=q.device, padded_lengths=(pq, pk)))
    # contiguous copies: a slice keeps the buffer's strides, which differ with every cache size (dynamo guards them)
    kk, vv = (t.contiguous() for t in _keys_so_far(at, k, v, ctx, n=pk))
    return flex_attend(q, kk, vv, bm, r.backend)


def _flex_over_slots(at, q, k, v, ctx, r):
    """Keys [the slots that positions < offset can occupy (a prefix of the layout), padded ; the chunk, padded]; the
    mask_mod reads each column's position (-1: empty) and the offset from tensors, so the graph depends on shapes only."""
    c, row, o, C = ctx.cache[at], ctx.row, ctx.offset, q.shape[2]
    pq, n = r.shape[0], c.pattern.cache_slots(o)
    ps = r.shape[1] - pq
    bm = ctx.memo(("slots", c.pattern, at.num_heads, n, r.shape), lambda: build_cached_block_mask(
        c.pattern, c.pos[row, :, :n], C, q_offset=o, num_heads=at.num_heads, num_kv_heads=at.num_kv_heads,
        block_size=BLOCK, padded_lengths=(ps, pq)))

    def keys(slots: Tensor, new: Tensor) -> Tensor:  # one contiguous buffer: strides that depend on the shape only
        out = new.new_zeros(1, at.num_kv_heads, ps + pq, new.shape[-1])
        out[:, :, :n] = slots[row:row + 1, :, :n]
        out[:, :, ps:ps + C] = new
        return out

    return flex_attend(q, keys(c.k, k), keys(c.v, v), bm, r.backend)


def _sdpa_over_slots(at, q, k, v, ctx, r):
    """[every slot ; the chunk's keys] under the bool mask of their positions."""
    c, row, o, C = ctx.cache[at], ctx.row, ctx.offset, q.shape[2]
    kk, vv = torch.cat([c.k[row:row + 1], k], dim=2), torch.cat([c.v[row:row + 1], v], dim=2)
    qpos = torch.arange(o, o + C, device=q.device, dtype=torch.int32)
    kpos = torch.cat([c.pos[row:row + 1], qpos.expand(1, c.pos.shape[1], C)], dim=2)
    mask = position_mask(c.pattern, qpos[None], kpos, at.num_heads)
    return F.scaled_dot_product_attention(q, *_expand_kv(q, kk, vv), attn_mask=mask)


def _decode_exact(at, q, k, v, ctx, r):
    c = ctx.cache[at]
    return F.scaled_dot_product_attention(q, c.k, c.v, enable_gqa=True)


def _decode_masked(at, q, k, v, ctx, r):
    c = ctx.cache[at]
    mask = ctx.memo(("decode", c.pattern, c.slots, at.num_heads), lambda: position_mask(
        c.pattern, ctx.pos[:, None], c.pos, at.num_heads))  # built after the layer's write, by the first layer
    return F.scaled_dot_product_attention(q, c.k, c.v, attn_mask=mask, enable_gqa=True)


def _decode_fp8(at, q, k, v, ctx, r):
    """A full layer's FP8 cache read as stored: each row's slots 0 .. its position (written before)."""
    c = ctx.cache[at]
    lengths = ctx.memo(("lengths",), lambda: ctx.pos + 1)
    return kv_fp8.decode_attention(q, c.k, c.k_scale, c.v, c.v_scale, lengths)


#: The route table's kernels by name.
KERNELS = {"sdpa_causal": _causal, "sdpa_dense_mask": _dense, "flex": _flex_seq, "sdpa_lower_right": _causal,
           "flex_full_chunk": _flex_full_chunk, "flex_over_slots": _flex_over_slots,
           "sdpa_over_slots": _sdpa_over_slots, "sdpa_exact": _decode_exact, "sdpa_masked": _decode_masked,
           "fp8_decode": _decode_fp8}


class HybridAttention(MultiHeadAttention):
    """torchtune's ``MultiHeadAttention`` (same submodules and state-dict keys) with a ``pattern``; its kernels come from
    the route table; its KV caches are flexgen_long.cache's compact per-pattern ones."""

    def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, q_proj: nn.Module,
                 k_proj: nn.Module, v_proj: nn.Module, output_proj: nn.Module, pos_embeddings: nn.Module,
                 max_seq_len: int, pattern: Pattern):
        super().__init__(embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         q_proj=q_proj, k_proj=k_proj, v_proj=v_proj, output_proj=output_proj,
                         pos_embeddings=pos_embeddings, max_seq_len=max_seq_len, is_causal=True, attn_dropout=0.0)
        if not isinstance(pattern, Pattern):
            raise ValueError(f"pattern must be a flexgen_long.patterns pattern, got {pattern!r}")
        self.pattern = pattern
        self._attention_call = None  # torchtune's SDPA/flex gate is not used (CUDA-only flex, expands GQA)
        self.register_buffer("_wqkv", None, persistent=False)  # flexgen_long.models.fuse_projections (inference)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern!r}"

    def setup_cache(self, batch_size: int, dtype: torch.dtype, max_seq_len: int) -> None:
        raise NotImplementedError("torchtune's KV cache keeps every key, which defeats the sparse layers; "
                                  "flexgen_long.engine.Engine allocates compact per-pattern caches")

    def forward(self, x: Tensor, y: Tensor | None = None, *, mask: MaskSet | None = None,
                input_pos: Tensor | None = None, kv: KVStep | None = None) -> Tensor:
        if y is not None and y is not x:
            raise ValueError("HybridAttention is self-attention: y must be None or x itself")
        b, s, _ = x.shape
        if self._wqkv is not None and not torch.is_grad_enabled():  # fuse_projections: one matrix product
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = F.linear(x, self._wqkv).split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.pos_embeddings(q.view(b, s, self.num_heads, self.head_dim), input_pos=input_pos).transpose(1, 2)
        k = self.pos_embeddings(k.view(b, s, self.num_kv_heads, self.head_dim), input_pos=input_pos).transpose(1, 2)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if kv is not None:
            out = self._attend_cached(q, k, v, kv)
        else:
            if mask is None:  # a layer used on its own: unpacked, masks for this layer only
                mask = MaskSet([self.pattern], s, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                               device=x.device, grad=torch.is_grad_enabled(), dtype=q.dtype, head_dim=self.head_dim)
            out = self.attend(q, k, v, mask)
        return self.output_proj(out.transpose(1, 2).reshape(b, s, -1))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, masks: MaskSet) -> Tensor:
        """The no-cache forward's attention: the MaskSet's route for this pattern. q [B, Hq, S, D], k/v [B, Hkv, S, D]."""
        if not isinstance(masks, MaskSet):
            raise ValueError("mask must be a flexgen_long.attention.MaskSet (the hybrid model builds one per forward "
                             f"from doc_ids); torchtune bool masks / BlockMasks would override the per-layer patterns, "
                             f"got {type(masks).__name__}")
        if q.shape[-2] != masks.seq_len:
            raise ValueError(f"MaskSet was built for seq_len={masks.seq_len}, the layer got {q.shape[-2]} tokens")
        r = masks.route(self.pattern)
        if r.kernel == "flex" and q.device.type == "cpu" and torch.is_grad_enabled() and any(
                t.requires_grad for t in (q, k, v)):
            raise RuntimeError("flex_attention has no CPU backward: build the MaskSet with kind='dense' or grad=True "
                               "(the model does this by itself when gradients are needed on CPU)")
        return KERNELS[r.kernel](self, q, k, v, masks, r)

    # Never traced: a compiled decode step or prefill compiles each layer's work around this call and runs it eagerly
    # between the graphs (cache writes, masks, attention kernels; flex keeps its own graphs), which also keeps the
    # caches' sizes, offsets and masks out of every compiled graph's guards. Measured: analysis/README.md.
    @torch.compiler.disable
    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, kv: KVStep) -> Tensor:
        """Attention of new tokens over this layer's cache by the step's route; the tokens are written into the cache
        before a kernel that reads them from it (``routes.BUFFER_KERNELS``), after the others."""
        cache, r = kv.cache[self], kv.route(self, q.shape[2], q.element_size())
        write = (lambda: cache.write_step(k, v, kv.pos)) if kv.phase == "decode" else \
            (lambda: cache.write_prefill(kv.row, k, v, kv.offset))
        if r.kernel in BUFFER_KERNELS:
            write()
            return KERNELS[r.kernel](self, q, k, v, kv, r)
        out = KERNELS[r.kernel](self, q, k, v, kv, r)
        write()
        return out


class HybridLayer(TransformerSelfAttentionLayer):
    """torchtune's ``TransformerSelfAttentionLayer`` (same submodules and keys) that hands its attention the KV step."""

    def forward(self, x: Tensor, *, mask: MaskSet | None = None, input_pos: Tensor | None = None,
                kv: KVStep | None = None, **kwargs) -> Tensor:
        h = self.sa_scale(self.attn(self.sa_norm(x), mask=mask, input_pos=input_pos, kv=kv)) + x
        return h + self.mlp_scale(self.mlp(self.mlp_norm(h)))
