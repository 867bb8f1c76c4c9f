"""flexgen_long.quantize: torchao's int8 weight-only quantization of a loaded model, with fused projections, through
generate() (eager and a compiled decode step), the memory plan's byte counts, the refusals, and the recipes'
``quantize`` key. The oracles: the unquantized weights and the rounding bound of symmetric per-row int8, the model's
own no-cache forward, the unquantized model's logits and tokens, and byte counts from the shapes. fp8 and int4wo need
CUDA: tests/gpu/test_gpu_quantize.py."""

import weakref

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from flexgen_long.cache import decode_activation_bytes, serving_capacity
from flexgen_long.generation import generate
from flexgen_long.models import fuse_projections, longgen_llama3_1_8b, longgen_tiny, unfuse_projections
from flexgen_long.policy import Policy
from flexgen_long.quantize import (dequantized_transient_bytes, is_quantized, quantize_weights, quantized_matrices,
                                   weight_bytes)
from reference import rel_err

#: logits of the int8wo tiny model vs its fp32 original, ||diff|| / ||want||. Why 0.02: rounding to int8 with one
#: scale s = max|w_row| / 127.5 per row errs uniformly within s/2, an rms of s/sqrt(12); for torch's default init
#: (uniform, max/rms = sqrt(3)) that is 0.39% of a linear's output. About ten linears on a path through the tiny model
#: add such errors roughly in quadrature (~1.2%), and RMSNorm rescales rather than amplifies them; measured: 0.42%.
INT8_LOGITS_REL_ERR = 0.02


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return longgen_tiny(vocab_size=256).eval()


def copy_of(model: nn.Module) -> nn.Module:
    twin = longgen_tiny(vocab_size=256).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def greedy_by_forward(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens by re-running the no-cache forward on the growing sequence (no engine, no cache)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8wo_rounds_each_row_to_int8_and_keeps_the_logits_close(dtype):
    """Every nn.Linear weight becomes an int8 tensor whose dequantized values lie within half a step of the original
    (step = the row's max |w| / 127.5: the whole int8 range, in bf16 too, where torchao 0.15 alone would clamp the
    step at 2**-7); embeddings and norms are untouched; the logits stay within INT8_LOGITS_REL_ERR of the unquantized
    model's (bf16: both in bf16)."""
    ref = tiny().to(dtype)
    model = copy_of(ref).to(dtype)
    assert quantize_weights(model, "int8wo") is model and is_quantized(model) and not is_quantized(ref)
    for name, lin in linears(model).items():
        w, want = lin.weight, linears(ref)[name].weight.detach().float()
        assert w.qdata.dtype == torch.int8 and w.shape == want.shape and not w.requires_grad
        half_step = want.abs().amax(dim=1, keepdim=True) / 127.5 / 2
        assert ((w.dequantize().float() - want).abs() <= half_step * (1 + 1e-4)).all(), name  # + float rounding
    assert torch.equal(model.tok_embeddings.weight, ref.tok_embeddings.weight)
    assert torch.equal(model.norm.scale, ref.norm.scale)
    x = torch.randint(0, 256, (2, 300))
    with torch.no_grad():
        err = rel_err(model(x), ref(x))
    assert 0 < err < INT8_LOGITS_REL_ERR


def test_fused_then_quantized_equals_quantized_alone_and_holds_no_second_copy():
    """Quantizing a fused model quantizes its q/k/v and gate/up matrices whole: each projection's weight is a row slice
    of the quantized matrix (same storage), equal to quantizing that projection alone (per-row scales), so the logits
    equal the unfused quantized model's; the float matrices are freed. Fusing or unfusing quantized weights is
    refused."""
    ref = tiny()
    fused, alone = fuse_projections(copy_of(ref)), copy_of(ref)
    old = weakref.ref(fused.layers[0].attn._wqkv)
    quantize_weights(fused, "int8wo")
    quantize_weights(alone, "int8wo")
    assert old() is None  # the float fused matrix is gone (its row views went with the old parameters)
    for layer_f, layer_a in zip(fused.layers, alone.layers):
        for owner_f, owner_a, buf, names in ((layer_f.attn, layer_a.attn, "_wqkv", ("q_proj", "k_proj", "v_proj")),
                                              (layer_f.mlp, layer_a.mlp, "_w13", ("w1", "w3"))):
            whole = getattr(owner_f, buf)
            for n in names:
                got, want = getattr(owner_f, n).weight, getattr(owner_a, n).weight
                assert torch.equal(got.qdata, want.qdata) and torch.equal(got.scale, want.scale)
                assert got.qdata.untyped_storage().data_ptr() == whole.qdata.untyped_storage().data_ptr()
    assert weight_bytes(fused) == weight_bytes(alone)
    assert len(quantized_matrices(fused)) == 17 and len(quantized_matrices(alone)) == 29  # 4 x (2 + 2) + 1; 4 x 7 + 1
    x = torch.randint(0, 256, (2, 300))
    with torch.no_grad():
        got, want = fused(x), alone(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    with pytest.raises(ValueError, match="fuse_projections: the weights are Int8Tensor.*fuse first, then quantize"):
        fuse_projections(alone)
    with pytest.raises(ValueError, match="unfuse_projections: the weights are Int8Tensor"):
        unfuse_projections(fused)


def test_weight_bytes_counts_each_storage_once_and_int8wo_halves_bf16_linears():
    """weight_bytes from the shapes: parameters and buffers (the RoPE table) at their itemsize, a fused matrix and its
    slices once; after int8wo every linear holds 1 byte per weight plus one float32 scale per output row -- half its
    bf16 bytes plus the scales."""
    model = tiny().to(torch.bfloat16)
    lin = linears(model)
    plain = sum(t.numel() for t in (*model.parameters(), *model.buffers())) * 2
    assert weight_bytes(model) == plain == weight_bytes(fuse_projections(model))
    assert weight_bytes(tiny()) == 2 * plain and weight_bytes(tiny(), torch.bfloat16) == plain  # fp32 counted as bf16
    linear_bytes = sum(m.weight.numel() for m in lin.values()) * 2
    scale_bytes = sum(m.weight.shape[0] for m in lin.values()) * 4
    quantize_weights(model, "int8wo")
    assert weight_bytes(model) == plain - linear_bytes + linear_bytes // 2 + scale_bytes
    assert dequantized_transient_bytes(model, torch.bfloat16) == 512 * 64 * 2  # the largest: a fused gate/up matrix


def test_serving_capacity_holds_more_rows_with_int8wo_weights():
    """The 8B hybrid at 128K on an 80 GB card (meta device: shapes only): int8wo halves the linears' bytes in the plan
    (the bf16 embedding stays), the decode estimate adds the largest dequantized matrix, and more rows fit."""
    GiB = 2**30
    with torch.device("meta"):
        plain, model = (longgen_llama3_1_8b(max_seq_len=131072 + 128).to(torch.bfloat16) for _ in range(2))
    lin = linears(model)
    linear_bytes = sum(m.weight.numel() for m in lin.values()) * 2
    quantize_weights(fuse_projections(model), "int8wo")
    before, after = (serving_capacity(m, 131072, 128, 79 * GiB) for m in (plain, model))
    assert after["weights_bytes"] == before["weights_bytes"] - linear_bytes // 2 + sum(
        m.weight.shape[0] for m in lin.values()) * 4
    assert after["weights_bytes"] < 0.55 * before["weights_bytes"]
    extra = decode_activation_bytes(model, 1, 4096) - decode_activation_bytes(plain, 1, 4096)
    assert extra >= 128256 * 4096 * 2  # the output layer converted to bf16 for its product (x the safety factor)
    assert after["batch"] > before["batch"] >= 1


def test_generate_with_int8wo_gives_the_quantized_forwards_tokens_and_fp32_ones_up_to_a_near_tie():
    """generate() on the fused int8wo model (a mixed batch of 1, 7, 77 and 300 tokens, whole and in 64-token prefill
    chunks) gives exactly the greedy tokens of the same model's no-cache forward. Against the fp32 model: each row's
    tokens agree up to its first difference, if any, and there the fp32 model was at a near-tie (its two tokens' logits
    within 1% of the logits' standard deviation; random weights give flat distributions, so ties occur), and at least
    40 of the 48 tokens come before any difference."""
    ref = tiny()
    model = quantize_weights(fuse_projections(copy_of(ref)), "int8wo")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 7, 77, 300)]
    got = [r.tokens for r in generate(model, prompts, max_new_tokens=12)]
    assert [r.tokens for r in generate(model, prompts, max_new_tokens=12, policy=Policy(prefill_chunk=64))] == got
    assert got == [greedy_by_forward(model, p, 12) for p in prompts]
    agreed = 0
    for p, q, f in zip(prompts, got, [r.tokens for r in generate(ref, prompts, max_new_tokens=12)]):
        k = next((i for i, (a, b) in enumerate(zip(q, f)) if a != b), len(f))
        agreed += k
        if k < len(f):
            with torch.no_grad():
                logits = ref(torch.tensor([p + f[:k]]))[0, -1]
            assert logits[f[k]] - logits[q[k]] < 0.01 * logits.std(), (p[:5], k)
    assert agreed >= 40


def test_compiled_decode_runs_the_quantized_layers():
    """Policy(compile_decode=True): the decode step's layers, with their int8 tensor-subclass weights, through
    torch.compile (Inductor) give the eager path's tokens."""
    model = quantize_weights(fuse_projections(tiny()), "int8wo")
    prompts = [[5], list(range(40, 113))]
    eager = [r.tokens for r in generate(model, prompts, max_new_tokens=6)]
    assert [r.tokens for r in generate(model, prompts, max_new_tokens=6, policy=Policy(compile_decode=True))] == eager


def test_a_forward_with_gradients_is_refused():
    """A quantized model is for inference: a forward with gradients enabled raises (a training step would update only
    the embeddings and norms); under no_grad / inference_mode it runs."""
    model = quantize_weights(tiny(), "int8wo")
    x = torch.randint(0, 256, (1, 20))
    with pytest.raises(RuntimeError, match="quantized .* for inference only: run it under torch.inference_mode"):
        model(x)
    with torch.no_grad():
        assert model(x).shape == (1, 20, 256)


def test_bad_schemes_and_second_quantization_are_refused_before_anything_changes():
    """None is a no-op; an unknown name lists the schemes; fp8 and int4wo off CUDA name the capability they need;
    quantizing twice is refused; each refusal leaves the weights as they were."""
    model = tiny()
    w = model.output.weight
    assert quantize_weights(model, None) is model and model.output.weight is w
    with pytest.raises(ValueError, match=r"scheme must be None or one of \['int8wo', 'fp8', 'int4wo'\], got 'int8'"):
        quantize_weights(model, "int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"scheme 'fp8' needs a CUDA device of capability >= \(8, 9\)"):
            quantize_weights(model, "fp8")
        with pytest.raises(ValueError, match=r"scheme 'int4wo' needs a CUDA device of capability >= \(8, 0\)"):
            quantize_weights(model, "int4wo")
    assert model.output.weight is w and not is_quantized(model)
    quantize_weights(model, "int8wo")
    with pytest.raises(ValueError, match="quantized already"):
        quantize_weights(model, "int8wo")


def test_size_rules_of_fp8_and_int4wo():
    """torchao would skip (with a log line) a matrix its fp8 or int4 kernel cannot take; the sizes are refused first,
    naming the matrix. int4wo takes the largest group of 128, 64, 32 dividing every input size."""
    from flexgen_long.quantize import _check_sizes

    ok = [("a.weight", torch.Size([64, 4096]), None), ("b._wqkv", torch.Size([96, 576]), [64, 16, 16])]
    assert _check_sizes("int4wo", ok) == 64 and _check_sizes("fp8", ok) is None and _check_sizes("int8wo", ok) is None
    with pytest.raises(ValueError, match=r"scheme 'fp8' needs every matrix's sizes to be multiples of 16.*c.weight "
                                         r"is \[24, 64\]"):
        _check_sizes("fp8", [*ok, ("c.weight", torch.Size([24, 64]), None)])
    with pytest.raises(ValueError, match=r"input size to be a multiple of 32.*c.weight is \[64, 72\]"):
        _check_sizes("int4wo", [*ok, ("c.weight", torch.Size([64, 72]), None)])
    with pytest.raises(ValueError, match=r"slices the fused matrix c._wqkv into rows \[60, 30, 30\]"):
        _check_sizes("int4wo", [("c._wqkv", torch.Size([120, 64]), [60, 30, 30])])


# -- the recipes' quantize key ---------------------------------------------------------------------------------------
def test_generate_recipe_quantizes_after_fusing_and_logs_the_bytes(capsys, caplog):
    """`quantize=int8wo` in the generate recipe: one log line naming the matrices and the weight bytes before and
    after (the fused q/k/v and gate/up matrices quantized as they are), and the text is generated."""
    from pathlib import Path

    from recipes.longgen_generate import generate_text

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "recipes" / "configs" / "generate" / "tiny.yaml")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["quantize=int8wo", "max_new_tokens=4", "temperature=0"]))
    with caplog.at_level("INFO"):
        generate_text(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quantize=")]
    assert len(lines) == 1 and "17 weight matrices (8 of them fused q/k/v or gate/up) hold int8 weights" in lines[0]
    before, after = (int(b.replace(",", "")) for b in lines[0].split("weight bytes ")[1].split(" (")[0].split(" -> "))
    assert 0.3 < after / before < 0.4  # fp32 -> int8 linears; the embedding, norms and RoPE table stay fp32
    assert "=== [0] def fibonacci(n):" in capsys.readouterr().out
