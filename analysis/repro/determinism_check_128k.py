"""Run-to-run determinism of generate() at 128K on the Llama-2-7B shape (random bf16 weights, AttnSink(128, 1920), fused
projections): greedy tokens of three eager calls, then three compiled calls (the CUDA default), each against the first.
Result (taken before the port to Policy, with the same calls as keywords):
analysis/results/logs/determinism_llama2_7b_128K_NVIDIA_H200.log. Run from the repository root:
python analysis/repro/determinism_check_128k.py"""
import torch
from flexgen_long.models import longgen_llama2_7b, fuse_projections
from flexgen_long.patterns import AttnSink
from flexgen_long.generation import generate
from flexgen_long.policy import Policy
torch.set_default_dtype(torch.bfloat16)
with torch.device('cuda'):
    m = longgen_llama2_7b(sparse_pattern=AttnSink(128, 1920), max_seq_len=131072 + 128).eval()
fuse_projections(m)
p = torch.randint(0, 32000, (131072,)).tolist()
eager = Policy(prefill_chunk=None, compile_decode=False, compile_prefill=False)
runs = [generate(m, [p], max_new_tokens=64, policy=eager)[0].tokens for _ in range(3)]
for i in (1, 2):
    div = next((j for j, (x, y) in enumerate(zip(runs[0], runs[i])) if x != y), None)
    print('eager run', i, 'equal to run 0:', runs[i] == runs[0], 'first divergence', div, flush=True)
runs = [generate(m, [p], max_new_tokens=64, policy=Policy(prefill_chunk=None))[0].tokens for _ in range(3)]
for i in (1, 2):
    div = next((j for j, (x, y) in enumerate(zip(runs[0], runs[i])) if x != y), None)
    print('compiled run', i, 'equal to run 0:', runs[i] == runs[0], 'first divergence', div, flush=True)
