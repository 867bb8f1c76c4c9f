"""One attention layer of the hybrid model: torchtune's projections and RoPE, GQA, a pattern, and the kernel choice.

Kernel dispatch (``HybridAttention.attend``, the one place that picks a kernel):

* full layer, unpacked batch      -> ``F.scaled_dot_product_attention(is_causal=True)``: torch picks its fastest backend
                                     (cuDNN / flash on GPU) at any shape; no mask tensor, nothing compiled;
* sparse layer, or a packed batch -> compiled ``flex_attention`` with the pattern's BlockMask (``masks.build_block_mask``,
                                     document-masked when packed), through the shape policy (``flex_attend``: lengths
                                     padded to a bucket, one compiled function per shape key; flexgen_long.shapes);
* the same, where the MaskSet is *dense* -> SDPA with the bool mask of the same token rule (``masks.dense_mask``): on
                                     CPU when gradients are needed (flex has no CPU backward) and on CPU for sequences
                                     of up to ``CPU_DENSE_MAX_LEN`` tokens (compiling a flex graph costs 8-26 s on a
                                     2-core CPU, measured; the O(S^2) bool mask is 4 MB at 2048 tokens).

Cached steps (``KVCacheStep``, generation) are dispatched in ``_attend_cached``; see its docstring. In short: decode
is SDPA over the slots; a prompt's first chunk is the dispatch above; later chunks on GPU run compiled flex under the
same shape policy -- full layers with the Full BlockMask over the buffer, sparse layers over [the cache slots in use ;
the chunk's keys] with a positional mask_mod and a BlockMask built from block-level position ranges
(``masks.build_cached_block_mask``: no dense mask, no K/V expansion) -- and on CPU exact SDPA, nothing compiled.

GQA: K/V keep ``num_kv_heads`` heads (``enable_gqa=True``) everywhere but lower-right causal SDPA (``_sdpa_causal``
says why and what was measured) and the CPU path of a sparse layer's later prefill chunk (masked SDPA, which may fall
back to the math kernel).

Masks are built once per forward pass, one per distinct pattern, by ``MaskSet`` (the model builds it and hands it to
every layer through torchtune's ``mask`` keyword).

The flex guard: uncompiled ``flex_attention`` materialises the whole score matrix (64 GiB per head at 128K tokens). All
flex calls run ``_flex``, whose body checks ``torch.compiler.is_compiling()``: dynamo folds that to True while
tracing, so compiled code never sees the check, but when dynamo does not compile the call (compilation disabled,
``set_stance("force_eager")``, an outer compiled region that gave up) the body runs as plain Python, sees False, and
raises ``FlexNotCompiledError`` for any sequence longer than ``FLEX_EAGER_MAX_LEN``. Short sequences may run eagerly.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torchtune.modules import MultiHeadAttention

from torch.nn.attention.bias import causal_lower_right

from .decode_kernel import decode_attention  # imports without triton; its kernels need it (a GPU install has it)
from .masks import build_block_mask, build_cached_block_mask, dense_mask
from .patterns import AttnSink, Documents, Full, Pattern, check_doc_ids
from .shapes import BLOCK, compiled, flex_graph_key, pad_seq, padded_len

__all__ = ["HybridAttention", "MaskSet", "KVCacheStep", "FlexNotCompiledError", "FLEX_EAGER_MAX_LEN", "slot_part_len",
           "CPU_DENSE_MAX_LEN", "flex_attend", "positions_in_documents"]

#: Longest query or key length that flex may run uncompiled (its eager path allocates B*H*q_len*kv_len scores).
FLEX_EAGER_MAX_LEN = 2048
#: On CPU, sequences up to this length use SDPA with the pattern's dense bool mask instead of compiled flex: a flex
#: graph costs 8-26 s to compile on the 2-core CPU machine (measured, torch 2.13), the mask 4 MB per pattern here.
CPU_DENSE_MAX_LEN = 2048
#: The full layers' decode kernel on CUDA when their buffer is not exactly filled (nearly every step): "sdpa" (SDPA
#: over the whole buffer with the bool mask of the filled slots) or "split_k" (flexgen_long.decode_kernel: each row
#: reads only its filled slots, the key range split over many programs so that one sequence fills the GPU). "sdpa"
#: stays the default until the split-K kernel is measured against it (analysis/bench_decode_kernel.py); the GPU suite
#: checks both.
FULL_DECODE_KERNEL = "sdpa"
#: Device types whose sparse layers run their later prefill chunks by compiled flex (``_chunk_over_slots_flex``);
#: elsewhere masked SDPA. CPU has no cheap flex compile; the CPU tests add "cpu" here (with compilation off) to run the
#: flex path at small sizes.
_CHUNK_FLEX_DEVICES = frozenset({"cuda"})


class FlexNotCompiledError(RuntimeError):
    """flex_attention was about to run uncompiled on a long sequence."""


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    if not torch.compiler.is_compiling():
        # Only reached when dynamo did not compile this call (see the module docstring).
        if max(q.shape[-2], k.shape[-2]) > FLEX_EAGER_MAX_LEN:
            raise FlexNotCompiledError(
                f"flex_attention would run uncompiled on q_len={q.shape[-2]}, kv_len={k.shape[-2]} (> "
                f"FLEX_EAGER_MAX_LEN={FLEX_EAGER_MAX_LEN}), materialising the full score matrix: compilation is "
                "disabled or was abandoned for this call (run with TORCH_LOGS=recompiles,graph_breaks)")
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


def flex_attend(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    """Compiled flex attention under the shape policy (flexgen_long.shapes): q [B, Hq, S, D] and k/v [B, Hkv, T, D]
    are zero-padded to the BlockMask's lengths (a bucket; ``build_block_mask(padded_lengths=)``), the call runs the
    compiled graph of its shape key, and the output is cut back to S rows. Inside an outer compiled region (a
    ``torch.compile``'d layer) flex is traced into that region's graph instead."""
    pq, pk = block_mask.seq_lengths
    S, T = q.shape[-2], k.shape[-2]
    if S > pq or T > pk:
        raise ValueError(f"BlockMask is for {pq} queries x {pk} keys, got {S} x {T}")
    q, k, v = pad_seq(q, pq), pad_seq(k, pk), pad_seq(v, pk)
    if torch.compiler.is_compiling():
        out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    else:
        fn = compiled(_flex, flex_graph_key(q, k, v, block_mask), dynamic=False, fullgraph=True)
        out = fn(q, k, v, block_mask)
    return out if S == pq else out[:, :, :S]


def slot_part_len(pattern: Pattern, used: int) -> int:
    """Compiled length of the cached-slot part of a sparse layer's later prefill chunk, ``used`` slots in use: an
    AttnSink ring never holds more than sink + window keys, so it is padded to that (rounded up to a block) at every
    offset -- one graph per chunk bucket; the empty columns are key blocks the BlockMask lists for no query, which the
    kernel skips. A BlockSparse stride store grows with the prompt: the bucket of the slots in use."""
    if isinstance(pattern, AttnSink):
        return -(-(pattern.sink + pattern.window) // BLOCK) * BLOCK
    return padded_len(used)


def _sdpa_causal(q: Tensor, k: Tensor, v: Tensor, q_offset: int = 0) -> Tensor:
    """Causal SDPA of queries at positions q_offset .. q_offset+S-1 over keys 0 .. T-1 (T = q_offset + S): the Full
    pattern, at any shape, nothing compiled.

    Square -> ``is_causal`` with ``enable_gqa`` (unexpanded K/V: on an H200, torch 2.11, bf16, 16K tokens, 32 q / 8 kv
    heads, warmed up, 2.45 ms forward / 8.89 ms forward+backward at D 64 against 2.60 / 9.14 ms with K/V expanded
    first; 3.80 / 14.36 against 4.07 / 14.77 at D 128; analysis/results/shapes_NVIDIA_H200.json). A chunk after a
    prefix -> ``causal_lower_right`` (flash / memory-efficient kernels align the diagonal to the last key); its flash
    call takes equal head counts, so K/V are expanded there."""
    S, T = q.shape[-2], k.shape[-2]
    if S == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(S, T))


def positions_in_documents(doc_ids: Tensor) -> Tensor:
    """[B, S] (or [S] -> [1, S]) RoPE positions that restart at 0 at every document start."""
    docs = Documents.from_ids(doc_ids)
    pos = torch.arange(docs.start.shape[1], device=docs.start.device, dtype=torch.int32)
    return (pos - docs.start).long()


class MaskSet:
    """The masks of one forward pass: for each distinct pattern, what its kernel needs for this batch.

    ``kind`` is ``"block"`` (BlockMasks for flex) or ``"dense"`` (bool masks for SDPA; CPU with gradients). A Full
    pattern on an unpacked batch needs no mask (SDPA ``is_causal``) and gets none."""

    def __init__(self, patterns: Iterable[Pattern], seq_len: int, *, num_heads: int, num_kv_heads: int,
                 device, doc_ids: Tensor | None = None, kind: str = "block"):
        if kind not in ("block", "dense"):
            raise ValueError(f"MaskSet kind must be 'block' or 'dense', got {kind!r}")
        if doc_ids is not None:
            doc_ids = check_doc_ids(doc_ids, seq_len).to(device)
        self.seq_len, self.kind, self.doc_ids = seq_len, kind, doc_ids
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.masks: dict[Pattern, Tensor | BlockMask] = {}
        for p in dict.fromkeys(patterns):  # distinct, in layer order
            if isinstance(p, Full) and doc_ids is None:
                continue
            if kind == "block":
                padded = padded_len(seq_len)  # the shape policy: one bucket per range of lengths
                self.masks[p] = build_block_mask(p, seq_len, seq_len, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                                 block_size=BLOCK, device=device, doc_ids=doc_ids,
                                                 padded_lengths=(padded, padded))
            else:
                self.masks[p] = dense_mask(p, seq_len, seq_len, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                           doc_ids=doc_ids).to(device)

    @staticmethod
    def kind_for(device, needs_grad: bool, seq_len: int | None = None) -> str:
        """'dense' on CPU where flex cannot run the backward pass (gradients) or where compiling would cost more than
        the dense mask (``seq_len <= CPU_DENSE_MAX_LEN``), else 'block'."""
        cpu = torch.device(device).type == "cpu"
        short = seq_len is not None and seq_len <= CPU_DENSE_MAX_LEN
        return "dense" if cpu and (needs_grad or short) else "block"

    def __getitem__(self, pattern: Pattern):
        try:
            return self.masks[pattern]
        except KeyError:
            raise KeyError(f"no mask for {pattern!r} in this MaskSet (built for {list(self.masks)})") from None


class KVCacheStep:
    """What generation passes as a layer's ``mask`` to run it over its KV cache (flexgen_long.cache holds the caches,
    flexgen_long.generation builds the steps; the kernels are chosen here, in ``HybridAttention.attend``).

    ``caches[layer]`` gives the layer's cache (``k``/``v`` [B, Hkv, slots, D], ``pos`` [B, Hp, slots], ``max_len``,
    ``write_prefill``, ``write_step``, ``visible``). ``mode`` is ``"prefill"`` (one sequence ``row``: a chunk of
    tokens at absolute positions ``offset ..``; ``chunk``: the prefill's nominal chunk size, which sizes the compiled
    shape of every later chunk, the last one too) or ``"decode"`` (one token per sequence at device positions ``pos``
    [B]). ``exact``: layers whose cache holds exactly the keys the query may see (a full buffer or a full ring at the
    same position in every row) -- decode over those needs no mask at all; it is host knowledge, passed in by the
    caller, so no step ever syncs to find it out."""

    def __init__(self, caches, mode: str, *, row: int = 0, offset: int = 0, pos: Tensor | None = None,
                 exact: frozenset = frozenset(), chunk: int | None = None):
        if mode not in ("prefill", "decode"):
            raise ValueError(f"KVCacheStep mode must be 'prefill' or 'decode', got {mode!r}")
        self.caches, self.mode, self.row, self.offset, self.pos, self.exact = caches, mode, row, offset, pos, exact
        self.chunk = chunk
        self._masks: dict = {}  # masks of this step, built once and shared by every layer that needs the same one

    def mask(self, key, build):
        """The mask for ``key`` in this step, built by ``build()`` on first use (masks once per forward, not per
        layer: a prefill chunk's layers of one pattern all need the same BlockMask)."""
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]


def _expand_heads(mask: Tensor, num_heads: int) -> Tensor:
    """[B, Hp, Q, S] per-KV-head mask -> broadcastable over query heads (GQA groups share their KV head's pattern)."""
    return mask if mask.shape[1] == 1 else mask.repeat_interleave(num_heads // mask.shape[1], dim=1)


class HybridAttention(MultiHeadAttention):
    """torchtune's ``MultiHeadAttention`` (same submodules, same state-dict keys) with a fixed ``pattern`` and its own
    kernel dispatch. Self-attention only; KV caches are flexgen_long.cache's compact per-pattern ones, reached through
    a ``KVCacheStep`` passed as ``mask`` (``attend`` -> ``_attend_cached``), not torchtune's ``setup_cache``."""

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
        raise NotImplementedError("torchtune's KV cache keeps every key, which defeats the sparse layers; use the "
                                  "compact per-pattern caches of flexgen_long.cache.ModelCache (flexgen_long.generation."
                                  "generate allocates them)")

    def forward(self, x: Tensor, y: Tensor | None = None, *, mask: MaskSet | None = None,
                input_pos: Tensor | None = None) -> Tensor:
        if y is not None and y is not x:
            raise ValueError("HybridAttention is self-attention: y must be None or x itself")
        b, s, _ = x.shape
        if self._wqkv is not None and not torch.is_grad_enabled():
            # one projection for q, k and v (fuse_projections): their weights are row blocks of one matrix
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = F.linear(x, self._wqkv).split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)
        v = v.view(b, s, self.num_kv_heads, self.head_dim)
        q = self.pos_embeddings(q, input_pos=input_pos)
        k = self.pos_embeddings(k, input_pos=input_pos)
        if mask is None:  # a layer used on its own: unpacked, masks for this layer only
            mask = MaskSet([self.pattern], s, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                           device=x.device, kind=MaskSet.kind_for(x.device, torch.is_grad_enabled(), s))
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.output_proj(out.transpose(1, 2).reshape(b, s, -1))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, masks: MaskSet | KVCacheStep) -> Tensor:
        """The kernel dispatch. q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D]."""
        if isinstance(masks, KVCacheStep):
            return self._attend_cached(q, k, v, masks)
        if not isinstance(masks, MaskSet):
            raise ValueError("mask must be a flexgen_long.attention.MaskSet (the hybrid model builds one per forward "
                             f"from doc_ids); torchtune bool masks / BlockMasks would override the per-layer patterns, "
                             f"got {type(masks).__name__}")
        if q.shape[-2] != masks.seq_len:
            raise ValueError(f"MaskSet was built for seq_len={masks.seq_len}, the layer got {q.shape[-2]} tokens")
        if isinstance(self.pattern, Full) and masks.doc_ids is None:
            return _sdpa_causal(q, k, v)
        m = masks[self.pattern]
        if masks.kind == "dense":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                    or v.requires_grad):
            raise RuntimeError("flex_attention has no CPU backward: build the MaskSet with kind='dense' "
                               "(the model does this by itself when gradients are needed on CPU)")
        return flex_attend(q, k, v, m)

    # Never traced: a compiled decode step or prefill (flexgen_long.generation: ``fused_decode_step``,
    # ``prefill(compile=True)``) compiles each layer's work around this call -- RMSNorm, the q/k/v projections and RoPE
    # before it, the output projection, residuals and MLP after it -- and runs this eagerly between the graphs: the
    # cache write, the masks and the attention kernels (SDPA / flash over the compact cache; prefill's flex calls
    # keep their own compiled graphs under the shape policy). Decode with the attention compiled into the step took
    # 33.4 ms against 12.9 ms eager at 128K on an H200, Llama-2-7B shape
    # (analysis/results/generation_compiled_decode_NVIDIA_H200.json). It also keeps the caches (sized per call), the
    # chunk offsets and the masks out of every compiled graph's guards.
    @torch.compiler.disable
    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, step: KVCacheStep) -> Tensor:
        """Attention of new tokens over this layer's compact cache (k/v: the new tokens' keys, after RoPE).

        decode: write the token, then SDPA over the slots -- with no mask where the cache holds exactly the visible keys
        (``step.exact``; flash/efficient SDPA over a compact cache was 9-31x faster than flex decoding on an H200, over
        4K-128K caches), else with a [B, H, 1, slots] bool mask from the slots' positions (ring not yet full, stale
        stride blocks, rows of different lengths). Static shapes, positions on the device: CUDA-graph safe, and nothing
        compiled sees the cache's size.

        prefill (one row, a chunk of C tokens at ``offset`` o):
        * full layer: the chunk joins the buffer, then attends positions 0 .. o+C-1 of it. First chunk: causal SDPA
          (cuDNN). Later chunks on GPU: compiled flex with the Full BlockMask at offset o, the chunk padded to the
          bucket of the nominal chunk size and the keys to the bucket of o + C (copied past the buffer's end only when
          that bucket outgrows it) -- 19.3 ms against 25.0 ms for lower-right causal SDPA (flash) for 8192 queries
          over 65536 keys (H200, bf16, 32 q / 8 kv heads, D 128; analysis/results/shapes_NVIDIA_H200.json), at most
          one graph per key bucket; on CPU: lower-right causal SDPA, exact, nothing compiled;
        * sparse layer, first chunk (o = 0): the ordinary dispatch of the no-cache forward (compiled flex under the
          shape policy, or the dense mask on CPU), so a prompt prefilled whole gives exactly the forward's output;
        * sparse layer, later chunks: the chunk attends [cached slots ; its own keys], then joins the slots. On GPU
          (``_chunk_over_slots_flex``): compiled flex under the shape policy -- keys are the slots that positions < o
          can occupy (``cache.used_slots(o)``, a prefix of the layout: n <= sink + window, or the local ring plus the
          stride blocks so far), padded with empty slots -- to sink + window rounded up to a block for AttnSink (the
          most a ring holds), to ``padded_len(n)`` for BlockSparse (its stride store grows) -- then the chunk's keys padded to the
          bucket of the nominal chunk size, like the queries; GQA unexpanded. The mask_mod reads each key column's
          position (-1: empty or padding) and the offset from captured tensors and applies the pattern's token rule,
          so the graph depends on shapes only: one per (pattern, chunk bucket) for AttnSink and per (pattern, chunk
          bucket, slot bucket) for BlockSparse, never one per offset,
          prompt length or cache size. The BlockMask (``masks.build_cached_block_mask``) comes from each key block's
          [min, max] position in O(q_blocks x kv_blocks): no C x keys mask, and a block is full only where it holds
          no empty column and the rule covers its whole range. On CPU (``_chunk_over_slots_sdpa``): SDPA over every
          slot with the dense bool mask from positions and K/V expanded per query head, exact, nothing compiled."""
        if step.mode == "decode":
            return self._decode(q, k, v, step)
        cache = step.caches[self]
        row, o, C = step.row, step.offset, q.shape[2]
        if isinstance(self.pattern, Full):
            cache.write_prefill(row, k, v, o)
            if o == 0 or q.device.type != "cuda":
                return _sdpa_causal(q, cache.k[row:row + 1, :, :o + C], cache.v[row:row + 1, :, :o + C], o)
            pq, pk = padded_len(max(C, step.chunk or C)), padded_len(o + C)
            bm = step.mask(("full_chunk", pq, pk), lambda: build_block_mask(
                Full(), C, o + C, q_offset=o, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                block_size=BLOCK, device=q.device, padded_lengths=(pq, pk)))
            # contiguous copies: a slice of the buffer has the buffer's strides, which differ with every cache size
            # and would make every generate() call a new graph (dynamo guards on strides)
            kk, vv = (t[row:row + 1, :, :pk].contiguous() for t in (cache.k, cache.v))
            return flex_attend(q, kk, vv, bm)
        if o == 0:
            masks = step.mask(("first", self.pattern), lambda: MaskSet(
                [self.pattern], C, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, device=q.device,
                kind=MaskSet.kind_for(q.device, False, C)))
            out = self.attend(q, k, v, masks)
            cache.write_prefill(row, k, v, o)
            return out
        if q.device.type in _CHUNK_FLEX_DEVICES:
            out = self._chunk_over_slots_flex(q, k, v, cache, step)
        else:
            out = self._chunk_over_slots_sdpa(q, k, v, cache, row, o)
        cache.write_prefill(row, k, v, o)
        return out

    def _decode(self, q: Tensor, k: Tensor, v: Tensor, step: KVCacheStep) -> Tensor:
        """One token per sequence: write it into the cache, then SDPA over the slots -- with no mask where the cache
        holds exactly the visible keys (``step.exact``), else with the bool mask of the slots' positions, built once
        per step for all layers of one pattern (they hold the same positions; each layer writes its token before it
        reads the mask, the first one before it builds it)."""
        cache = step.caches[self]
        cache.write_step(k, v, step.pos)
        if self in step.exact:
            return F.scaled_dot_product_attention(q, cache.k, cache.v, enable_gqa=True)
        if FULL_DECODE_KERNEL == "split_k" and isinstance(self.pattern, Full) and q.device.type == "cuda":
            # a full buffer holds position p at slot p: row b sees slots 0 .. pos[b]
            return decode_attention(q, cache.k, cache.v, step.mask(("full_lengths",), lambda: step.pos + 1))
        mask = step.mask(("decode", cache.pattern, cache.slots, self.num_heads), lambda: _expand_heads(
            cache.visible(step.pos[:, None], cache.pos), self.num_heads))
        return F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=mask, enable_gqa=True)

    def _chunk_over_slots_flex(self, q: Tensor, k: Tensor, v: Tensor, cache, step: KVCacheStep) -> Tensor:
        """A sparse layer's later prefill chunk (offset o > 0) by compiled flex, under the shape policy: keys
        ``[the slots that positions < o can occupy (cache.used_slots(o): n, padded with empty slots, see below) ;
        the chunk's keys padded to the chunk bucket]``, queries padded to the same bucket, GQA
        unexpanded; the BlockMask and its positional mask_mod from ``masks.build_cached_block_mask``. Reads the
        cache, writes nothing."""
        row, o, C = step.row, step.offset, q.shape[2]
        n = cache.used_slots(o)
        pq = padded_len(max(C, step.chunk or C))
        ps = slot_part_len(self.pattern, n)
        # Every layer of one pattern holds the same positions (they receive the same writes, and this chunk's own
        # write comes after its attention), so the layers of a pattern share one mask per step.
        bm = step.mask(("sparse_chunk", self.pattern, self.num_heads, self.num_kv_heads, n, ps, pq),
                       lambda: build_cached_block_mask(self.pattern, cache.pos[row, :, :n], C, q_offset=o,
                                                       num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                                       block_size=BLOCK, padded_lengths=(ps, pq)))

        def keys(slots: Tensor, new: Tensor) -> Tensor:
            # one contiguous [1, Hkv, ps + pq, D] buffer: its strides depend on the shape key only (dynamo guards on
            # strides), and the empty columns are masked by position (-1), whatever they hold
            out = new.new_zeros(1, self.num_kv_heads, ps + pq, new.shape[-1])
            out[:, :, :n] = slots[row:row + 1, :, :n]
            out[:, :, ps:ps + C] = new
            return out

        return flex_attend(q, keys(cache.k, k), keys(cache.v, v), bm)

    def _chunk_over_slots_sdpa(self, q: Tensor, k: Tensor, v: Tensor, cache, row: int, o: int) -> Tensor:
        """The same by masked SDPA (CPU; exact, nothing compiled): [all slots ; the chunk's keys] under the dense bool
        mask [1, H, C, slots + C] from their positions, K/V expanded per query head. Reads the cache, writes
        nothing."""
        C = q.shape[2]
        kk = torch.cat([cache.k[row:row + 1], k], dim=2)
        vv = torch.cat([cache.v[row:row + 1], v], dim=2)
        qpos = torch.arange(o, o + C, device=q.device, dtype=torch.int32)
        kpos = torch.cat([cache.pos[row:row + 1], qpos.expand(1, cache.pos.shape[1], C)], dim=2)
        mask = _expand_heads(cache.visible(qpos[None], kpos), self.num_heads)
        group = self.num_heads // self.num_kv_heads
        if group > 1:  # a masked SDPA with enable_gqa may fall back to the math kernel (C x slots scores per head)
            kk, vv = kk.repeat_interleave(group, dim=1), vv.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
