"""The route table: which attention kernel a layer runs, at which compiled shape, and what it costs in memory.

``route()`` is a pure function of the layer's pattern, the phase, the device, the lengths and the policy. Attention
executes what it returns (``flexgen_long.attention.KERNELS``), the memory plan adds up its ``bytes``
(``flexgen_long.cache``) and ``Engine.warmup`` compiles its ``shape``s ahead of traffic, so changing a route here
changes all three together.

=========  =========================================================  ==============================================
phase      route                                                      kernel
=========  =========================================================  ==============================================
train /    full layer, unpacked                                       ``sdpa_causal``: SDPA is_causal (cuDNN/flash)
first      sparse or packed, CPU with a gradient, or at most          ``sdpa_dense_mask``: SDPA with the token rule's
           ``policy.dense_mask_max_len`` tokens                       bool mask
           otherwise                                                  ``flex``: compiled, the pattern's BlockMask,
                                                                      lengths padded to their bucket
later      full layer, ``policy.chunk_flex``                          ``flex_full_chunk``: over the buffer so far
           full layer, otherwise                                      ``sdpa_lower_right``: causal SDPA, exact
           sparse layer, ``policy.chunk_flex``                        ``flex_over_slots``: over [cached slots ; chunk]
           sparse layer, otherwise                                    ``sdpa_over_slots``: SDPA, dense mask, exact
decode     a full layer whose cache is FP8 (``policy.kv_cache_dtype``)  ``fp8_decode``: flexgen_long.kv_fp8's kernel
           the cache holds exactly the visible keys                   ``sdpa_exact``: SDPA over the slots, no mask
           otherwise                                                  ``sdpa_masked``: SDPA, mask from positions
=========  =========================================================  ==============================================

A full layer with an FP8 cache takes the same prefill routes over its keys as stored: the chunk is quantised into the
cache, then every key so far is read back dequantised (both in the route's bytes).

"first" is a prompt's first prefill chunk and the no-cache inference forward; "train" the same with a gradient;
"later" a prefill chunk at an offset; "decode" one token per row.

A flex route runs on ``Route.backend`` (``flex_route_backend``): ``policy.flex_backend`` (``"flash"``: flash-attn-4's
kernels, ``"triton"``: flex's own) for 16-bit inputs, Triton for float32, which FLASH does not take. For training,
``attention.MaskSet`` moves a FLASH route to Triton where FLASH's backward fails for the mask
(``flex_backend.train_backend``, probed once per mask kind, said once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_fp8 import default_num_splits
from .patterns import Pattern
from .policy import Policy
from .shapes import BLOCK, padded_len

__all__ = ["Route", "route", "flex_route_backend", "PHASES", "MASK_BUILD_BYTES", "BUFFER_KERNELS"]

PHASES = ("train", "first", "later", "decode")
#: Bytes per element of a mask built from positions: an int64 difference and three bools (rule, comparisons, mask).
MASK_BUILD_BYTES = 8 + 3
#: Kernels that, over a cache, read the new tokens' keys from it: the tokens are written first.
BUFFER_KERNELS = frozenset({"sdpa_causal", "sdpa_lower_right", "flex_full_chunk", "sdpa_exact", "sdpa_masked",
                            "fp8_decode"})


@dataclass(frozen=True)
class Route:
    """``kernel``: a name in ``attention.KERNELS``; ``shape``: the (query, key) lengths a compiled flex kernel runs at
    (None: nothing compiled); ``bytes``: the kernel path's transient memory beyond q, k, v and the output;
    ``backend``: a flex kernel's backend, ``"triton"`` or ``"flash"`` (None: not flex)."""

    kernel: str
    shape: tuple[int, int] | None
    bytes: int
    backend: str | None = None


def flex_route_backend(policy: Policy, itemsize: int) -> str:
    """The backend of a flex route: the policy's for 16-bit q / k / v, Triton for any other width (FLASH takes float16
    and bfloat16 only)."""
    return (policy.flex_backend or "triton") if itemsize == 2 else "triton"


def route(pattern: Pattern, phase: str, *, device, policy: Policy, q_len: int, offset: int = 0,
          chunk: int | None = None, slots: int = 0, lo: int = 0, batch: int = 1, packed: bool = False,
          heads: tuple[int, int, int] = (1, 1, 1), itemsize: int = 2) -> Route:
    """The route of one layer. ``pattern`` bound to its KV heads; ``q_len`` queries (a chunk, or the sequence) at
    ``offset``; ``chunk``: the prefill's nominal chunk (sizes the compiled shape of every later chunk, the last too);
    ``slots``: the layer cache's size; ``lo``: the lowest row position of a decode step; ``heads``: (query heads, KV
    heads, head dim); ``policy`` resolved for ``device`` (``Policy.on``)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    H, Hkv, D = heads
    a, C = itemsize, q_len
    cpu = torch.device(device).type == "cpu"
    Hm = H if pattern.head_dependent else 1  # a mask's heads: broadcast over heads unless the rule is per KV head
    Hp = Hkv if pattern.head_dependent else 1  # a position index's heads
    lse = H * padded_len(C) * 4  # flash / cuDNN / flex log-sum-exp rows

    fp8 = policy.stores_fp8(pattern) and phase != "train"  # training keeps no cache
    # an FP8 cache: the chunk's keys quantised (fp32 work), then the keys so far read back dequantised
    stored = 2 * Hkv * C * D * 4 + 2 * Hkv * (offset + C) * D * a if fp8 else 0

    def flex(kernel, pq, pk, extra=0):  # padded q, k, v and output copies
        return Route(kernel, (pq, pk), (2 * H * pq + 2 * Hkv * pk) * D * a + lse + extra + stored,
                     flex_route_backend(policy, a))

    if phase == "decode":
        if fp8:  # stage 1's fp32 partials; on a CPU the reference's dequantised, expanded K/V of one row in fp32
            splits = default_num_splits(batch, Hkv, slots)
            cpu_ref = 3 * H * slots * D * 4 + 2 * Hkv * slots * D * 4 if cpu else 0
            return Route("fp8_decode", None, batch * H * splits * (D + 1) * 4 + batch * 8 + cpu_ref
                         + 2 * batch * Hkv * D * 4)
        if pattern.holds_exactly(lo, slots):
            return Route("sdpa_exact", None, 0)
        return Route("sdpa_masked", None, batch * H * slots * MASK_BUILD_BYTES)  # the mask, per query head
    if phase in ("train", "first"):
        if pattern.is_full and not packed:
            return Route("sdpa_causal", None, lse + stored)
        if (phase == "train" and cpu) or C <= policy.dense_mask_max_len:
            return Route("sdpa_dense_mask", None, Hm * C * C * (MASK_BUILD_BYTES + a))
        return flex("flex", padded_len(C), padded_len(C))
    T, pc = offset + C, padded_len(max(C, chunk or C))
    if pattern.is_full:
        if policy.chunk_flex:
            return flex("flex_full_chunk", pc, padded_len(T))
        return Route("sdpa_lower_right", None, 2 * H * T * D * a + C * T * (2 + 2 * a)  # K/V expanded, [C, T] mask
                     + stored)
    if policy.chunk_flex:
        # the slots that positions < offset can occupy, padded: a bounded cache (a ring) always to its most, so one
        # graph serves every offset; a growing one to the bucket of the slots in use
        bound = pattern.max_slots
        ps = -(-bound // BLOCK) * BLOCK if bound is not None else padded_len(pattern.cache_slots(offset))
        return flex("flex_over_slots", pc, ps + pc, Hp * (ps + pc) * 4)
    K = slots + C  # every cached slot, then the chunk's own keys; K/V expanded per query head; a dense mask
    return Route("sdpa_over_slots", None, (2 * Hkv + (2 * H if H > Hkv else 0)) * K * D * a + K * 12
                 + Hm * C * K * (MASK_BUILD_BYTES + a) + lse)
