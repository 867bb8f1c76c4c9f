"""The engine: a model, its KV caches and its runtime policy, with the three verbs every caller uses.

    engine = Engine(model, Policy())            # the policy's None fields resolve for the model's device
    engine.warmup(max_prompt_len=32768)         # optional: compile ahead of traffic
    engine.reserve(batch_size=2, max_len=4096, longest_prompt=4000)   # plan, check free memory, allocate
    logits = engine.prefill(prompt_ids, row=0)  # [vocab] for the last token, chunked per policy
    logits = engine.step(next_ids)              # [B, vocab]: one token per row at its next position

``generate()``, the recipes and the benchmarks run on one. Compilation (each layer's work around attention through
torch.compile, attention eager between the graphs) and CUDA graphs (one captured decode step per route signature) live
here; the kernels are the route table's (flexgen_long.routes).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor, nn

from .attention import KVStep, attention_layers, run_layer
from .cache import ModelCache, check_fits, choose_prefill_chunk, free_memory_bytes, plan_cache
from .policy import Policy
from .routes import route
from .shapes import buckets, compiled, compiled_graphs

__all__ = ["Engine"]


class Engine:
    """A model with its caches and policy. ``compile_s`` (compiling the decode step ahead of the first one) and
    ``capture_s`` (CUDA-graph capture) count since the last ``reserve``: setup, reported apart from decoding. Positions
    are kept on the host (``lengths``: each row's tokens so far) and on the device, so a step never waits for the GPU."""

    def __init__(self, model: nn.Module, policy: Policy | None = None):
        if policy is not None and not isinstance(policy, Policy):
            raise ValueError(f"policy must be a flexgen_long.policy.Policy, got {type(policy).__name__}")
        param = next(model.parameters())
        self.model, self.device, self.dtype = model, param.device, param.dtype
        self.policy = (policy or Policy()).on(self.device)
        self.layers = attention_layers(model)
        self.cache, self.chunk, self.compile_s, self.capture_s = None, None, 0.0, 0.0

    # -- compiled layer functions: shared by every layer (torch.compile treats their weights as inputs) ----------------
    def _layer_fn(self, phase: str) -> Callable:
        p = self.policy
        if phase == "decode" and p.compile_decode:
            opts = dict(p.compile_options or ())
            return compiled(run_layer, ("decode_layer", p.compile_backend, p.compile_options),
                            backend=p.compile_backend, **({"options": opts} if opts else {}))
        if phase != "decode" and p.compile_prefill:  # dynamic shapes: one graph set for every chunk length
            return compiled(run_layer, ("prefill_layer", p.compile_backend), backend=p.compile_backend, dynamic=True)
        return run_layer

    # -- caches ------------------------------------------------------------------------------------------------------------
    def plan_chunk(self, batch_size: int, max_len: int, longest_prompt: int) -> int | None:
        """The caches' plan checked against free memory (MemoryError before anything is allocated), then the prefill
        chunk: the policy's, or for "auto" the one whose activations fit in what the caches leave."""
        if max_len > self.model.max_seq_len:
            raise ValueError(f"max_len {max_len} (longest prompt + new tokens) exceeds model.max_seq_len="
                             f"{self.model.max_seq_len}")
        plan = plan_cache(self.model, batch_size, max_len, self.dtype, self.policy)
        free = free_memory_bytes(self.device)
        check_fits(plan, self.device, free_bytes=free)
        if self.policy.prefill_chunk != "auto":
            return self.policy.prefill_chunk
        return choose_prefill_chunk(self.model, longest_prompt, free - plan.total_bytes, self.dtype, max_len,
                                    self.device, self.policy)

    @torch.inference_mode()  # caches and position buffers are inference tensors, as every step that uses them
    def reserve(self, batch_size: int, max_len: int, longest_prompt: int | None = None) -> int | None:
        """Allocate caches for ``batch_size`` rows of up to ``max_len`` tokens (planned and checked first); returns the
        prefill chunk for prompts of up to ``longest_prompt`` tokens (default ``max_len``). With
        ``policy.compile_decode`` the decode step for this batch size is compiled here, on a one-token cache."""
        self.chunk = self.plan_chunk(batch_size, max_len, longest_prompt or max_len)
        self.cache = None  # the previous caches go before the new ones are allocated
        self.cache = ModelCache(self.model, batch_size, max_len, self.dtype, self.device, check_memory=False,
                                policy=self.policy)
        self.lengths = [0] * batch_size
        self._pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # static buffers (CUDA graphs)
        self._tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._graphs: dict = {}  # new caches: new captures, counted afresh
        self._pos_stale, self.capture_s, self.compile_s = True, 0.0, 0.0
        if self.policy.compile_decode:
            self.compile_s = self._compile_decode(batch_size)
        return self.chunk

    @torch.inference_mode()  # as the steps run: dynamo guards on the grad mode
    def _compile_decode(self, batch_size: int) -> float:
        """Compile the decode step's layers for ``batch_size`` on a throwaway one-token cache (the graphs do not depend
        on the cache): compilation stays out of decode timings."""
        t = time.perf_counter()
        tmp = ModelCache(self.model, batch_size, 1, self.dtype, self.device, check_memory=False, policy=self.policy)
        zeros = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._forward_decode(tmp, zeros, zeros, 0)
        self._sync()
        return time.perf_counter() - t

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- prefill ---------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompt: Tensor, row: int = 0, *, all_logits: bool = False) -> Tensor:
        """Run ``prompt`` [n] into row ``row`` of the caches, ``self.chunk`` tokens at a time (a later chunk attends to
        the cached keys plus its own: chunking changes memory, not results). Returns the last token's logits [vocab],
        or every token's [n, vocab]."""
        if self.cache is None:
            raise RuntimeError("Engine.prefill needs caches: call reserve(batch_size, max_len) first")
        n = prompt.shape[0]
        chunk, layer_fn, outs = self.chunk or n, self._layer_fn("prefill"), []
        for o in range(0, n, chunk):
            toks = prompt[o:o + chunk].view(1, -1)
            step = KVStep(self.cache, "first" if o == 0 else "later", self.policy, row=row, offset=o, chunk=chunk,
                          last_only=not all_logits, layer_fn=layer_fn)
            pos = torch.arange(o, o + toks.shape[1], device=prompt.device).view(1, -1)
            outs.append(self.model(toks, input_pos=pos, kv=step)[0])
        self.lengths[row], self._pos_stale = n, True
        return torch.cat(outs) if all_logits else outs[-1][-1]

    def copy_row(self, src: int, dst: int) -> None:
        """Make row ``dst`` a copy of row ``src``: its cache and its length (a prompt prefilled once, decoded as many
        rows -- several samples of one prompt)."""
        self.cache.copy_row(src, dst)
        self.lengths[dst], self._pos_stale = self.lengths[src], True

    # -- decode ----------------------------------------------------------------------------------------------------------
    def _forward_decode(self, cache: ModelCache, tokens: Tensor, pos: Tensor, lo: int) -> Tensor:
        step = KVStep(cache, "decode", self.policy, pos=pos, lo=lo, layer_fn=self._layer_fn("decode"))
        return self.model(tokens.view(-1, 1), input_pos=pos.view(-1, 1), kv=step)[:, -1]

    def signature(self, lo: int) -> tuple:
        """The kernels a decode step at lowest row position ``lo`` runs, one per distinct layer cache (a CUDA graph
        each): from the route table."""
        kinds = dict.fromkeys((c.pattern, c.slots) for c in self.cache.layers.values())
        return tuple(route(p, "decode", device=self.device, policy=self.policy, q_len=1, slots=n, lo=lo).kernel
                     for p, n in kinds)

    @torch.inference_mode()
    def step(self, tokens: Tensor) -> Tensor:
        """Feed ``tokens`` [B] (device) at each row's next position; returns logits [B, vocab] and advances every row.
        No host sync: positions are known on the host and kept on the device."""
        if self.cache is None:
            raise RuntimeError("Engine.step needs caches: call reserve() and prefill() first")
        if self._pos_stale:  # rows were (re)filled: one copy before decoding starts
            self._pos.copy_(torch.tensor(self.lengths, device=self.device))
            self._pos_stale = False
        lo = min(self.lengths)
        if max(self.lengths) >= self.cache.max_len:
            raise ValueError(f"a row would pass the caches' max_len={self.cache.max_len}")
        self._tokens.copy_(tokens)
        if self.policy.cuda_graphs:
            out = self._replay(self.signature(lo), lo)
        else:
            out = self._forward_decode(self.cache, self._tokens, self._pos, lo)
        self._pos += 1
        self.lengths = [n + 1 for n in self.lengths]
        return out

    def _replay(self, key: tuple, lo: int) -> Tensor:
        """The decode step of this route signature from its CUDA graph; the first of a kind runs for real on a side
        stream (CUDA graphs need a warm-up), then is captured (capturing runs nothing)."""
        if key in self._graphs:
            graph, out = self._graphs[key]
            graph.replay()
            return out
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            result = self._forward_decode(self.cache, self._tokens, self._pos, lo).clone()
        torch.cuda.current_stream().wait_stream(s)
        self._sync()  # the real step above is decoding; the capture below is not
        t = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward_decode(self.cache, self._tokens, self._pos, lo)
        self._sync()
        self.capture_s += time.perf_counter() - t
        self._graphs[key] = (graph, out)
        return result

    # -- warm-up ---------------------------------------------------------------------------------------------------------
    def prefill_graphs(self, n: int, chunk: int | None) -> set:
        """The compiled kernels (route table: kernel, pattern, shape) that prefilling an ``n``-token prompt in chunks
        of ``chunk`` runs, over caches just long enough."""
        out, chunk = set(), chunk or n
        kinds = dict.fromkeys((at.pattern.bind_heads(at.num_kv_heads), (at.num_heads, at.num_kv_heads, at.head_dim))
                              for at in self.layers)  # the layers of one pattern take the same routes
        for p, heads in kinds:
            for o in range(0, n, chunk):
                r = route(p, "first" if o == 0 else "later", device=self.device, policy=self.policy,
                          q_len=min(chunk, n - o), offset=o, chunk=chunk, slots=p.cache_slots(n), heads=heads)
                if r.shape is not None:
                    out.add((r.kernel, repr(p), r.shape))
        return out

    @torch.inference_mode()
    def warmup(self, max_prompt_len: int) -> dict:
        """Compile, ahead of traffic, what prompts of up to ``max_prompt_len`` tokens need with this policy (and the chunk
        ``generate`` would choose for one such prompt now): every compiled kernel the route table gives their chunks
        (one prefill per length that adds one: a first chunk's buckets, each key bucket a last chunk can end in, the
        longest prompt, which passes every offset), the compiled layers (1- and 2-token prompts: the 1-token and the
        dynamic set) and the decode step for batches 1 and 2 (then every size). Returns ``graphs`` (the route
        table's compiled kernels), ``compiled`` (new compiled functions), ``prefill_chunk``, ``seconds``."""
        if not isinstance(max_prompt_len, int) or isinstance(max_prompt_len, bool) or \
                not 1 <= max_prompt_len <= self.model.max_seq_len:
            raise ValueError(f"max_prompt_len must be an int in [1, model.max_seq_len={self.model.max_seq_len}], "
                             f"got {max_prompt_len!r}")
        t0, g0 = time.perf_counter(), len(compiled_graphs())
        chunk = self.plan_chunk(1, max_prompt_len, max_prompt_len)
        chunk = chunk if chunk is not None and chunk < max_prompt_len else None
        lengths = {min(b, max_prompt_len) for b in buckets(chunk or max_prompt_len)}
        if chunk is not None:
            lengths |= {min(b, max_prompt_len) for b in buckets(max_prompt_len) if b > chunk}
        # the compiled layers: their 1-token specialisation and the dynamic-length set, which serves every other length
        graphs, run = set(), {1, min(2, max_prompt_len)} if self.policy.compile_prefill else set()
        for n in sorted(lengths, reverse=True):  # the longest first: it covers the most
            new = self.prefill_graphs(n, chunk) - graphs
            if new:
                graphs |= new
                run.add(n)
        # the chunk chosen above, whatever memory says now; the decode step is compiled below
        saved, self.policy = self.policy, self.policy.replace(prefill_chunk=chunk, compile_decode=False)
        try:
            for n in sorted(run):
                self.reserve(1, n)
                self.prefill(torch.zeros(n, dtype=torch.long, device=self.device), 0)
        finally:
            self.policy = saved
        decode_s = 0.0
        if self.policy.compile_decode:
            decode_s = sum(self._compile_decode(b) for b in (1, 2))
        self.cache = None
        self._sync()
        return {"graphs": sorted(graphs), "compiled": len(compiled_graphs()) - g0, "prefill_chunk": chunk,
                "decode_compile_s": decode_s, "seconds": time.perf_counter() - t0}
