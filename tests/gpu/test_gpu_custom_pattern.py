"""A pattern defined only in a test (sink + window + every stride-th key, tests/test_custom_pattern.py) through the
compiled GPU paths at the shapes users send: the no-cache forward by compiled flex against the dense-mask path, and
generate() with chunked prefill (flex over the full buffer and over [cached slots ; chunk] with the pattern's own
rectangle rule) against the no-cache forward's greedy tokens."""

from __future__ import annotations

import random

import torch

from flexgen_long.attention import MaskSet, attention_layers
from flexgen_long.generation import generate
from flexgen_long.models import longgen_llama
from flexgen_long.policy import Policy
from reference import rel_err
from test_custom_pattern import SinkWindowStride

DEV = "cuda"
PAT = SinkWindowStride(sink=4, window=200, stride=64)


def test_custom_pattern_forward_and_generate(record_property):
    torch.manual_seed(0)
    model = longgen_llama(512, 4, 8, 2, 256, 512, 4096, full_layers=[1, 2], sparse_pattern=PAT).to(DEV).eval()
    attn = attention_layers(model)
    worst = 0.0
    with torch.no_grad():
        for S in sorted(random.Random(0).sample(range(1, 1500), 12)) + [127, 128, 129]:
            x = torch.randint(0, 512, (1, S), generator=torch.Generator().manual_seed(S)).to(DEV)
            dense = MaskSet([a.pattern for a in attn], S, num_heads=8, num_kv_heads=2, device=DEV, kind="dense")
            worst = max(worst, rel_err(model(x), model(x, mask=dense)))
    record_property("flex_vs_dense_max_rel_err", worst)
    assert worst < 1e-4
    for n, chunk in [(700, 256), (1333, 300), (90, None)]:
        prompt = torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        out = generate(model, [prompt], max_new_tokens=12, policy=Policy(prefill_chunk=chunk))[0].tokens
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(model(torch.tensor([seq], device=DEV))[0, -1].argmax()))
        assert out == seq[n:], f"n={n} chunk={chunk}"
