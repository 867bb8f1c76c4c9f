"""Generation: prompts in, tokens out, over compact per-layer KV caches (flexgen_long.engine does the work).

    from flexgen_long.generation import generate
    outs = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32)          # greedy, a batch of 2 prompts
    outs[0].tokens, outs[0].tokens_per_s, batch_tokens_per_s(outs)

Prompts of different lengths are prefilled one row at a time and decoded together, every row at its own position, so
a batch gives exactly what each prompt gives alone. How it runs (chunking, compilation, CUDA graphs, the look-ahead
loop) is the ``policy`` (flexgen_long.policy.Policy); the defaults suit the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .engine import Engine
from .policy import Policy

__all__ = ["generate", "Generation", "batch_decode_s", "batch_tokens_per_s", "sample"]


@dataclass
class Generation:
    """One prompt's result: the generated ids (a stop token, when hit, is the last) and timings. ``prefill_s``: the
    batch's prefill, until every row's first token is on the host (each row's time to first token). ``decode_s``: this
    row's, from the end of the prefill to its last token on the host, less ``capture_s`` (CUDA-graph capture, reported
    apart). ``compile_s``: compiling the decode step before the prefill."""

    tokens: list[int] = field(default_factory=list)
    prompt_len: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_chunk: int | None = None  # the chunk the prefill used (None: the whole prompt)
    capture_s: float = 0.0
    compile_s: float = 0.0

    @property
    def decode_tokens(self) -> int:
        return max(len(self.tokens) - 1, 0)  # the first token comes from the prefill

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def batch_decode_s(results: Sequence[Generation]) -> float:
    """The decode wall time of one ``generate()`` call: until its last row finished."""
    if not results:
        raise ValueError("results must be the non-empty list one generate() call returned")
    return max(r.decode_s for r in results)


def batch_tokens_per_s(results: Sequence[Generation]) -> float:
    """Decode tokens/s of one ``generate()`` call: every row's tokens after its first over ``batch_decode_s``."""
    s = batch_decode_s(results)
    return sum(r.decode_tokens for r in results) / s if s > 0 else float("nan")


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """[B, vocab] -> [B] ids. temperature 0: greedy (argmax); else softmax(logits / T) restricted to the top_k ids
    and / or the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep ids until the mass before them reaches top_p
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _check(prompts, max_new_tokens, temperature, top_k, top_p, vocab_size) -> list[list[int]]:
    if not isinstance(prompts, Sequence) or not prompts or isinstance(prompts, (str, bytes)):
        raise ValueError(f"prompts must be a non-empty list of lists of token ids, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        p = p.tolist() if isinstance(p, Tensor) else p
        if not isinstance(p, Sequence) or not p or not all(isinstance(t, int) and 0 <= t < vocab_size for t in p):
            raise ValueError(f"prompts[{i}] must be a non-empty list of ints in [0, vocab_size={vocab_size}), got "
                             f"{str(p)[:80]}")
        out.append(list(p))
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    return out


class _HostIds:
    """Sampled ids [B] on their way to the host: on CUDA a non-blocking copy into pinned memory with an event behind it,
    so waiting for them does not wait for work queued after them; elsewhere the tensor itself."""

    def __init__(self, ids: Tensor):
        if ids.device.type == "cuda":
            self.host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self.host.copy_(ids, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = ids, None

    def wait(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


@torch.inference_mode()
def generate(model: nn.Module | Engine, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens=None,
             on_token: Callable[[int, int], None] | None = None, generator: torch.Generator | None = None,
             policy: Policy | None = None) -> list[Generation]:
    """Generate up to ``max_new_tokens`` ids after each prompt (lists of token ids, any lengths).

    temperature 0 = greedy; ``top_k`` / ``top_p`` restrict sampling; a row stops after emitting one of
    ``stop_tokens``; ``on_token(row, token_id)`` is called for every emitted token, in order (streaming). ``model``: a
    model (run with ``policy``, default ``Policy()``) or an ``Engine`` (its own policy; reuse one to serve many calls).
    The caches are planned and checked against free memory before anything is allocated.

    With ``policy.lookahead`` (CUDA's default) step t+1 is launched before the host waits for token t (ids copied to
    pinned memory behind an event), so streaming and stop tokens overlap the GPU's step; the results are those of the
    lockstep loop, and when every row has stopped the step already launched is discarded."""
    engine = model if isinstance(model, Engine) else Engine(model, policy)
    if isinstance(model, Engine) and policy is not None:
        raise ValueError("pass a policy or an Engine (which has its own), not both")
    prompts = _check(prompts, max_new_tokens, temperature, top_k, top_p,
                     engine.model.tok_embeddings.num_embeddings)
    stop = set(int(t) for t in (stop_tokens or ()))
    lens = [len(p) for p in prompts]
    B = len(prompts)
    chunk = engine.reserve(B, max(lens) + max_new_tokens, max(lens))
    dev = engine.device

    t0 = time.perf_counter()
    last = torch.stack([engine.prefill(torch.tensor(p, device=dev), row) for row, p in enumerate(prompts)])
    tok = sample(last, temperature, top_k, top_p, generator)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t1 = time.perf_counter()
    results = [Generation(prompt_len=n, prefill_s=t1 - t0, prefill_chunk=chunk, compile_s=engine.compile_s)
               for n in lens]
    pending, done = _HostIds(tok), [False] * B

    def launch() -> _HostIds:  # feed the last sampled ids, sample the next
        nonlocal tok
        tok = sample(engine.step(tok), temperature, top_k, top_p, generator)
        return _HostIds(tok)

    for t in range(max_new_tokens):
        final = t == max_new_tokens - 1
        if engine.policy.lookahead and not final:
            following = launch()
        ids = pending.wait()  # the loop's one wait per token: streaming and stop tokens need the ids on the host
        now = time.perf_counter()  # the step that made these ids has finished (t = 0: the prefill's token)
        for b, i in enumerate(ids):
            if not done[b]:
                results[b].tokens.append(i)
                if on_token is not None:
                    on_token(b, i)
                done[b] = i in stop
                if done[b] or final:  # this row's last token: its decode clock stops here, capture excluded
                    results[b].capture_s = engine.capture_s
                    results[b].decode_s = now - t1 - engine.capture_s if t > 0 else 0.0
        if all(done) or final:
            break
        pending = following if engine.policy.lookahead else launch()
    return results
