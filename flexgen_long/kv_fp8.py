"""FP8 (e4m3) keys and values for the full layers' KV caches, and the decode attention that reads them as stored.

Storage. ``quantize(x)`` stores x [..., D] as float8_e4m3fn values with one fp32 scale per vector (per token and KV
head): scale = max|x| / 448 (e4m3's largest finite value), stored = x / scale, so every element keeps e4m3's three
mantissa bits relative to its own vector's largest element; ``dequantize`` multiplies back. A full layer's cache then
holds 2 * D + 8 bytes per token and KV head instead of 4 * D in bf16 (0.52x at D 128).

Decode. SDPA takes no FP8 inputs, and dequantising the cache before SDPA would read the bytes once more and write them
twice. ``decode_attention`` is a split-K ("flash-decoding") Triton kernel that reads the stored FP8 values and their
scales and dequantises in registers. For each row b and query head h, G = Hq / Hkv query heads per KV head:

    out[b, h] = softmax(sm_scale * q[b, h] . (k8[b, h // G, n] * ks[b, h // G, n]) over n < L[b])
                @ (v8[b, h // G, n] * vs[b, h // G, n])

Since the scales are per key, the kernel scales a block's scores by ``ks`` after the dot product and the
probabilities by ``vs`` before the value product: the dot products run on the stored values (converted to bf16 in
registers, exactly: e4m3 values are bf16 values).

Stage 1 (grid (B, Hkv, num_splits)): row b's L[b] keys are cut into ``num_splits`` BLOCK_N-aligned chunks (computed on
the device from L[b]); each program runs the online softmax (fp32, base 2) over its chunk and writes its chunk's
normalised output [G, D] and log-sum-exp into fp32 partials. A program past L[b] writes lse -inf and output 0. One
program serves all G query heads of its KV head, so K/V are read once per group: by ``tl.dot`` (the group padded to
16 rows) when G > 1, by elementwise products and sums when G = 1. Stage 2 (grid (B, Hq)) merges the splits by their
log-sum-exp and writes q's dtype.

The grid depends on shapes only and L is read on the device, so a CUDA graph captures the two launches once and
replays them for any lengths. ``num_splits`` and the block sizes (``default_num_splits``, ``kernel_config``) are
chosen for the bandwidth a decode step needs; their measurement is in analysis/README.md.

CPU tensors take ``decode_attention_reference`` (plain torch), or with ``interpret=True`` the Triton kernels in
Triton's interpreter (the CPU tests; TRITON_INTERPRET=1 must be set before triton's first import).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton: decode_attention then takes the reference path on CPU tensors
    triton = None

__all__ = ["FP8", "FP8_MAX", "quantize", "dequantize", "stored_bytes", "decode_attention", "decode_attention_reference",
           "default_num_splits", "kernel_config", "compile_kernels"]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value
SMS = 132  # streaming multiprocessors of an H100 SXM / H200
TARGET_PROGRAMS = 8 * SMS  # enough programs per SM to keep loads in flight (decode is bound by bytes read)
MIN_SPLIT_KEYS = 256
MAX_HEAD_DIM = 256
Q_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., D] -> (float8_e4m3fn [..., D], fp32 scales [...]) with x ~= stored * scale (module docstring)."""
    scale = x.detach().abs().amax(-1).float() / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero vector stores zeros
    stored = (x.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # clamp: rounding past 448 is NaN
    return stored, scale


def stored_bytes(head_dim: int) -> int:
    """Bytes a token's key and value take per KV head: the e4m3 values and their two fp32 scales."""
    return 2 * head_dim + 2 * 4


def dequantize(stored: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The values ``quantize`` stored, computed in ``dtype`` (no wider temporary: a 16-bit product rounds at 2^-9
    relative, far below e4m3's 2^-4)."""
    return stored.to(dtype).mul_(scale.to(dtype).unsqueeze(-1))


def default_num_splits(batch: int, kv_heads: int, seq_len: int) -> int:
    """Key splits per (row, KV head): the fewest that give ``TARGET_PROGRAMS`` programs, at most one per
    ``MIN_SPLIT_KEYS`` slots. A function of shapes only (CUDA-graph safe)."""
    want = -(-TARGET_PROGRAMS // (batch * kv_heads))
    return max(1, min(want, seq_len // MIN_SPLIT_KEYS))


def kernel_config(group: int, head_dim: int) -> dict:
    """Stage 1's key block and launch options: the largest key block whose sm_90 build keeps every value in registers
    (tests/test_kv_fp8.py compiles it offline and checks that nothing spills); D > 128 halves the block."""
    wide = head_dim > 128
    if group == 1:
        return {"BLOCK_N": 32 if wide else 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_N": 32 if wide else 64, "num_warps": 4, "num_stages": 3}


if triton is not None:

    @triton.jit
    def _split_range(Lens, b, split, S, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
        """Row b's keys [lo, hi) of this split: L[b] (clamped into 0..S) cut into NUM_SPLITS BLOCK_N-aligned chunks."""
        L = tl.minimum(tl.maximum(tl.load(Lens + b).to(tl.int32), 0), S)
        chunk = tl.cdiv(tl.cdiv(L, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        return lo, tl.minimum(lo + chunk, L)

    @triton.jit
    def _split_kernel(Q, K, V, KS, VS, Lens, PartO, PartLse, sm_scale_log2,
                      sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, ssb, ssh, ssn,
                      S, Hq, D, G: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      DOT_DTYPE: tl.constexpr):
        """Stage 1 for G > 1 query heads per KV head: the group's rows padded to 16, scores and values by tl.dot."""
        b = tl.program_id(0).to(tl.int64)
        hkv = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)

        lo, hi = _split_range(Lens, b, split, S, NUM_SPLITS, BLOCK_N)

        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        heads = hkv * G + g  # the group's query heads (query head h reads KV head h // G)
        g_ok = g < G
        d_ok = d < D
        q = tl.load(Q + b * sqb + heads[:, None] * sqh + d[None, :] * sqd,
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        k_row = K + b * skb + hkv * skh
        v_row = V + b * svb + hkv * svh
        ks_row = KS + b * ssb + hkv * ssh  # the two scale tensors share one layout
        vs_row = VS + b * ssb + hkv * ssh

        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            kv_mask = n_ok[:, None] & d_ok[None, :]
            n64 = n.to(tl.int64)
            k = tl.load(k_row + n64[:, None] * skn + d[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(v_row + n64[:, None] * svn + d[None, :] * svd, mask=kv_mask, other=0.0)
            ks = tl.load(ks_row + n64 * ssn, mask=n_ok, other=0.0)
            vs = tl.load(vs_row + n64 * ssn, mask=n_ok, other=0.0)
            s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), out_dtype=tl.float32)
            s = tl.where(n_ok[None, :], s * (ks * sm_scale_log2)[None, :], float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))  # every block holds a key below hi: m_new is finite
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            pv = tl.dot((p * vs[None, :]).to(DOT_DTYPE), v.to(DOT_DTYPE), out_dtype=tl.float32)
            acc = acc * alpha[:, None] + pv
            m = m_new

        has = l > 0  # an empty chunk writes output 0 and lse -inf: weight 0 in stage 2
        out = acc / tl.where(has, l, 1.0)[:, None]
        lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
        row = (b * Hq + heads) * NUM_SPLITS + split
        tl.store(PartO + row[:, None] * D + d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
        tl.store(PartLse + row, lse, mask=g_ok)

    @triton.jit
    def _split_kernel_mha(Q, K, V, KS, VS, Lens, PartO, PartLse, sm_scale_log2,
                          sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, ssb, ssh, ssn,
                          S, Hq, D, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Stage 1 for one query head per KV head (G = 1): the same online softmax on vectors, scores by
        elementwise products and row sums (a 16-row dot would be 15/16 padding)."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)

        lo, hi = _split_range(Lens, b, split, S, NUM_SPLITS, BLOCK_N)

        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(Q + b * sqb + h * sqh + d * sqd, mask=d_ok, other=0.0).to(tl.float32)
        k_row = K + b * skb + h * skh
        v_row = V + b * svb + h * svh
        ks_row = KS + b * ssb + h * ssh
        vs_row = VS + b * ssb + h * ssh

        m = float("-inf")
        l = 0.0
        acc = tl.zeros([BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            kv_mask = n_ok[:, None] & d_ok[None, :]
            n64 = n.to(tl.int64)
            k = tl.load(k_row + n64[:, None] * skn + d[None, :] * skd, mask=kv_mask, other=0.0)
            ks = tl.load(ks_row + n64 * ssn, mask=n_ok, other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], 1)
            s = tl.where(n_ok, s * (ks * sm_scale_log2), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new)
            l = l * alpha + tl.sum(p, 0)
            v = tl.load(v_row + n64[:, None] * svn + d[None, :] * svd, mask=kv_mask, other=0.0)
            vs = tl.load(vs_row + n64 * ssn, mask=n_ok, other=0.0)
            acc = acc * alpha + tl.sum((p * vs)[:, None] * v.to(tl.float32), 0)
            m = m_new

        has = l > 0
        out = acc / tl.where(has, l, 1.0)
        lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
        row = (b * Hq + h) * NUM_SPLITS + split
        tl.store(PartO + row * D + d, out, mask=d_ok)
        tl.store(PartLse + row, lse)

    @triton.jit
    def _combine_kernel(PartO, PartLse, Out, sob, soh, sod, Hq, D,
                        NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        base = (b * Hq + h) * NUM_SPLITS
        m = float("-inf")
        den = 0.0
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, NUM_SPLITS, BLOCK_S):  # online log-sum-exp over the splits
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < NUM_SPLITS
            lse = tl.load(PartLse + base + s, mask=s_ok, other=float("-inf"))
            o = tl.load(PartO + (base + s)[:, None] * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            m_new = tl.maximum(m, tl.max(lse, 0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # every split so far empty: weights 0, not NaN
            alpha = tl.exp2(m - m_ref)
            w = tl.exp2(lse - m_ref)
            den = den * alpha + tl.sum(w, 0)
            acc = acc * alpha + tl.sum(w[:, None] * o, 0)
            m = m_new
        out = acc / tl.where(den > 0, den, 1.0)  # den = 0 only for a row without keys (L = 0): zeros
        tl.store(Out + b * sob + h * soh + d * sod, out.to(Out.dtype.element_ty), mask=d_ok)


def _interpreted() -> bool:
    """Whether the kernels were made by Triton's interpreter (TRITON_INTERPRET=1 before triton's first import)."""
    from triton.runtime import interpreter

    if not isinstance(_split_kernel, interpreter.InterpretedFunction):
        return False
    if not getattr(interpreter, "_flexgen_index_fix", False):
        # Triton 3.6's interpreter turns a 1-element array into a Python int with int(array), which numpy >= 2.4
        # refuses: every loop with a loaded bound fails. Upstream's fix (triton-lang/triton#9172, after 3.6.0)
        # squeezes the array first; the same patch, applied to the interpreter's tensor patching only.
        patch_tensor = interpreter._patch_lang_tensor

        def patched(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

        interpreter._patch_lang_tensor = patched
        interpreter._flexgen_index_fix = True
    return True


def _check(q, k, ks, v, vs, lengths, scale) -> None:
    """Host-side checks only (lengths' values would need a device sync)."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be [B, Hq, 1, D] (one query token per row), got shape {tuple(q.shape)}")
    B, Hq, _, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"k and v must be [B={B}, Hkv, S, D={D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hq % Hkv or S < 1 or not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"need Hq ({Hq}) a multiple of Hkv ({Hkv}), S >= 1 (got {S}), 1 <= D <= {MAX_HEAD_DIM} "
                         f"(got {D})")
    if k.dtype != FP8 or v.dtype != FP8:
        raise ValueError(f"k and v must be {FP8} (kv_fp8.quantize), got {k.dtype} and {v.dtype}")
    if q.dtype not in Q_DTYPES:
        raise ValueError(f"q must be one of {[str(t) for t in Q_DTYPES]}, got {q.dtype}")
    for name, t in (("k_scale", ks), ("v_scale", vs)):
        if t.shape != k.shape[:3] or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 [B, Hkv, S] = {tuple(k.shape[:3])}, got {t.dtype} "
                             f"{tuple(t.shape)}")
    if ks.stride() != vs.stride():
        raise ValueError("k_scale and v_scale must share one layout (strides)")
    if lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be int32 or int64 [B={B}], got {lengths.dtype} {tuple(lengths.shape)}")
    for name, t in (("k", k), ("v", v), ("k_scale", ks), ("v_scale", vs), ("lengths", lengths)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float or None (1/sqrt(D)), got {scale!r}")


def _checked_splits(num_splits, k: Tensor) -> int:
    B, Hkv, S = k.shape[:3]
    if num_splits is None:
        return default_num_splits(B, Hkv, S)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= S:
        raise ValueError(f"num_splits must be an int in 1..S={S} or None, got {num_splits!r}")
    return num_splits


def _check_config(config) -> None:
    if config is None:
        return
    if not isinstance(config, dict) or not set(config) <= {"BLOCK_N", "num_warps", "num_stages"}:
        raise ValueError(f"config must be None or a dict with keys among BLOCK_N, num_warps, num_stages, got {config!r}")
    for key, low in (("BLOCK_N", 16), ("num_warps", 1), ("num_stages", 1)):
        val = config.get(key, low)
        if not isinstance(val, int) or val < low or (key != "num_stages" and val & (val - 1)):
            raise ValueError(f"config[{key!r}] must be " + ("an int >= 1" if key == "num_stages" else
                             f"a power of two >= {low}") + f", got {val!r}")


def _empty(*shape: int, dtype: torch.dtype, device) -> Tensor:
    """Every buffer the kernels write comes from here (the tests fill them with NaN: every element must be written)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _launches(q, k, ks, v, vs, lengths, scale, num_splits, interpret=False, config=None):
    """The two launches as (kernel, grid, args, kwargs), and the output they fill."""
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    G = Hq // Hkv
    cfg = {**kernel_config(G, D), **(config or {})}
    block_g = max(16, triton.next_power_of_2(G))
    block_d = max(16, triton.next_power_of_2(D))
    part_o = _empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
    part_lse = _empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    out = _empty(B, Hq, 1, D, dtype=q.dtype, device=q.device)
    launch = {} if interpret else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    # the interpreter has no bfloat16 arithmetic (it multiplies bit patterns): its dots run in fp32
    dot_dtype = tl.float32 if interpret else tl.bfloat16
    args = (q, k, v, ks, vs, lengths, part_o, part_lse, scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
            q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(), *ks.stride(), S, Hq, D)
    if G == 1:
        split = (_split_kernel_mha, (B, Hkv, num_splits), args,
                 dict(NUM_SPLITS=num_splits, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, **launch))
    else:
        split = (_split_kernel, (B, Hkv, num_splits), args,
                 dict(G=G, NUM_SPLITS=num_splits, BLOCK_G=block_g, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d,
                      DOT_DTYPE=dot_dtype, **launch))
    combine = (_combine_kernel, (B, Hq),
               (part_o, part_lse, out, out.stride(0), out.stride(1), out.stride(3), Hq, D),
               dict(NUM_SPLITS=num_splits, BLOCK_S=min(32, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
                    **({} if interpret else {"num_warps": 4})))
    return [split, combine], out


def decode_attention(q: Tensor, k: Tensor, k_scale: Tensor, v: Tensor, v_scale: Tensor, lengths: Tensor, *,
                     scale: float | None = None, num_splits: int | None = None, config: dict | None = None,
                     interpret: bool = False) -> Tensor:
    """Attention of one query per row over the first ``lengths[b]`` slots of an FP8 cache (module docstring).
    q [B, Hq, 1, D]; k, v float8_e4m3fn [B, Hkv, S, D]; k_scale, v_scale fp32 [B, Hkv, S]; lengths [B] int on q's
    device -> [B, Hq, 1, D] in q's dtype. ``num_splits`` / ``config``: overrides of ``default_num_splits`` and
    ``kernel_config`` (the benchmark's sweep). CPU tensors take the reference unless ``interpret``."""
    _check(q, k, k_scale, v, v_scale, lengths, scale)
    num_splits = _checked_splits(num_splits, k)
    _check_config(config)
    if q.device.type == "cpu" and not interpret:
        return decode_attention_reference(q, k, k_scale, v, v_scale, lengths, scale).to(q.dtype)
    if triton is None:
        raise RuntimeError("kv_fp8.decode_attention needs triton on a GPU: pip install triton")
    if interpret and (q.device.type != "cpu" or not _interpreted()):
        raise RuntimeError("interpret=True runs on CPU tensors with TRITON_INTERPRET=1 set before triton is first "
                           "imported in this process")
    launches, out = _launches(q, k, k_scale, v, v_scale, lengths, scale, num_splits, interpret, config)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        for kernel, grid, args, kwargs in launches:
            kernel[grid](*args, **kwargs)
    return out


def compile_kernels(q: Tensor, k: Tensor, k_scale: Tensor, v: Tensor, v_scale: Tensor, lengths: Tensor, *,
                    num_splits: int | None = None, config: dict | None = None) -> list:
    """Compile (not run) both kernels for these arguments, for the target of Triton's active driver: with a driver
    that names a GPU target this works on CPU tensors (the tests build for sm_90 this way)."""
    _check(q, k, k_scale, v, v_scale, lengths, None)
    num_splits = _checked_splits(num_splits, k)
    _check_config(config)
    launches, _ = _launches(q, k, k_scale, v, v_scale, lengths, None, num_splits, config=config)
    return [kernel.warmup(*args, grid=grid, **kwargs) for kernel, grid, args, kwargs in launches]


def decode_attention_reference(q: Tensor, k: Tensor, k_scale: Tensor, v: Tensor, v_scale: Tensor, lengths: Tensor,
                               scale: float | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The same attention in plain torch over the dequantised K/V, computed in ``dtype`` (float64 in the tests). Reads
    the lengths on the host (a device sync); a row of length 0 gets zeros, lengths above S read S slots."""
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.zeros(B, Hq, 1, D, device=q.device, dtype=dtype)
    for b, L in enumerate(lengths.tolist()):
        L = min(max(L, 0), S)
        if L == 0:
            continue
        kk = dequantize(k[b, :, :L], k_scale[b, :, :L], dtype).repeat_interleave(Hq // Hkv, dim=0)  # [Hq, L, D]
        vv = dequantize(v[b, :, :L], v_scale[b, :, :L], dtype).repeat_interleave(Hq // Hkv, dim=0)
        p = torch.softmax(scale * (q[b].to(dtype) @ kk.transpose(1, 2)), dim=-1)
        out[b] = p @ vv
    return out
