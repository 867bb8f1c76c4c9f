"""flexgen_long.train_plan and recipes/longgen_plan.py: the memory plan against torch's own memory trackers on a small
model trained on the CPU (one process, and FSDP2 over a fake process group), against the peaks measured on H200s
(the commands recorded in analysis/results/finetune_*.json), and the CLI on the shipped Llama-2-7B configs."""

import contextlib
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torchtune import training
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.loss import CEWithChunkedOutputLoss

from flexgen_long import train_plan
from flexgen_long.losses import ChunkedLinearCrossEntropy
from flexgen_long.models import longgen_llama, longgen_llama2_7b
from scripts import load_script

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
LLAMA2_7B = "recipes/configs/llama2_7b_longgen_128k.yaml"
RANDOM_WEIGHTS = ["checkpoint.base_dir=null", "tokenizer._component_=flexgen_long.tokenizers.byte_tokenizer",
                  "~tokenizer.path", "~tokenizer.prompt_template", "dataset.source=python-stdlib"]



@contextlib.contextmanager
def _fake_world(world_size):
    """A process group of ``world_size`` ranks in this process whose collectives do nothing (torch's fake backend):
    FSDP2 shards, gathers and allocates as on rank 0 of a real job."""
    if world_size == 1:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


# (world size, vocab, loss chunks, phase the peak falls in, loss): a large vocabulary puts the peak in the loss, a tiny
# one in a layer's backward; 3 ranks leave ragged shards (FSDP2 pads them). flexgen_long's linear loss holds so little
# that only a larger vocabulary (4000) puts its peak in the head.
LINEAR = "flexgen_long.losses.ChunkedLinearCrossEntropy"
CASES = [(1, 1000, 4, "head phase", None), (1, 1000, 0, "head phase", None), (1, 10, 0, "layer phase", None),
         (3, 1000, 4, "head phase", None), (3, 10, 4, "layer phase", None),
         (1, 4000, 4, "head phase", LINEAR), (3, 4000, 8, "head phase", LINEAR)]


@pytest.mark.parametrize("world_size,vocab,chunks,phase,loss", CASES,
                         ids=[f"w{c[0]}-v{c[1]}-c{c[2]}" + ("-linear" if c[4] else "") for c in CASES])
def test_plan_matches_torch_memory_trackers(world_size, vocab, chunks, phase, loss):
    """Train a small model as the recipe does (bf16, activation checkpointing per layer, FSDP2 via torchtune's
    shard_model, the recipe's loss call, AdamW, gradients set to None each step) and measure its second step with
    torch's MemTracker / FSDPMemTracker: parameters and optimizer states exactly, the peak within 0-5% above, in the
    planned phase."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    S = 256
    with _fake_world(world_size):
        with training.set_default_dtype(torch.bfloat16):
            model = longgen_llama(vocab, 3, 4, 2, 64, 160, 512, full_layers="all")
        plan = train_plan.plan_training(model, seq_len=S, world_size=world_size, loss_chunks=chunks, loss=loss)
        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
        if world_size > 1:
            training.shard_model(model, [lambda n, m: isinstance(m, TransformerSelfAttentionLayer)], cpu_offload=False)
            units = [n.replace("._checkpoint_wrapped_module", "") or "root"
                     for n, m in model.named_modules() if isinstance(m, torch.distributed.fsdp.FSDPModule)]
            assert sorted(units) == sorted(u.name for u in plan.units)
        loss_fn = CEWithChunkedOutputLoss(num_output_chunks=chunks) if chunks else torch.nn.CrossEntropyLoss()
        if loss == LINEAR:  # as the recipe sets it up: hidden states out of the model, the root kept gathered
            loss_fn = ChunkedLinearCrossEntropy(num_chunks=chunks)
            loss_fn.set_model_output(model)
            if world_size > 1:
                model.set_reshard_after_forward(False, recurse=False)
        elif chunks:
            model.set_num_output_chunks(chunks)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens, labels = torch.randint(0, vocab, (2, 1, S))
        pos = torch.arange(S)[None]  # packed batches give RoPE positions: the tables are gathered per layer

        def step():
            opt.zero_grad(set_to_none=True)
            logits = model(tokens, input_pos=pos)
            value = (loss_fn(logits, labels) if chunks else  # as recipes/longgen_finetune.py calls each loss
                     loss_fn(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)))
            del logits
            value.backward()
            opt.step()

        step()  # optimizer states exist from here on, as in every measured step of a run
        tracker = FSDPMemTracker(model, opt) if world_size > 1 else MemTracker()
        if world_size == 1:
            tracker.track_external(model, opt)
        with tracker:
            step()
        snap = {getattr(k, "value", k): v for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
    parts = plan.phases[plan.peak_phase]
    assert snap["Sharded Param" if world_size > 1 else "Parameter"] == parts["parameters (bfloat16)"]
    assert snap["OptState" if world_size > 1 else "Optstate"] == parts["optimizer (torch.optim.AdamW)"]
    assert plan.peak_phase == phase
    assert snap["Total"] <= plan.peak <= 1.05 * snap["Total"], (plan.peak, snap)


def test_8bit_optimizer_states_as_torchao_allocates_them():
    """torchao's AdamW8bit: 8-bit codes + an fp32 scale per 256 values + the code map for shards of >= 4096 values
    divisible by 256, plain states in the parameter's dtype otherwise -- as its own allocator makes them."""
    from torchao.optim import AdamW8bit

    shapes = [(4096, 64), (100, 64), (64,), (3, 4096), (17, 256)]  # quantized, too small, too small, 12288 ok, 4352 ok
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in shapes]
    opt = AdamW8bit(params)
    measured = 0
    for p in params:
        for signed in (True, False):
            buf = opt._new_buffer(p, signed)
            parts = [buf.codes, buf.scale, buf.qmap] if hasattr(buf, "codes") else [buf]
            measured += sum(t.numel() * t.element_size() for t in parts)
    planned = train_plan._optimizer_bytes("adam8bit", [p.numel() for p in params], 2) - 4 * len(params)  # minus step
    assert planned == measured


def _recorded_runs():
    for path in sorted((REPO / "analysis" / "results").glob("finetune_*NVIDIA_H200.json")):
        for run in json.loads(path.read_text())["runs"]:
            if run.get("peak_memory_alloc_gib"):
                yield pytest.param(run, id=f"{path.stem}:{run['spec']}")


@pytest.mark.parametrize("run", list(_recorded_runs()))
def test_plan_matches_the_peaks_measured_on_h200s(run):
    """The plan of each recorded `tune run` command (its config, overrides and GPU count) against the peak torchtune
    measured (max allocated, steps after the first): within 1%."""
    bench = load_script("analysis/bench_finetune.py", "bench_finetune")
    plan = bench.plan_run(shlex.split(run["command"]))
    assert plan.peak / GiB == pytest.approx(run["peak_memory_alloc_gib"], rel=0.01)


def test_plan_of_the_llama2_7b_config_on_8_gpus():
    """The shape and sharding of the paper's setting, worked out by hand: 6738.4M parameters, 32 layer units of
    202.4M values + the root's 262.1M, each sharded by 8 (dims divide: no padding); AdamW's states in bf16."""
    with torch.device("meta"):
        model = longgen_llama2_7b(max_seq_len=131072)
    plan = train_plan.plan_training(model, seq_len=131072, world_size=8, loss_chunks=16)
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    root = 2 * 32000 * 4096 + 4096
    assert [u.values for u in plan.units] == [layer] * 32 + [root]
    assert [u.per_rank for u in plan.units] == [layer // 8] * 32 + [root // 8]
    parts = plan.phases["layer phase"]
    total = 32 * layer + root
    assert parts["parameters (bfloat16)"] == 2 * total // 8 and parts["optimizer (torch.optim.AdamW)"] == \
        4 * total // 8 + 4 * (32 * 9 + 3)
    assert parts["kept activations"] == 32 * 131072 * 4096 * 2  # every layer's input, bf16
    assert plan.peak_phase == "layer phase" and 60 * GiB < plan.peak < 80 * GiB
    # on one GPU nothing is sharded, and the 8-bit optimizer saves 2 x (2 - 1 - 4/256) bytes per parameter
    one = train_plan.plan_training(model, seq_len=131072, world_size=1, loss_chunks=16)
    assert one.units[-1].per_rank == root and one.phases["layer phase"]["FSDP2 buffers"] == 0
    assert one.peak - one.alternative[1] == pytest.approx(total * 2 * (1 - 4 / 256), rel=0.001)
    # FSDP2 CPU offload: the sharded state lives on the host, the GPU keeps the gathered units and the activations
    off = train_plan.plan_training(model, seq_len=131072, world_size=8, loss_chunks=16, cpu_offload=True)
    assert off.host_bytes == parts["parameters (bfloat16)"] * 2 + parts["optimizer (torch.optim.AdamW)"]
    assert off.peak == plan.peak - parts["parameters (bfloat16)"] - parts["optimizer (torch.optim.AdamW)"] - \
        parts["gradients"]


def _plan_cli(*args):
    cli = load_script("recipes/longgen_plan.py", "longgen_plan")
    return cli.main(["--config", LLAMA2_7B, *args])


def test_cli_prints_the_7b_plan_at_8_gpus(capsys):
    plan = _plan_cli("--world-size", "8", *RANDOM_WEIGHTS)
    out = capsys.readouterr().out
    assert "valid (device checked for its form only)" in out or torch.cuda.is_available()
    assert re.search(r"layers.0-31 +32 units x +202.38M values -> +25.30M per rank", out)
    assert re.search(r"root +1 unit +x +262.15M values -> +32.77M per rank", out)
    assert f"peak (estimate): {plan.peak / GiB:.2f} GiB per GPU, in the layer phase" in out
    assert "fits 139.8 GiB" in out and "with optimizer._component_=torchao.optim.AdamW8bit" in out


@pytest.mark.parametrize("args,message", [
    (["--world-size", "1", "--gpu-memory-gib", "80"],
     r"config field 'seq_len': 131072 x batch_size 1 needs an estimated 101.9 GiB per GPU at world size 1 \(in the "
     r"layer phase\), more than the 80 GiB of one GPU \(--gpu-memory-gib\); what fits: seq_len <= \d+ \(multiples of "
     r"128\); or world size >= 4"),
    (["--world-size", "0"], r"world size \(--world-size, or torchrun's --nproc_per_node\) must be an int >= 1, got 0"),
    (["--world-size", "8", "optimizer._component_=torch.optim.SGD", "~optimizer.betas"],
     r"config field 'optimizer._component_': the memory plan knows \['torch.optim.AdamW', .*got 'torch.optim.SGD'"),
    (["--world-size", "8", "optimizer.lr=abc"], r"config field 'optimizer.lr': must be a number, got 'abc'"),
    (["--world-size", "8", "seq_len=200000"], r"config field 'seq_len': 200000 exceeds model.max_seq_len=131072"),
    (["--world-size", "8", "~nope"], r"config overrides: Could not find key nope"),
])
def test_cli_refuses_naming_the_field(args, message, capsys):
    with pytest.raises(SystemExit, match=r"^error: " + message):
        _plan_cli(*args, *RANDOM_WEIGHTS)


def test_cli_refuses_the_shipped_config_without_weights_or_data():
    with pytest.raises(SystemExit, match=r"config field 'checkpoint.base_dir': is required \(the config leaves it"):
        _plan_cli("--world-size", "8")


@pytest.mark.parametrize("config", ["llama2_7b_longgen_128k", "llama2_7b_full_128k"])
def test_the_7b_configs_state_their_plan(config):
    """The numbers the shipped 7B configs' header states are the plan's (so they cannot go stale unnoticed)."""
    cli = load_script("recipes/longgen_plan.py", "longgen_plan")
    path = REPO / "recipes" / "configs" / f"{config}.yaml"
    cfg = cli.load_config(path, RANDOM_WEIGHTS)
    header = path.read_text().split("\noutput_dir:")[0]
    eight, one = (train_plan.plan_from_config(cfg, w) for w in (8, 1))
    assert f"{eight.peak / GiB:.1f} GiB per GPU at 8 GPUs" in header and f"One GPU: {one.peak / GiB:.1f} GiB" in header
    assert f"-{(eight.peak - eight.alternative[1]) / GiB:.1f} GiB" in header  # what the 8-bit optimizer would save
    assert "An H200 has 139.8 GiB" in header and eight.peak < one.peak < 139.8 * GiB


def test_the_3b_128k_spec_fits_one_h200_with_the_chunked_linear_loss():
    """The Llama-3.2-3B shape (vocabulary 128,256) at 128K tokens on one GPU, as analysis/bench_finetune.py runs it:
    with torchtune's CEWithChunkedOutputLoss (8 chunks, what the spec ran before) the head alone is 105.5 GiB and the
    run does not fit an H200; with flexgen_long's loss (32 chunks) the head is 10.4 GiB and the peak moves to the
    layers' backward."""
    bench = load_script("analysis/bench_finetune.py", "bench_finetune")
    args = bench.run_args("3b", 131072, "hybrid", 1, 3, "/tmp/x", "/tmp/y")
    assert "loss._component_=flexgen_long.losses.ChunkedLinearCrossEntropy" in args and "loss.num_chunks=32" in args
    new = bench.plan_run(args)
    old = train_plan.plan_training(new.shape, seq_len=131072, loss_chunks=8)  # CEWithChunkedOutputLoss's default
    head = "head (final norm + loss)"
    new_head, old_head = new.phases["head phase"][head], old.phases["head phase"][head]
    assert new.loss == LINEAR and new.loss_chunks == 32
    assert old_head / GiB == pytest.approx(105.52, abs=0.01) and old.peak > 139.8 * GiB  # what --plan-only printed
    assert new_head / GiB == pytest.approx(10.37, abs=0.01) and new_head < old_head / 10
    assert new.peak_phase == "layer phase" and new.peak < 0.5 * old.peak and new.peak <= 139.8 * GiB


def _comment(path: Path) -> str:
    """The config's comment lines joined into one line (numbers may wrap across them)."""
    return " ".join(ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#"))


@pytest.mark.parametrize("config", ["llama3_1_8b_longgen_128k", "llama3_1_8b_full_128k", "llama3_2_1b_longgen_64k",
                                    "llama3_2_1b_full_64k", "llama2_7b_longgen_128k", "llama2_7b_full_128k"])
def test_the_128k_configs_state_their_loss_choice(config):
    """The Llama-3 configs switched to flexgen_long's loss and state their plan's peaks with it and with the
    CEWithChunkedOutputLoss they shipped with (8B at 8 GPUs: over an H200 before); the Llama-2-7B ones kept theirs,
    whose peak is in the layers' backward either way, and state what the new loss would change."""
    cli = load_script("recipes/longgen_plan.py", "longgen_plan")
    path = REPO / "recipes" / "configs" / f"{config}.yaml"
    cfg = cli.load_config(path, RANDOM_WEIGHTS)
    text = _comment(path)
    old_loss = ["loss._component_=torchtune.modules.loss.CEWithChunkedOutputLoss", "~loss.num_chunks",
                "loss.num_output_chunks=16"]
    if config.startswith("llama2"):
        assert cfg.loss._component_ == "torchtune.modules.loss.CEWithChunkedOutputLoss"
        old = train_plan.plan_from_config(cfg, 8)
        new = train_plan.plan_from_config(cli.load_config(path, [*RANDOM_WEIGHTS, f"loss._component_={LINEAR}",
                                                                 "~loss.num_output_chunks", "loss.num_chunks=32"]), 8)
        assert new.peak == old.peak and new.peak_phase == "layer phase"
        assert f"{old.totals['head phase'] / GiB:.1f} -> {new.totals['head phase'] / GiB:.1f} GiB per GPU at 8 GPUs" \
            in text
        return
    assert cfg.loss._component_ == LINEAR
    new8, new1 = (train_plan.plan_from_config(cfg, w) for w in (8, 1))
    old8, old1 = (train_plan.plan_from_config(cli.load_config(path, [*RANDOM_WEIGHTS, *old_loss]), w) for w in (8, 1))
    assert old8.loss == train_plan.LOSSES[1] and old8.loss_chunks == 16
    assert f"{new8.peak / GiB:.1f} GiB per GPU at 8 GPUs, {new1.peak / GiB:.1f} GiB on one" in text
    assert f"{old8.peak / GiB:.1f} and {old1.peak / GiB:.1f} GiB" in text
    assert new8.peak < old8.peak and new1.peak < old1.peak
    assert ("over an H200's 139.8 GiB even at 8 GPUs" in text) == (old8.peak > 139.8 * GiB)
    assert f"a chunk of {cfg.seq_len // cfg.loss.num_chunks} tokens" in text
