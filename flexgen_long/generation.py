"""Generation over compact per-layer KV caches: chunked prefill, one-token decode steps, sampling, streaming.

    from flexgen_long.generation import generate
    outs = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32)          # greedy, a batch of 2 prompts
    outs[0].tokens, outs[0].tokens_per_s, batch_tokens_per_s(outs)

Prompts of different lengths are prefilled one row at a time (each row's cache slots see only its own positions) and
decoded together, every row at its own absolute position (RoPE and masks per row), so a batch gives exactly what each
prompt gives alone. Prefill runs in chunks of ``prefill_chunk`` tokens (default ``"auto"``: the whole prompt when its
activations fit in the memory the KV caches leave, else the largest multiple of 128 tokens that fits,
flexgen_long.cache.choose_prefill_chunk); a chunk at offset o attends to the cached keys plus its own under the layer's
pattern, so chunking changes memory, not results.

A decode step (``decode_step``) has static shapes and keeps positions on the device: the loop never syncs inside a step
(it waits once per token for that token's ids, to stream and check stop tokens; on CUDA the next step is already
launched by then, so the wait overlaps the GPU's work). On CUDA the step is captured once into a CUDA graph per kind of
mask use (rings not yet full / full) and replayed, so a step costs what its kernels cost; and by default each layer's
work around attention runs compiled, in the prefill (``compiled_prefill_layer``) and in the decode step
(``fused_decode_step``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .attention import KVCacheStep
from .patterns import AttnSink, Full
from .cache import ModelCache, check_fits, choose_prefill_chunk, free_memory_bytes, plan_cache
from .shapes import buckets, compiled, compiled_graphs

__all__ = ["generate", "Generation", "batch_decode_s", "batch_tokens_per_s", "prefill", "decode_step",
           "fused_decode_step", "forward_cached",
           "sample", "exact_layers", "warmup"]


@dataclass
class Generation:
    """One prompt's result: the generated ids (a stop token, when hit, is the last) and timings.

    ``prefill_s``: the batch's prefill, shared by its rows -- wall time from the start of the first row's prefill
    (rows are prefilled one after another) until every row's first token is sampled and synced; no row's first token
    is available earlier, so it is also each row's time to first token, counted from the start of prefill (the caches
    are planned and allocated before it). ``decode_s``: this row's own decode time -- wall time from the end of the
    prefill until the decode step that produced this row's last token had its ids on the host (0.0 when the prefill's
    token was the row's only one), less ``capture_s``, the CUDA-graph capture (once per kind of step and batch,
    reported apart: it is setup, not decoding). ``tokens_per_s``: this row's decode rate, its tokens after the first (which comes
    from the prefill) over its ``decode_s``. A batch's rate over all rows: ``batch_tokens_per_s``."""

    tokens: list[int] = field(default_factory=list)
    prompt_len: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_chunk: int | None = None  # the chunk the prefill used (None: the whole prompt)
    capture_s: float = 0.0  # CUDA-graph capture during this row's decode, excluded from decode_s (the batch's)
    compile_s: float = 0.0  # generate(compile_decode=True): compiling the decode step, before the prefill (the batch's)

    @property
    def decode_tokens(self) -> int:
        return max(len(self.tokens) - 1, 0)  # the first token comes from the prefill

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def batch_decode_s(results: Sequence[Generation]) -> float:
    """The decode wall time of one ``generate()`` call's batch: until its last row finished (the longest row's
    ``decode_s``; every row's clock starts at the end of the shared prefill)."""
    if not results:
        raise ValueError("results must be the non-empty list one generate() call returned")
    return max(r.decode_s for r in results)


def batch_tokens_per_s(results: Sequence[Generation]) -> float:
    """Decode tokens/s of one ``generate()`` call's batch: every row's tokens after its first (which comes from the
    prefill), summed, over the batch's decode wall time (``batch_decode_s``). NaN when nothing was decoded."""
    s = batch_decode_s(results)
    return sum(r.decode_tokens for r in results) / s if s > 0 else float("nan")


def _call_layer(layer: nn.Module, h: Tensor, step: KVCacheStep, input_pos: Tensor) -> Tensor:
    return layer(h, mask=step, input_pos=input_pos)


def forward_cached(model: nn.Module, tokens: Tensor, step: KVCacheStep, input_pos: Tensor,
                   last_only: bool = False, layer_fn: Callable = _call_layer) -> Tensor:
    """The model's forward over its caches. ``last_only``: logits of the last token only (a long prefill chunk would
    otherwise materialise [C, vocab] logits). ``layer_fn(layer, h, step, input_pos)`` runs each layer
    (``fused_decode_step`` passes the compiled one)."""
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer_fn(layer, h, step, input_pos)
    if last_only:
        h = h[:, -1:]
    return model.unembed(h)


def prefill(model: nn.Module, cache: ModelCache, prompt: Tensor, row: int, chunk: int | None = None,
            all_logits: bool = False, compile: bool = False) -> Tensor:
    """Run ``prompt`` [n] (one sequence) through the model into row ``row`` of the caches, ``chunk`` tokens at a time.
    Returns the last token's logits [vocab] (or every token's [n, vocab] with ``all_logits``). ``compile``: each
    layer's work around attention through ``compiled_prefill_layer`` (same results up to kernel rounding)."""
    n = prompt.shape[0]
    chunk = n if chunk is None else chunk
    layer_fn = compiled_prefill_layer() if compile else _call_layer
    outs = []
    for o in range(0, n, chunk):
        toks = prompt[o:o + chunk].view(1, -1)
        pos = torch.arange(o, o + toks.shape[1], device=prompt.device).view(1, -1)
        logits = forward_cached(model, toks, KVCacheStep(cache, "prefill", row=row, offset=o, chunk=chunk), pos,
                                last_only=not all_logits, layer_fn=layer_fn)
        outs.append(logits[0])
    return torch.cat(outs) if all_logits else outs[-1][-1]


def decode_step(model: nn.Module, cache: ModelCache, tokens: Tensor, pos: Tensor,
                exact: frozenset = frozenset()) -> Tensor:
    """One token per sequence: ``tokens`` [B] at positions ``pos`` [B] (device tensors) -> logits [B, vocab].
    ``exact``: layers whose caches hold exactly the visible keys (see ``exact_layers``): no mask there."""
    step = KVCacheStep(cache, "decode", pos=pos, exact=exact)
    return forward_cached(model, tokens.view(-1, 1), step, pos.view(-1, 1))[:, -1]


def exact_layers(model: nn.Module, cache: ModelCache, lo: int, hi: int) -> frozenset:
    """Layers whose cache, after writing tokens at positions in [lo, hi] (one per row), holds exactly the keys each
    row's query may see: a full buffer that every row fills to its last slot, or an AttnSink ring that every row has
    filled (q >= sink + window - 1). BlockSparse stores keep stale off-stride slots: never exact. Host arithmetic over
    the cache's own layer list (it runs once per generated token: no walk over the model's modules)."""
    out = set()
    for a, c in cache.layers.items():
        p = a.pattern
        if (isinstance(p, Full) or (isinstance(p, AttnSink) and c.slots < p.sink + p.window)) \
                and lo == hi == c.slots - 1:
            out.add(a)
        elif isinstance(p, AttnSink) and c.slots == p.sink + p.window and lo >= c.slots - 1:
            out.add(a)
    return frozenset(out)


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


def _check(prompts, max_new_tokens, temperature, top_k, top_p, prefill_chunk, vocab_size):
    if not isinstance(prompts, Sequence) or not prompts or isinstance(prompts, (str, bytes)):
        raise ValueError(f"prompts must be a non-empty list of lists of token ids, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if isinstance(p, Tensor):
            p = p.tolist()
        if not isinstance(p, Sequence) or not p or not all(isinstance(t, int) and 0 <= t < vocab_size for t in p):
            raise ValueError(f"prompts[{i}] must be a non-empty list of ints in [0, vocab_size={vocab_size}), got "
                             f"{str(p)[:80]}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if prefill_chunk != "auto" and prefill_chunk is not None and \
            (not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be 'auto' (the whole prompt if it fits, else a chunk chosen from the "
                         f"memory plan), None (the whole prompt) or an int >= 1, got {prefill_chunk!r}")


def _compile_flags(device, **flags) -> tuple[bool, ...]:
    """``generate`` / ``warmup``'s compile flags: None -> on for CUDA, off elsewhere; else a bool, checked."""
    out = []
    for name, v in flags.items():
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{name} must be True, False or None (None: on for CUDA, off elsewhere), got {v!r}")
        out.append(torch.device(device).type == "cuda" if v is None else v)
    return tuple(out)


def _checked_prefill_chunk(model: nn.Module, batch_size: int, max_len: int, longest: int, prefill_chunk, dtype,
                           device):
    """Check the caches' plan against free memory before anything is allocated, then return the prefill chunk:
    ``prefill_chunk`` itself, or for "auto" the one that fits in what the caches leave (``choose_prefill_chunk``)."""
    plan = plan_cache(model, batch_size, max_len, dtype)
    free = free_memory_bytes(device)
    check_fits(plan, device, free_bytes=free)  # the caches' bytes first ...
    if prefill_chunk == "auto":  # ... then the prefill's activations in what they leave
        prefill_chunk = choose_prefill_chunk(model, longest, free - plan.total_bytes, dtype, max_len, device)
    return prefill_chunk


#: The torch.compile backend of ``fused_decode_step`` and ``compiled_prefill_layer`` (the CPU tests use "eager":
#: dynamo's graph split without Inductor's code generation, which takes minutes on a 2-core CPU).
COMPILE_BACKEND = "inductor"
#: Inductor options of ``fused_decode_step`` (``torch.compile(options=...)``), e.g. ``{"coordinate_descent_tuning":
#: True}`` (gpt-fast's setting for batch-1 decode) or ``{"max_autotune": True}``; None: Inductor's defaults, the
#: setting measured so far. Part of the compiled graphs' key: changing it compiles a new set.
DECODE_COMPILE_OPTIONS: dict | None = None


def fused_decode_step(model: nn.Module, cache: ModelCache, tokens: Tensor, pos: Tensor,
                      exact: frozenset = frozenset()) -> Tensor:
    """``decode_step`` with each layer's work around attention compiled: Inductor fuses RMSNorm, RoPE, the residual
    adds and the SiLU gate into a few kernels per layer around cuBLAS GEMVs, where eager torchtune layers launch ~30
    small kernels; the attention itself (cache write, mask, SDPA: ``HybridAttention._decode``) is excluded from
    compilation and runs between the graphs. Same logits as ``decode_step`` up to kernel rounding.

    Compiled graphs: the layer code is shared by every layer (torch.compile treats their parameters as inputs), so
    the step compiles four graphs -- RMSNorm; the q/k/v projections and RoPE; the output projection; the residual,
    RMSNorm and MLP -- whatever the depth, the cache size or the ``exact`` set: at most three such sets per model
    shape and dtype, for the first batch size, for batch 1 (always specialised), and one with the batch dimension
    dynamic (torch.compile's automatic dynamic shapes) that serves every later batch size. Compilation happens on the first call (on CUDA: the warm-up step before
    CUDA-graph capture, outside ``decode_s``)."""
    step = KVCacheStep(cache, "decode", pos=pos, exact=exact)
    opts = DECODE_COMPILE_OPTIONS
    layer_fn = compiled(_call_layer, ("decode_layer", COMPILE_BACKEND, tuple(sorted((opts or {}).items()))),
                        backend=COMPILE_BACKEND, **({"options": dict(opts)} if opts else {}))
    return forward_cached(model, tokens.view(-1, 1), step, pos.view(-1, 1), layer_fn=layer_fn)[:, -1]


def compiled_prefill_layer() -> Callable:
    """The prefill's layer function with each layer's work around attention compiled (``prefill(compile=True)``,
    ``generate(compile_prefill=True)``): Inductor fuses RMSNorm (fp32 inside), RoPE (fp32 inside), the residual adds
    and the SiLU gate, which eager torchtune layers run as separate passes over [C, dim] and [C, ffn] activations --
    at a 128K-token prompt each pass over one of them moves 1-6 GB. The attention (``HybridAttention._attend_cached``:
    cache write, masks, SDPA / compiled flex) stays outside, as in ``fused_decode_step``.

    Shapes: compiled with ``dynamic=True``, so the chunk length is symbolic and one set of graphs serves every prompt
    and chunk length (a 1-token chunk is specialised by torch.compile: one more set); the graphs hold no attention,
    hence none of the shape policy's buckets apply. The layer code is shared by every layer, as in
    ``fused_decode_step``."""
    return compiled(_call_layer, ("prefill_layer", COMPILE_BACKEND), backend=COMPILE_BACKEND, dynamic=True)


def compile_decode_ahead(model: nn.Module, batch_size: int, dtype: torch.dtype, device) -> float:
    """Compile ``fused_decode_step`` for this batch size before any real step, on a throwaway one-token cache (its
    graphs do not depend on the cache), so that compilation stays out of the decode timings. Returns the wall time
    (milliseconds once the graphs exist)."""
    t = time.perf_counter()
    tmp = ModelCache(model, batch_size, 1, dtype, device, check_memory=False)  # a few KiB
    zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
    fused_decode_step(model, tmp, zeros, zeros)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


class _GraphedStep:
    """decode_step captured into one CUDA graph per ``exact`` set; static input buffers, replayed each token.
    ``compile``: capture ``fused_decode_step`` instead of the eager step (its compilation then runs in the first,
    real step of each kind and is not separated from it). ``capture_s``: wall time spent capturing graphs so far
    (each capture between two device syncs, so it holds no decoding work) -- generate() reports it apart from the
    decode time."""

    def __init__(self, model, cache, batch_size, device, compile: bool = False):
        self.compile, self.batch_size = compile, batch_size
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.graphs: dict[frozenset, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.capture_s = 0.0
        self.compile_s = compile_decode_ahead(model, batch_size, next(iter(cache.layers.values())).k.dtype,
                                              device) if compile else 0.0

    def __call__(self, tokens: Tensor, pos: Tensor, exact: frozenset) -> Tensor:
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        if exact in self.graphs:
            graph, out = self.graphs[exact]
            graph.replay()
            return out
        # First step of this kind: run it for real on a side stream (warm-up, as CUDA graphs require), then capture
        # the same step; capturing runs nothing, so the caches are written once.
        step = fused_decode_step if self.compile else decode_step
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            result = step(self.model, self.cache, self.tokens, self.pos, exact).clone()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()  # the real step above is decoding; the capture below is not
        t = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(self.model, self.cache, self.tokens, self.pos, exact)
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - t
        self.graphs[exact] = (graph, out)
        return result


@torch.inference_mode()
def generate(model: nn.Module, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop_tokens=None, prefill_chunk: int | str | None = "auto",
             on_token: Callable[[int, int], None] | None = None, cuda_graph: bool | None = None,
             compile_decode: bool | None = None, compile_prefill: bool | None = None,
             generator: torch.Generator | None = None) -> list[Generation]:
    """Generate up to ``max_new_tokens`` ids after each prompt (lists of token ids, any lengths).

    temperature 0 = greedy; ``top_k`` / ``top_p`` restrict sampling; a row stops after emitting one of ``stop_tokens``.
    ``on_token(row, token_id)`` is called for every emitted token, in order (streaming). ``prefill_chunk``: prefill this
    many tokens at a time (bounded activation memory; same results); ``None``: each prompt whole; ``"auto"`` (the
    default): each prompt whole when the estimated activations of the longest one
    (flexgen_long.cache.prefill_activation_bytes) fit in the free memory the KV caches leave, else the largest
    multiple of 128 tokens that fits (flexgen_long.cache.choose_prefill_chunk; MemoryError when not even 128 does).
    The chunk used is in each result's ``prefill_chunk``. ``cuda_graph``: replay decode steps from CUDA graphs
    (default: on CUDA). ``compile_decode``: decode with ``fused_decode_step`` (each layer's work around attention
    compiled; compiled once per process before the first step, reported as ``compile_s``, outside ``decode_s``).
    ``compile_prefill``: prefill with each layer's work around attention compiled (``compiled_prefill_layer``;
    compiled on first use, inside the first call's ``prefill_s`` -- ``warmup`` moves it ahead). Both default to
    ``None``: on for CUDA, where each was measured faster than the eager layers on an H200 (Llama-2-7B shape, 128K
    prompt: prefill 5.84 vs 6.67 s, decode 10.3 vs 13.0 ms per token with ``models.fuse_projections``;
    analysis/README.md), off elsewhere (Inductor takes minutes to compile a model on a small CPU). The caches are
    planned and checked against free memory before they are allocated, and the automatic chunk is chosen after the
    caches' bytes are taken, before anything is allocated.

    On CUDA the decode loop runs one step ahead: step t+1 is launched before the host waits for step t's ids (copied
    to pinned memory behind an event), so the per-token host work (streaming, stop tokens, the next launch) overlaps
    the GPU's step instead of idling it. Results are the same as running the steps in lockstep; when every row has
    stopped, the step already launched is discarded.

    Timings (see ``Generation``): ``prefill_s`` is the batch's, ``decode_s`` / ``tokens_per_s`` each row's own (a
    row that hit a stop token early stops its clock there); ``batch_tokens_per_s(results)`` is the batch's rate."""
    vocab = model.tok_embeddings.num_embeddings
    _check(prompts, max_new_tokens, temperature, top_k, top_p, prefill_chunk, vocab)
    stop = set(int(t) for t in (stop_tokens or ()))
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    compile_decode, compile_prefill = _compile_flags(device, compile_decode=compile_decode,
                                                     compile_prefill=compile_prefill)
    prompts = [list(p.tolist() if isinstance(p, Tensor) else p) for p in prompts]
    lens = [len(p) for p in prompts]
    B, max_len = len(prompts), max(lens) + max_new_tokens
    if max_len > model.max_seq_len:
        raise ValueError(f"longest prompt ({max(lens)}) + max_new_tokens ({max_new_tokens}) = {max_len} exceeds "
                         f"model.max_seq_len={model.max_seq_len}")
    prefill_chunk = _checked_prefill_chunk(model, B, max_len, max(lens), prefill_chunk, dtype, device)
    cache = ModelCache(model, B, max_len, dtype, device, check_memory=False)  # checked above
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    if cuda_graph:
        step_fn = _GraphedStep(model, cache, B, device, compile=compile_decode)
        compile_s = step_fn.compile_s
    else:
        compile_s = compile_decode_ahead(model, B, dtype, device) if compile_decode else 0.0
        one_step = fused_decode_step if compile_decode else decode_step
        step_fn = lambda tok, pos, exact: one_step(model, cache, tok, pos, exact)  # noqa: E731

    t0 = time.perf_counter()
    last = torch.stack([prefill(model, cache, torch.tensor(p, device=device), row, prefill_chunk,
                                compile=compile_prefill) for row, p in enumerate(prompts)])
    tok = sample(last, temperature, top_k, top_p, generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    results = [Generation(prompt_len=n, prefill_s=t1 - t0, prefill_chunk=prefill_chunk, compile_s=compile_s)
               for n in lens]
    pos = torch.tensor(lens, device=device)  # position of the token fed next, per row
    done = [False] * B

    def launch(t: int) -> _HostIds:  # the step that feeds token t (at position lens + t) and samples token t + 1
        nonlocal tok, pos
        exact = exact_layers(model, cache, min(lens) + t, max(lens) + t)
        tok = sample(step_fn(tok, pos, exact), temperature, top_k, top_p, generator)
        pos = pos + 1
        return _HostIds(tok)

    ahead = device.type in _LOOKAHEAD_DEVICES
    pending = _HostIds(tok)
    for t in range(max_new_tokens):
        final = t == max_new_tokens - 1
        if ahead and not final:
            following = launch(t)
        ids = pending.wait()  # the loop's one wait per token: streaming and stop tokens need the ids on the host
        now = time.perf_counter()  # exact: the step that made these ids has finished (t = 0: the prefill's token)
        for b, i in enumerate(ids):
            if not done[b]:
                results[b].tokens.append(i)
                if on_token is not None:
                    on_token(b, i)
                done[b] = i in stop
                if done[b] or final:  # this row's last token: its decode clock stops here, capture excluded
                    captured = getattr(step_fn, "capture_s", 0.0)
                    results[b].capture_s = captured
                    results[b].decode_s = now - t1 - captured if t > 0 else 0.0
        if all(done) or final:
            break
        pending = following if ahead else launch(t)
    return results


#: Device types whose decode loop launches the next step before waiting for the current token (``generate``); on the
#: CPU a launched step runs to completion at once, so there is nothing to overlap (the CPU tests add "cpu" here to run
#: the look-ahead loop).
_LOOKAHEAD_DEVICES = frozenset({"cuda"})


class _HostIds:
    """Sampled ids [B] on their way to the host: on CUDA a non-blocking copy into pinned memory and an event behind
    it, so that waiting for them does not wait for work queued after them (``tolist()`` would synchronise the whole
    stream); elsewhere the tensor itself."""

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
def warmup(model: nn.Module, max_prompt_len: int, prefill_chunk: int | str | None = None,
           compile_decode: bool | None = None, compile_prefill: bool | None = None) -> dict:
    """Compile, ahead of traffic, every graph that ``generate(prompts, prefill_chunk=prefill_chunk)`` can need for
    prompts of up to ``max_prompt_len`` tokens. Compiled code runs in three places of a prefill (flexgen_long.shapes):
    a prompt's first chunk (flex in the sparse and packed layers, at the bucket of the chunk's length) and, on GPU,
    the later chunks: full layers' (flex at the bucket of the chunk size x the bucket of the keys seen so far) and
    sparse layers' (flex at the bucket of the chunk size x the bucket of the slots that the positions before the chunk
    can occupy, ``LayerCache.used_slots``). Both later-chunk keys depend only on the chunk size and the chunk's offset,
    never on the cache's size (so not on ``max_new_tokens``). One prefill per bucket length covers them all: the
    first chunks at every bucket, the full layers' key buckets at the lengths past the chunk, and every offset a
    prompt can have (the multiples of the chunk size below ``max_prompt_len``) in the chunked prefill of the longest
    prompt. ``prefill_chunk="auto"``: the chunk that ``generate()``'s default would choose for one prompt of
    ``max_prompt_len`` tokens on this device now (None when it fits whole); a batch's larger caches may leave less room
    and make ``generate()`` choose a smaller one (``Generation.prefill_chunk`` says which) -- warm that one up too.
    ``compile_decode``: also compile ``fused_decode_step`` for batch 1 (always specialised) and batch 2 (which, coming
    after 1, compiles the batch dimension dynamic: every later size), for traffic through
    ``generate(compile_decode=True)``; ``"decode_compile_s"`` in the result. ``compile_prefill``: run those prefills
    through ``compiled_prefill_layer`` (its graphs, for traffic through ``generate(compile_prefill=True)``; the
    first prefill compiles them, a 1-token prompt the set torch.compile specialises for 1-token chunks). Both
    default to ``generate()``'s defaults (None: on for CUDA, off elsewhere), so that ``warmup`` compiles what
    ``generate`` with its defaults will run.
    Returns ``{"graphs": new compiled graphs, "seconds": wall time, "prefill_chunk": the chunk warmed up}``."""
    if not isinstance(max_prompt_len, int) or max_prompt_len < 1 or max_prompt_len > model.max_seq_len:
        raise ValueError(f"max_prompt_len must be an int in [1, model.max_seq_len={model.max_seq_len}], got "
                         f"{max_prompt_len!r}")
    if prefill_chunk != "auto" and prefill_chunk is not None and (
            not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be 'auto' (generate()'s default choice), None (whole prompt) or an int "
                         f">= 1, got {prefill_chunk!r}")
    param = next(model.parameters())
    compile_decode, compile_prefill = _compile_flags(param.device, compile_decode=compile_decode,
                                                     compile_prefill=compile_prefill)
    if prefill_chunk == "auto":  # as generate() decides it, for one prompt of max_prompt_len tokens
        prefill_chunk = _checked_prefill_chunk(model, 1, max_prompt_len, max_prompt_len, "auto", param.dtype,
                                               param.device)
    chunk = prefill_chunk if prefill_chunk is not None and prefill_chunk < max_prompt_len else None
    # the top bucket may pass the longest prompt: its shorter lengths share that bucket
    lengths = {min(b, max_prompt_len) for b in buckets(chunk or max_prompt_len)}  # first chunks
    if chunk is not None:  # prompts whose last chunk ends in each key bucket past the first chunk; the longest
        # (max_prompt_len, the top bucket clipped) runs at every offset a chunked prompt can have: the sparse layers'
        # later-chunk graphs, keyed by the slots in use at that offset
        lengths |= {min(b, max_prompt_len) for b in buckets(max_prompt_len) if b > chunk}
    if compile_prefill:
        lengths.add(1)  # compiled_prefill_layer's specialised set for 1-token chunks
    t0, g0 = time.perf_counter(), len(compiled_graphs())
    for n in sorted(lengths):
        cache = ModelCache(model, 1, n, param.dtype, param.device)
        prefill(model, cache, torch.zeros(n, dtype=torch.long, device=param.device), 0,
                chunk if chunk is not None and n > chunk else None, compile=compile_prefill)
        del cache
    if param.device.type == "cuda":
        torch.cuda.synchronize(param.device)
    out = {"graphs": len(compiled_graphs()) - g0, "seconds": None, "prefill_chunk": prefill_chunk}
    if compile_decode:
        out["decode_compile_s"] = sum(compile_decode_ahead(model, b, param.dtype, param.device) for b in (1, 2))
    out["seconds"] = time.perf_counter() - t0
    return out
