"""flexgen_long.hf_model on the GPU: transformers' generate() on an exported tiny model, its compiled static-cache
path (on CUDA generate() compiles the decode step itself, CUDA graphs included) and compiled FlexAttention for long
calls. Oracles: our own generate() on the same checkpoint, the dynamic cache, and the dense-mask path (the CPU tests'
oracles, tests/test_hf_model.py)."""

from __future__ import annotations

import pytest
import torch

from flexgen_long import generation
from flexgen_long import hf_model as H
from flexgen_long.patterns import AttnSink
from test_hf_model import _cache, _tiny

DEV = "cuda"


def test_generate_dynamic_static_compiled_and_ours_agree(tmp_path):
    ours, theirs = _tiny(tmp_path, AttnSink(4, 60), max_seq_len=4096)
    ours, theirs = ours.to(DEV), theirs.to(DEV)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (700, 333)]
    want = [o.tokens for o in generation.generate(ours, prompts, max_new_tokens=24)]
    width = max(map(len, prompts))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(DEV), mask.to(DEV)
    with torch.no_grad():
        dynamic = theirs.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
        static = [theirs.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                  cache_implementation="static") for _ in range(2)]  # the second replays the graphs
    assert [dynamic[i, width:].tolist() for i in range(2)] == want
    assert all(torch.equal(s, dynamic) for s in static)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_path_equals_the_dense_path(tmp_path, monkeypatch, dtype):
    _, theirs = _tiny(tmp_path, AttnSink(4, 60))
    theirs = theirs.to(DEV, dtype)
    x = torch.randint(0, 256, (2, 1000), device=DEV)
    mask = torch.ones(2, 1000, dtype=torch.long, device=DEV)
    mask[1, :37] = 0
    kw = lambda cache: {H._CACHE_KW: cache}  # noqa: E731
    with torch.no_grad():
        dense = theirs(x, attention_mask=mask, use_cache=False).logits.float()
        monkeypatch.setattr(H, "DENSE_MASK_LIMIT", 0)
        flex = theirs(x, attention_mask=mask, use_cache=False).logits.float()
        prefix = theirs(x[:, :700], attention_mask=mask[:, :700])
        chunk = theirs(x[:, 700:], attention_mask=mask, **kw(_cache(prefix))).logits.float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    real = mask.bool()
    scale = dense[real].abs().max().item()
    assert (flex - dense)[real].abs().max().item() <= tol * scale
    assert (chunk - dense[:, 700:]).abs().max().item() <= tol * scale
