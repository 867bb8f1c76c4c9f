"""Model-level speed and memory benchmark: hybrid LongGen (AttnSink, BlockSparse) against the dense model, and the HF
transformers peer running the same layout.

    python analysis/bench.py ours --model llama2_7b --lengths 8192 32768 131072 --out $OUT/bench_ours.json --commit SHA
    python analysis/bench.py hf   --model llama2_7b --lengths 8192 32768 131072 --out $OUT/bench_hf.json --commit SHA
    python analysis/bench.py ours --device cpu --tiny --out /tmp/b.json      # smoke test (seconds, CPU)

``ours`` builds the model once (random bf16 weights: speed does not depend on values) and switches the per-layer
patterns between variants, so every variant runs the same weights in the same process:

* ``dense``       -- full_layers="all": causal SDPA in every layer, forced onto cuDNN / flash (the dense baseline must
                     be the best one: on the H200 with torch 2.11 cuDNN's causal SDPA measured 258 ms forward at 128K,
                     32 / 8 heads, D 128, bf16, flash-SDPA 419 ms and flex causal 339 ms -- analysis/bench_masks.py);
* ``attnsink``    -- middle third full, AttnSink elsewhere (compiled flex);
* ``blocksparse`` -- middle third full, BlockSparse elsewhere.

Per length it measures:

* prefill: a no-grad forward of the whole prompt through every layer, keeping each layer's K/V as a cache would (full
  layers: every token; sparse layers: the tokens the next query may still see, gathered per KV head) and computing
  logits for the last position only (what a prefill needs to sample the first token);
* decode: steps through ``flexgen_long.engine.Engine`` (eager layers, CUDA graphs on a GPU), after its own untimed
  prefill of the prompt. Every call decodes at the next position (S, S + 1, ...: a step advances the rows), over caches
  sized for S + ``DECODE_STEPS`` tokens -- the route ``generate()`` runs before its last token (full layers mask the
  buffer's empty slots; a full ring needs no mask); ``decode_routes`` counts the layers per route. (Records made before
  the engine timed one step at position S over caches of S + 1 tokens, every buffer and ring exactly full: the
  mask-free route in every layer, counted as ``exact_layers``.);
* train: forward + backward of ``--train-layers`` layers of the same shape with the same full/sparse ratio (the whole
  model does not fit with activations at long context); the LM head is left out because it costs the same in every
  variant and would only dilute the attention difference at reduced depth -- stated in the JSON;
* KV memory: ``flexgen_long.cache.plan_cache`` for a cache holding the prompt -- the bytes ``generate`` allocates;
* peak memory (torch.cuda.max_memory_allocated) of each measurement.

``hf`` runs transformers' MinistralForCausalLM with per-layer ``layer_types`` (our full layers -> "full_attention",
the others "sliding_attention", sliding_window = our AttnSink window; HF has no sink) with ``attn_implementation``
"sdpa" and "flex_attention", its own DynamicCache: prefill (logits_to_keep=1) and decode steps.

Timing: ``flexgen_long.timing.measure`` (one warm-up call, which compiles, then CUDA-event timings until a time budget
is spent, at least 3; median with min/max). Layouts switch with ``flexgen_long.models.relayout``. Memory is freed
between prefill, decode and training measurements. Out-of-memory is caught, freed and recorded as {"oom": true, ...};
any other failure is recorded as {"error": ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from flexgen_long import models  # noqa: E402
from flexgen_long.attention import MaskSet, attention_layers  # noqa: E402
from flexgen_long.cache import plan_cache  # noqa: E402
from flexgen_long.engine import Engine  # noqa: E402
from flexgen_long.hf import model_sizes  # noqa: E402
from flexgen_long.layout import full_layer_indices  # noqa: E402
from flexgen_long.models import relayout  # noqa: E402
from flexgen_long.patterns import AttnSink, BlockSparse  # noqa: E402
from flexgen_long.policy import Policy  # noqa: E402
from flexgen_long.routes import route  # noqa: E402
from flexgen_long.timing import measure, time_call  # noqa: E402


#: model shapes (flexgen_long.models presets) -> builder, and the shape recorded in the JSON
MODELS = {
    "llama2_7b": models.longgen_llama2_7b,
    "llama3_1_8b": models.longgen_llama3_1_8b,
    "llama3_2_1b": models.longgen_llama3_2_1b,
    "tiny": models.longgen_tiny,
}

#: The paper's budget of about 2K kept tokens per sparse layer at 128K (Ge et al. 2025: 1/64 of the context), for both
#: sparse patterns: AttnSink 64 + 1984 = 2048 keys; BlockSparse 8 local blocks of 128 (1024) + one block in 64 on the
#: stride (1024 at 128K). Block 128 = the flex tile, so BlockSparse masks have no partial blocks off the diagonal.
VARIANTS = {
    "dense": ("all", None),
    "attnsink": ("middle", AttnSink(sink=64, window=1984)),
    "blocksparse": ("middle", BlockSparse(block=128, local_blocks=8, vertical_stride=64, per_head=True)),
}
TINY_VARIANTS = {  # same structure, patterns small enough to be sparse at a few hundred tokens
    "dense": ("all", None),
    "attnsink": ("middle", AttnSink(sink=4, window=60)),
    "blocksparse": ("middle", BlockSparse(block=16, local_blocks=2, vertical_stride=4, per_head=True)),
}

#: the paper's reported whole-model ratios (LongGen, Llama-2-7B, 128K), drawn as reference lines by plot_speedups.py
PAPER = {"prefill": 1.67, "decode": 1.41, "train": 1.55, "kv_reduction": 0.62}


def guarded(fn) -> dict:
    """Run one measurement; out-of-memory and other failures become records, not crashes. The exception is dropped
    before freeing, since its traceback holds the frames (and tensors) of the failed call."""
    err = None
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        err = {"oom": True, "error": str(e).splitlines()[0][:300]}
    except Exception as e:  # noqa: BLE001 -- a benchmark records what failed and goes on with the next case
        err = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    free()
    return err


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sdpa_context(device: torch.device):
    """A factory of fresh contexts (sdpa_kernel's context manager is single-use) forcing cuDNN / flash for every causal
    SDPA call on GPU (the best dense baseline, see the module docstring), and its description; CPU: torch's pick."""
    if device.type != "cuda":
        return contextlib.nullcontext, "default (cpu)"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return (lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION])), "cudnn,flash (forced)"


# -- KV accounting -----------------------------------------------------------------------------------------------------

def kept_positions(pattern, seq_len: int, num_kv_heads: int, device) -> torch.Tensor | None:
    """[Hkv, n] positions that a compact cache keeps after a prompt of ``seq_len`` tokens: the keys the last prompt
    token sees (per KV head; padded to the longest head by repeating its last position). None for Full. (prefill_fn
    gathers these so that its peak memory includes a cache's bytes.)"""
    if pattern.is_full:
        return None
    pattern = pattern.bind_heads(num_kv_heads)
    k = torch.arange(seq_len, device=device)
    rows = [k[pattern.visible(torch.tensor(seq_len - 1, device=device), k, h)] for h in range(num_kv_heads)]
    n = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r[-1:].expand(n - len(r))]) for r in rows])


def kv_record(model, seq_len: int, dtype) -> dict:
    """KV cache of a prompt of ``seq_len`` tokens as ``generate`` allocates it (``flexgen_long.cache.plan_cache``:
    K, V and slot positions per layer), and the slots per distinct sparse pattern."""
    plan = plan_cache(model, 1, seq_len, dtype)
    slots = {repr(lp.pattern): lp.slots for lp in plan.layers if not lp.pattern.is_full}
    return {"kv_gib": plan.total_bytes / 2**30, "kv_bytes": plan.total_bytes, "slots_sparse_layer": slots,
            "source": "flexgen_long.cache.plan_cache"}


# -- our model ---------------------------------------------------------------------------------------------------------

def set_layout(model, full_layers, sparse) -> list:
    """Switch every layer's pattern in place (``flexgen_long.models.relayout``: same weights across variants); the
    per-layer patterns."""
    relayout(model, full_layers, sparse if sparse is not None else AttnSink(0, 1))  # no sparse layer with "all"
    return [a.pattern for a in attention_layers(model)]


def build(name: str, num_layers: int | None, max_seq_len: int, device, dtype):
    """A preset's shape with random weights, built directly on the device in ``dtype``; ``num_layers`` overrides
    the depth (training at reduced depth) through the generic builder with the preset's other dimensions."""
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ref = None
            if num_layers is not None:
                with torch.device("meta"):
                    ref = MODELS[name](max_seq_len=max_seq_len)
            model = MODELS[name](max_seq_len=max_seq_len) if ref is None else _same_shape(ref, num_layers,
                                                                                       max_seq_len, name)
    finally:
        torch.set_default_dtype(prev)
    return model


def _same_shape(ref, num_layers: int, max_seq_len: int, name: str):
    a = ref.layers[0].attn
    rope = a.pos_embeddings
    scaling = None
    if type(rope).__name__ == "Llama3ScaledRoPE":
        scaling = {**models.LLAMA3_1_ROPE_SCALING, "factor": float(rope.scale_factor)}
    tied = type(ref.output).__name__ == "TiedLinear"
    return models.longgen_llama(ref.tok_embeddings.num_embeddings, num_layers, a.num_heads, a.num_kv_heads,
                                a.embed_dim, ref.layers[0].mlp.w1.out_features, max_seq_len, rope.base,
                                full_layers="middle", rope_scaling=scaling, tie_word_embeddings=tied)


def hf_peer(model, max_len: int, impl: str, device, dtype):
    """transformers' MinistralForCausalLM with ``model``'s sizes and layout, random weights: its full layers
    "full_attention", the others "sliding_attention" with ``sliding_window`` = our AttnSink window (HF has no sink).
    Returns (peer, its layout for the JSON)."""
    from transformers import MinistralConfig, MinistralForCausalLM

    shp = model_sizes(model)
    patterns = [layer.attn.pattern for layer in model.layers]
    sparse = {p for p in patterns if not p.is_full}
    sp = next(iter(sparse), None)
    if len(sparse) != 1 or not hasattr(sp, "window"):  # a sink + sliding window (AttnSink) is what HF can express
        raise ValueError(f"the HF peer runs one AttnSink pattern beside full layers, got {sorted(map(repr, sparse))}")
    layer_types = ["full_attention" if p.is_full else "sliding_attention" for p in patterns]
    cfg = MinistralConfig(
        vocab_size=shp["vocab_size"], hidden_size=shp["embed_dim"], intermediate_size=shp["intermediate_dim"],
        num_hidden_layers=shp["num_layers"], num_attention_heads=shp["num_heads"],
        num_key_value_heads=shp["num_kv_heads"], head_dim=shp["head_dim"], max_position_embeddings=max_len,
        sliding_window=sp.window, layer_types=layer_types, rope_theta=float(model.layers[0].attn.pos_embeddings.base),
        tie_word_embeddings=False, use_cache=True, pad_token_id=0)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            peer = MinistralForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    return peer, {"shape": shp, "layer_types": layer_types, "sliding_window": sp.window, "sink": 0,
                  "note": f"HF sliding window has no sink; our AttnSink has {sp.sink} sink tokens"}


def run_layers(model, tokens, needs_grad: bool, kv_hooks: list | None = None):
    """Embedding and every layer with one MaskSet (as HybridDecoder.forward), then the final norm; no LM head."""
    attn = attention_layers(model)
    mask = MaskSet([a.pattern for a in attn], tokens.shape[1], num_heads=attn[0].num_heads,
                   num_kv_heads=attn[0].num_kv_heads, device=tokens.device, grad=needs_grad)
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h, mask=mask)
    return model.norm(h)


def prefill_fn(model, tokens, patterns):
    """No-grad prefill: all layers, K/V kept as a compact cache would keep them, last-position logits."""
    a0 = model.layers[0].attn
    S, hkv, d = tokens.shape[1], a0.num_kv_heads, a0.head_dim
    keep = {}
    for p in dict.fromkeys(patterns):
        idx = kept_positions(p, S, hkv, tokens.device)
        keep[p] = None if idx is None else idx.T[None, :, :, None].expand(tokens.shape[0], -1, -1, d)
    cache: list = []

    def hook(mod, inp, out, pattern):
        kv = out.view(out.shape[0], out.shape[1], hkv, d)
        idx = keep[pattern]
        # full layers keep the projection output itself (every token); sparse layers a gathered copy of their kept
        # tokens [B, n, Hkv, D] -- the bytes a compact cache holds, so peak memory is a real prefill's
        cache.append(kv if idx is None else torch.gather(kv, 1, idx))

    def fn():
        cache.clear()
        handles = []
        for layer, p in zip(model.layers, patterns):
            for proj in (layer.attn.k_proj, layer.attn.v_proj):
                handles.append(proj.register_forward_hook(lambda m, i, o, p=p: hook(m, i, o, p)))
        try:
            with torch.no_grad():
                h = run_layers(model, tokens, needs_grad=False)
                logits = model.output(h[:, -1:])
        finally:
            for hd in handles:
                hd.remove()
        cache.clear()
        return logits

    return fn


def train_fn(model, tokens):
    def fn():
        model.zero_grad(set_to_none=True)
        h = run_layers(model, tokens, needs_grad=True)
        h.float().square().mean().backward()
    return fn


def decode_routes(engine: Engine, first: int, last: int) -> dict:
    """Layers per decode route (flexgen_long.routes: {kernel: layers}) of ``engine``'s caches for steps whose lowest row
    position runs from ``first`` to ``last``; ValueError when the routes change in between (a timed window would mix
    kernels, and under CUDA graphs capture a new graph inside it)."""
    def at(lo: int) -> dict:
        kinds = [route(c.pattern, "decode", device=engine.device, policy=engine.policy, q_len=1, slots=c.slots,
                       lo=lo, batch=engine.cache.batch_size).kernel for c in engine.cache.layers.values()]
        return {k: kinds.count(k) for k in sorted(set(kinds))}
    routes = at(first)
    if at(last) != routes:
        raise ValueError(f"decode routes change between positions {first} and {last}: {routes} -> {at(last)}")
    return routes


#: Decode steps a record may time (timing.measure's max_reps), and the positions its caches hold beyond the prompt:
#: the warm-up call, the timed calls and one more, so that every timed step runs the same routes.
DECODE_REPS_MAX = 200
DECODE_STEPS = DECODE_REPS_MAX + 2


def decode_record(model, tokens, budget_ms: float) -> dict:
    """Decode steps of one row through ``Engine.step`` (eager layers; CUDA-graph replay on a GPU, as generate() runs):
    the prompt prefilled by the engine (untimed), then one step per call at positions S, S + 1, ... over caches sized
    for S + DECODE_STEPS tokens (module docstring)."""
    S, dev = tokens.shape[1], tokens.device
    engine = Engine(model, Policy(compile_prefill=False, compile_decode=False))
    engine.reserve(1, S + DECODE_STEPS, S)
    engine.prefill(tokens[0], 0)
    routes = decode_routes(engine, S, S + DECODE_STEPS - 2)
    tok = torch.zeros(1, dtype=torch.long, device=dev)
    r = measure(lambda: engine.step(tok), dev, budget_ms=budget_ms, min_reps=10, max_reps=DECODE_REPS_MAX)
    r.update({"cache_gib": engine.cache.nbytes / 2**30, "decode_routes": routes, "capture_s": engine.capture_s,
              "method": f"Engine.step at positions S, S + 1, ... over caches of S + {DECODE_STEPS} tokens"
              + (", CUDA graph replay" if engine.policy.cuda_graphs else "")})
    del engine
    return r


def bench_ours(a, device, dtype, res: dict) -> dict:
    variants = TINY_VARIANTS if a.tiny else VARIANTS
    name = "tiny" if a.tiny else a.model
    ctx, backend = sdpa_context(device)
    max_len = max(a.lengths)
    res.update({"variants": {k: {"full_layers": fl, "sparse_pattern": repr(sp)} for k, (fl, sp) in variants.items()},
                "sdpa_backend": backend, "prefill": {}, "decode": {}, "train": {}, "kv": {}})
    model = build(name, None, max_len + DECODE_STEPS, device, dtype)  # the decode steps after S
    model.requires_grad_(False)
    res["shape"] = model_sizes(model)
    L = res["shape"]["num_layers"]
    for v, (fl, sp) in variants.items():
        res["variants"][v]["full_layer_indices"] = list(full_layer_indices(L, fl))
    budget = 300 if a.tiny else a.budget_ms
    for S in a.lengths:
        tokens = torch.randint(0, res["shape"]["vocab_size"], (1, S), device=device)
        for v, (fl, sp) in variants.items():
            pats = set_layout(model, fl, sp)
            res["kv"].setdefault(v, {})[str(S)] = kv_record(model, S, dtype)
            with ctx():
                r = guarded(lambda: measure(prefill_fn(model, tokens, pats), device, budget_ms=budget))
            res["prefill"].setdefault(v, {})[str(S)] = r
            print(f"prefill {v:12s} {S:7d}: {_fmt(r)}", flush=True)
            free()  # the prefill's activations and kept K/V must not crowd the decode's caches
            with ctx():
                r = guarded(lambda: decode_record(model, tokens, 300 if a.tiny else 1000))
            res["decode"].setdefault(v, {})[str(S)] = r
            print(f"decode  {v:12s} {S:7d}: {_fmt(r)}", flush=True)
            free()
    del model
    free()
    if a.train_layers > 0:
        tl = a.train_layers
        tmodel = build(name, tl, max_len, device, dtype)
        res["train_setup"] = {
            "num_layers": tl, "full_layers": {v: list(full_layer_indices(tl, fl)) for v, (fl, _) in variants.items()},
            "note": f"{tl} of {L} layers (the whole model's activations do not fit at long context), full/sparse "
                    "ratio as the middle-third layout; forward + backward, loss on the final norm output, no LM "
                    "head and no optimizer step (both cost the same in every variant)"}
        for S in a.lengths:
            tokens = torch.randint(0, res["shape"]["vocab_size"], (1, S), device=device)
            for v, (fl, sp) in variants.items():
                set_layout(tmodel, fl, sp)
                with ctx():
                    r = guarded(lambda: measure(train_fn(tmodel, tokens), device, budget_ms=budget))
                tmodel.zero_grad(set_to_none=True)
                res["train"].setdefault(v, {})[str(S)] = r
                print(f"train   {v:12s} {S:7d}: {_fmt(r)}", flush=True)
                free()
        del tmodel
        free()
    return res


# -- HF transformers peer ----------------------------------------------------------------------------------------------

def bench_hf(a, device, dtype, res: dict) -> dict:
    """transformers' Ministral (per-layer layer_types) with our layout and window; its own DynamicCache."""
    import transformers

    name = "tiny" if a.tiny else a.model
    fl, sp = (TINY_VARIANTS if a.tiny else VARIANTS)["attnsink"]
    with torch.device("meta"):
        ref = relayout(MODELS[name](max_seq_len=max(a.lengths)), fl, sp)
    res.update({"transformers": transformers.__version__, "prefill": {}, "decode": {}})
    cuda = device.type == "cuda"
    for impl in a.hf_impls:
        free()
        model, layout = hf_peer(ref, max(a.lengths), impl, device, dtype)
        res.update(layout)
        shp = layout["shape"]
        for S in a.lengths:
            tokens = torch.randint(0, shp["vocab_size"], (1, S), device=device)

            def prefill():
                with torch.no_grad():
                    return model(tokens, use_cache=True, logits_to_keep=1)
            r = guarded(lambda: measure(prefill, device, budget_ms=300 if a.tiny else a.budget_ms))
            res["prefill"].setdefault(impl, {})[str(S)] = r
            print(f"hf {impl:14s} prefill {S:7d}: {_fmt(r)}", flush=True)
            if S > a.hf_decode_max:
                res["decode"].setdefault(impl, {})[str(S)] = {"not_measured": f"length > --hf-decode-max "
                                                                              f"{a.hf_decode_max} (device time)"}
                free()
                continue

            def decode():
                with torch.no_grad():
                    out = model(tokens, use_cache=True, logits_to_keep=1)
                    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                    del out
                    steps = []
                    for i in range(6):  # the first step warms up; the cache grows by one token per step
                        t = time_call(lambda: model(nxt, past_key_values=cache, use_cache=True), device)
                        steps.append(t)
                return {"median_ms": statistics.median(steps[1:]), "min_ms": min(steps[1:]),
                        "max_ms": max(steps[1:]), "reps": len(steps) - 1,
                        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            r = guarded(decode)
            res["decode"].setdefault(impl, {})[str(S)] = r
            print(f"hf {impl:14s} decode  {S:7d}: {_fmt(r)}", flush=True)
            free()
        del model
        free()
    return res


# -- entry point -------------------------------------------------------------------------------------------------------

#: set by main(): writes the partial result after every measurement, so a run stopped at its time limit keeps what it
#: measured (device calls have a hard limit)
_SAVE = None


def _fmt(r: dict) -> str:
    if _SAVE is not None:
        _SAVE()
    if "median_ms" in r:
        return (f"{r['median_ms']:10.2f} ms  [{r['min_ms']:.2f}, {r['max_ms']:.2f}] x{r['reps']}"
                f"  peak {r.get('peak_mem_gib') or 0:.1f} GiB")
    return json.dumps(r)[:160]


def environment(device, commit) -> dict:
    env = {"card": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'})",
           "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["card_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return env


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["ours", "hf"], help="our hybrid model vs dense, or the HF transformers peer")
    ap.add_argument("--model", default="llama2_7b", choices=[m for m in MODELS if m != "tiny"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--train-layers", type=int, default=3,
                    help="depth of the training measurement (0: skip); 3 = 1 full + 2 sparse, the middle-third ratio")
    ap.add_argument("--budget-ms", type=float, default=4000.0, help="timing budget per measurement after warm-up")
    ap.add_argument("--hf-impls", nargs="+", default=["sdpa", "flex_attention"])
    ap.add_argument("--hf-decode-max", type=int, default=32768, help="HF decode only up to this length")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model, short lengths: a CPU smoke test in seconds")
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None, help="git commit of the benchmarked tree (the device copy has no .git)")
    a = ap.parse_args(argv)
    if a.tiny and a.lengths == ap.get_default("lengths"):
        a.lengths = [128, 256]
    device = torch.device(a.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # CPU smoke: bf16 matmuls are slow there
    commit = a.commit
    if commit is None:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                             stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    res = {"benchmark": f"model_{a.what}", "model": "tiny" if a.tiny else a.model, "lengths": a.lengths,
           "dtype": str(dtype).replace("torch.", ""), "batch": 1, **environment(device, commit), "paper": PAPER}
    t0 = time.time()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    part: dict = {}

    def save(complete=False):
        with open(a.out, "w") as f:
            json.dump({**res, **part, "complete": complete, "wall_s": time.time() - t0}, f, indent=1)
    global _SAVE
    _SAVE = save
    try:
        (bench_ours if a.what == "ours" else bench_hf)(a, device, dtype, part)
    finally:
        _SAVE = None
    res.update(part)
    res["wall_s"] = time.time() - t0
    save(complete=True)
    print(f"wrote {a.out} ({res['wall_s']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
