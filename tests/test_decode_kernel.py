"""flexgen_long.decode_kernel on a CPU: the Triton kernels themselves, run by Triton's interpreter, against the plain
torch reference (float64) at lengths 1..S around every key-block edge, MHA and GQA groups 2, 3, 4, 8, head dims 64,
80, 128, one split and several, splits wholly past a row's length, strided inputs; the kernels compiled for an
H100/H200 (sm_90) without a GPU; the reference against today's masked SDPA; the split heuristic; argument errors.

How the interpreter runs here. Triton 3.6 reads TRITON_INTERPRET when ``@triton.jit`` decorates a function: its own
library (tl.cdiv, tl.sum, ...) at ``import triton``, our kernels at ``import flexgen_long.decode_kernel``, and the
interpreter cannot call a compiled library function. Setting the variable in this module would come too late where
triton is already imported (torch.compile's Inductor imports it, even on a CPU, so earlier tests do), and would turn
every Triton kernel made later in the pytest process -- Inductor's, in the GPU suite -- into an interpreted one. So
the kernels run in a child process started with TRITON_INTERPRET=1 (this file run as a script), once for all cases,
and each test reads its case's result (``children`` fixture). The offline sm_90 compile runs in a second child,
without the variable, at the same time. Each child spends ~4 s importing torch and triton.

Interpreter limits (Triton's, documented in its debugging guide): no bfloat16 arithmetic -- it stores bf16 as uint16,
and ``tl.dot`` multiplies those bit patterns. The G = 1 path converts K/V to fp32 before any arithmetic, so bf16 runs
there; the GQA path (``tl.dot``) runs here in fp32 and fp16, and in bf16 on the GPU suite
(tests/gpu/test_gpu_decode_kernel.py). Lengths above S and 0 are clamped (module docstring) and tested as such.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flexgen_long.decode_kernel import (MIN_SPLIT_KEYS, TARGET_PROGRAMS, decode_attention, decode_attention_reference,
                                        default_num_splits)
from reference import rel_err

S = 512
LENGTHS = [1, 2, 17, 127, 128, 129, 300, S]
HEADS = {"mha": (2, 2), "g2": (4, 2), "g3": (6, 2), "g4": (8, 2), "g8": (8, 1)}  # (query heads, KV heads)
TOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}  # relative L2 error against the float64 reference


def _cases() -> dict[str, dict]:
    """Interpreter cases: id -> inputs. Every length of LENGTHS under every head layout, rows of different lengths
    in one batch (B 1..3), one split and several."""
    cases = {}
    rows = [([1, 2, 17], 4), ([127, 128], 1), ([129, 300, S], 3)]  # (lengths, num_splits)
    for name, (hq, hkv) in HEADS.items():
        D = 128 if name in ("g2", "g4") else 64
        for lens, splits in rows:
            cases[f"fp32_{name}_d{D}_L{'-'.join(map(str, lens))}_splits{splits}"] = dict(
                hq=hq, hkv=hkv, D=D, S=S, dtype="float32", lengths=lens, num_splits=splits)
    # the default split count (at S 512 it is 1; at S 2048 with B * Hkv = 2 it is 4), int64 lengths, a custom scale
    cases["fp32_g4_d64_default_splits_S2048"] = dict(hq=8, hkv=2, D=64, S=2048, dtype="float32", lengths=[2000],
                                                     num_splits=None, int64=True, scale=0.3)
    # head dim 80 (not a power of two: padded to 128 and masked), S 640 (not a power of two), 5 splits
    cases["fp32_g3_d80_S640"] = dict(hq=6, hkv=2, D=80, S=640, dtype="float32", lengths=[640, 333], num_splits=5)
    # K/V as views of a [B, S, Hkv, D] buffer, q of [B, 1, Hq, D]: no dim contiguous but D
    cases["fp32_g2_strided"] = dict(hq=4, hkv=2, D=64, S=S, dtype="float32", lengths=[300, 129], num_splits=4,
                                    strided=True)
    # splits wholly past L[b]: chunk = 64 keys, so row 0 (L 1) fills split 0 only and row 1 (L 65) splits 0-1
    cases["fp32_g4_empty_splits"] = dict(hq=8, hkv=2, D=64, S=S, dtype="float32", lengths=[1, 65], num_splits=8)
    cases["fp32_mha_empty_splits"] = dict(hq=2, hkv=2, D=64, S=S, dtype="float32", lengths=[3, 40], num_splits=16)
    # out-of-range lengths: clamped into 0..S (no read outside the buffer; L 0 -> zeros)
    cases["fp32_g2_clamped"] = dict(hq=4, hkv=2, D=64, S=S, dtype="float32", lengths=[0, S + 7, -3], num_splits=3,
                                    clamped=True)
    # 16-bit: bf16 on the elementwise path (G 1), fp16 on the dot path
    cases["bf16_mha_d128"] = dict(hq=2, hkv=2, D=128, S=S, dtype="bfloat16", lengths=[300, S, 17], num_splits=3)
    cases["fp16_g4_d128"] = dict(hq=8, hkv=2, D=128, S=S, dtype="float16", lengths=[17, 129, S], num_splits=3)
    cases["fp16_g3_d64"] = dict(hq=6, hkv=2, D=64, S=S, dtype="float16", lengths=[128, 1], num_splits=1)
    return cases


CASES = _cases()


def _inputs(c: dict, seed: int):
    gen = torch.Generator().manual_seed(seed)
    B, dt = len(c["lengths"]), getattr(torch, c["dtype"])
    if c.get("strided"):
        q = torch.randn(B, 1, c["hq"], c["D"], generator=gen).to(dt).transpose(1, 2)
        k, v = (torch.randn(B, c["S"], c["hkv"], c["D"], generator=gen).to(dt).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(B, c["hq"], 1, c["D"], generator=gen).to(dt)
        k, v = (torch.randn(B, c["hkv"], c["S"], c["D"], generator=gen).to(dt) for _ in range(2))
    lengths = torch.tensor(c["lengths"], dtype=torch.int64 if c.get("int64") else torch.int32)
    return q, k, v, lengths


def _expected_empty_splits(lengths, splits, block_n, S) -> int:
    """Splits holding no key, by the kernel's rule written out: chunk = ceil(ceil(L / splits) / BLOCK_N) * BLOCK_N,
    split s empty when s * chunk >= L (L clamped into 0..S)."""
    empty = 0
    for L in lengths:
        L = min(max(L, 0), S)
        chunk = -(-(-(-L // splits)) // block_n) * block_n
        empty += sum(s * chunk >= L for s in range(splits))
    return empty


# ---------------------------------------------------------------- the child processes (this file run as a script)

def _child_interpret(out_path: str) -> None:
    import flexgen_long.decode_kernel as dk

    made = []

    def poisoned(*shape, dtype, device):  # NaN everywhere: an element the kernels skip stays NaN
        t = torch.full(shape, float("nan"), dtype=dtype, device=device)
        made.append(t)
        return t

    dk._empty = poisoned
    results = {}
    for i, (name, c) in enumerate(CASES.items()):
        t0 = time.perf_counter()
        try:
            q, k, v, lengths = _inputs(c, seed=i)
            made.clear()
            out = dk.decode_attention(q, k, v, lengths, scale=c.get("scale"), num_splits=c["num_splits"],
                                      interpret=True)
            part_o, part_lse, _ = made
            ref_lengths = lengths.clamp(1, c["S"])  # clamped rows: L > S reads S keys; L <= 0 checked apart
            ref = dk.decode_attention_reference(q.double(), k.double(), v.double(), ref_lengths, scale=c.get("scale"))
            zero = lengths <= 0
            empty = torch.isneginf(part_lse)
            results[name] = {
                "dtype": str(out.dtype).removeprefix("torch."), "shape": list(out.shape),
                "nan_out": bool(out.isnan().any()),
                "nan_partials": bool(part_o.isnan().any() or part_lse.isnan().any()),
                "err": rel_err(out[~zero], ref[~zero]),
                "zero_rows_max": float(out[zero].abs().max()) if zero.any() else 0.0,
                "empty_splits": int(empty.sum()) // c["hq"],  # per (row, split), over query heads
                "empty_partials_max": float(part_o[empty].abs().max()) if empty.any() else 0.0,
                "num_splits": part_lse.shape[-1],
                "block_n": dk.kernel_config(q.dtype, c["hq"] // c["hkv"], c["D"])["BLOCK_N"],
                "seconds": round(time.perf_counter() - t0, 2)}
        except Exception as e:  # reported by the case's test, with the others still run
            import traceback

            results[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
    Path(out_path).write_text(json.dumps(results))


class _OfflineDriver:
    """Enough of Triton's driver for JITFunction.warmup to compile for a GPU target with no GPU present: the device
    and stream are never used (nothing launches), the target picks the backend (nvidia) and the architecture."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _child_compile(out_path: str) -> None:
    """Compile both kernels for sm_90 (H100/H200) at Llama shapes, with the specialisation a real launch gets
    (strides of 1 and 16-byte alignment seen from the tensors); report each build's registers and stack (spills)
    from the bundled cuobjdump, and whether the PTX uses tensor-core MMA."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    import flexgen_long.decode_kernel as dk

    driver.set_active(_OfflineDriver(GPUTarget("cuda", 90, 32)))
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    results = {}
    for name, (dt, hq, hkv, D) in COMPILE_SHAPES.items():
        try:
            B, Sc = 2, 4096
            q = torch.randn(B, hq, 1, D, dtype=dt)
            k, v = (torch.randn(B, hkv, Sc, D, dtype=dt) for _ in range(2))
            kernels = dk.compile_kernels(q, k, v, torch.full((B,), Sc, dtype=torch.int32))
            res = {"mma": "mma" in kernels[0].asm["ptx"]}
            for which, kern in zip(("split", "combine"), kernels):
                cubin = Path(out_path).with_suffix(f".{name}.{which}.cubin")
                cubin.write_bytes(kern.asm["cubin"])
                usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                                       text=True, check=True).stdout
                line = next(ln for ln in usage.splitlines() if "REG:" in ln)
                fields = dict(f.split(":") for f in line.split() if f.count(":") == 1)
                res[which] = {key: int(fields[key]) for key in ("REG", "STACK", "LOCAL")}
            results[name] = res
        except Exception as e:
            import traceback

            results[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
    Path(out_path).write_text(json.dumps(results))


COMPILE_SHAPES = {  # id: (dtype, query heads, KV heads, head dim)
    "llama2_7b_bf16": (torch.bfloat16, 32, 32, 128),
    "llama31_8b_bf16": (torch.bfloat16, 32, 8, 128),
    "g8_bf16_d256": (torch.bfloat16, 8, 1, 256),
    "g3_fp16_d80": (torch.float16, 6, 2, 80),
    "llama31_8b_fp32": (torch.float32, 32, 8, 128),
}


if __name__ == "__main__":
    {"interpret": _child_interpret, "compile": _child_compile}[sys.argv[1]](sys.argv[2])
    sys.exit(0)


# ---------------------------------------------------------------- the tests

def _need_triton():
    if importlib.util.find_spec("triton") is None:
        pytest.fail("triton is not importable: these tests run the Triton kernels (interpreter and offline compile); "
                    "install the dev extra (pip install -e '.[dev]', which pins triton==3.6.0)")


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """Start both child processes at once (the machine's second core runs one while the other works) and hand
    each fixture its own result when it asks."""
    _need_triton()
    tmp = tmp_path_factory.mktemp("decode_kernel")
    repo = Path(__file__).resolve().parents[1]
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # this checkout's package first, as in the pytest process (pyproject's pythonpath), whatever is installed
    base["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])])
    envs = {"interpret": {**base, "TRITON_INTERPRET": "1"},
            # a fresh cache, so that the compile really runs
            "compile": {**base, "TRITON_CACHE_DIR": str(tmp / "triton_cache")}}
    procs = {mode: (subprocess.Popen([sys.executable, __file__, mode, str(tmp / f"{mode}.json")], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo),
                    time.perf_counter())
             for mode, env in envs.items()}
    done = {}

    def result(mode: str) -> dict:
        if mode not in done:
            proc, t0 = procs[mode]
            _, err = proc.communicate(timeout=600)
            out = tmp / f"{mode}.json"
            if proc.returncode != 0 or not out.is_file():
                pytest.fail(f"the {mode} child failed ({proc.returncode}):\n{err[-4000:]}")
            done[mode] = json.loads(out.read_text())
            print(f"\n{mode} child: {len(done[mode])} cases, {time.perf_counter() - t0:.1f} s")
        return done[mode]

    yield result
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def interpreted(children):
    return children("interpret")


@pytest.fixture(scope="module")
def compiled(children):
    return children("compile")


def _result(results: dict, name: str) -> dict:
    r = results[name]
    if "error" in r:
        pytest.fail(f"{name}: {r['error']}")
    return r


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(interpreted, name):
    """Every output element written (the buffers start as NaN), no NaN anywhere, relative L2 error against the
    float64 reference within the dtype's tolerance, output shape and dtype of q."""
    c, r = CASES[name], _result(interpreted, name)
    assert r["dtype"] == c["dtype"] and r["shape"] == [len(c["lengths"]), c["hq"], 1, c["D"]]
    assert not r["nan_out"] and not r["nan_partials"], r
    assert r["err"] < TOL[c["dtype"]], f"relative error {r['err']:.2e}"


@pytest.mark.parametrize("name", list(CASES))
def test_empty_splits_write_neg_inf_and_zero(interpreted, name):
    """The splits that hold no key are exactly those the chunk rule predicts, and each wrote lse -inf and a zero
    partial (so stage 2 gives it weight 0)."""
    c, r = CASES[name], _result(interpreted, name)
    splits = r["num_splits"]
    assert splits == (c["num_splits"] or default_num_splits(len(c["lengths"]), c["hkv"], c["S"]))
    want = _expected_empty_splits(c["lengths"], splits, r["block_n"], c["S"])
    assert r["empty_splits"] == want
    assert r["empty_partials_max"] == 0.0


def test_cases_cover_the_lengths_and_splits():
    """The case table itself: each length of LENGTHS under each head layout, batches of 1..3 rows, one split and
    several, and splits past L that are really empty (so the tests above check something)."""
    for name in HEADS:
        seen = {L for n, c in CASES.items() if n.startswith(f"fp32_{name}_") for L in c["lengths"]}
        assert set(LENGTHS) <= seen, (name, set(LENGTHS) - seen)
    assert {len(c["lengths"]) for c in CASES.values()} >= {1, 2, 3}
    assert {1, 4, 16} <= {c["num_splits"] for c in CASES.values()}
    assert _expected_empty_splits([1, 65], 8, 64, S) == 7 + 6


def test_out_of_range_lengths_are_clamped(interpreted):
    """L <= 0 gives a zero row, L > S reads the S slots (the reference at L = S): no read outside the buffer."""
    r = _result(interpreted, "fp32_g2_clamped")
    assert r["zero_rows_max"] == 0.0
    assert r["err"] < TOL["float32"]


@pytest.mark.parametrize("name", list(COMPILE_SHAPES))
def test_kernels_compile_for_sm90(compiled, name):
    """Both kernels build for an H100/H200 (sm_90, ptxas) at this shape; 16-bit builds keep everything in registers
    (no stack: a spill would cost bandwidth on the path that decodes), the GQA path uses tensor-core MMA."""
    r = _result(compiled, name)
    dt, hq, hkv, _ = COMPILE_SHAPES[name]
    assert r["mma"] == (hq > hkv and dt != torch.float32), r
    if dt != torch.float32:
        assert r["split"]["STACK"] == 0 and r["split"]["LOCAL"] == 0, r
        assert r["combine"]["STACK"] == 0, r


# ---------------------------------------------------------------- in-process: reference, dispatch, heuristic, errors


def _sdpa_masked(q, k, v, lengths):
    """Today's decode path for a full layer: SDPA over the whole buffer with the mask arange(S) < L per row."""
    S = k.shape[2]
    mask = (torch.arange(S) < lengths[:, None])[:, None, None, :].expand(-1, q.shape[1], 1, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 1)])
def test_reference_equals_masked_sdpa(hq, hkv):
    q = torch.randn(3, hq, 1, 32, dtype=torch.float64)
    k, v = torch.randn(2, 3, hkv, 200, 32, dtype=torch.float64)
    lengths = torch.tensor([1, 129, 200])
    assert rel_err(decode_attention_reference(q, k, v, lengths), _sdpa_masked(q, k, v, lengths)) < 1e-12


def test_cpu_without_interpreter_takes_the_reference():
    q = torch.randn(2, 4, 1, 64, dtype=torch.bfloat16)
    k, v = torch.randn(2, 2, 2, 96, 64, dtype=torch.bfloat16)
    lengths = torch.tensor([5, 96], dtype=torch.int32)
    out = decode_attention(q, k, v, lengths)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert torch.equal(out, decode_attention_reference(q, k, v, lengths).to(torch.bfloat16))


def test_interpret_needs_the_variable_at_import():
    """In this process triton was imported without TRITON_INTERPRET: interpret=True must say so, not run compiled
    kernels on CPU pointers."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("run this suite without TRITON_INTERPRET=1 (the interpreter tests set it in their own process)")
    _need_triton()
    q = torch.randn(1, 2, 1, 16)
    k = torch.randn(1, 2, 32, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        decode_attention(q, k, k, torch.tensor([3]), interpret=True)


@pytest.mark.parametrize("B", [1, 2, 8, 64])
@pytest.mark.parametrize("hkv", [1, 8, 32])
@pytest.mark.parametrize("S", [64, 512, 4096, 8192, 131072])
def test_default_splits(B, hkv, S):
    """The fewest splits reaching TARGET_PROGRAMS programs, unless that would give splits under MIN_SPLIT_KEYS
    slots; a function of shapes only."""
    n = default_num_splits(B, hkv, S)
    cap = max(1, S // MIN_SPLIT_KEYS)
    assert 1 <= n <= cap
    if n < cap:
        assert B * hkv * n >= TARGET_PROGRAMS
    if n > 1:
        assert B * hkv * (n - 1) < TARGET_PROGRAMS
    if (B, hkv, S) == (1, 8, 131072):  # Llama-3.1-8B at batch 1: 33 splits of ~4K keys, 264 programs
        assert n == 33
    if (B, hkv, S) == (1, 32, 131072):  # Llama-2-7B: 9 splits
        assert n == 9


def _args(B=2, hq=4, hkv=2, S=64, D=32, dtype=torch.float32):
    return (torch.randn(B, hq, 1, D, dtype=dtype), torch.randn(B, hkv, S, D, dtype=dtype),
            torch.randn(B, hkv, S, D, dtype=dtype), torch.tensor([1, S][:B] + [S] * max(0, B - 2)))


BAD = {  # id: (change to the arguments, message fragment)
    "q_3d": (lambda a: a.update(q=a["q"][:, :, 0]), r"q must be \[B, Hq, 1, D\]"),
    "q_len_2": (lambda a: a.update(q=a["q"].expand(-1, -1, 2, -1)), r"q must be \[B, Hq, 1, D\]"),
    "k_batch": (lambda a: a.update(k=a["k"][:1]), r"k must be \[B=2, Hkv, S, D=32\]"),
    "k_dim": (lambda a: a.update(k=a["k"][..., :16]), r"k must be \[B=2, Hkv, S, D=32\]"),
    "v_shape": (lambda a: a.update(v=a["v"][:, :, :10]), r"v must have k's shape"),
    "groups": (lambda a: a.update(k=torch.randn(2, 3, 64, 32), v=torch.randn(2, 3, 64, 32)),
               r"q's heads \(4\) must be a multiple of k's heads \(3\)"),
    "head_dim": (lambda a: a.update(q=torch.randn(2, 4, 1, 320), k=torch.randn(2, 2, 64, 320),
                                    v=torch.randn(2, 2, 64, 320)), r"head dim .* between 1 and 256, got 320"),
    "dtype_mix": (lambda a: a.update(k=a["k"].half()), r"q, k, v must share one dtype"),
    "dtype_f64": (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()),
                  r"must share one dtype among \['torch.float16', 'torch.bfloat16', 'torch.float32'\]"),
    "lengths_shape": (lambda a: a.update(lengths=a["lengths"][:1]), r"lengths must be \[B=2\]"),
    "lengths_dtype": (lambda a: a.update(lengths=a["lengths"].float()), r"lengths must be torch.int32 or torch.int64"),
    "lengths_device": (lambda a: a.update(lengths=a["lengths"].to("meta")), r"lengths must be on q's device"),
    "scale": (lambda a: a.update(scale=-1.0), r"scale must be a positive finite float or None"),
    "scale_nan": (lambda a: a.update(scale=math.nan), r"scale must be a positive finite float or None"),
    "splits_0": (lambda a: a.update(num_splits=0), r"num_splits must be an int in 1..S=64 or None"),
    "splits_big": (lambda a: a.update(num_splits=65), r"num_splits must be an int in 1..S=64 or None"),
    "splits_float": (lambda a: a.update(num_splits=2.0), r"num_splits must be an int in 1..S=64 or None"),
    "config_key": (lambda a: a.update(config={"BLOCK_M": 64}), r"config must be None or a dict with keys among"),
    "config_block": (lambda a: a.update(config={"BLOCK_N": 24}), r"config\['BLOCK_N'\] must be a power of two >= 16"),
    "config_stages": (lambda a: a.update(config={"num_stages": 0}), r"config\['num_stages'\] must be an int >= 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_argument_errors(case):
    change, msg = BAD[case]
    q, k, v, lengths = _args()
    a = dict(q=q, k=k, v=v, lengths=lengths)
    change(a)
    kw = {key: a.pop(key) for key in ("scale", "num_splits", "config") if key in a}
    with pytest.raises(ValueError, match=msg):
        decode_attention(a["q"], a["k"], a["v"], a["lengths"], **kw)


@pytest.mark.parametrize("lengths", [[0, 64], [1, 65]])
def test_reference_checks_lengths(lengths):
    q, k, v, _ = _args()
    with pytest.raises(ValueError, match=r"lengths\[\d\] must be in 1..S=64"):
        decode_attention_reference(q, k, v, torch.tensor(lengths))

