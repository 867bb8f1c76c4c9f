"""FP8 KV caches on a CPU: quantisation bounds; flexgen_long.kv_fp8's Triton kernels run by Triton's interpreter
against the float64 reference (MHA and GQA groups, head dims 64 / 80 / 128, rows of different lengths around the key
blocks, splits past a row's length, lengths 0 and above S clamped, every output element written); the kernels compiled
for an H100/H200 (sm_90) without a GPU, with no register spills; the cache layout, the route table's rows and the
memory plan under ``Policy(kv_cache_dtype="fp8")``; generate() with FP8 full-layer caches against the model's dtype.

The interpreter runs in a child process started with TRITON_INTERPRET=1 (Triton reads it when ``@triton.jit``
decorates, at import: too late in this process, where Inductor has imported triton), once for all cases; the offline
sm_90 build runs in a second child at the same time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexgen_long import kv_fp8
from flexgen_long.cache import ModelCache, plan_cache, serving_capacity
from flexgen_long.engine import Engine
from flexgen_long.generation import generate
from flexgen_long.models import longgen_llama
from flexgen_long.patterns import AttnSink, Full
from flexgen_long.policy import Policy
from flexgen_long.routes import route
from reference import rel_err

FP8 = Policy(kv_cache_dtype="fp8")
# (query heads, KV heads, D, S, lengths, num_splits): interpreter cases
CASES = {
    "mha_d64": (2, 2, 64, 300, [1, 17, 64, 65, 300], 3),
    "g4_d128": (8, 2, 128, 512, [129, 512, 2], 4),
    "g3_d80": (6, 2, 80, 640, [640, 333], 5),
    "g8_d64_one_split": (8, 1, 64, 200, [200, 7], 1),
    "mha_empty_splits": (2, 2, 64, 512, [3, 40], 16),
    "g2_clamped": (4, 2, 64, 256, [0, 263, -3], 3),
}


def _inputs(case, seed):
    hq, hkv, D, S, lengths, _ = case
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    q = torch.randn(B, hq, 1, D, generator=g)
    k8, ks = kv_fp8.quantize(3 * torch.randn(B, hkv, S, D, generator=g))
    v8, vs = kv_fp8.quantize(torch.randn(B, hkv, S, D, generator=g))
    return q, k8, ks, v8, vs, torch.tensor(lengths, dtype=torch.int32)


def _child_interpret(out: str) -> None:
    made = []

    def poisoned(*shape, dtype, device):  # NaN everywhere: an element the kernels skip stays NaN
        made.append(torch.full(shape, float("nan"), dtype=dtype, device=device))
        return made[-1]

    kv_fp8._empty = poisoned
    res = {}
    for i, (name, case) in enumerate(CASES.items()):
        q, k8, ks, v8, vs, L = _inputs(case, i)
        made.clear()
        o = kv_fp8.decode_attention(q, k8, ks, v8, vs, L, num_splits=case[5], interpret=True)
        ref = kv_fp8.decode_attention_reference(q, k8, ks, v8, vs, L, dtype=torch.float64)
        part_o, part_lse, _ = made
        res[name] = {"err": rel_err(o, ref), "nan": bool(o.isnan().any() or part_o.isnan().any()
                                                          or part_lse.isnan().any()),
                     "zero_rows_max": float(o[L <= 0].abs().max()) if (L <= 0).any() else 0.0}
    Path(out).write_text(json.dumps(res))


class _OfflineDriver:
    """Enough of Triton's driver for JITFunction.warmup to build for a GPU target with no GPU (nothing launches)."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _child_compile(out: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    driver.set_active(_OfflineDriver(GPUTarget("cuda", 90, 32)))
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    res = {}
    for name, (hq, hkv, D) in {"llama2_7b": (32, 32, 128), "llama3_1_8b": (32, 8, 128), "smollm2": (9, 3, 64),
                               "d256": (8, 2, 256)}.items():
        q = torch.randn(1, hq, 1, D, dtype=torch.bfloat16)
        k8, ks = kv_fp8.quantize(torch.randn(1, hkv, 4096, D))
        v8, vs = kv_fp8.quantize(torch.randn(1, hkv, 4096, D))
        kernels = kv_fp8.compile_kernels(q, k8, ks, v8, vs, torch.full((1,), 4096, dtype=torch.int32))
        row = {"mma": "mma" in kernels[0].asm["ptx"]}
        for which, kern in zip(("split", "combine"), kernels):
            cubin = Path(out).with_suffix(f".{name}.{which}.cubin")
            cubin.write_bytes(kern.asm["cubin"])
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                                   text=True, check=True).stdout
            line = next(ln for ln in usage.splitlines() if "REG:" in ln)
            fields = dict(f.split(":") for f in line.split() if f.count(":") == 1)
            row[which] = {key: int(fields[key]) for key in ("REG", "STACK", "LOCAL")}
        res[name] = row
    Path(out).write_text(json.dumps(res))


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """Both children at once: the interpreter's cases and the offline sm_90 build."""
    d = tmp_path_factory.mktemp("kv_fp8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = {}
    for which, extra in (("interpret", {"TRITON_INTERPRET": "1"}), ("compile", {})):
        out = d / f"{which}.json"
        procs[which] = (out, subprocess.Popen([sys.executable, __file__, which, str(out)], env={**env, **extra},
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    res = {}
    for which, (out, p) in procs.items():
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"{which} child failed:\n{log[-4000:]}"
        res[which] = json.loads(out.read_text())
    return res


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_in_interpreter_matches_reference(children, name):
    r = children["interpret"][name]
    assert not r["nan"], "an output or partial element was never written"
    assert r["err"] < 1e-5  # fp32 arithmetic on both sides over the same dequantised values
    assert r["zero_rows_max"] == 0.0  # a row of length <= 0 gets zeros


@pytest.mark.parametrize("name", ["llama2_7b", "llama3_1_8b", "smollm2", "d256"])
def test_kernels_build_for_sm90_without_spills(children, name):
    r = children["compile"][name]
    for which in ("split", "combine"):
        assert r[which]["STACK"] == 0 and r[which]["LOCAL"] == 0, r
        assert r[which]["REG"] <= 255
    assert r["mma"] == (name != "llama2_7b")  # GQA groups take the tensor cores, one query head the vector units


def test_quantize_round_trip_bound():
    """Every element within half an e4m3 step of its vector's scale-relative grid: |x - x'| <= 2^-4 |x| for normal
    values, and at most max|x| * 2^-9 / 448 * ... for the smallest; the simple bound 2^-4 * max|x| per vector holds."""
    x = torch.randn(4, 3, 100, 64) * torch.logspace(-3, 3, 100)[None, None, :, None]
    x8, s = kv_fp8.quantize(x)
    back = kv_fp8.dequantize(x8, s, torch.float32)
    assert x8.dtype == torch.float8_e4m3fn and s.shape == x.shape[:-1]
    assert ((back - x).abs() <= 2 ** -4 * x.abs().amax(-1, keepdim=True)).all()
    assert ((back - x).abs() <= 2 ** -4 * x.abs() + 2 ** -9 * s.unsqueeze(-1)).all()  # relative, or subnormal
    zero8, zs = kv_fp8.quantize(torch.zeros(2, 8))
    assert (kv_fp8.dequantize(zero8, zs, torch.float32) == 0).all()


def test_decode_attention_errors():
    q, k8, ks, v8, vs, L = _inputs(CASES["mha_d64"], 0)
    with pytest.raises(ValueError, match="k and v must be torch.float8_e4m3fn"):
        kv_fp8.decode_attention(q, k8.float(), ks, v8, vs, L)
    with pytest.raises(ValueError, match="k_scale must be float32"):
        kv_fp8.decode_attention(q, k8, ks.half(), v8, vs, L)
    with pytest.raises(ValueError, match="num_splits must be an int in 1..S=300"):
        kv_fp8.decode_attention(q, k8, ks, v8, vs, L, num_splits=301)
    with pytest.raises(ValueError, match="q must be"):
        kv_fp8.decode_attention(q[:, :, :0], k8, ks, v8, vs, L)


def test_policy_field():
    with pytest.raises(ValueError, match=r"Policy.kv_cache_dtype must be one of \(None, 'fp8'\)"):
        Policy(kv_cache_dtype="int8")
    assert FP8.stores_fp8(Full()) and not FP8.stores_fp8(AttnSink(4, 60)) and not Policy().stores_fp8(Full())


def test_routes_under_fp8():
    """Decode: a full layer's FP8 cache takes fp8_decode, a sparse layer keeps SDPA; prefill keeps its kernels and adds
    the bytes of quantising the chunk and reading every key so far back dequantised."""
    kw = dict(device="cpu", heads=(8, 2, 128))
    bf16, fp8 = Policy().on("cpu"), FP8.on("cpu")
    assert route(Full(), "decode", policy=fp8, q_len=1, slots=1000, lo=999, **kw).kernel == "fp8_decode"
    assert route(Full(), "decode", policy=bf16, q_len=1, slots=1000, lo=999, **kw).kernel == "sdpa_exact"
    sink = AttnSink(4, 60).bind_heads(2)
    assert route(sink, "decode", policy=fp8, q_len=1, slots=64, lo=999, **kw) == \
        route(sink, "decode", policy=bf16, q_len=1, slots=64, lo=999, **kw)
    for phase, offset in (("first", 0), ("later", 900)):
        a = route(Full(), phase, policy=bf16, q_len=100, offset=offset, chunk=100, slots=1000, **kw)
        b = route(Full(), phase, policy=fp8, q_len=100, offset=offset, chunk=100, slots=1000, **kw)
        assert a.kernel == b.kernel
        assert b.bytes - a.bytes == 2 * 2 * 100 * 128 * 4 + 2 * 2 * (offset + 100) * 128 * 2
    assert route(Full(), "train", policy=fp8, q_len=100, **kw) == route(Full(), "train", policy=bf16, q_len=100, **kw)


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    return longgen_llama(256, 4, 4, 2, 128, 256, 2048, full_layers=[1, 2], sparse_pattern=AttnSink(16, 48)).eval()


def test_cache_layout_and_memory_plan(hybrid):
    """Full layers hold float8 values and fp32 scales, sparse layers the model's dtype; the plan equals what is
    allocated, about half the bf16 plan's full-layer bytes; serving_capacity fits more rows."""
    plan = plan_cache(hybrid, 3, 500, torch.bfloat16, FP8)
    cache = ModelCache(hybrid, 3, 500, torch.bfloat16, "cpu", policy=FP8)
    assert cache.nbytes == plan.total_bytes
    kinds = [(c.k.dtype, c.k_scale is not None) for c in cache.layers.values()]
    assert kinds == [(torch.bfloat16, False), (torch.float8_e4m3fn, True), (torch.float8_e4m3fn, True),
                     (torch.bfloat16, False)]
    full = [lp.bytes for lp in plan.layers if lp.fp8]
    full_bf16 = [lp.bytes for lp in plan_cache(hybrid, 3, 500, torch.bfloat16).layers if lp.pattern.is_full]
    D = 32
    assert full == [3 * 500 * (2 * (2 * D + 8) + 4)] * 2 and full_bf16 == [3 * 500 * (2 * 4 * D + 4)] * 2
    assert "fp8" in str(plan)
    cap = [serving_capacity(hybrid, 1500, 100, 2**27, device="cpu", policy=p)["batch"] for p in (Policy(), FP8)]
    assert cap[1] > cap[0] > 0


def test_copy_row_copies_scales(hybrid):
    e = Engine(hybrid, FP8)
    e.reserve(2, 300)
    p = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    e.prefill(p, 0)
    e.copy_row(0, 1)
    for c in e.cache.layers.values():
        for t in c.tensors:
            assert torch.equal(t[0].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t[0],
                               t[1].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t[1])
    out = e.step(torch.tensor([5, 5]))
    assert torch.equal(out[0], out[1])


def test_generate_fp8_against_model_dtype(hybrid):
    """Two rows at different positions, teacher-forced over 30 decode steps: the FP8 engine's logits within 2e-2
    (relative) of the fp32 engine's with the same argmax, from the prefill on (it attends to the keys as stored);
    chunking the prefill changes nothing but rounding; greedy generate() agrees on these prompts."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (333, 64)]
    engines = [Engine(hybrid), Engine(hybrid, FP8), Engine(hybrid, FP8.replace(prefill_chunk=128))]
    first = []
    for e in engines:
        e.reserve(2, 400)
        first.append([e.prefill(p, i) for i, p in enumerate(prompts)])
    for a, b, c in zip(*first):
        assert rel_err(b, a) < 2e-2 and rel_err(c, b) < 1e-5
    for t in range(30):
        tok = torch.randint(0, 256, (2,), generator=g)
        a, b, c = (e.step(tok) for e in engines)
        assert rel_err(b, a) < 2e-2 and rel_err(c, b) < 1e-5
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    want = generate(hybrid, [p.tolist() for p in prompts], max_new_tokens=12)
    got = generate(hybrid, [p.tolist() for p in prompts], max_new_tokens=12, policy=FP8)
    assert [w.tokens for w in want] == [x.tokens for x in got]


if __name__ == "__main__":  # the children
    {"interpret": _child_interpret, "compile": _child_compile}[sys.argv[1]](sys.argv[2])
