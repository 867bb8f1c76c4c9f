"""transformers' ``generate()`` on an exported LongGen model against our own ``generate()``, same weights, same prompt:
decode time per token, prefill time, peak memory, KV-cache bytes, and whether the greedy tokens agree.

    python analysis/bench_hf_generate.py --model llama3_1_8b --prompt-len 32768 --new-tokens 64      # a GPU
    python analysis/bench_hf_generate.py --source outputs/smollm2-135m-instruct --prompt-len 32768   # real weights
    python analysis/bench_hf_generate.py --smoke                                                     # CPU, seconds

The model: ``--source DIR`` (an HF Llama directory or a finetune checkpoint; the layout options apply to the former) or
``--model NAME``, a shape of flexgen_long.models with random weights (speed does not depend on values). Either way it
goes the user's way: our model is written as a finetune checkpoint (``flexgen_long.checkpoint_io``) -- unless a
``--source`` is given -- and exported with ``flexgen_long.export_hf``; transformers loads the export
(``AutoModelForCausalLM`` after ``import flexgen_long.hf_model``), ours is ``flexgen_long.hf.load_model`` of the same
checkpoint. The layout: ``--full-layers`` (default middle) and AttnSink(``--sink``, ``--window``).

Rows, each called twice with the same shapes (the first call compiles, captures CUDA graphs, warms allocators; the
second is reported):

* ``ours``: ``flexgen_long.generation.generate(model, [prompt], max_new_tokens=N)``; its own ``prefill_s`` and
  ``decode_s`` per decoded token (CUDA-graph capture excluded, as generate() reports it);
* ``hf_dynamic``: ``model.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)`` (the default dynamic
  cache with our trimmed sink layers);
* ``hf_static``: the same with ``cache_implementation="static"`` (on a GPU transformers compiles the decode step).

transformers' rows are timed by a streamer that notes when each token reaches the host: prefill = from the call to the
first new token, decode per token = from the first to the last new token over N - 1 (generate() moves each token to
the host, so these are device-synchronised wall times, the Python loop and sampling included). Peak memory: the
device's peak allocation during the reported call, less what was allocated before it (weights); KV bytes: ours
``flexgen_long.cache.plan_cache`` (what generate() allocates), transformers' the cache it returned
(``flexgen_long.hf_model.cache_bytes``). Results go to ``<out>/hf_generate_<model>_<card>.json``; the table is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from flexgen_long import checkpoint_io, hf, models
from flexgen_long.cache import plan_cache
from flexgen_long.export_hf import export_hf, resolve_checkpoint
from flexgen_long.generation import generate
from flexgen_long.patterns import AttnSink
from flexgen_long.recipe_config import DTYPES

#: --model: SmolLM2-135M's shape (``SMOLLM2``) and flexgen_long.models' ``longgen_<name>`` presets.
SHAPES = ("smollm2", "llama3_2_1b", "llama2_7b", "llama3_1_8b")
#: SmolLM2-135M's sizes (its config.json), for random weights when the real ones are not at hand.
SMOLLM2 = dict(vocab_size=49152, num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576, intermediate_dim=1536,
               rope_base=100_000.0, norm_eps=1e-5, tie_word_embeddings=True)
TINY = dict(vocab_size=256, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
            rope_base=10_000.0)


def _peak_start(device) -> int:
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak(device, base: int):
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None


def write_checkpoint(args, workdir: Path, dtype) -> Path:
    """A finetune-format checkpoint of a random-weight model of ``args.model``'s shape with the layout."""
    sparse = {"_component_": "flexgen_long.patterns.AttnSink", "sink": args.sink, "window": args.window}
    max_len = args.prompt_len + args.new_tokens + 8
    if args.model in ("smollm2", "tiny"):
        cfg = {"_component_": "flexgen_long.models.longgen_llama", **(SMOLLM2 if args.model == "smollm2" else TINY),
               "max_seq_len": max_len}
    else:
        cfg = {"_component_": f"flexgen_long.models.longgen_{args.model}", "max_seq_len": max_len}
    cfg |= {"full_layers": args.full_layers, "sparse_pattern": sparse}
    builder = getattr(models, cfg["_component_"].rsplit(".", 1)[1])
    model = builder(**{k: v for k, v in cfg.items() if k != "_component_"}).to(dtype)
    return checkpoint_io.save_checkpoint(workdir / "run", 1, model.state_dict(),
                                         checkpoint_io.hf_config(model, cfg, dtype=dtype))


def run_ours(checkpoint: Path, prompt: list[int], args, device, dtype, trained: bool) -> dict:
    """Our generate() on ``checkpoint``: a finetune checkpoint (``trained``) as trained, an HF Llama with the layout."""
    model = hf.load_model(checkpoint, device=device, dtype=dtype).eval()
    if not trained:
        models.relayout(model, args.full_layers, AttnSink(args.sink, args.window))
    for call in range(2):
        base = _peak_start(device)
        out = generate(model, [prompt], max_new_tokens=args.new_tokens)[0]
    row = {"impl": "ours", "prefill_s": out.prefill_s, "decode_ms_per_token": 1e3 * out.decode_s / out.decode_tokens,
           "peak_bytes": _peak(device, base),
           "kv_bytes": plan_cache(model, 1, len(prompt) + args.new_tokens, dtype).total_bytes, "tokens": out.tokens}
    del model
    return row


class _Clock:
    """A generate() streamer that only notes when each put() arrives: first the prompt, then every new token (which
    generate() moves to the host, so the device has finished the step)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_hf(export: Path, prompt: list[int], args, device, dtype, static: bool) -> dict:
    import flexgen_long.hf_model as hf_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, dtype=dtype).to(device).eval()
    ids = torch.tensor([prompt], device=device)
    kw = {"cache_implementation": "static"} if static else {}
    n = args.new_tokens
    with torch.inference_mode():
        for call in range(2):
            clock = _Clock()
            base = _peak_start(device)
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
                                 return_dict_in_generate=True, **kw)
    t = clock.times  # [prompt, token 1, ..., token n]
    cache = out.cache if "cache" in out else out.past_key_values
    row = {"impl": "hf_static" if static else "hf_dynamic", "prefill_s": t[1] - t0,
           "decode_ms_per_token": 1e3 * (t[-1] - t[1]) / (n - 1), "peak_bytes": _peak(device, base),
           "kv_bytes": hf_model.cache_bytes(cache), "tokens": out.sequences[0, len(prompt):].tolist()}
    del model, out, cache
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", help="an HF Llama directory or a finetune checkpoint (default: --model, random weights)")
    p.add_argument("--model", default="smollm2", choices=[*SHAPES, "tiny"])
    p.add_argument("--full-layers", default="middle")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--window", type=int, default=448)
    p.add_argument("--prompt-len", type=int, default=32768)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--rows", nargs="+", default=["ours", "hf_dynamic", "hf_static"])
    p.add_argument("--workdir", help="where the checkpoint and the export are written (default: a temporary dir)")
    p.add_argument("--out", default="analysis/results")
    p.add_argument("--smoke", action="store_true", help="CPU, a tiny random model, 512-token prompt, 8 tokens")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.prompt_len, args.new_tokens, args.sink, args.window = "tiny", 512, 8, 4, 60
        args.full_layers = [1]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    card = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"
    name = Path(args.source).name if args.source else args.model

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)  # the folder for the run's temporary files
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        checkpoint = resolve_checkpoint(args.source) if args.source else write_checkpoint(args, tmp, dtype)
        t0 = time.perf_counter()
        source_is_trained = hf.is_recipe_checkpoint(hf.read_config(checkpoint))
        layout = {} if source_is_trained else {"full_layers": args.full_layers,
                                               "sparse_pattern": AttnSink(args.sink, args.window)}
        export = export_hf(checkpoint, tmp / "hf", dtype=dtype, log=print, **layout)
        export_s = time.perf_counter() - t0
        vocab = json.loads((export / "config.json").read_text())["vocab_size"]
        prompt = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        rows = []
        for impl in args.rows:
            if impl == "ours":
                rows.append(run_ours(checkpoint, prompt, args, device, dtype, source_is_trained))
            else:
                rows.append(run_hf(export, prompt, args, device, dtype, static=impl == "hf_static"))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    ours = next((r for r in rows if r["impl"] == "ours"), None)
    print(f"\n{name}, prompt {args.prompt_len}, {args.new_tokens} new tokens, {dtype}, {card} "
          f"(export {export_s:.0f} s)")
    print(f"{'impl':<12} {'prefill s':>10} {'decode ms/tok':>14} {'x ours':>7} {'peak GiB':>9} {'x ours':>7} "
          f"{'KV MiB':>9} {'tokens = ours':>14}")
    for r in rows:
        if ours is not None:
            r["decode_vs_ours"] = r["decode_ms_per_token"] / ours["decode_ms_per_token"]
            r["peak_vs_ours"] = r["peak_bytes"] / ours["peak_bytes"] if r["peak_bytes"] and ours["peak_bytes"] else None
            same = next((i for i, (a, b) in enumerate(zip(r["tokens"], ours["tokens"])) if a != b), len(r["tokens"]))
            r["tokens_equal_to_ours"] = same
        peak = f"{r['peak_bytes'] / 2**30:9.2f}" if r["peak_bytes"] else f"{'-':>9}"
        peak_x = f"{r['peak_vs_ours']:7.2f}" if r.get("peak_vs_ours") else f"{'-':>7}"
        print(f"{r['impl']:<12} {r['prefill_s']:10.3f} {r['decode_ms_per_token']:14.2f} "
              f"{r.get('decode_vs_ours', float('nan')):7.2f} {peak} {peak_x} {r['kv_bytes'] / 2**20:9.2f} "
              f"{r.get('tokens_equal_to_ours', '-')!s:>14}")
    result = {"model": name, "card": card, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "layout": {"full_layers": args.full_layers, "sink": args.sink, "window": args.window} if not
              source_is_trained else "as trained", "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "export_s": export_s, "rows": rows}
    out = Path(args.out) / f"hf_generate_{name}_{card}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
