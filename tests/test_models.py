"""The hybrid model against independent references: torchtune's own llama (same weights), transformers'
LlamaForCausalLM (through torchtune's HF->tune conversion and HF checkpointer), torchtune's own layers run with the
loop-built dense mask of each layer (tests/reference.py), and documents run one by one. One compiled CPU flex graph."""

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config
from torchtune.models.convert_weights import hf_to_tune
from torchtune.models.llama3._component_builders import llama3
from torchtune.models.llama3_2._component_builders import llama3_2
from transformers import LlamaConfig, LlamaForCausalLM

import reference as ref
from flexgen_long import checkpoint_io, hf
from flexgen_long.models import (LLAMA3_1_ROPE_SCALING, doc_ids_from_seq_lens, longgen_llama, longgen_llama2_7b,
                                 longgen_llama3_1_8b, longgen_llama3_2_1b, longgen_tiny)
from flexgen_long.patterns import AttnSink, BlockSparse, Full

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

V, L, H, HKV, E, FFN = 256, 4, 4, 2, 64, 256


def tiny(**kw):
    return longgen_llama(V, L, H, HKV, E, FFN, 512, 10_000, **kw)


def rand_init(model):
    # RMSNorm scales start at 1: perturb them so that a mix-up of norms would show
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("scale"):
                p.add_(0.1 * torch.randn_like(p))
    return model


# (a) full_layers="all" is torchtune's llama ---------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True], ids=["llama3", "llama3_2-tied-scaled-rope"])
def test_all_full_equals_torchtune_llama(tied):
    if tied:
        theirs = llama3_2(V, L, H, HKV, E, 512, rope_base=500_000, intermediate_dim=FFN, scale_factor=32)
        ours = longgen_llama(V, L, H, HKV, E, FFN, 512, 500_000, full_layers="all", tie_word_embeddings=True,
                             rope_scaling={**LLAMA3_1_ROPE_SCALING, "factor": 32})
    else:
        theirs = llama3(V, L, H, HKV, E, 512, rope_base=10_000, intermediate_dim=FFN)
        ours = tiny(full_layers="all")
    rand_init(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    tok = torch.randint(0, V, (2, 100))
    with torch.no_grad():
        torch.testing.assert_close(ours(tok), theirs(tok), atol=1e-5, rtol=1e-5)


# (b) parity with transformers through the HF conversion --------------------------------------------------------------

@pytest.mark.parametrize("kv_heads, rope", [(4, None), (2, LLAMA3_1_ROPE_SCALING)], ids=["llama2-MHA", "llama3-GQA"])
def test_parity_with_transformers(kv_heads, rope):
    theta = 10_000.0 if rope is None else 500_000.0
    cfg = LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=H,
                      num_key_value_heads=kv_heads, max_position_embeddings=512, rms_norm_eps=1e-5,
                      rope_theta=theta, tie_word_embeddings=False,
                      rope_scaling=None if rope is None else dict(rope), attn_implementation="eager")
    hf = rand_init(LlamaForCausalLM(cfg)).eval()
    rp = hf.config.rope_parameters  # transformers 5 folds rope_theta/rope_scaling into rope_parameters
    assert rp["rope_theta"] == theta and rp["rope_type"] == ("default" if rope is None else "llama3")
    ours = longgen_llama(V, 2, H, kv_heads, E, FFN, 512, theta, full_layers="all", rope_scaling=rope)
    ours.load_state_dict(hf_to_tune(hf.state_dict(), num_heads=H, num_kv_heads=kv_heads, dim=E), strict=True)
    tok = torch.randint(0, V, (2, 200))
    with torch.no_grad():
        want = hf(tok).logits
        got = ours(tok)
    assert (got - want).abs().max() <= 1e-5


def test_hf_checkpoint_round_trip(tmp_path):
    """HF safetensors -> flexgen_long.hf's reader -> hybrid model -> the recipes' checkpoint writer -> transformers,
    bit for bit."""
    cfg = LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=FFN, num_hidden_layers=3, num_attention_heads=H,
                      num_key_value_heads=HKV, max_position_embeddings=512, tie_word_embeddings=False)
    hf_model = rand_init(LlamaForCausalLM(cfg))
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = longgen_llama(V, 3, H, HKV, E, FFN, 512, 10_000, full_layers=[1], sparse_pattern=AttnSink(2, 9))
    sd, _ = hf.load_hf_state_dict(tmp_path / "hf")
    model.load_state_dict(sd, strict=True)
    path = checkpoint_io.save_checkpoint(tmp_path / "out", 1, model.state_dict(), checkpoint_io.hf_config(model))
    back = LlamaForCausalLM.from_pretrained(path)
    sd0, sd1 = hf_model.state_dict(), back.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k


# (c) hybrid == torchtune's own layers, each with the loop-built dense mask of its pattern ------------------------------

def reference_forward(theirs, patterns, tok, doc_ids=None):
    """torchtune's llama run layer by layer, each layer given the bool mask of its pattern (tests/reference.py),
    positions restarting per document."""
    B, S = tok.shape
    pos = None
    if doc_ids is not None:
        pos = torch.tensor([[t - ref.doc_starts(r)[1][t] for t in range(S)] for r in doc_ids.tolist()])
    h = theirs.tok_embeddings(tok)
    for layer, pat in zip(theirs.layers, patterns):
        mask = ref.dense(pat, S, S, num_heads=1, doc_ids=doc_ids)[:, 0]  # [B or 1, S, S]
        h = layer(h, mask=mask.expand(B, S, S), input_pos=pos)
    return theirs.unembed(h)


HYBRIDS = [([1, 2], AttnSink(sink=3, window=17)), ("interleave:2", BlockSparse(block=16, local_blocks=1,
                                                                                vertical_stride=3))]


@pytest.mark.parametrize("full_layers, sparse", HYBRIDS, ids=["attnsink", "blocksparse"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_hybrid_equals_per_layer_dense_reference(full_layers, sparse, packed):
    S = 90
    theirs = rand_init(llama3(V, L, H, HKV, E, 512, rope_base=10_000, intermediate_dim=FFN))
    ours = tiny(full_layers=full_layers, sparse_pattern=sparse)
    ours.load_state_dict(theirs.state_dict())
    patterns = [layer.attn.pattern for layer in ours.layers]
    assert sum(isinstance(p, Full) for p in patterns) == 2
    tok = torch.randint(0, V, (2, S))
    doc = doc_ids_from_seq_lens([torch.tensor([40, 35, 15]), torch.tensor([90])]) if packed else None
    want = reference_forward(theirs, patterns, tok, doc)
    # CPU with gradients: dense-mask SDPA path; then the flex path (eager at this size) without gradients
    got_dense = ours(tok, doc_ids=doc)
    torch.testing.assert_close(got_dense, want, atol=2e-5, rtol=1e-5)
    want.square().mean().backward()
    got_dense.square().mean().backward()
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=n)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        got_flex = ours(tok, doc_ids=doc)
    torch.testing.assert_close(got_flex, want, atol=2e-5, rtol=1e-5)


# (d) gradients through the CPU fallback; fallback == compiled flex ----------------------------------------------------

def test_cpu_fallback_grads_and_compiled_flex_agree():
    model = rand_init(longgen_tiny())  # layer 1 full, the others AttnSink(4, 60)
    tok = torch.randint(0, V, (1, 256))
    out = model(tok)  # CPU + grad -> dense masks
    torch.nn.functional.cross_entropy(out[0, :-1], tok[0, 1:]).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    with torch.no_grad():  # no grad -> BlockMask + compiled flex (one CPU graph: the AttnSink pattern)
        flex = model(tok)
    torch.testing.assert_close(flex, out.detach(), atol=2e-5, rtol=1e-5)


# (e) a packed batch == its documents run separately -------------------------------------------------------------------

def test_packed_batch_equals_separate_documents():
    model = rand_init(tiny(full_layers="middle", sparse_pattern=AttnSink(sink=2, window=13)))
    lens = [[37, 50, 41], [128]]
    tok = torch.randint(0, V, (2, 128))
    doc = doc_ids_from_seq_lens([torch.tensor(x) for x in lens])
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # eager flex: no CPU compile per length
        alone = torch.cat([torch.cat([model(tok[b:b + 1, s:s + n]) for s, n in
                                      zip([0] + list(torch.tensor(x).cumsum(0)[:-1].tolist()), x)], dim=1)
                           for b, x in enumerate(lens)])
        packed_flex = model(tok, doc_ids=doc)
    packed_dense = model(tok, doc_ids=doc)  # with gradients: dense masks
    torch.testing.assert_close(packed_flex, alone, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(packed_dense.detach(), alone, atol=2e-5, rtol=1e-5)


def test_doc_ids_from_seq_lens():
    ids = doc_ids_from_seq_lens([torch.tensor([2, 3, 1]), torch.tensor([6]), torch.tensor([1, 0, 5])])
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2], [0] * 6, [0, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="same packed length"):
        doc_ids_from_seq_lens([torch.tensor([2, 3]), torch.tensor([6])])
    with pytest.raises(ValueError, match="seq_lens"):
        doc_ids_from_seq_lens([])


# (f) builders: YAML, presets, bad values --------------------------------------------------------------------------------

def test_yaml_instantiate_with_nested_pattern():
    cfg = OmegaConf.create({"model": {
        "_component_": "flexgen_long.models.longgen_tiny", "full_layers": [0, 3],
        "sparse_pattern": {"_component_": "flexgen_long.patterns.AttnSink", "sink": 8, "window": 24}}})
    model = config.instantiate(cfg.model)
    assert [type(layer.attn.pattern) for layer in model.layers] == [Full, AttnSink, AttnSink, Full]
    assert model.layers[1].attn.pattern == AttnSink(sink=8, window=24)


def test_presets_on_meta_device():
    with torch.device("meta"):
        m7 = longgen_llama2_7b()
        m8 = longgen_llama3_1_8b()
        m1 = longgen_llama3_2_1b()
    full = lambda m: [i for i, layer in enumerate(m.layers) if isinstance(layer.attn.pattern, Full)]  # noqa: E731
    assert full(m7) == list(range(10, 21)) and full(m8) == list(range(10, 21)) and full(m1) == [5, 6, 7, 8, 9]
    assert sum(p.numel() for p in m7.parameters()) == 6_738_415_616  # Llama-2-7B
    assert sum(p.numel() for p in m8.parameters()) == 8_030_261_248  # Llama-3.1-8B
    assert sum(p.numel() for p in m1.parameters()) == 1_235_814_400  # Llama-3.2-1B (tied)
    assert m8.layers[0].attn.num_kv_heads == 8 and m8.layers[0].attn.pos_embeddings.scale_factor == 8


@pytest.mark.parametrize("kw, msg", [
    (dict(full_layers=[4]), "full_layers index 4 out of range"),
    (dict(full_layers=[1, 1]), "more than once"),
    (dict(full_layers=1.5), "fraction"),
    (dict(full_layers="centre"), "unknown string"),
    (dict(sparse_pattern=Full()), "sparse_pattern"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4}), "rope_scaling"),
])
def test_bad_builder_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        longgen_tiny(**kw)


def test_bad_forward_arguments():
    model = longgen_tiny(max_seq_len=64)
    tok = torch.randint(0, V, (1, 32))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.randint(0, V, (1, 65)))
    with pytest.raises(ValueError, match="MaskSet"):
        model(tok, mask=torch.ones(1, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="doc_ids"):
        model(tok, doc_ids=torch.zeros(1, 31, dtype=torch.long))
    with pytest.raises(ValueError, match="doc_ids batch 3"):
        model(tok, doc_ids=torch.zeros(3, 32, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="KV cache"):
        model.setup_caches(1, torch.float32)


def test_fused_projections_same_outputs_same_state_dict_and_training_still_reaches_every_weight():
    """fuse_projections: q/k/v and gate/up as row blocks of one matrix. The forward and generate() give the same
    results as the separate projections (CPU, fp32), the state dict keeps its keys and values, training after fusing
    still gets a gradient for every weight (the separate path runs under autograd), and unfusing restores torchtune's
    modules with one storage per weight."""
    from flexgen_long.generation import generate
    from flexgen_long.models import GateUpFeedForward, fuse_projections, longgen_tiny, unfuse_projections
    from torchtune.modules import FeedForward

    torch.manual_seed(0)
    model = longgen_tiny().eval()
    x = torch.randint(0, 200, (2, 300))
    prompts = [torch.randint(0, 200, (n,)).tolist() for n in (1, 77, 130)]
    with torch.no_grad():
        want = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = [r.tokens for r in generate(model, prompts, max_new_tokens=16)]

    assert fuse_projections(model) is model
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    assert type(mlp) is GateUpFeedForward
    assert attn.q_proj.weight.data_ptr() == attn._wqkv.data_ptr()  # views of the fused matrix: no copy kept
    assert mlp.w3.weight.data_ptr() == mlp._w13.data_ptr() + mlp.w1.weight.numel() * mlp._w13.element_size()
    with torch.no_grad():
        assert torch.allclose(model(x), want, rtol=1e-6, atol=1e-6)
    sd = model.state_dict()
    assert sd.keys() == before.keys() and all(torch.equal(sd[k], before[k]) for k in before)
    assert [r.tokens for r in generate(model, prompts, max_new_tokens=16)] == tokens
    from flexgen_long.policy import Policy
    torch._dynamo.reset()
    traced = Policy(compile_decode=True, compile_backend="eager")  # dynamo's tracing, no Inductor code (CPU)
    assert [r.tokens for r in generate(model, prompts, max_new_tokens=16, policy=traced)] == tokens

    model.train()
    model(x[:, :64]).float().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    model.zero_grad()

    unfuse_projections(model.eval())
    assert type(mlp) is FeedForward and attn._wqkv is None and not hasattr(mlp, "_w13")
    storages = {m.weight.untyped_storage().data_ptr() for m in (attn.q_proj, attn.k_proj, attn.v_proj)}
    assert len(storages) == 3
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_fuse_projections_refuses_models_it_does_not_know():
    from flexgen_long.models import fuse_projections

    with pytest.raises(ValueError, match="HybridAttention"):
        fuse_projections(torch.nn.Sequential(torch.nn.Linear(4, 4)))
