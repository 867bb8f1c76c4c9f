"""FlexAttention's kernel backends: which one compiled flex runs, why, and what the FLASH one needs.

Two backends run the same BlockMask: ``"triton"`` (flex's own Triton kernels, torch's default) and ``"flash"``
(flash-attn-4's CuTe-DSL kernels, ``kernel_options={"BACKEND": "FLASH"}``; the optional ``flash`` extra installs
them). ``Policy.flex_backend`` names one; ``None`` resolves here (``resolve``): FLASH on a CUDA device of compute
capability 9.0 or newer where ``flash_attn.cute`` imports, else Triton. The import is tried once per process and
device, and one line on stderr says which backend flex uses and why.

What FLASH takes: 128 x 128 blocks (its tile on Hopper: ``shapes.BLOCK``), the full blocks listed (every BlockMask of
flexgen_long.masks lists them) and q / k / v of one 16-bit dtype (the route table sends float32 to Triton) --
``check_call`` refuses a call without them -- and torch.compile with ``dynamic=False`` (``shapes.compiled``) and
mask_mods whose per-call values are device tensors, since it bakes captured Python scalars into the kernel
(flexgen_long.masks says why ours qualify). It has no split-KV decode on sm90: decode stays on SDPA.

Training: ``train_backend`` runs FLASH's forward and backward once per mask kind on a two-block problem and compares
them with dense SDPA; where either fails, the training route runs Triton (flexgen_long.attention.MaskSet), and one
line says so.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .masks import build_block_mask, dense_mask
from .patterns import Pattern
from .shapes import BLOCK, compiled, flex_graph_key

__all__ = ["BACKENDS", "flash_status", "resolve", "kernel_options", "check_call", "backward_error", "train_backend"]

BACKENDS = ("triton", "flash")
#: Largest relative L2 error of FLASH's output or gradients against fp32 dense SDPA that ``backward_error`` accepts:
#: above what 16-bit rounding gives, far below what a wrong mask or a wrong gradient gives.
PROBE_TOL = 0.05


@functools.lru_cache(maxsize=None)
def log_once(line: str) -> None:
    """``line`` on stderr, the first time it is said in this process."""
    print(line, file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


@functools.lru_cache(maxsize=None)
def _cuda_flash_status(index: int | None) -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(index)
    if major < 9:
        return False, f"sm{major}{minor}: FLASH needs sm90 or newer"
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as e:  # a missing package, a CUDA library that does not load, a frontend that fails to start
        return False, f"flash_attn.cute not importable: {_first_line(e)}"
    try:
        version = importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        version = "of unknown version"
    return True, f"flash_attn.cute {version}, sm{major}{minor}"


def flash_status(device) -> tuple[bool, str]:
    """(whether FLASH can run on ``device``, why / what runs it), probed once per process and device."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the model is on {device.type}"
    return _cuda_flash_status(device.index)


def resolve(requested: str | None, device) -> str:
    """The backend flex uses on ``device`` for ``Policy.flex_backend=requested``; says it once per process. An
    explicit ``"flash"`` where it cannot run is refused."""
    if requested == "triton":
        log_once("flex attention: Triton backend (Policy.flex_backend='triton')")
        return "triton"
    ok, why = flash_status(device)
    if requested == "flash" and not ok:
        raise ValueError(f"Policy.flex_backend='flash' cannot run on {device}: {why} (use None or 'triton')")
    log_once(f"flex attention: {'FLASH' if ok else 'Triton'} backend ({why})")
    return "flash" if ok else "triton"


def kernel_options(backend: str) -> dict | None:
    """flex_attention's ``kernel_options`` for ``backend`` (None: torch's default, Triton)."""
    return {"BACKEND": "FLASH"} if backend == "flash" else None


def check_call(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> None:
    """Refuse, in one line, a flex call that FLASH cannot take."""
    if tuple(block_mask.BLOCK_SIZE) != (BLOCK, BLOCK) or BLOCK != 128:
        raise ValueError(f"flex backend 'flash' needs 128 x 128 BlockMask blocks (Hopper's tile), got "
                         f"{tuple(block_mask.BLOCK_SIZE)}")
    if block_mask.full_kv_num_blocks is None:
        raise ValueError("flex backend 'flash' needs a BlockMask that lists its full blocks (flexgen_long.masks "
                         "builds them so)")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flex backend 'flash' takes q, k, v of one dtype, float16 or bfloat16, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype} (the route table sends float32 to 'triton')")


def _flash_probe(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=kernel_options("flash"))


@functools.lru_cache(maxsize=None)
def _backward_error(pattern: Pattern, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                    device: str, doc_batch: int | None, deterministic: bool) -> str | None:
    n = 2 * BLOCK
    gen = torch.Generator().manual_seed(0)
    docs = None if doc_batch is None else (torch.arange(n) >= n // 3).long().expand(doc_batch, n).to(device)
    B = doc_batch or 1
    q, k, v = (torch.randn(B, h, n, head_dim, generator=gen).to(device, dtype).requires_grad_()
               for h in (num_heads, num_kv_heads, num_kv_heads))
    g = torch.randn(B, num_heads, n, head_dim, generator=gen).to(device, dtype)
    bm = build_block_mask(pattern, n, n, num_heads=num_heads, num_kv_heads=num_kv_heads, block_size=BLOCK,
                          device=device, doc_ids=docs)
    try:
        with torch.enable_grad():
            out = compiled(_flash_probe, flex_graph_key(q, k, v, bm, "flash"), dynamic=False, fullgraph=True)(
                q, k, v, bm)
            got = torch.autograd.grad(out, (q, k, v), g)
    except Exception as e:  # the lowering refuses, the kernel does not compile, or it fails at run time
        return f"FLASH backward failed: {_first_line(e)}"
    mask = dense_mask(pattern, n, n, num_heads=num_heads, num_kv_heads=num_kv_heads, doc_ids=docs, device=device)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        ref = F.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=True)
        want = torch.autograd.grad(ref, leaves, g.float())
    for name, a, b in zip(("output", "dq", "dk", "dv"), (out, *got), (ref, *want)):
        err = float((a.float() - b).norm() / b.norm().clamp_min(1e-30))
        if not err <= PROBE_TOL:  # NaN too
            return f"FLASH {name} differs from dense SDPA by {err:.3g} (relative; at most {PROBE_TOL})"
    return None


def backward_error(pattern: Pattern, *, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device, doc_batch: int | None = None) -> str | None:
    """Why FLASH cannot train ``pattern`` (bound to its KV heads) at these heads, head dim and dtype -- packed with
    ``doc_batch`` rows of document ids (1: one layout for the batch), else unpacked -- or None. Runs a compiled FLASH
    forward and backward of 256 tokens once per such kind and process and compares output and gradients with fp32
    dense SDPA; torch's deterministic-algorithms setting is part of the kind (FLASH's block-sparse backward has no
    deterministic mode on sm90)."""
    return _backward_error(pattern, num_heads, num_kv_heads, head_dim, dtype, str(torch.device(device)), doc_batch,
                           torch.are_deterministic_algorithms_enabled())


def train_backend(pattern: Pattern, **kind) -> str:
    """``"flash"`` where ``backward_error`` finds nothing for ``pattern`` and ``kind`` (its keywords), else
    ``"triton"``, said once."""
    why = backward_error(pattern, **kind)
    if why is None:
        return "flash"
    log_once(f"flex attention: Triton backend for training {pattern!r} ({why})")
    return "triton"
