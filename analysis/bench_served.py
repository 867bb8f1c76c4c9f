"""A served workload in one process: many ``generate()`` calls with prompt lengths drawn log-uniformly from 1 to
``--max-len`` and batch sizes 1..``--max-batch`` (each row its own length), on a Llama-shaped model with random bf16
weights (speed does not depend on values). It reports what a serving operator sees: failures, distinct compiled graphs
and the compilation time they cost, time-to-first-token p50/p99 and decode tokens/s.

Passes, in one process, over the same calls:
1. ``cold``: the library as a user first meets it -- graphs compile when a new bucket first appears;
2. ``warmup``: ``Engine(model, policy).warmup(max_len)`` compiles every bucket ahead of traffic;
3. ``warm``: the same calls again; compilation adds nothing now, and p99 TTFT cold vs warm is the cost of compiling on
   the request path.
Then the peer, transformers' MinistralForCausalLM with the same layout (per-layer ``layer_types``, sliding window =
our window, no sink) through its ``generate()`` with left-padded batches, once per ``attn_implementation``
(``sdpa``, ``flex_attention``), each for at most ``--hf-seconds`` of wall time (device time is scarce; how many calls
it finished is in the JSON). Failures (out of memory included) are recorded per call, never crash the run.

TTFT = prefill of every row of the call + the first sampled token (``Generation.prefill_s``; for the peer, the time to
its streamer's first generated token). Decode tokens/s = tokens generated after the first, summed over the call's
rows, over the call's decode wall time (``generation.batch_decode_s``: until its last row finished; each row's own
``Generation.decode_s`` stops where that row did), summed over calls.

    python analysis/bench_served.py --out analysis/results/served_<card>.json --commit SHA
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import environment, free, hf_peer  # noqa: E402
from flexgen_long.engine import Engine  # noqa: E402
from flexgen_long.generation import batch_decode_s, generate  # noqa: E402
from flexgen_long.layout import full_layer_indices  # noqa: E402
from flexgen_long.models import LLAMA3_1_ROPE_SCALING, longgen_llama  # noqa: E402
from flexgen_long.layout import DEFAULT_SPARSE_PATTERN  # noqa: E402
from flexgen_long.policy import Policy  # noqa: E402
from flexgen_long.shapes import compiled_graphs  # noqa: E402

#: Llama-3.1-8B's layer shape (dim 4096, 32 q / 8 kv heads, FFN 14336, vocab 128256), fewer layers
SHAPE = dict(vocab_size=128_256, num_heads=32, num_kv_heads=8, embed_dim=4096, intermediate_dim=14_336)
SPARSE = DEFAULT_SPARSE_PATTERN  # AttnSink(128, 1920); the committed run 2 record used AttnSink(64, 1984)


def workload(n_calls: int, max_len: int, max_batch: int, new_tokens: int, seed: int) -> list[list[int]]:
    """Prompt lengths per call: each row log-uniform in [1, max_len - new_tokens]."""
    rng = random.Random(seed)
    top = max_len - new_tokens
    return [[min(top, max(1, int(math.exp(rng.uniform(0, math.log(top)))))) for _ in range(rng.randint(1, max_batch))]
            for _ in range(n_calls)]


def prompts_for(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))] if xs else None


def summary(calls: list[dict]) -> dict:
    ok = [c for c in calls if "error" not in c]
    ttft = [c["ttft_s"] for c in ok]
    dec_tok = sum(c.get("decode_tokens", 0) for c in ok)
    dec_s = sum(c.get("decode_s", 0.0) for c in ok)
    return {"calls": len(calls), "failures": len(calls) - len(ok),
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "ttft_max_s": max(ttft) if ttft else None,
            "decode_tokens_per_s": dec_tok / dec_s if dec_s else None,
            "compiled_graphs": sum(c.get("new_graphs", 0) for c in calls),
            "dynamo_graphs": sum(c.get("new_dynamo_graphs", 0) for c in calls),
            "compile_s": sum(c.get("compile_s", 0.0) for c in calls),
            "wall_s": sum(c.get("wall_s", 0.0) for c in calls)}


def run_ours(engine, calls, vocab, new_tokens, label, save) -> list[dict]:
    """Every call through ``generate(engine, ...)``: one engine (model + policy) serves them all."""
    out, stats = [], torch._dynamo.utils.counters["stats"]
    for i, lengths in enumerate(calls):
        g0, d0 = {id(g) for g in compiled_graphs()}, stats["unique_graphs"]
        rec = {"call": i, "batch": len(lengths), "lengths": lengths}
        t0 = time.perf_counter()
        try:
            gens = generate(engine, prompts_for(lengths, vocab, i), max_new_tokens=new_tokens)
            rec.update(ttft_s=gens[0].prefill_s, decode_s=batch_decode_s(gens),
                       decode_tokens=sum(g.decode_tokens for g in gens), prefill_chunk=gens[0].prefill_chunk,
                       capture_s=max(g.capture_s for g in gens))  # CUDA-graph capture, not in decode_s
        except Exception as e:  # noqa: BLE001 -- a failed call is a result of the workload
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            free()
        rec["wall_s"] = time.perf_counter() - t0
        new = [g for g in compiled_graphs() if id(g) not in g0]
        rec["new_graphs"], rec["compile_s"] = len(new), sum(g.first_call_s for g in new)
        rec["new_dynamo_graphs"] = stats["unique_graphs"] - d0  # every graph dynamo made, the compiled layers' too
        out.append(rec)
        if i % 20 == 0 or "error" in rec:
            print(f"{label} call {i:3d} batch {len(lengths)} max {max(lengths):6d}: "
                  + (rec["error"] if "error" in rec else f"ttft {rec['ttft_s']:.3f} s, {rec['new_graphs']} new "
                     "graphs"), flush=True)
            save()
    return out


class _FirstTokenClock:
    """transformers streamer that notes when the first generated token arrives (its first put() is the prompt)."""

    def __init__(self, device):
        self.puts, self.first, self.device = 0, None, device

    def put(self, value):
        self.puts += 1
        if self.puts == 2 and self.first is None:
            sync(self.device)
            self.first = time.perf_counter()

    def end(self):
        pass


def run_hf(ours, vocab, calls, new_tokens, impl, seconds, max_len, device, save) -> list[dict]:
    """The peer on the same calls: ``bench.hf_peer`` of our model (its sizes and layout), transformers' generate()."""
    model, _ = hf_peer(ours, max_len, impl, device, torch.bfloat16)
    out, t_start = [], time.perf_counter()
    for i, lengths in enumerate(calls):
        if time.perf_counter() - t_start > seconds:
            break
        rec = {"call": i, "batch": len(lengths), "lengths": lengths}
        rows = prompts_for(lengths, vocab, i)
        L = max(lengths)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for r, p in enumerate(rows):  # left padding, as transformers' generate() expects for decoder-only models
            ids[r, L - len(p):] = torch.tensor(p)
            mask[r, L - len(p):] = 1
        clock = _FirstTokenClock(device)
        sync(device)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                res = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     streamer=clock)
            sync(device)
            t1 = time.perf_counter()
            rec.update(ttft_s=clock.first - t0, decode_s=t1 - clock.first,
                       decode_tokens=len(rows) * (res.shape[1] - L - 1))
            del res
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        rec["wall_s"] = time.perf_counter() - t0
        free()
        out.append(rec)
        if i % 10 == 0 or "error" in rec:
            print(f"hf {impl} call {i:3d} batch {len(lengths)} max {L:6d}: "
                  + (rec["error"] if "error" in rec else f"ttft {rec['ttft_s']:.3f} s"), flush=True)
            save()
    del model
    free()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=131072)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--layers", type=int, default=6, help="model depth (middle third full)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-impls", nargs="*", default=["sdpa", "flex_attention"])
    ap.add_argument("--hf-seconds", type=float, default=90.0, help="wall-time cap per HF backend")
    ap.add_argument("--passes", nargs="+", default=["cold", "warmup", "warm"], choices=["cold", "warmup", "warm"],
                    help="which passes of our generate() to run, in order")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--eager", action="store_true",
                    help="our calls with eager layers (Policy(compile_prefill=False, compile_decode=False)) instead "
                         "of the device's default policy")
    ap.add_argument("--tiny", action="store_true", help="a small model for a CPU smoke test of the script")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    shape = dict(SHAPE, vocab_size=512, num_heads=4, num_kv_heads=2, embed_dim=128, intermediate_dim=256) \
        if a.tiny else SHAPE
    calls = workload(a.calls, a.max_len, a.max_batch, a.new_tokens, a.seed)
    res = {"benchmark": "served workload", **environment(dev, a.commit),
           "policy": "eager layers" if a.eager else "the device's default",
           "model": {**shape, "num_layers": a.layers, "full_layers": list(full_layer_indices(a.layers, "middle")),
                     "sparse": repr(SPARSE), "dtype": "bf16", "weights": "random"},
           "workload": {"calls": a.calls, "max_len": a.max_len, "max_batch": a.max_batch, "new_tokens": a.new_tokens,
                        "seed": a.seed, "prompt_tokens": sum(map(sum, calls)),
                        "distinct_lengths": len({n for c in calls for n in c})},
           "passes": {}}
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: path.write_text(json.dumps(res, indent=1))  # noqa: E731

    def ours(device):
        torch.manual_seed(0)
        with torch.device(device):
            return longgen_llama(shape["vocab_size"], a.layers, shape["num_heads"], shape["num_kv_heads"],
                                 shape["embed_dim"], shape["intermediate_dim"], a.max_len, 500_000,
                                 sparse_pattern=SPARSE, rope_scaling=LLAMA3_1_ROPE_SCALING).to(torch.bfloat16).eval()

    model = ours(dev)
    engine = Engine(model, Policy(compile_prefill=False, compile_decode=False) if a.eager else Policy())
    for label in a.passes:
        if label == "warmup":
            w = engine.warmup(a.max_len - a.new_tokens)
            res["passes"]["warmup"] = {**w, "graphs": [list(map(str, g)) for g in w["graphs"]]}
            print("warmup", res["passes"]["warmup"], flush=True)
            continue
        rows = run_ours(engine, calls, shape["vocab_size"], a.new_tokens, label, save)
        res["passes"][label] = {"summary": summary(rows), "calls": rows}
        print(label, res["passes"][label]["summary"], flush=True)
        save()
    if "cold" in res["passes"] and "warm" in res["passes"]:
        cold, warm = res["passes"]["cold"]["summary"], res["passes"]["warm"]["summary"]
        res["compile_share_of_cold_p99_ttft"] = cold["ttft_p99_s"] / warm["ttft_p99_s"] - 1
    del model, engine
    free()
    for impl in a.hf_impls:
        rows = run_hf(ours("meta"), shape["vocab_size"], calls, a.new_tokens, impl, a.hf_seconds, a.max_len, dev,
                      save)
        res["passes"][f"hf_{impl}"] = {"summary": summary(rows), "calls": rows,
                                       "note": f"stopped after {a.hf_seconds:.0f} s of wall time"}
        print(f"hf {impl}", res["passes"][f"hf_{impl}"]["summary"], flush=True)
        save()
    save()
    return res


if __name__ == "__main__":
    main()
