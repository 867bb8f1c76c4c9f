"""Run-to-run determinism of generate() on the GPU (a 6-layer model of the Llama-2-7B layer shape, bf16, 32K prompt):
prefill logits, caches and a decode step of two engines with the same policy, eager and compiled layers, then greedy
tokens of two generate() calls per policy. Result (taken before the port to Engine/Policy, when the decode step ran
eager layers in both rounds): analysis/results/logs/determinism_6layers_32K_NVIDIA_H200.log. Run from the repository
root: python analysis/repro/determinism_check.py"""
import torch
from flexgen_long import longgen_llama, AttnSink
from flexgen_long.engine import Engine
from flexgen_long.generation import generate
from flexgen_long.policy import Policy
torch.manual_seed(0)
m = longgen_llama(32000, 6, 32, 32, 4096, 11008, 40000, sparse_pattern=AttnSink(128, 1920)).to('cuda', torch.bfloat16).eval()
n = 32768
p = torch.randint(0, 32000, (n,), device='cuda')
for comp in (False, True):
    policy = Policy(prefill_chunk=None, compile_prefill=comp, compile_decode=comp, cuda_graphs=False)
    engines = [Engine(m, policy) for _ in range(2)]
    outs = []
    for e in engines:
        e.reserve(1, n + 64, n)
        outs.append(e.prefill(p, 0))
    same_cache = all(torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
                     for a, b in zip(engines[0].cache.layers.values(), engines[1].cache.layers.values()))
    top2 = outs[0].float().topk(2).values
    print('prefill compile', comp, 'logits bitwise equal', torch.equal(*outs), 'max diff',
          (outs[0].float() - outs[1].float()).abs().max().item(), 'caches equal', same_cache,
          'top2 gap', (top2[0] - top2[1]).item(), flush=True)
    tok = torch.tensor([5], device='cuda')
    d = [e.step(tok) for e in engines]  # one token at position n
    print('  decode bitwise equal', torch.equal(*d), (d[0].float() - d[1].float()).abs().max().item(), flush=True)
    del engines
for label, policy in (('eager layers', Policy(compile_decode=False, compile_prefill=False)), ('default', Policy())):
    a = generate(m, [p.tolist()], max_new_tokens=64, policy=policy)[0].tokens
    b = generate(m, [p.tolist()], max_new_tokens=64, policy=policy)[0].tokens
    div = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    print('generate', label, 'equal', a == b, 'first divergence', div, flush=True)
