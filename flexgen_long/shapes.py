"""The shape policy: which shapes reach compiled code, so that the number of compiled graphs stays small whatever
prompts, chunks and documents users send.

``flex_attention`` must run compiled (uncompiled it materialises the whole score matrix), and a compiled function with
static shapes is a new graph per shape; dynamo keeps at most ``recompile_limit`` (8) per function and then fails. So
every compiled flex call (flexgen_long.routes says which) goes through this module, which

1. **pads** query and key lengths up to a **bucket** (``padded_len``): 128, then 256, 384, 512, 768, 1024, 1536,
   2048, 3072, ... (2^k and 1.5 * 2^k, multiples of the 128-token block), at most ``2 * ceil(log2(n / 128))`` buckets
   for lengths up to n (20 up to 128K). Padding costs almost no compute: the BlockMask lists no key blocks for padded
   query blocks and causality hides padded keys. The shortest query block, 128, also keeps flex away from its
   decoding lowering, which failed on short AttnSink queries (analysis/README.md);
2. **compiles one function per shape key** (``compiled``): the key holds everything dynamo would guard on, and each key
   gets a fresh code object (dynamo's graph cache and recompile counter live on the code object), so every key
   compiles once and nothing approaches the recompile limit.

Static buckets rather than ``dynamic=True``: flex in torch 2.11 specialises sequence lengths in its block-mask checks.
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass
from typing import Callable, Hashable

import torch
from torch import Tensor

__all__ = ["BLOCK", "padded_len", "bucket_count", "buckets", "compiled", "compiled_graphs", "GraphInfo",
           "pad_seq", "flex_graph_key"]

#: FlexAttention's tile and our BlockMask block: every bucket is a multiple of it.
BLOCK = 128


def padded_len(n: int) -> int:
    """The bucket of a length ``n >= 1``: the smallest of 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, ...
    (2^k and 1.5 * 2^k, multiples of 128) that is >= n."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"length must be an int >= 1, got {n!r}")
    if n <= BLOCK:
        return BLOCK
    p = 1 << (n - 1).bit_length()  # smallest power of two >= n
    three_quarters = (p >> 2) * 3
    return three_quarters if three_quarters >= n and three_quarters % BLOCK == 0 else p


def buckets(max_len: int) -> list[int]:
    """Every bucket that lengths 1..max_len can map to, ascending."""
    out = [padded_len(1)]
    while out[-1] < padded_len(max_len):
        out.append(padded_len(out[-1] + 1))
    return out


def bucket_count(max_len: int) -> int:
    """How many buckets lengths 1..max_len use (<= max(1, 2 * ceil(log2(max_len / 128))); 20 up to 131072)."""
    return len(buckets(max_len))


def pad_seq(x: Tensor, length: int) -> Tensor:
    """Zero-pad dim -2 (the sequence of [B, H, S, D]) up to ``length``; ``x`` itself when it is already that long.

    The padded tensor keeps ``x``'s memory layout (the order of its strides): q / k / v arrive as transposed views of
    the projections ([B, S, H, D] memory), and a padded call must have the strides of an unpadded call of the bucket's
    length -- dynamo guards on strides, so a contiguous pad would compile a second graph per bucket."""
    s = x.shape[-2]
    if s == length:
        return x
    if s > length:
        raise ValueError(f"cannot pad a sequence of {s} tokens down to {length}")
    shape = list(x.shape)
    shape[-2] = length
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))  # outermost dim first (stable for ties)
    out = x.new_zeros([shape[d] for d in order]).permute([order.index(d) for d in range(x.dim())])
    out[..., :s, :] = x
    return out


# -- one compiled function per shape key ----------------------------------------------------------------------------------

@dataclass
class GraphInfo:
    """One compiled function: its key, and the wall time of its first call (compilation + one run, synchronised)."""

    key: tuple
    first_call_s: float = float("nan")


_COMPILED: dict[tuple, tuple[Callable, GraphInfo]] = {}


def _fresh_code(fn: Callable, tag: str) -> Callable:
    """A copy of ``fn`` with its own code object (dynamo caches graphs, and counts recompiles, per code object)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}__{tag}")
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=code.co_name)
    new = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def compiled(fn: Callable, key: Hashable, **compile_kwargs) -> Callable:
    """``torch.compile(fn, **compile_kwargs)`` for calls described by ``key``, compiled once per (fn, key).

    The caller's key must cover everything that changes the traced graph (shapes, dtypes, devices, grad mode, the
    values that mask functions capture); anything it misses still works -- dynamo recompiles that one function -- and
    after ``recompile_limit`` misses fails loudly (``fullgraph=True`` callers) instead of running uncompiled."""
    full_key = (fn.__module__, fn.__qualname__, key)
    hit = _COMPILED.get(full_key)
    if hit is not None:
        return hit[0]
    info = GraphInfo(full_key)
    compiled_fn = torch.compile(_fresh_code(fn, str(len(_COMPILED))), **compile_kwargs)

    def first_call(*args, **kwargs):
        t0 = time.perf_counter()
        out = compiled_fn(*args, **kwargs)
        if isinstance(out, Tensor) and out.is_cuda:
            torch.cuda.synchronize(out.device)
        info.first_call_s = time.perf_counter() - t0
        _COMPILED[full_key] = (compiled_fn, info)  # later calls skip the timing wrapper
        return out

    _COMPILED[full_key] = (first_call, info)
    return first_call


def compiled_graphs(prefix: str | None = None) -> list[GraphInfo]:
    """The compiled functions made so far (one graph each), optionally only those whose function's qualified name
    starts with ``prefix``."""
    return [info for (_, qual, _), (_, info) in _COMPILED.items() if prefix is None or qual.startswith(prefix)]


def flex_graph_key(q: Tensor, k: Tensor, v: Tensor, block_mask, backend: str = "triton") -> tuple:
    """Everything a compiled flex call's graph depends on: shapes, strides (dynamo guards on them: a view into a larger
    buffer must not share a key with a packed tensor), dtypes, device, whether it records gradients, the
    BlockMask's tensor shapes and block size, the mask_mod's own key (set by ``Pattern.mask_mod``: the bound
    pattern, the GQA group, the document layout's shape) -- or, for a foreign mask_mod, its code -- and the kernel
    backend (flexgen_long.flex_backend), so that Triton and FLASH graphs of one shape live side by side."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    mm = block_mask.mask_mod
    mask_key = getattr(mm, "graph_key", None) or (getattr(mm, "__code__", None), getattr(mm, "__qualname__", None))
    full = block_mask.full_kv_num_blocks
    return (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.stride(), k.stride(), v.stride(), q.dtype, k.dtype,
            str(q.device), grad, mask_key,
            tuple(block_mask.kv_num_blocks.shape), tuple(block_mask.kv_indices.shape),
            None if full is None else tuple(full.shape), tuple(block_mask.BLOCK_SIZE),
            tuple(block_mask.seq_lengths), backend)
