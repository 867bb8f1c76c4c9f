"""flexgen_long.losses.ChunkedLinearCrossEntropy: the value and gradients of cross-entropy on the full logits, what
it keeps for backward (one chunk's hidden states per chunk, no logits), FSDP2's root kept gathered for it, and the
finetuning recipe run with it as typed (two ranks: FSDP2) on the loss curve of torchtune's CEWithChunkedOutputLoss."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks
from torchtune.modules.loss import CEWithChunkedOutputLoss

from flexgen_long.losses import ChunkedLinearCrossEntropy
from flexgen_long.models import longgen_llama

V, D = 97, 24


def _model(dtype, tied):
    return longgen_llama(V, 2, 4, 2, D, 48, 128, full_layers="all", tie_word_embeddings=tied).to(dtype)


def _labels(batch, seq):
    labels = torch.randint(0, V, (batch, seq))
    labels[0, : seq // 3] = -100  # e.g. a synthetic task's prompt, trained on its answer only
    labels[-1, -1] = -100  # the last token of a document
    return labels


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tied", [False, True], ids=["output", "tied"])
@pytest.mark.parametrize("batch,seq,chunks", [(1, 37, 4), (3, 37, 5), (2, 64, 8), (2, 7, 16)],
                         ids=["b1-s37-c4", "b3-s37-c5", "b2-s64-c8", "fewer-tokens-than-chunks"])
def test_value_and_gradients_equal_cross_entropy_on_the_full_logits(dtype, tied, batch, seq, chunks):
    """Against F.cross_entropy (mean over non-ignored labels) on the whole logits in the same dtype: the loss, the
    gradient of the hidden states and of the output weight (the embedding, when tied), relative error < 1e-6."""
    model = _model(dtype, tied)
    weight = model.tok_embeddings.weight if tied else model.output.weight
    hidden = torch.randn(batch, seq, D, dtype=dtype, requires_grad=True)
    labels = _labels(batch, seq)
    loss_fn = ChunkedLinearCrossEntropy(num_chunks=chunks)
    loss_fn.set_model_output(model)
    ours = loss_fn(hidden, labels)
    ours_grads = torch.autograd.grad(ours, [hidden, weight])
    ref = F.cross_entropy(model.output(hidden).reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, [hidden, weight])
    assert ours.dtype == dtype
    assert abs(ours.item() - ref.item()) / ref.item() < 1e-6
    for got, want in zip(ours_grads, ref_grads):
        assert _rel(got, want) < 1e-6


@pytest.mark.parametrize("ignore_index", [0, 7, -1])
def test_a_configured_ignore_index_is_the_one_ignored(ignore_index):
    """Not only the default -100: labels equal to the configured ``ignore_index`` are left out of the sum and of the
    count (the oracle: F.cross_entropy with the same ignore_index). The labels hold no -100, which would then be an
    out-of-range class."""
    model = _model(torch.float64, tied=False)
    hidden = torch.randn(2, 40, D, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (2, 40))
    labels[:, ::3] = ignore_index
    loss_fn = ChunkedLinearCrossEntropy(num_chunks=3, ignore_index=ignore_index)
    loss_fn.set_model_output(model)
    ours = loss_fn(hidden, labels)
    ref = F.cross_entropy(model.output(hidden).reshape(-1, V), labels.reshape(-1), ignore_index=ignore_index)
    assert abs(ours.item() - ref.item()) / ref.item() < 1e-9
    default = ChunkedLinearCrossEntropy(num_chunks=3)  # the default would count those labels (or fail on -1)
    default.set_model_output(model)
    if ignore_index >= 0:
        assert abs(default(hidden, labels).item() - ref.item()) > 1e-6


def test_model_hands_hidden_states_and_training_equals_the_chunked_output_loss():
    """The whole model: ``skip_output_layer`` makes forward return the final-normed hidden states, which the output
    projects to exactly the logits of a plain forward; the loss and every parameter's gradient equal torchtune's
    CEWithChunkedOutputLoss on ``chunked_output`` (fp32: torchtune's forward and loss cast logits to fp32 whatever the
    model's dtype; packed documents, odd length)."""
    model = _model(torch.float32, tied=True)
    tokens, labels = torch.randint(0, V, (2, 45)), _labels(2, 45)
    doc_ids = torch.tensor([0] * 20 + [1] * 25).expand(2, -1)
    logits = model(tokens, doc_ids=doc_ids)
    model.set_num_output_chunks(4)
    ref = CEWithChunkedOutputLoss(num_output_chunks=4)(model(tokens, doc_ids=doc_ids), labels)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    model.set_num_output_chunks(0)
    loss_fn = ChunkedLinearCrossEntropy(num_chunks=4)
    loss_fn.set_model_output(model)
    hidden = model(tokens, doc_ids=doc_ids)
    assert hidden.shape == (2, 45, D) and torch.equal(model.output(hidden), logits)
    ours = loss_fn(hidden, labels)
    ours_grads = torch.autograd.grad(ours, list(model.parameters()))
    assert abs(ours.item() - ref.item()) / ref.item() < 1e-6
    for (name, _), got, want in zip(model.named_parameters(), ours_grads, ref_grads):
        assert _rel(got, want) < 1e-6, name


def _saved_for_backward(fn):
    """(shape, bytes) of every tensor autograd saves for backward while ``fn`` runs, and its result."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.numel() * t.element_size()))
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def test_backward_keeps_each_chunks_hidden_states_not_logits():
    """What forward leaves for backward: per chunk, its hidden states [n, D] and labels [n] (the checkpoint's inputs,
    views of the whole), a few scalars -- no [n, V] tensor, where torchtune's loss keeps every chunk's log-softmax."""
    batch, seq, chunks, vocab = 2, 300, 8, 4096
    model = longgen_llama(vocab, 1, 4, 2, D, 48, 512, full_layers="all")
    hidden = torch.randn(batch, seq, D, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    loss_fn = ChunkedLinearCrossEntropy(num_chunks=chunks)
    loss_fn.set_model_output(model)
    saved, loss = _saved_for_backward(lambda: loss_fn(hidden, labels))
    sizes = [len(c) for c in torch.arange(batch * seq).tensor_split(chunks)]  # 75 tokens each
    assert sorted(shape[0] for shape, _ in saved if len(shape) == 2) == sizes  # one [n, D] per chunk
    assert all(vocab not in shape for shape, _ in saved)
    kept = sum(b for _, b in saved)
    assert hidden.nbytes + labels.nbytes <= kept <= hidden.nbytes + labels.nbytes + 1024
    loss.backward()  # the chunks recompute their logits from what was kept
    assert hidden.grad is not None and model.output.weight.grad.shape == (vocab, D)

    model.set_num_output_chunks(chunks)
    theirs, _ = _saved_for_backward(lambda: CEWithChunkedOutputLoss(chunks)(model.chunked_output(hidden), labels))
    logits_bytes = batch * seq * vocab * 4
    assert sum(b for _, b in theirs) > logits_bytes > 100 * kept  # every chunk's fp32 log-softmax


def test_compiled_cross_entropy_inside_the_chunk_checkpoints():
    """``compile: true`` compiles the upcast + cross-entropy alone (recipes/longgen_finetune.py), which then runs inside
    each chunk's checkpoint, forward and recompute: the same loss and gradients in bf16. AOTAutograd's backend
    (aot_eager) stands in for inductor, to keep the test in seconds; inductor on the CPU agreed too, in 24 s."""
    model = _model(torch.bfloat16, tied=False)
    hidden = torch.randn(2, 37, D, dtype=torch.bfloat16, requires_grad=True)
    labels = _labels(2, 37)
    results = []
    for compiled in (False, True):
        loss_fn = ChunkedLinearCrossEntropy(num_chunks=5)
        loss_fn.set_model_output(model)
        if compiled:
            loss_fn.cross_entropy = torch.compile(loss_fn.cross_entropy, backend="aot_eager")
        loss = loss_fn(hidden, labels)
        results.append([loss, *torch.autograd.grad(loss, [hidden, model.output.weight])])
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled)


def test_no_trained_token_gives_zero_not_nan():
    model = _model(torch.float32, tied=False)
    loss_fn = ChunkedLinearCrossEntropy(num_chunks=3)
    loss_fn.set_model_output(model)
    hidden = torch.randn(1, 10, D, requires_grad=True)
    loss = loss_fn(hidden, torch.full((1, 10), -100))
    loss.backward()
    assert loss.item() == 0 and torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_misuse_is_refused_naming_what_to_do():
    with pytest.raises(ValueError, match=r"config field 'loss.num_chunks': must be an int >= 1 .*got 0"):
        ChunkedLinearCrossEntropy(num_chunks=0)
    with pytest.raises(ValueError, match=r"config field 'loss.ignore_index': must be an int"):
        ChunkedLinearCrossEntropy(ignore_index="x")
    loss_fn = ChunkedLinearCrossEntropy()
    with pytest.raises(RuntimeError, match=r"set_model_output\(model\) must be called before the first forward"):
        loss_fn(torch.randn(1, 4, D), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"needs a model built by flexgen_long.models .*got Linear"):
        loss_fn.set_model_output(torch.nn.Linear(D, V))
    loss_fn.set_model_output(_model(torch.float32, tied=False))
    with pytest.raises(ValueError, match=r"hidden states must be \[batch, seq_len, dim\] and labels \[batch, "):
        loss_fn(torch.randn(1, 4, V), torch.zeros(4, dtype=torch.long))


def test_fsdp2_root_must_stay_gathered_for_the_loss():
    """FSDP2 over a fake process group (collectives do nothing; sharding, gathering and hooks are real): the root unit
    is resharded after forward, so the loss's call of model.output meets a DTensor weight; kept gathered (what the
    recipe does), forward and backward run and the output weight gets its sharded gradient."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torchtune import training
    from torchtune.modules import TransformerSelfAttentionLayer

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model = _model(torch.float32, tied=False)
        training.shard_model(model, [lambda n, m: isinstance(m, TransformerSelfAttentionLayer)], cpu_offload=False)
        loss_fn = ChunkedLinearCrossEntropy(num_chunks=3)
        loss_fn.set_model_output(model)
        tokens, labels = torch.randint(0, V, (1, 30)), _labels(1, 30)
        with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
            loss_fn(model(tokens), labels)
        model.set_reshard_after_forward(False, recurse=False)
        model.zero_grad(set_to_none=True)
        loss_fn(model(tokens), labels).backward()
        grad = model.output.weight.grad
        assert type(grad).__name__ == "DTensor" and grad.to_local().shape == (V // 2 + 1, D)
    finally:
        dist.destroy_process_group()


def test_recipe_as_typed_on_two_ranks_follows_the_chunked_output_loss_curve(tmp_path):
    """`tune run --nproc_per_node 2` (FSDP2 over two CPU processes) on the tiny config with the new loss, against one
    process with torchtune's CEWithChunkedOutputLoss and both ranks' batches in one (batch 4 = 2 x 2; a rank reads its
    slice of the same permutation): the same seed, the same losses and gradient norms over 2 steps (logged to 4
    decimals)."""
    import re

    from test_recipes import SMALL, TINY, _cfg, _disk, _run, _tune

    steps = ["max_steps=2", "checkpoint.save_every_n_steps=null"]
    r = _tune("run", "--nproc_per_node", "2", "recipes/longgen_finetune.py", "--config", TINY,
              f"output_dir={tmp_path / 'new'}", *SMALL, *steps,
              "loss._component_=flexgen_long.losses.ChunkedLinearCrossEntropy", "loss.num_chunks=5")
    assert r.returncode == 0, r.stderr[-3000:]
    _run(_cfg(tmp_path / "old", *steps, "batch_size=4", *_disk(tmp_path / "log"),
              "loss._component_=torchtune.modules.loss.CEWithChunkedOutputLoss", "loss.num_output_chunks=4"))
    pattern = r"Step (\d+) \| loss:([0-9.]+) .*?grad_norm:([0-9.]+)"
    new = {int(s): (float(a), float(g)) for s, a, g in re.findall(pattern, r.stdout)}
    old = {int(s): (float(a), float(g)) for s, a, g in
           re.findall(pattern, "".join(p.read_text() for p in (tmp_path / "log").glob("*.txt")))}
    assert sorted(new) == sorted(old) == [1, 2]
    for step in (1, 2):
        assert new[step] == pytest.approx(old[step], abs=1e-4 + 1e-9), (step, new, old)


@pytest.mark.parametrize("override,message", [
    ("loss.num_chunks=0", r"config field 'loss.num_chunks': must be an int >= 1"),
    ("loss.num_chunks=many", r"config field 'loss.num_chunks': must be an int, got 'many'"),
    ("loss.num_chunk=8", r"config field 'loss.num_chunk': is not an argument of "
                         r"flexgen_long.losses.ChunkedLinearCrossEntropy; it takes \['ignore_index', 'num_chunks'\]"),
])
def test_recipe_refuses_a_bad_loss_section_naming_the_field(tmp_path, override, message):
    from recipes.longgen_finetune import validate_config
    from test_recipes import _cfg

    cfg = _cfg(tmp_path, "loss._component_=flexgen_long.losses.ChunkedLinearCrossEntropy", override)
    with pytest.raises(ValueError, match=message):
        validate_config(cfg)
