"""GPU check of the hybrid model: compiled flex forward+backward, no recompiles across packed layouts, GPU flex == CPU
dense-mask reference, SDPA with enable_gqa vs expanded K/V for the full layers, and the flex guard. Prints a table and
writes JSON to $OUT (or ./outputs). Needs a CUDA GPU, and torchtune importable (pip install -e . in the environment):

    python analysis/gpu_check_model.py

Timings go through flexgen_long.timing.measure (warm-up first, then CUDA-event timings; median).
"""

from __future__ import annotations

import itertools
import json
import os
import time

import torch
from torch._dynamo.utils import counters

from flexgen_long.attention import flex_attention_compiled
from flexgen_long.masks import build_block_mask
from flexgen_long.models import longgen_llama3_2_1b, longgen_tiny
from flexgen_long.patterns import AttnSink, Full
from flexgen_long.timing import measure

OUT = os.environ.get("OUT", "outputs")
os.makedirs(OUT, exist_ok=True)
card = torch.cuda.get_device_name().replace(" ", "_")
res: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": {}}


def save():
    with open(os.path.join(OUT, "model_gpu_check.json"), "w") as f:
        json.dump(res, f, indent=1)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def random_doc_ids(batch: int, seq: int, n_docs: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq] ids with n_docs documents at random cut points (a new layout every call)."""
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq - 1, generator=gen)[: n_docs - 1] + 1
        ids = torch.zeros(seq, dtype=torch.long)
        for c in cuts.tolist():
            ids[c:] += 1
        rows.append(ids)
    return torch.stack(rows)


def timed(fn, n):
    """Median ms of ``fn(i)`` over ``n`` timed calls after a warm-up call (i counts the calls: steps vary with it)."""
    calls = itertools.count()
    return measure(lambda: fn(next(calls)), "cuda", budget_ms=0, min_reps=n, max_reps=n)["median_ms"]


gen = torch.Generator().manual_seed(0)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# 1. GPU flex (compiled) == CPU dense-mask SDPA reference, fp32, tiny model, packed and unpacked, logits and grads
torch.manual_seed(0)
cpu = longgen_tiny(sparse_pattern=AttnSink(sink=4, window=100))
gpu = longgen_tiny(sparse_pattern=AttnSink(sink=4, window=100)).cuda()
gpu.load_state_dict(cpu.state_dict())
S = 1024
tok = torch.randint(0, 256, (2, S), generator=gen)
for name, doc in (("unpacked", None), ("packed", random_doc_ids(2, S, 4, gen))):
    ref = cpu(tok, doc_ids=doc)  # CPU with grad -> dense-mask SDPA in every sparse/packed layer
    ref.square().mean().backward()
    g0 = graphs()
    out = gpu(tok.cuda(), doc_ids=None if doc is None else doc.cuda())  # GPU -> compiled flex
    out.square().mean().backward()
    d_logit = (out.cpu() - ref).abs().max().item()
    d_grad = max((a.grad.cpu() - b.grad).abs().max().item() / (b.grad.abs().max().item() + 1e-12)
                 for a, b in zip(gpu.parameters(), cpu.parameters()))
    res["checks"][f"tiny_fp32_{name}_vs_cpu_dense"] = {"max_abs_logit_diff": d_logit, "max_rel_grad_diff": d_grad,
                                                       "graphs_compiled": graphs() - g0}
    print(f"tiny fp32 {name:9s}: GPU flex vs CPU dense  max|dlogit| {d_logit:.2e}  max rel dgrad {d_grad:.2e}")
    assert d_logit < 1e-4 and d_grad < 1e-3, (d_logit, d_grad)
    cpu.zero_grad(), gpu.zero_grad()
save()


# 2. recompiles: 20 steps with new packed layouts after a warm-up, tiny fp32 and 1B-shape bf16
def train_steps(model, seq, batch, vocab, steps, n_docs):
    toks = torch.randint(0, vocab, (batch, seq), device="cuda")

    def step(i):
        doc = random_doc_ids(batch, seq, n_docs + i % 5, gen).cuda()  # layout and document count change every step
        loss = model(toks, doc_ids=doc).float().square().mean() if vocab < 1000 else \
            torch.nn.functional.cross_entropy(model(toks, doc_ids=doc).flatten(0, 1), toks.flatten())
        loss.backward()

    t0 = time.perf_counter()
    step(0), step(1)  # warm-up: compiles flex fwd+bwd for each distinct pattern
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    g0 = graphs()
    ms = timed(step, steps)
    return {"warmup_s": round(warm_s, 2), "ms_per_step": round(ms, 2), "recompiles_after_warmup": graphs() - g0,
            "graphs_total": graphs()}


r = train_steps(gpu, 2048, 2, 256, 20, 3)
res["checks"]["tiny_fp32_20_packed_steps"] = r
print(f"tiny fp32 2x2048 packed fwd+bwd: {r}")
assert r["recompiles_after_warmup"] == 0
save()
del cpu, gpu

big = longgen_llama3_2_1b(max_seq_len=16384).to("cuda", torch.bfloat16)
S_BIG = 16384
r = train_steps(big, S_BIG, 1, 128_256, 20, 4)
r["full_layers"] = [i for i, l in enumerate(big.layers) if isinstance(l.attn.pattern, Full)]
r["sparse_pattern"] = repr(big.layers[0].attn.pattern)
r["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
res["checks"]["llama3_2_1b_bf16_16k_20_packed_steps"] = r
print(f"1B bf16 1x{S_BIG} packed fwd+bwd: {r}")
assert r["recompiles_after_warmup"] == 0
save()

# unpacked: full layers take SDPA (is_causal), sparse ones flex; compare with all-full (every layer SDPA)
toks = torch.randint(0, 128_256, (1, S_BIG), device="cuda")


def fb(model):
    def step(i):
        torch.nn.functional.cross_entropy(model(toks).flatten(0, 1), toks.flatten()).backward()
    step(0)
    return timed(step, 5)


hyb_ms = fb(big)
del big
dense = longgen_llama3_2_1b(max_seq_len=16384, full_layers="all").to("cuda", torch.bfloat16)
dense_ms = fb(dense)
del dense
res["checks"]["llama3_2_1b_bf16_16k_unpacked_fwd_bwd_ms"] = {"hybrid": round(hyb_ms, 1), "all_full_sdpa":
                                                             round(dense_ms, 1)}
print(f"1B bf16 1x{S_BIG} unpacked fwd+bwd ms: hybrid {hyb_ms:.1f}  all-full (SDPA) {dense_ms:.1f}")
save()

# 3. SDPA causal with enable_gqa vs K/V expanded (which backend torch picks matters for the full layers). Both warmed
# up (flexgen_long.timing); the expanded variant times the expansion too, as the full layers' code path pays it.
q = torch.randn(1, 32, S_BIG, 64, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 8, S_BIG, 64, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
F = torch.nn.functional
gqa_ms = timed(lambda i: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 20)
exp_ms = timed(lambda i: F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                        is_causal=True), 20)
res["checks"]["sdpa_causal_16k_fwd_ms"] = {"enable_gqa": round(gqa_ms, 3), "expanded_kv": round(exp_ms, 3),
                                           "method": "median of 20 calls after a warm-up; expansion inside the call"}
print(f"SDPA causal 16K fwd ms: enable_gqa {gqa_ms:.3f}  expanded K/V {exp_ms:.3f}")
save()

# 4. the guard: past the recompile limit, a long flex call must raise instead of running uncompiled
torch._dynamo.config.recompile_limit = 1  # this function has compiled several graphs above: the next new shape is over
bm = build_block_mask(AttnSink(4, 100), 4096 + 128, 4096 + 128, device="cuda")
x = torch.randn(1, 1, 4096 + 128, 64, device="cuda")
try:
    flex_attention_compiled(x, x, x, bm)
    raised = None
except Exception as e:  # FlexNotCompiledError (eager fallback caught by our guard) or dynamo's fullgraph hard failure
    raised = type(e).__name__
res["checks"]["guard_raises_past_recompile_limit"] = raised
print(f"guard past the recompile limit raises: {raised}")
assert raised in ("FlexNotCompiledError", "FailOnRecompileLimitHit"), raised
res["ok"] = True
save()
os.replace(os.path.join(OUT, "model_gpu_check.json"), os.path.join(OUT, f"model_gpu_check_{card}.json"))
