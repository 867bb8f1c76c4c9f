"""Length-aware split-K ("flash-decoding") attention for one query token over a preallocated KV cache.

What it computes. For each row b and query head h, with G = Hq / Hkv query heads per KV head (GQA; G = 1 is MHA):

    out[b, h, 0] = softmax(scale * q[b, h, 0] @ k[b, h // G, :L[b]].T) @ v[b, h // G, :L[b]]

q [B, Hq, 1, D]; k, v [B, Hkv, S, D] are cache buffers of S allocated slots of which row b holds valid keys at slots
0 .. L[b]-1 (``lengths`` [B], a device tensor). This equals SDPA over the whole buffer with the bool mask
``arange(S) < L[b]`` (the full layers' decode step today), without reading the masked slots.

Why. Decode is bound by the bytes read. Masked SDPA reads all S slots of every row; and at q_len 1 a kernel that
parallelises over rows, heads and query blocks has B * Hq work items -- 32 for a Llama-2-7B layer at batch 1, on a
chip of 132 SMs (how today's path really fares is for the benchmark below to measure). Here:

* each row reads only its L[b] keys: 2 * Hkv * L[b] * D * itemsize bytes of K/V instead of S;
* the key range is split over ``num_splits`` programs per (row, KV head) (split-K), so one sequence fills the GPU;
  stage 2 merges the splits' partial results by their log-sum-exp;
* one program serves all G query heads of its KV head, so K/V are read once per group, not G times;
* L is read on the device and the grid depends only on shapes, so a CUDA graph captures it once and replays it for
  any lengths (copy_ new values into the captured ``lengths`` tensor).

Stage 1 (``_split_kernel``, grid (B, Hkv, num_splits)): row b's L[b] keys are cut into ``num_splits`` chunks of
equal size (a multiple of BLOCK_N, computed on the device from L[b], so a short row still spreads over every split);
each program runs the online softmax over its chunk in BLOCK_N-key blocks, in fp32, and writes its chunk's normalised
output [G, D] and log-sum-exp (base 2) into fp32 partials [B, Hq, num_splits, D] and [B, Hq, num_splits]. A program
whose chunk starts at or past L[b] runs no block and writes the empty partial (lse = -inf, output 0). Scores come from
``tl.dot`` when G > 1 -- the group's G query rows padded to 16, the MMA's smallest M; decode is memory-bound, so the
padded rows cost no bandwidth -- and from elementwise products and ``tl.sum`` when G = 1, where a 16-row dot would
be 15/16 padding.

Stage 2 (``_combine_kernel``, grid (B, Hq)) is a small Triton kernel rather than torch ops: the torch version
(softmax over splits, multiply, sum, cast to q.dtype) is four launches and two temporaries, and at short caches the
whole attention takes a few microseconds (8K keys x 8 KV heads x D 128, bf16: 34 MB, ~7 us at 4.8 TB/s), so one
launch that writes q.dtype directly is worth its 30 lines.

``num_splits`` (``default_num_splits``): the fewest splits that give B * Hkv * num_splits >= 264 programs, twice the
132 SMs of an H100 / H200, so that every SM has at least two programs to overlap their loads; at most S // 512, so a
split of a full cache covers at least 512 keys and the partials (num_splits x D per head) stay small next to the
keys. It depends on (B, Hkv, S) only, never on L: a CUDA graph's grid stays fixed.

Constraints: q, k, v of one dtype (float16, bfloat16, float32) on one CUDA device, any strides; q_len 1; Hq a
multiple of Hkv; head dim up to 256 (any value: the kernel pads it to a power of two and masks); lengths int32 or
int64. Lengths are not checked against 1..S (that would sync the device); the kernel clamps them into 0..S, so a bad
value never reads outside the buffer, and a row with L = 0 gets zeros. fp32 inputs use IEEE fp32 dots (not TF32).

CPU tensors take ``decode_attention_reference`` (plain torch), or with ``interpret=True`` the same Triton kernels in
Triton's interpreter (how the CPU tests run them; TRITON_INTERPRET=1 must be set before triton's first import, and
``_interpreted`` mends one numpy 2.4 incompatibility of Triton 3.6's interpreter).

Speed is not yet measured: ``analysis/bench_decode_kernel.py`` measures it against masked SDPA over the whole buffer
and against SDPA over exactly the L valid keys. BLOCK_N, num_warps and num_stages below are first choices, not tuned.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the package imports without triton (CPU installs); decode_attention then needs CPU tensors
    triton = None

SMS = 132  # streaming multiprocessors of an H100 SXM / H200
TARGET_PROGRAMS = 2 * SMS
MIN_SPLIT_KEYS = 512
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def default_num_splits(batch: int, kv_heads: int, seq_len: int) -> int:
    """Splits per (row, KV head): the fewest that give ``TARGET_PROGRAMS`` programs, at most one per
    ``MIN_SPLIT_KEYS`` allocated slots (module docstring). A function of shapes only (CUDA-graph safe)."""
    want = -(-TARGET_PROGRAMS // (batch * kv_heads))
    return max(1, min(want, seq_len // MIN_SPLIT_KEYS))


if triton is not None:

    @triton.jit
    def _split_kernel(Q, K, V, Lens, PartO, PartLse, sm_scale_log2,
                      sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                      S, Hq, D, G: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        hkv = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)

        # this program's chunk of row b's keys: L[b] cut into NUM_SPLITS equal, BLOCK_N-aligned chunks
        L = tl.minimum(tl.maximum(tl.load(Lens + b).to(tl.int32), 0), S)
        chunk = tl.cdiv(tl.cdiv(L, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, L)

        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        heads = hkv * G + g  # the group's query heads (GQA: query head h reads KV head h // G)
        g_ok = g < G
        d_ok = d < D
        q = tl.load(Q + b * sqb + heads[:, None] * sqh + d[None, :] * sqd,
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        k_row = K + b * skb + hkv * skh
        v_row = V + b * svb + hkv * svh

        m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of scores (base-2 units)
        l = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            kv_mask = n_ok[:, None] & d_ok[None, :]
            n64 = n.to(tl.int64)  # slot * stride can pass 2**31 on long caches with strided views
            k = tl.load(k_row + n64[:, None] * skn + d[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(v_row + n64[:, None] * svn + d[None, :] * svd, mask=kv_mask, other=0.0)
            if USE_DOT:
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            else:
                s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2)
            s = tl.where(n_ok[None, :], s * sm_scale_log2, float("-inf"))
            # every block holds at least one key below hi, so m_new is finite and alpha = 0 on the first block
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            if USE_DOT:
                pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            else:
                pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
            acc = acc * alpha[:, None] + pv
            m = m_new

        # an empty chunk (lo >= L[b]) leaves l = 0, m = -inf: it writes output 0 and lse -inf, weight 0 in stage 2
        has = l > 0
        out = acc / tl.where(has, l, 1.0)[:, None]
        lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
        row = (b * Hq + heads) * NUM_SPLITS + split
        tl.store(PartO + row[:, None] * D + d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
        tl.store(PartLse + row, lse, mask=g_ok)

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
        for s0 in range(0, NUM_SPLITS, BLOCK_S):  # online log-sum-exp over the splits, BLOCK_S at a time
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < NUM_SPLITS
            lse = tl.load(PartLse + base + s, mask=s_ok, other=float("-inf"))
            o = tl.load(PartO + (base + s)[:, None] * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            m_new = tl.maximum(m, tl.max(lse, 0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all splits so far empty: keep weights 0, not NaN
            alpha = tl.exp2(m - m_ref)
            w = tl.exp2(lse - m_ref)
            den = den * alpha + tl.sum(w, 0)
            acc = acc * alpha + tl.sum(w[:, None] * o, 0)
            m = m_new
        out = acc / tl.where(den > 0, den, 1.0)  # den = 0 only for a row with no key (L = 0): zeros
        tl.store(Out + b * sob + h * soh + d * sod, out.to(Out.dtype.element_ty), mask=d_ok)


def _interpreted() -> bool:
    """Whether the kernels were made by Triton's interpreter. Triton 3.6 reads TRITON_INTERPRET when ``@triton.jit``
    runs: for its own library (tl.cdiv, tl.sum, ...) at ``import triton``, for these kernels at this module's import.
    The interpreter cannot call a compiled library function, so the variable must be set before triton is first
    imported in the process -- in practice, in a fresh process (the CPU tests start one)."""
    from triton.runtime import interpreter

    if not isinstance(_split_kernel, interpreter.InterpretedFunction):
        return False
    if not getattr(interpreter, "_flexgen_index_fix", False):
        # Triton 3.6's interpreter turns a scalar (a 1-element array) into a Python int with int(array), which numpy
        # >= 2.4 refuses ("only 0-dimensional arrays can be converted"): every loop with a loaded bound, like ours,
        # fails. The fix upstream (github.com/triton-lang/triton/pull/9172, after 3.6.0) squeezes the array first;
        # the same patch, applied to the interpreter's tensor patching only.
        patch_tensor = interpreter._patch_lang_tensor

        def patched(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

        interpreter._patch_lang_tensor = patched
        interpreter._flexgen_index_fix = True
    return True


def _check(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale, dtypes=DTYPES) -> None:
    """Host-side checks only: shapes, dtypes, devices (lengths' values would need a device sync)."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be [B, Hq, 1, D] (one query token per row), got shape {tuple(q.shape)}")
    B, Hq, _, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[3] != D:
            raise ValueError(f"{name} must be [B={B}, Hkv, S, D={D}] like q, got shape {tuple(t.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k's heads ({Hkv})")
    if S < 1:
        raise ValueError(f"k must hold at least one slot (S >= 1), got S={S}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[-1]) must be between 1 and {MAX_HEAD_DIM}, got {D}")
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among {[str(t) for t in dtypes]}, got q {q.dtype}, "
                         f"k {k.dtype}, v {v.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"lengths must be [B={B}], got shape {tuple(lengths.shape)}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be torch.int32 or torch.int64, got {lengths.dtype}")
    for name, t in (("k", k), ("v", v), ("lengths", lengths)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float or None (1/sqrt(D)), got {scale!r}")


def decode_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, *, scale: float | None = None,
                     num_splits: int | None = None, config: dict | None = None, interpret: bool = False) -> Tensor:
    """Attention of one query token per row over the first ``lengths[b]`` slots of a KV cache buffer (module
    docstring). q [B, Hq, 1, D], k/v [B, Hkv, S, D], lengths [B] int on q's device -> [B, Hq, 1, D] in q.dtype.

    ``num_splits``: key splits per (row, KV head), 1..S; default ``default_num_splits(B, Hkv, S)``. ``config``:
    overrides of ``kernel_config``'s choices (BLOCK_N, num_warps, num_stages; the benchmark's sweep). ``interpret``:
    run the Triton kernels in Triton's interpreter on CPU tensors (the tests; needs TRITON_INTERPRET=1 set before
    triton's first import, see ``_interpreted``). Without it, CPU tensors take ``decode_attention_reference``."""
    _check(q, k, v, lengths, scale)
    num_splits = _checked_splits(num_splits, q, k)
    _check_config(config)
    if q.device.type == "cpu" and not interpret:
        return decode_attention_reference(q, k, v, lengths, scale).to(q.dtype)
    if triton is None:
        raise RuntimeError("decode_attention needs triton on a GPU or with interpret=True: pip install triton==3.6.0")
    if interpret and q.device.type != "cpu":
        raise ValueError(f"interpret=True runs on CPU tensors, got q on {q.device}")
    if interpret and not _interpreted():
        raise RuntimeError("interpret=True needs TRITON_INTERPRET=1 in the environment before triton is first imported "
                           "in this process (triton 3.6 reads it when its functions are decorated)")
    launches, out = _launches(q, k, v, lengths, scale, num_splits, interpret, config)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        for kernel, grid, args, kwargs in launches:
            kernel[grid](*args, **kwargs)
    return out


def _checked_splits(num_splits, q: Tensor, k: Tensor) -> int:
    B, Hkv, S = k.shape[0], k.shape[1], k.shape[2]
    if num_splits is None:
        return default_num_splits(B, Hkv, S)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= S:
        raise ValueError(f"num_splits must be an int in 1..S={S} or None, got {num_splits!r}")
    return num_splits


def _check_config(config) -> None:
    if config is None:
        return
    if not isinstance(config, dict) or not set(config) <= {"BLOCK_N", "num_warps", "num_stages"}:
        raise ValueError(f"config must be None or a dict with keys among BLOCK_N, num_warps, num_stages, "
                         f"got {config!r}")
    for key, low in (("BLOCK_N", 16), ("num_warps", 1), ("num_stages", 1)):
        val = config.get(key, low)
        if not isinstance(val, int) or val < low or (key != "num_stages" and val & (val - 1)):
            raise ValueError(f"config[{key!r}] must be " + ("an int >= 1" if key == "num_stages" else
                             f"a power of two >= {low}") + f", got {val!r}")


def _empty(*shape: int, dtype: torch.dtype, device) -> Tensor:
    """Every buffer the kernels write (partials, output) comes from here: the tests fill it with NaN instead, to
    show that the kernels write every element."""
    return torch.empty(*shape, dtype=dtype, device=device)


def kernel_config(dtype: torch.dtype, group: int, head_dim: int) -> dict:
    """Stage 1's block of keys and launch options. First choices, not tuned (no GPU timing yet), each the largest
    key block whose sm_90 build (ptxas, Triton 3.6) keeps every value in registers (no spill to local memory):

    * G = 1 (elementwise scores): 32 keys, 4 warps -- 96 registers; 64 keys took 176;
    * G > 1 (tl.dot), 16-bit: 64 keys, 4 warps -- 84 registers (bf16, D 128);
    * G > 1, fp32: the IEEE dot runs on FMA units and spilled at 4 warps (255 registers + 544 bytes of stack);
      8 warps hold it in 80 registers;
    * D > 128 halves the key block (the same bytes per block).
    """
    wide = max(16, triton.next_power_of_2(head_dim)) > 128
    if group == 1:
        return {"BLOCK_N": 16 if wide else 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_N": 32 if wide else 64, "num_warps": 8 if dtype == torch.float32 else 4, "num_stages": 2}


def _launches(q, k, v, lengths, scale, num_splits, interpret=False, config=None):
    """The two kernel launches as (kernel, grid, args, kwargs), and the output they fill."""
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    G = Hq // Hkv
    use_dot = G > 1
    cfg = {**kernel_config(q.dtype, G, D), **(config or {})}
    block_g = max(16, triton.next_power_of_2(G)) if use_dot else 1
    block_d = max(16, triton.next_power_of_2(D))
    part_o = _empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
    part_lse = _empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    out = _empty(B, Hq, 1, D, dtype=q.dtype, device=q.device)
    launch = {} if interpret else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    split = (_split_kernel, (B, Hkv, num_splits),
             (q, k, v, lengths, part_o, part_lse, scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
              q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(), S, Hq, D),
             dict(G=G, NUM_SPLITS=num_splits, BLOCK_G=block_g, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d,
                  USE_DOT=use_dot, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **launch))
    combine = (_combine_kernel, (B, Hq),
               (part_o, part_lse, out, out.stride(0), out.stride(1), out.stride(3), Hq, D),
               dict(NUM_SPLITS=num_splits, BLOCK_S=min(32, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
                    **({} if interpret else {"num_warps": 4})))
    return [split, combine], out


def compile_kernels(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, *, scale: float | None = None,
                    num_splits: int | None = None, config: dict | None = None) -> list:
    """Compile (not run) the two kernels for these arguments' shapes, dtypes, strides and alignments, for the target
    of Triton's active driver; returns the compiled kernels (``.asm["ptx"]``, ``.asm["cubin"]``, ...). With a driver
    that names a GPU target, this works on tensors of any device: the CPU tests compile for an H100/H200 (sm_90)
    this way, so a kernel that does not compile for the GPU fails CI."""
    _check(q, k, v, lengths, scale)
    num_splits = _checked_splits(num_splits, q, k)
    _check_config(config)
    launches, _ = _launches(q, k, v, lengths, scale, num_splits, config=config)
    return [kernel.warmup(*args, grid=grid, **kwargs) for kernel, grid, args, kwargs in launches]


def decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float | None = None) -> Tensor:
    """The same attention in plain torch: per row, slice to lengths[b] keys, expand K/V to the query heads
    (repeat_interleave), softmax. Computes in fp32 (float64 for float64 inputs) and returns that dtype. Reads the
    lengths on the host (a device sync) and checks them against 1..S."""
    _check(q, k, v, lengths, scale, dtypes=DTYPES + (torch.float64,))
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=dt)
    for b, L in enumerate(lengths.tolist()):
        if not 1 <= L <= S:
            raise ValueError(f"lengths[{b}] must be in 1..S={S}, got {L}")
        kk = k[b, :, :L].to(dt).repeat_interleave(Hq // Hkv, dim=0)  # [Hq, L, D]
        vv = v[b, :, :L].to(dt).repeat_interleave(Hq // Hkv, dim=0)
        p = torch.softmax(scale * (q[b].to(dt) @ kk.transpose(1, 2)), dim=-1)  # [Hq, 1, L]
        out[b] = p @ vv
    return out
