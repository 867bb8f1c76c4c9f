"""A pattern defined only here -- sink + window + every stride-th key -- runs through everything that takes a pattern
(the no-cache forward, training, the masks, generate() with chunked prefill on both later-chunk routes, the memory
plan, the warm-up) without any other file knowing its class. Oracles: the rule written out in Python loops, and the
model's own no-cache forward."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from flexgen_long.attention import MaskSet
from flexgen_long.cache import ModelCache, plan_cache, prefill_activation_bytes, serving_capacity
from flexgen_long.engine import Engine
from flexgen_long.generation import generate
from flexgen_long.masks import build_block_mask, dense_mask, density
from flexgen_long.models import longgen_llama
from flexgen_long.patterns import Pattern
from flexgen_long.policy import Policy


@dataclass(frozen=True)
class SinkWindowStride(Pattern):
    """``k <= q and (k < sink or q - k < window or k % stride == 0)``: sinks, a sliding window, and every stride-th
    key forever. Layout: sinks, a ring of ``window`` slots, then one slot per stride-th position."""

    sink: int
    window: int
    stride: int

    def visible(self, q, k, kv_head=0):
        return (k <= q) & ((k < self.sink) | (q - k < self.window) | (k % self.stride == 0))

    def rect(self, q0, q1, k0, k1, kv_head=0):
        first = -(-k0 // self.stride) * self.stride  # the first stride-th key at or after k0
        any_ = (k0 <= q1) & ((k0 < self.sink) | (q0 - k1 < self.window) | (first <= torch.minimum(k1, q1)))
        all_ = (k1 <= q0) & ((k1 < self.sink) | (q1 - torch.clamp(k0, min=self.sink) < self.window))
        return any_, all_

    def row_count(self, q, kv_head=0):
        sink = torch.clamp(q + 1, max=self.sink)
        win = torch.clamp(q + 1 - torch.clamp(q - self.window + 1, min=self.sink), min=0)
        hi = q - self.window  # stride-th keys in [sink, q - window]: outside the window, past the sinks
        lo = torch.as_tensor(self.sink)
        strided = torch.where(hi >= lo, hi // self.stride - (lo - 1) // self.stride, 0)
        return sink + win + strided

    def cache_slots(self, max_len):
        return self.sink + self.window + -(-max_len // self.stride)

    def slot_of(self, p, kv_head=0):
        ring = self.sink + torch.remainder(p - self.sink, self.window)
        strided = self.sink + self.window + p // self.stride
        return torch.where(p < self.sink, p, torch.where(p % self.stride == 0, strided, ring))


PAT = SinkWindowStride(sink=3, window=9, stride=16)


def loops(q_len, kv_len, q_offset=0):
    """The rule token by token in plain Python."""
    return torch.tensor([[k <= q and (k < 3 or q - k < 9 or k % 16 == 0) for k in range(kv_len)]
                         for q in range(q_offset, q_offset + q_len)])


def model(seed=0):
    torch.manual_seed(seed)
    return longgen_llama(97, 4, 4, 2, 32, 64, 1024, full_layers=[1, 2], sparse_pattern=PAT).eval()


def test_masks_and_counts_follow_the_rule():
    """Dense mask, BlockMask (expanded to tokens) and row counts equal the loop oracle, at an offset too."""
    import reference as ref
    for q_len, kv_len, off in [(150, 150, 0), (37, 190, 153)]:
        want = loops(q_len, kv_len, off)
        assert torch.equal(dense_mask(PAT, q_len, kv_len, q_offset=off)[0, 0], want)
        bm = build_block_mask(PAT, q_len, kv_len, q_offset=off, block_size=16)
        assert torch.equal(ref.expand_block_mask(bm, q_len, kv_len)[0][0, 0], want)
    q = torch.arange(300)
    assert torch.equal(PAT.row_count(q), loops(300, 300).sum(1))
    assert density(PAT, 300) == pytest.approx(loops(300, 300).float().mean().item())


def test_forward_and_training():
    """The no-cache forward by flex (the BlockMask from the rectangle rule) equals the dense-mask path (the token
    rule), packed documents included; a few CPU training steps (dense masks: no flex backward there) lower the loss."""
    m = model()
    x = torch.randint(0, 97, (2, 150))
    doc = torch.tensor([0] * 70 + [1] * 80)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for d in (None, doc):
            ms = [MaskSet([layer.attn.pattern for layer in m.layers], 150, num_heads=4, num_kv_heads=2,
                          device="cpu", doc_ids=d, kind=k) for k in ("block", "dense")]
            torch.testing.assert_close(m(x, mask=ms[0]), m(x, mask=ms[1]), atol=2e-5, rtol=1e-5)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("chunk_flex", [False, True], ids=["sdpa-over-slots", "flex-over-slots"])
def test_generate_equals_recompute_through_both_later_chunk_routes(chunk_flex):
    """A batch of mixed lengths, prefilled in chunks (later chunks by exact SDPA or, as on a GPU, by flex over
    [cached slots ; chunk]), then decoded far past the window and several strides: teacher-forced logits equal the
    no-cache forward's, and greedy generate() equals greedy by full recompute."""
    m = model()
    toks = torch.randint(0, 97, (2, 170))
    with torch.enable_grad():
        ref = m(toks).detach()
    policy = Policy(prefill_chunk=23, chunk_flex=chunk_flex)
    with torch.compiler.set_stance("force_eager"):
        engine = Engine(m, policy)
        engine.reserve(2, 170)
        lens = [100, 41]
        got = [[engine.prefill(toks[b, :n], b, all_logits=True)] for b, n in enumerate(lens)]
        pos = torch.tensor(lens)
        for _ in range(170 - max(lens)):
            out = engine.step(toks[torch.arange(2), pos])
            for b in range(2):
                got[b].append(out[b:b + 1])
            pos = pos + 1
        for b in range(2):
            g = torch.cat(got[b])
            torch.testing.assert_close(g, ref[b, :g.shape[0]], atol=2e-5, rtol=1e-4)
        prompt = toks[0, :60].tolist()
        out = generate(m, [prompt], max_new_tokens=40, policy=policy)[0].tokens
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(40):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[60:]


def test_memory_plan_and_warmup():
    """The memory plan counts this pattern's own slots (equal to what is allocated); the activation estimate and the
    serving capacity take it; the warm-up lists its later-chunk kernel, and prompts after it add no compiled key."""
    from flexgen_long.shapes import compiled_graphs
    m = model()
    plan, cache = plan_cache(m, 2, 500, torch.float32), ModelCache(m, 2, 500, torch.float32, "cpu")
    assert plan.total_bytes == cache.nbytes
    assert [lp.slots for lp in plan.layers] == [3 + 9 + 32, 500, 500, 3 + 9 + 32]
    assert prefill_activation_bytes(m, 128, torch.float32, 500, device="cpu") > 0
    assert serving_capacity(m, 400, 100, 2**30, torch.float32, prefill_chunk=128, device="cpu")["batch"] >= 1
    policy = Policy(prefill_chunk=100, chunk_flex=True)
    with torch.compiler.set_stance("force_eager"):
        w = Engine(m, policy).warmup(500)
        assert ("flex_over_slots", repr(PAT), (128, 128 + 128)) in w["graphs"]
        before = len(compiled_graphs("_flex"))
        for n in (101, 250, 499):
            e = Engine(m, policy)
            e.reserve(1, n + 7)
            e.prefill(torch.randint(0, 97, (n,)), 0)
    assert len(compiled_graphs("_flex")) == before
