"""FlexAttention's FLASH backend (flash-attn-4, CuTe DSL) against its Triton backend and cuDNN SDPA on this GPU:
forward of one [1, 32 q / 8 kv heads, S, 128] bf16 call at S = 32K and 128K, AttnSink(128, 1920) and causal block masks,
median of 10 CUDA-event timings after the first (compiling) call; each backend's output against the other's.

    pip install "flash-attn-4[cu13]==4.0.0b36"        # CUDA 13 torch; the run below used these wheels:
    #   flash_attn_4 4.0.0b36, nvidia_cutlass_dsl 4.8.1 (+ libs_base, libs_core, libs_cu13 4.8.1), cuda_bindings 13.5.0,
    #   cuda_pathfinder 1.9.1, apache_tvm_ffi 0.1.15.post2, torch_c_dlpack_ext 0.1.5, quack_kernels 0.6.5, einops 0.8.2,
    #   protobuf 7.36.2 -- installed with pip --target into a directory named by FA4_SITE (the device machine has no
    #   network; its .pth file needs site.addsitedir)
    FA4_SITE=/path/to/that/dir python analysis/repro/flex_flash_backend_probe.py out.json

Result: analysis/results/flex_flash_backend_NVIDIA_H200.json (torch 2.11.0+cu130, NVIDIA H200)."""
import json, os, site, sys, time, traceback
if os.environ.get("FA4_SITE"):
    site.addsitedir(os.environ["FA4_SITE"])  # processes nvidia_cutlass_dsl_packages.pth
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
torch._dynamo.config.recompile_limit = 64
res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
for mod in ("cutlass", "cutlass.cute", "flash_attn.cute"):
    try:
        __import__(mod)
        res[f"import {mod}"] = "ok"
    except Exception:
        res[f"import {mod}"] = traceback.format_exc()[-800:]
print(json.dumps(res), flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)


def sink(b, h, q, k):
    return (k <= q) & ((k < 128) | (q - k < 1920))


def causal(b, h, q, k):
    return k <= q


def med(fn, n=10):
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return sorted(ts)[n // 2]


for S in (32768, 131072):
    q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    sd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref_causal = sd()
    sdpa_ms = med(sd)
    for name, mm in (("AttnSink(128,1920)", sink), ("causal", causal)):
        bm = create_block_mask(mm, 1, 1, S, S, device="cuda", _compile=True)
        row, outs = {"S": S, "mask": name, "cudnn_sdpa_causal_ms": sdpa_ms}, {}
        for backend in ("FLASH", "TRITON"):
            try:
                f = torch.compile(lambda q, k, v, bk=backend, bm=bm: flex_attention(
                    q, k, v, block_mask=bm, enable_gqa=True, kernel_options={"BACKEND": bk}), dynamic=False)
                t0 = time.time(); outs[backend] = f(q, k, v); torch.cuda.synchronize()
                row[f"{backend}_first_call_s"] = round(time.time() - t0, 2)
                row[f"{backend}_ms"] = med(lambda: f(q, k, v))
            except Exception:
                row[f"{backend}_error"] = traceback.format_exc()[-1500:]
        if len(outs) == 2:
            row["flash_vs_triton_max_abs"] = float((outs["FLASH"].float() - outs["TRITON"].float()).abs().max())
        if name == "causal" and "TRITON" in outs:
            row["triton_vs_sdpa_max_abs"] = float((outs["TRITON"].float() - ref_causal.float()).abs().max())
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        json.dump(res, open(sys.argv[1], "w"), indent=1)
json.dump(res, open(sys.argv[1], "w"), indent=1)
