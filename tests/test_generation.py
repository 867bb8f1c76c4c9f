"""flexgen_long.engine and flexgen_long.generation against the no-cache oracle: the hybrid model's own full forward
``model(tokens)`` (same sparse masks, dense-mask SDPA on CPU) -- teacher-forced logits through the caches, greedy
tokens vs greedy by full recompute, chunked vs unchunked prefill, batches of mixed lengths vs each prompt alone; and
the policy's compiled paths against the eager ones (traced by dynamo with a graph-counting backend: Inductor takes
minutes on a 2-core CPU; the GPU suite runs Inductor)."""

import time

import pytest
import torch

from flexgen_long import generation
from flexgen_long.cache import plan_cache, prefill_activation_bytes
from flexgen_long.engine import Engine
from flexgen_long.generation import batch_decode_s, batch_tokens_per_s, generate, sample
from flexgen_long.models import longgen_llama, longgen_tiny
from flexgen_long.patterns import AttnSink, BlockSparse
from flexgen_long.policy import Policy
from flexgen_long.shapes import compiled_graphs

# (pattern, num_kv_heads): windows small enough that 150-token sequences wrap rings ~14x and drop many stride blocks
CASES = [(AttnSink(3, 10), 4), (AttnSink(3, 10), 2), (AttnSink(0, 7), 1),
         (BlockSparse(16, 2, 3, per_head=True), 2), (BlockSparse(16, 2, 3, per_head=True), 4),
         (BlockSparse(16, 2, 4, per_head=False), 2)]
IDS = [f"{p!r}-kv{h}" for p, h in CASES]


def _model(pattern, kv_heads, vocab=97):
    torch.manual_seed(0)
    return longgen_llama(vocab, 4, 4, kv_heads, 32, 64, 512, full_layers="middle", sparse_pattern=pattern)


def _oracle(model, toks):
    with torch.enable_grad():  # grad-enabled forward on CPU = dense masks of the same token rule, no cache
        return model(toks).detach()


def _positional_flex_graphs() -> int:
    """Compiled-function keys of sparse layers' later chunks (their mask key starts with "positional")."""
    return sum(1 for g in compiled_graphs("_flex") if any(isinstance(x, tuple) and x[:1] == ("positional",)
                                                            for x in g.key[2]))


@pytest.mark.parametrize("pattern, kv_heads", CASES, ids=IDS)
def test_teacher_forced_logits_equal_full_forward(pattern, kv_heads):
    """Batch of 3 prompts of mixed lengths (prefilled in chunks), then teacher-forced decode of the rest together;
    every row's logits == the full forward of that row's sequence. 150 tokens >= 3x every window."""
    model = _model(pattern, kv_heads)
    S, B = 150, 3
    toks = torch.randint(0, 97, (B, S))
    ref = _oracle(model, toks)
    lens = [37, 5, 64]
    engine = Engine(model, Policy(prefill_chunk=11))
    engine.reserve(B, S)
    got = [[engine.prefill(toks[b, :n], b, all_logits=True)] for b, n in enumerate(lens)]
    pos = torch.tensor(lens)
    for t in range(S - max(lens)):
        logits = engine.step(toks[torch.arange(B), pos])
        for b in range(B):
            got[b].append(logits[b:b + 1])
        pos = pos + 1
    assert engine.lengths == [n + S - max(lens) for n in lens]
    for b, n in enumerate(lens):
        g = torch.cat(got[b])
        torch.testing.assert_close(g, ref[b, :g.shape[0]], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pattern, kv_heads", CASES[:1] + CASES[3:4], ids=IDS[:1] + IDS[3:4])
def test_chunked_prefill_equals_unchunked(pattern, kv_heads):
    model = _model(pattern, kv_heads)
    prompt = torch.randint(0, 97, (140,))
    outs = []
    for chunk in (None, 1, 16, 33):
        engine = Engine(model, Policy(prefill_chunk=chunk))
        engine.reserve(1, 160)
        logits = engine.prefill(prompt, 0, all_logits=True)
        # what the next query (position 140) may see; stale slots (never read) may differ between chunkings
        live = [(c.visible(torch.tensor([[140]]), c.pos)[:, :, 0], c) for c in engine.cache.layers.values()]
        outs.append((logits, [(torch.where(m[..., None], c.k, 0), torch.where(m, c.pos, -1)) for m, c in live]))
    for logits, layers in outs[1:]:
        torch.testing.assert_close(logits, outs[0][0], atol=2e-5, rtol=1e-4)
        for (k, p), (k0, p0) in zip(layers, outs[0][1]):
            assert torch.equal(p, p0)  # the same positions in the same slots
            torch.testing.assert_close(k, k0, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("pattern, kv_heads", CASES[1:], ids=IDS[1:])  # MQA, GQA and MHA; AttnSink MHA: test_attention
def test_chunked_prefill_by_flex_equals_full_forward(pattern, kv_heads):
    """Later chunks by the GPU's routes (``Policy(chunk_flex=True)``: flex over the full buffer, and over [used slots ;
    chunk] with a positional mask_mod, padded to buckets; run here eagerly): every chunked prefill's logits equal the
    no-cache forward's, over prompts of several lengths and caches of several sizes, and the sparse later chunks make
    one compiled-function key -- one chunk bucket (11 and 37 both pad to 128), whatever the offset, the prompt length
    or the cache's max_len."""
    model = _model(pattern, kv_heads)
    toks = torch.randint(0, 97, (1, 150))
    ref = _oracle(model, toks)[0]
    before = _positional_flex_graphs()
    with torch.compiler.set_stance("force_eager"):
        for n, chunk, extra in [(150, 11, 0), (150, 37, 7), (96, 37, 50), (61, 11, 3)]:
            engine = Engine(model, Policy(prefill_chunk=chunk, chunk_flex=True))
            engine.reserve(1, n + extra)
            got = engine.prefill(toks[0, :n], 0, all_logits=True)
            torch.testing.assert_close(got, ref[:n], atol=2e-5, rtol=1e-4, msg=f"n={n} chunk={chunk}")
    new = _positional_flex_graphs() - before
    assert new <= 1 and (new == 1 or pattern == AttnSink(3, 10) and kv_heads == 2)  # earlier cases may have made it


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_warmup_covers_the_sparse_later_chunk_keys():
    """Engine.warmup(max_prompt_len) makes every compiled-function key that chunked prompts of up to that length then
    need for the sparse layers' later chunks, whatever max_new_tokens sizes their caches (the GPU routes forced on
    CPU, compilation off: the keys are made as on a GPU, nothing is compiled)."""
    model = _model(BlockSparse(32, 2, 2, per_head=True), 2)  # slots in use grow with the offset: 2 slot buckets
    policy = Policy(prefill_chunk=50, chunk_flex=True)
    g = torch.Generator().manual_seed(3)
    with torch.compiler.set_stance("force_eager"):
        before = len(compiled_graphs("_flex"))
        w = Engine(model, policy).warmup(300)
        warmed = len(compiled_graphs("_flex"))
        for n in sorted(torch.randint(51, 301, (8,), generator=g).tolist()) + [300]:
            engine = Engine(model, policy)
            engine.reserve(1, n + n % 50)  # as generate sizes it: + max_new_tokens
            engine.prefill(torch.randint(0, 97, (n,), generator=g), 0)
    assert warmed - before >= 2 and len(compiled_graphs("_flex")) == warmed
    assert {k for k, _, _ in w["graphs"]} == {"flex_over_slots", "flex_full_chunk"} and w["prefill_chunk"] == 50


def _greedy_by_recompute(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            with torch.enable_grad():
                logits = model(torch.tensor([seq]))[0, -1].detach()
            seq.append(int(logits.argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("pattern, kv_heads", [CASES[1], CASES[3]], ids=[IDS[1], IDS[3]])
def test_greedy_equals_full_recompute_and_batch_equals_alone(pattern, kv_heads):
    model = _model(pattern, kv_heads)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (30, 3, 55)]
    streamed = []
    outs = generate(model, prompts, max_new_tokens=40, policy=Policy(prefill_chunk=16),
                    on_token=lambda b, t: streamed.append((b, t)))
    for b, p in enumerate(prompts):
        assert outs[b].tokens == _greedy_by_recompute(model, p, 40)
        assert outs[b].prompt_len == len(p) and outs[b].tokens_per_s > 0
        assert [t for r, t in streamed if r == b] == outs[b].tokens
        alone = generate(model, [p], max_new_tokens=40)[0].tokens
        assert alone == outs[b].tokens


def test_stop_tokens_and_sampling():
    model = longgen_tiny(vocab_size=50)
    out = generate(model, [[1, 2, 3]], max_new_tokens=30)[0].tokens
    stop = out[4]
    cut = generate(model, [[1, 2, 3]], max_new_tokens=30, stop_tokens=[stop])[0].tokens
    assert cut == out[:out.index(stop) + 1]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = generate(model, [[1, 2], [3]], max_new_tokens=10, temperature=0.8, top_k=10, top_p=0.9, generator=g1)
    b = generate(model, [[1, 2], [3]], max_new_tokens=10, temperature=0.8, top_k=10, top_p=0.9, generator=g2)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert all(0 <= t < 50 for r in a for t in r.tokens)


def _early_stop_case(model, n=30):
    """Two prompts and a stop token that ends row 0 after a few tokens and never appears in row 1's output."""
    prompts = [[1, 2, 3], [7, 8]]
    full = [r.tokens for r in generate(model, prompts, max_new_tokens=n)]
    for k in range(2, n - 5):
        if full[0][k] not in full[1] and full[0][k] not in full[0][:k]:
            return prompts, full, k
    pytest.skip("no token of row 0 is absent from row 1 (random weights)")


class _CountingEngine(Engine):
    """An Engine that counts its decode steps."""

    steps = 0

    def step(self, tokens):
        self.steps += 1
        return super().step(tokens)


def test_per_row_decode_time_counts_its_own_steps(monkeypatch):
    """A row's decode_s runs from the end of prefill to the step that produced its last token: with a clock that reads
    the number of decode steps run so far, a row that stopped after k steps reports k, the other the whole batch's
    n - 1, each row's rate is its own tokens over its own time, and the batch rate is all rows' tokens over n - 1."""
    model = longgen_tiny(vocab_size=50)
    n = 30
    prompts, full, k = _early_stop_case(model, n)
    engine = _CountingEngine(model)
    monkeypatch.setattr(generation, "time",
                        type("Clock", (), {"perf_counter": staticmethod(lambda: float(engine.steps))}))
    outs = generate(engine, prompts, max_new_tokens=n, stop_tokens=[full[0][k]])
    assert outs[0].tokens == full[0][:k + 1] and outs[1].tokens == full[1]
    assert (outs[0].decode_s, outs[1].decode_s) == (k, n - 1)
    assert outs[0].tokens_per_s == outs[1].tokens_per_s == 1.0
    assert batch_decode_s(outs) == n - 1 and batch_tokens_per_s(outs) == (k + n - 1) / (n - 1)
    assert outs[0].prefill_s == outs[1].prefill_s == 0.0  # prefill runs no decode step


def test_early_stopping_row_reports_its_own_rate():
    """Real clock: the row that hit a stop token early stops its clock there; rates from each row's own count."""
    model = longgen_tiny(vocab_size=50)
    prompts, full, k = _early_stop_case(model)
    outs = generate(model, prompts, max_new_tokens=30, stop_tokens=[full[0][k]])
    assert len(outs[0].tokens) == k + 1 and len(outs[1].tokens) == 30
    assert 0 < outs[0].decode_s < outs[1].decode_s
    for o in outs:
        assert o.tokens_per_s == pytest.approx((len(o.tokens) - 1) / o.decode_s)
    assert outs[0].prefill_s == outs[1].prefill_s > 0  # the batch's prefill, shared
    assert batch_decode_s(outs) == outs[1].decode_s
    assert batch_tokens_per_s(outs) == pytest.approx((k + 29) / outs[1].decode_s)
    one = generate(model, [[1, 2, 3]], max_new_tokens=5, stop_tokens=[full[0][0]])[0]
    assert one.tokens == full[0][:1] and one.decode_s == 0.0  # the prefill's token was its only one
    with pytest.raises(ValueError, match="non-empty list"):
        batch_tokens_per_s([])


def test_auto_prefill_chunk_from_the_memory_plan(monkeypatch):
    """prefill_chunk='auto' (the default): whole prompts when memory is ample; with little free memory left after the
    caches, the largest multiple of 128 whose activations fit -- and the same tokens as whole-prompt prefill; a
    MemoryError naming the numbers when not even 128 tokens fit, or when the caches alone do not."""
    from flexgen_long import engine as engine_module
    model = longgen_tiny(vocab_size=259)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 259, (n,), generator=g).tolist() for n in (1000, 300)]
    new = 8
    whole = generate(model, prompts, max_new_tokens=new, policy=Policy(prefill_chunk=None))
    assert generate(model, prompts, max_new_tokens=new)[0].prefill_chunk is None  # ample memory: whole prompts
    plan = plan_cache(model, 2, 1000 + new, torch.float32)
    act = {c: prefill_activation_bytes(model, c, torch.float32, 1000, 1000 + new, "cpu") for c in (128, 256, 384)}
    assert act[128] < act[256] < act[384] < prefill_activation_bytes(model, 1000, torch.float32, 1000 + new)
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda d: plan.total_bytes + (act[256] + act[384]) // 2)
    auto = generate(model, prompts, max_new_tokens=new)
    assert [o.prefill_chunk for o in auto] == [256, 256]
    assert [o.tokens for o in auto] == [o.tokens for o in whole]
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: plan.total_bytes + act[128] - 1)
    with pytest.raises(MemoryError, match=r"1000-token prompt does not fit: .* in chunks of 128 tokens, but only "
                                          rf"{act[128] - 1} bytes .* are free after the KV caches"):
        generate(model, prompts, max_new_tokens=new)
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: plan.total_bytes - 1)
    with pytest.raises(MemoryError, match=rf"KV caches need {plan.total_bytes} bytes"):
        generate(model, prompts, max_new_tokens=new)


def test_warmup_auto_resolves_the_chunk_generate_would_choose(monkeypatch):
    """warmup with prefill_chunk='auto' warms the chunk that generate()'s default picks for one prompt of
    max_prompt_len tokens (None with ample memory, the memory plan's chunk when tight) and says which."""
    from flexgen_long import engine as engine_module
    model = longgen_tiny(vocab_size=259)
    assert Engine(model).warmup(1000)["prefill_chunk"] is None
    plan = plan_cache(model, 1, 1000, torch.float32)
    act = {c: prefill_activation_bytes(model, c, torch.float32, 1000, 1000, "cpu") for c in (256, 384)}
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda d: plan.total_bytes + (act[256] + act[384]) // 2)
    w = Engine(model).warmup(1000)
    assert w["prefill_chunk"] == 256 and w["seconds"] > 0
    with pytest.raises(ValueError, match="max_prompt_len must be an int"):
        Engine(model).warmup(0)


def test_sample_filters():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    assert sample(logits).tolist() == [1]
    for _ in range(20):
        assert sample(logits, 1.0, top_k=2).item() in (1, 2)
        assert sample(logits, 1.0, top_p=0.5).item() == 1  # p(1) = 0.72 >= 0.5 alone


@pytest.mark.parametrize("kw, msg", [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                                     (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"),
                                     (dict(prompts=[[]]), r"prompts\[0\]"), (dict(prompts=[[1, 999]]), "vocab_size"),
                                     (dict(max_new_tokens=5000), "max_seq_len"), (dict(policy="fast"), "policy must be")])
def test_bad_arguments(kw, msg):
    model = longgen_tiny(vocab_size=50)
    args = dict(prompts=[[1, 2]], max_new_tokens=4) | kw
    with pytest.raises(ValueError, match=msg):
        generate(model, args.pop("prompts"), **args)
    with pytest.raises(ValueError, match="not both"):
        generate(Engine(model), [[1, 2]], max_new_tokens=4, policy=Policy())


@pytest.mark.parametrize("kw, msg", [(dict(prefill_chunk=0), "prefill_chunk"), (dict(prefill_chunk=True), "prefill_chunk"),
                                     (dict(prefill_chunk="whole"), r"prefill_chunk must be 'auto' .*None .*int >= 1"),
                                     (dict(compile_decode="yes"), "compile_decode must be True, False or None"),
                                     (dict(cuda_graphs=1), "cuda_graphs must be True, False or None"),
                                     (dict(dense_mask_max_len=-1), "dense_mask_max_len"),
                                     (dict(compile_backend=3), "compile_backend"),
                                     (dict(compile_options=[1]), "compile_options")])
def test_policy_refuses_bad_fields_naming_them(kw, msg):
    with pytest.raises(ValueError, match=f"Policy.{msg}"):
        Policy(**kw)


def test_policy_defaults_follow_the_device():
    """None fields resolve per device: compiled layers, CUDA graphs, look-ahead and flex later chunks on CUDA, none of
    them on a CPU, where short sequences use dense masks; CUDA graphs are refused off CUDA; set fields are kept."""
    cuda, cpu = Policy().on("cuda"), Policy().on("cpu")
    for f in ("compile_prefill", "compile_decode", "cuda_graphs", "lookahead", "chunk_flex"):
        assert getattr(cuda, f) is True and getattr(cpu, f) is False
    assert (cuda.dense_mask_max_len, cpu.dense_mask_max_len) == (0, 2048)
    assert Policy(compile_decode=True, prefill_chunk=64).on("cpu").compile_decode is True
    assert Policy(compile_options={"b": 1, "a": 2}).compile_options == (("a", 2), ("b", 1))
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        Engine(longgen_tiny(vocab_size=50), Policy(cuda_graphs=True))


def test_generate_recipe_runs_as_typed_and_loads_a_checkpoint(tmp_path):
    """`tune run recipes/longgen_generate.py --config recipes/configs/generate/tiny.yaml` from the repo root (as the
    README says), on random weights and with checkpoint_dir= a checkpoint in the finetune recipe's format."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from flexgen_long import checkpoint_io

    repo = Path(__file__).resolve().parents[1]
    tune = str(Path(sys.executable).parent / "tune")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cfg = "recipes/configs/generate/tiny.yaml"
    r = subprocess.run([tune, "run", "recipes/longgen_generate.py", "--config", cfg, "max_new_tokens=8",
                        "temperature=0"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "=== [0] def fibonacci(n):" in r.stdout and "tokens/s over the batch of 2" in r.stderr + r.stdout
    assert "KV cache plan" in r.stderr + r.stdout

    model_cfg = {"_component_": "flexgen_long.models.longgen_tiny", "vocab_size": 259, "max_seq_len": 256}
    model = longgen_tiny(vocab_size=259, max_seq_len=256)
    path = checkpoint_io.save_checkpoint(tmp_path, 7, model.state_dict(), checkpoint_io.hf_config(model, model_cfg))
    r = subprocess.run([tune, "run", "recipes/longgen_generate.py", "--config", cfg, "max_new_tokens=8",
                        "temperature=0", f"checkpoint_dir={path}", "prompts=[abc]"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    prompt = [256, 97, 98, 99]  # BOS + "abc"
    want = generate(model, [prompt], max_new_tokens=8)[0].tokens
    from flexgen_long.tokenizers import ByteTokenizer
    assert f"=== [0] abc{ByteTokenizer().decode(want)}" in r.stdout

    # kv_cache_dtype=fp8: the plan shows the FP8 full layers, the text is the library's under the same policy
    r = subprocess.run([tune, "run", "recipes/longgen_generate.py", "--config", cfg, "max_new_tokens=8",
                        "temperature=0", f"checkpoint_dir={path}", "prompts=[abc]", "kv_cache_dtype=fp8"], cwd=repo,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert " fp8\n" in r.stderr + r.stdout
    want = generate(model, [prompt], max_new_tokens=8, policy=Policy(kv_cache_dtype="fp8"))[0].tokens
    assert f"=== [0] abc{ByteTokenizer().decode(want)}" in r.stdout


@pytest.mark.parametrize("overrides,message", [
    (["prompts=hello"], r"config field 'prompts': must be a non-empty list of non-empty strings .*got 'hello'"),
    (["prompts=[]"], r"config field 'prompts': must be a non-empty list"),
    (["checkpoint_dir=/nonexistent/step_5"], r"config field 'checkpoint_dir': '/nonexistent/step_5' does not exist"),
    (["top_p=2"], r"config field 'top_p': must be null or a number in \(0, 1\], got 2"),
    (["max_new_tokens=abc"], r"config field 'max_new_tokens': must be an int >= 1, got 'abc'"),
    (["temperature=-1"], r"config field 'temperature': must be a number >= 0, got -1"),
    (["dtype=fp16"], r"config field 'dtype': must be one of \['fp32', 'bf16'\], got 'fp16'"),
    (["prefill_chunk=whole"], r"config field 'prefill_chunk': must be null, 'auto' or an int >= 1, got 'whole'"),
    (["prefill_chunk=0"], r"config field 'prefill_chunk': must be null, 'auto' or an int >= 1, got 0"),
    (["compile=always"], r"config field 'compile': must be null, true or false, got 'always'"),
    (["kv_cache_dtype=int8"], r"config field 'kv_cache_dtype': must be null or 'fp8', got 'int8'"),
    (["quantize=int8"], r"config field 'quantize': must be null or one of \['int8wo', 'fp8', 'int4wo'\], got 'int8'"),
    (["quantize=int4wo"], r"config field 'quantize': scheme 'int4wo' needs .*CUDA|needs bf16 weights"),
    *([] if torch.cuda.is_available() else [(["device=cuda"], r"config field 'device': 'cuda' was requested")]),
])
def test_generate_recipe_refuses_bad_config_naming_the_field(overrides, message):
    from pathlib import Path

    from omegaconf import OmegaConf
    from recipes.longgen_generate import validate_config

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "recipes" / "configs" / "generate" / "tiny.yaml")
    with pytest.raises(ValueError, match=message):
        validate_config(OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides)))


class _GraphCounter:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them as traced (no code generation:
    Inductor takes minutes on a 2-core CPU; the GPU suite runs the Inductor-compiled step)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs, **kwargs):
        self.graphs.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        self.options = kwargs.get("options")
        return gm.forward


@pytest.mark.parametrize("pattern, kv_heads", [(AttnSink(3, 10), 2), (BlockSparse(16, 2, 3, per_head=True), 2)],
                         ids=["attnsink-gqa", "blocksparse-perhead"])
def test_compiled_decode_same_logits_tokens_and_bounded_graphs(pattern, kv_heads):
    """Policy(compile_decode=True) (each layer's work around attention compiled, attention eager between the graphs)
    against the eager step on twin engines: the same logits at every step of a mixed-length batch (rings filling,
    wrapping and full, exact and masked steps), the same greedy tokens through generate(), and 4 graphs per set
    whatever the depth -- one set for the first batch size, one for batch 1 (always specialised), one with the batch
    dimension dynamic at the next size, none after, nor for other cache sizes or prompt lengths."""
    torch._dynamo.reset()  # graphs compiled by other tests for other model shapes must not count here
    counter = _GraphCounter()
    compiled = Policy(compile_decode=True, compile_backend=counter)
    model = _model(pattern, kv_heads).eval()
    prompts = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (1, 23, 61)]
    engines = [Engine(model), Engine(model, compiled)]
    for e in engines:
        e.reserve(3, 140)
        for row, p in enumerate(prompts):
            e.prefill(torch.tensor(p), row)
    tok, worst = torch.tensor([p[-1] for p in prompts]), 0.0
    for t in range(70):
        want, got = engines[0].step(tok), engines[1].step(tok)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        tok = want.argmax(-1)
    assert worst < 1e-6, f"compiled vs eager decode logits: relative difference {worst:.2e}"
    for c0, c1 in zip(engines[0].cache.layers.values(), engines[1].cache.layers.values()):  # eager attention wrote
        assert torch.equal(c0.pos, c1.pos) and torch.allclose(c0.k, c1.k, atol=1e-6)
    assert len(counter.graphs) == 4, counter.graphs  # RMSNorm | q/k/v + RoPE | output projection | residual + MLP
    assert not any("scaled_dot_product_attention" in str(g) for g in counter.graphs)  # attention stays eager

    plain = generate(model, prompts, max_new_tokens=12)
    fused = generate(model, prompts, max_new_tokens=12, policy=compiled)  # same batch size: nothing new
    assert [r.tokens for r in fused] == [r.tokens for r in plain]
    assert len(counter.graphs) == 4 and fused[0].compile_s >= 0
    seen = []
    for batch in ([prompts[0]], prompts[:2], [prompts[2]] * 4, [prompts[1]] * 5):
        out = generate(model, batch, max_new_tokens=5, policy=compiled)
        assert [r.tokens for r in out] == [r.tokens for r in generate(model, batch, max_new_tokens=5)]
        seen.append(len(counter.graphs))
    assert seen == [8, 12, 12, 12], seen  # batch 1: static; batch 2: the batch dimension dynamic; 4 and 5: nothing


def test_warmup_compiles_the_decode_step_for_every_batch_size():
    """Engine.warmup with compile_decode leaves nothing for generate() with the same policy to compile at any batch
    size; the decode step's Inductor options reach the backend."""
    torch._dynamo.reset()
    counter = _GraphCounter()
    policy = Policy(compile_decode=True, compile_backend=counter, compile_options={"coordinate_descent_tuning": True})
    model = _model(AttnSink(3, 10), 2).eval()
    w = Engine(model, policy).warmup(64)
    assert len(counter.graphs) == 8 and w["decode_compile_s"] > 0  # batch 1 (static), then 2 (the batch dynamic)
    assert counter.options == {"coordinate_descent_tuning": True}
    for b in (1, 4, 2, 7):
        prompts = [torch.randint(0, 97, (5 + 9 * r,), generator=torch.Generator().manual_seed(r)).tolist()
                   for r in range(b)]
        generate(model, prompts, max_new_tokens=3, policy=policy)
    assert len(counter.graphs) == 8


def test_compiled_prefill_same_logits_one_graph_set_for_every_length():
    """Policy(compile_prefill=True) -- each layer's work around attention through torch.compile with dynamic shapes --
    gives the eager prefill's logits and caches for prompts of any length, whole or chunked with ragged tails, and
    compiles 4 graphs for every length >= 2 plus the same 4 once for 1-token chunks (torch.compile specialises size
    1), none holding attention. Through generate(): same greedy tokens; after warmup nothing is compiled."""
    torch._dynamo.reset()
    counter = _GraphCounter()
    model = _model(AttnSink(3, 10), 2).eval()
    seen = []
    for n, chunk in [(37, None), (140, 11), (64, 7), (1, None), (23, 22), (5, None)]:
        prompt = torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n))
        engines = [Engine(model, Policy(prefill_chunk=chunk, compile_prefill=c, compile_backend=counter))
                   for c in (False, True)]
        want, got = (e.reserve(1, n) and None or e.prefill(prompt, 0, all_logits=True) for e in engines)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        for c0, c1 in zip(engines[0].cache.layers.values(), engines[1].cache.layers.values()):
            assert torch.equal(c0.pos, c1.pos) and torch.allclose(c0.k, c1.k, atol=1e-6)
        seen.append(len(counter.graphs))
    # 140 = 12 x 11 + 8: ragged tail; 64 = 9 x 7 + 1: the first 1-token chunk (the second set); 23 = 22 + 1 likewise
    assert seen == [4, 4, 8, 8, 8, 8], seen
    assert not any("attention" in str(g) for g in counter.graphs)
    prompts = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 3)]
    compiled = Policy(prefill_chunk=16, compile_prefill=True, compile_backend=counter)
    plain = generate(model, prompts, max_new_tokens=8, policy=Policy(prefill_chunk=16))
    assert [r.tokens for r in generate(model, prompts, max_new_tokens=8, policy=compiled)] == \
        [r.tokens for r in plain]
    assert len(counter.graphs) == 8

    torch._dynamo.reset()
    counter.graphs.clear()
    compiled = compiled.replace(prefill_chunk=100)
    Engine(model, compiled).warmup(300)
    assert len(counter.graphs) == 8
    for n in (1, 2, 99, 101, 257, 300):
        generate(model, [[i % 97 for i in range(n)]], max_new_tokens=2, policy=compiled)
    assert len(counter.graphs) == 8


def test_lookahead_decode_loop_gives_the_lockstep_results():
    """With Policy(lookahead=True) (CUDA's default) the loop launches step t+1 before it waits for token t. Run here
    on the CPU, it gives exactly the lockstep loop's results: greedy batches whose rows stop at different tokens,
    the streamed (row, token) order, seeded sampling, max_new_tokens=1 -- and it launches one step more than lockstep
    only when every row stops before max_new_tokens (that step is discarded)."""
    model = longgen_tiny(vocab_size=50)
    prompts, full, k = _early_stop_case(model)

    def run(lookahead):
        out = []
        for kw in ({"prompts": prompts, "max_new_tokens": 30, "stop_tokens": [full[0][k]]},
                   {"prompts": prompts[:1], "max_new_tokens": 30, "stop_tokens": [full[0][k]]},
                   {"prompts": prompts, "max_new_tokens": 1},
                   {"prompts": [[1, 2], [3], [4, 5, 6]], "max_new_tokens": 9, "temperature": 0.8, "top_k": 10,
                    "top_p": 0.9, "generator": torch.Generator().manual_seed(5)}):
            streamed, kw = [], dict(kw)
            engine = _CountingEngine(model, Policy(lookahead=lookahead))
            res = generate(engine, kw.pop("prompts"), **kw, on_token=lambda b, t: streamed.append((b, t)))
            out.append(([r.tokens for r in res], streamed, engine.steps))
        return out

    lockstep, ahead = run(False), run(True)
    assert [(t, s) for t, s, _ in ahead] == [(t, s) for t, s, _ in lockstep]
    assert lockstep[0][0][0] == full[0][:k + 1] and lockstep[0][0][1] == full[1]
    assert [a[2] - b[2] for a, b in zip(ahead, lockstep)] == [0, 1, 0, 0]  # only the all-stopped call runs one more
    assert lockstep[1][2] == k


def test_graph_capture_is_reported_apart_from_decode_time():
    """generate() subtracts the engine's capture time (CUDA-graph capture on a GPU) from each row's decode_s and
    reports it as capture_s: simulated on CPU by an engine that spends 0.3 s 'capturing' on its first step."""

    class Capturing(Engine):
        def step(self, tokens):
            out = super().step(tokens)
            if self.capture_s == 0:
                time.sleep(0.3)
                self.capture_s += 0.3
            return out

    model = _model(AttnSink(4, 12), 2)
    prompt = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    engine = Capturing(model)
    for _ in range(2):  # one engine serving several calls: each call's capture is its own (new caches, new graphs)
        t = time.perf_counter()
        graphed = generate(engine, [prompt], max_new_tokens=6)[0]
        wall = time.perf_counter() - t
        assert 0.3 <= graphed.capture_s < 0.4 and 0 < graphed.decode_s < wall - graphed.prefill_s - 0.29
    plain = generate(model, [prompt], max_new_tokens=6)[0]
    assert graphed.tokens == plain.tokens and plain.capture_s == 0.0
