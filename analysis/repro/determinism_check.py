"""Run-to-run determinism of generate() on the GPU (a 6-layer model of the Llama-2-7B layer shape, bf16, 32K prompt):
prefill logits, caches and a decode step, eager and compiled, then greedy tokens of two generate() calls per mode.
Result: analysis/results/logs/determinism_6layers_32K_NVIDIA_H200.log. Run from the repository root: python analysis/repro/determinism_check.py"""
import torch
from flexgen_long import longgen_llama, AttnSink
from flexgen_long.cache import ModelCache
from flexgen_long.generation import prefill, generate, decode_step, exact_layers
torch.manual_seed(0)
m = longgen_llama(32000, 6, 32, 32, 4096, 11008, 40000, sparse_pattern=AttnSink(128, 1920)).to('cuda', torch.bfloat16).eval()
n = 32768
p = torch.randint(0, 32000, (n,), device='cuda')
with torch.inference_mode():
    for comp in (False, True):
        outs, caches = [], []
        for _ in range(2):
            c = ModelCache(m, 1, n + 64, torch.bfloat16, 'cuda')
            outs.append(prefill(m, c, p, 0, None, compile=comp)); caches.append(c)
        same_cache = all(torch.equal(a.k, b.k) and torch.equal(a.v, b.v) for a, b in zip(caches[0].layers.values(), caches[1].layers.values()))
        top2 = outs[0].float().topk(2).values
        print('prefill compile', comp, 'logits bitwise equal', torch.equal(*outs), 'max diff',
              (outs[0].float() - outs[1].float()).abs().max().item(), 'caches equal', same_cache,
              'top2 gap', (top2[0] - top2[1]).item(), flush=True)
        tok = torch.tensor([5], device='cuda'); pos = torch.tensor([n], device='cuda')
        ex = exact_layers(m, caches[0], n, n)
        d = [decode_step(m, c, tok, pos, ex) for c in caches]
        print('  decode bitwise equal', torch.equal(*d), (d[0].float() - d[1].float()).abs().max().item(), flush=True)
        del caches
for kw in ({'compile_decode': False, 'compile_prefill': False}, {}):
    a = generate(m, [p.tolist()], max_new_tokens=64, **kw)[0].tokens
    b = generate(m, [p.tolist()], max_new_tokens=64, **kw)[0].tokens
    div = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    print('generate', kw, 'equal', a == b, 'first divergence', div, flush=True)
