"""The runtime policy: every choice of how the model runs that is not the model itself, in one frozen, validated object.

``Policy()`` is the default everywhere (``generate``, ``Engine``, ``model(tokens)``); ``None`` in a field means "the
device's default", and ``policy.on(device)`` resolves those for one device, so nothing below reads a half-decided
value. The defaults follow measurements (analysis/README.md): compiled layers, CUDA graphs, the look-ahead decode loop
and flex for later prefill chunks on CUDA; on a CPU nothing compiled where a dense mask is cheaper than compiling
(Inductor takes minutes and one flex graph 8-26 s on a 2-core CPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from .flex_backend import BACKENDS as FLEX_BACKENDS, resolve as resolve_flex_backend

__all__ = ["Policy"]

KV_CACHE_DTYPES = (None, "fp8")
_TRISTATE = ("compile_prefill", "compile_decode", "cuda_graphs", "lookahead", "chunk_flex")


def _int(x, least: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= least


@dataclass(frozen=True)
class Policy:
    """How the engine runs a model.

    ``prefill_chunk``: tokens per prefill chunk (bounded activation memory, same results); ``None``: each prompt
    whole; ``"auto"``: whole when its activations fit in what the KV caches leave, else the largest multiple of 128
    that fits (flexgen_long.cache.choose_prefill_chunk).
    ``compile_prefill`` / ``compile_decode``: each layer's work around attention (norms, projections, RoPE, MLP)
    compiled, in the prefill (dynamic shapes: one graph set for every length) / in the decode step.
    ``cuda_graphs``: decode steps captured once and replayed. ``lookahead``: the decode loop launches step t+1 before
    it waits for token t. ``chunk_flex``: later prefill chunks by compiled flex (else exact SDPA, nothing compiled).
    ``dense_mask_max_len``: sparse or packed sequences up to this many tokens run SDPA with the pattern's dense bool
    mask instead of compiled flex (without a gradient; with one on a CPU always, flex has no CPU backward).
    ``compile_backend`` / ``compile_options``: torch.compile's backend for the layers, and Inductor options of the
    decode step (a dict, e.g. ``{"coordinate_descent_tuning": True}``).
    ``kv_cache_dtype``: ``"fp8"`` stores the full layers' keys and values as float8 e4m3 with one scale per token and
    KV head (flexgen_long.kv_fp8: half the bytes, read as stored by the decode kernel); ``None``: the model's dtype.
    The sparse layers' caches, bounded by their pattern, keep the model's dtype.
    ``flex_backend``: the kernels of compiled flex (prefill and training; decode never runs flex): ``"triton"``,
    ``"flash"`` (flash-attn-4, the ``flash`` extra; CUDA sm90+), or ``None``: FLASH where it can run, else Triton
    (flexgen_long.flex_backend)."""

    prefill_chunk: int | str | None = "auto"
    compile_prefill: bool | None = None
    compile_decode: bool | None = None
    cuda_graphs: bool | None = None
    lookahead: bool | None = None
    chunk_flex: bool | None = None
    dense_mask_max_len: int | None = None
    compile_backend: str | Callable = "inductor"
    compile_options: dict | tuple | None = None
    kv_cache_dtype: str | None = None
    flex_backend: str | None = None

    def __post_init__(self):
        def bad(field, allowed):
            raise ValueError(f"Policy.{field} must be {allowed}, got {getattr(self, field)!r}")

        if not (self.prefill_chunk in ("auto", None) or _int(self.prefill_chunk, 1)):
            bad("prefill_chunk", "'auto' (the whole prompt if it fits, else a chunk from the memory plan), None (the "
                                 "whole prompt) or an int >= 1")
        for name in _TRISTATE:
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                bad(name, "True, False or None (None: the device's default)")
        if not (self.dense_mask_max_len is None or _int(self.dense_mask_max_len, 0)):
            bad("dense_mask_max_len", "None (2048 on a CPU, 0 elsewhere) or an int >= 0")
        if not (isinstance(self.compile_backend, str) or callable(self.compile_backend)):
            bad("compile_backend", "a torch.compile backend (a name or a callable)")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            bad("kv_cache_dtype", f"one of {KV_CACHE_DTYPES} (None: the model's dtype)")
        opts = self.compile_options
        if isinstance(opts, dict):  # stored as sorted pairs: a Policy is hashable and keys compiled graphs
            object.__setattr__(self, "compile_options", tuple(sorted(opts.items())))
        elif not (opts is None or (isinstance(opts, tuple) and all(isinstance(o, tuple) and len(o) == 2
                                                                   for o in opts))):
            bad("compile_options", "None or a dict of Inductor options")
        if self.flex_backend not in (None, *FLEX_BACKENDS):
            bad("flex_backend", "None (FLASH where flash_attn.cute imports on CUDA sm90+, else Triton), 'triton' or "
                                "'flash'")

    def stores_fp8(self, pattern) -> bool:
        """Whether a layer of ``pattern`` keeps its keys and values in FP8 under this policy (full layers only)."""
        return self.kv_cache_dtype == "fp8" and pattern.is_full

    def on(self, device) -> "Policy":
        """This policy with every None resolved for ``device``'s type; refuses CUDA graphs off CUDA and FLASH where it
        cannot run."""
        cuda = torch.device(device).type == "cuda"
        if self.cuda_graphs and not cuda:
            raise ValueError(f"Policy.cuda_graphs=True needs a CUDA device, the model is on {device}")
        # (a plan for a GPU made where there is none checks nothing here)
        if self.kv_cache_dtype == "fp8" and cuda and torch.cuda.is_available() and \
                torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError(f"Policy.kv_cache_dtype='fp8' needs a GPU of compute capability >= 8.9 (FP8 "
                             f"conversions), {device} has {torch.cuda.get_device_capability(device)}")
        fill = {name: cuda for name in _TRISTATE if getattr(self, name) is None}
        if self.dense_mask_max_len is None:
            fill["dense_mask_max_len"] = 2048 if torch.device(device).type == "cpu" else 0
        backend = resolve_flex_backend(self.flex_backend, device)
        if backend != self.flex_backend:
            fill["flex_backend"] = backend
        return dataclasses.replace(self, **fill) if fill else self

    def replace(self, **changes) -> "Policy":
        """A copy with ``changes`` (validated like the original)."""
        return dataclasses.replace(self, **changes)
