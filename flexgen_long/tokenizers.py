"""Tokenizers for the recipes.

The tiny default job uses ``byte_tokenizer()``: UTF-8 bytes are the tokens, so it needs no file and no network.
A real model's tokenizer comes from its checkpoint directory, as the model does (``hf_tokenizer``)::

    tokenizer:
      _component_: flexgen_long.tokenizers.hf_tokenizer
      checkpoint_dir: outputs/smollm2-135m-instruct     # tokenizer.json, else tokenizer.model

torchtune's own tokenizers can also be named directly (they take the tokenizer file)::

    tokenizer:
      _component_: torchtune.models.llama2.llama2_tokenizer     # SentencePiece tokenizer.model
      path: /models/Llama-2-7b-hf/tokenizer.model

Everything in flexgen_long.data and the recipes uses only what those share: ``encode(text, add_bos=, add_eos=)``,
``decode(ids)``, ``bos_id``, ``eos_id``, ``vocab_size`` (and ``stop_tokens`` where a tokenizer has it).
``add_bos=True`` starts a sequence the way the tokenizer starts plain text; ``add_eos=True`` ends a document with
``eos_id``. ``check_fits`` refuses a tokenizer whose ids do not fit the model's embedding table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["ByteTokenizer", "byte_tokenizer", "HFTokenizer", "hf_tokenizer", "check_fits", "sequence_start"]


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, then BOS = 256, EOS = 257, PAD = 258 (``vocab_size`` = 259)."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if not skip_special_tokens and any(i > 255 for i in ids):
            raise ValueError("ByteTokenizer.decode: special tokens (>= 256) have no text; pass skip_special_tokens=True")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def byte_tokenizer() -> ByteTokenizer:
    """Builder for configs (``_component_: flexgen_long.tokenizers.byte_tokenizer``)."""
    return ByteTokenizer()


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (with its ``tokenizer_config.json``) loaded by transformers, with BOS and EOS
    as that directory says.

    ``encode(text, add_bos=True)`` begins with what the directory's tokenizer puts before plain text -- its BOS for
    Llama-2 / Llama-3, nothing for SmolLM2 (its BOS ``<|im_start|>`` belongs to the chat template) -- so prompts match
    what transformers feeds the model. ``add_eos=True`` appends ``eos_id`` (a document end for training data;
    transformers' tokenizers add none to plain text). ``stop_tokens``: ``eos_id`` plus generation_config.json's
    ``eos_token_id``(s). ``vocab_size``: the largest id + 1, special tokens included.

    Why not torchtune's ``HuggingFaceBaseTokenizer``: its ``add_bos=True`` always adds a BOS (SmolLM2 plain text gets
    none), its ``add_bos=False`` keeps one that the tokenizer adds by itself, and it reads neither the added-token
    settings nor the post-processor rules that transformers applies from tokenizer_config.json."""

    def __init__(self, checkpoint_dir):
        from transformers import AutoTokenizer

        d = Path(checkpoint_dir)
        try:
            self._hf = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except Exception as e:  # transformers raises many kinds here (OSError, ValueError, JSON and Rust errors)
            raise ValueError(f"{d}: the HF tokenizer (tokenizer.json, tokenizer_config.json) cannot be loaded: "
                             f"{type(e).__name__}: {e}") from None
        self._backend = self._hf.backend_tokenizer
        self.bos_id = self._hf.bos_token_id
        self.eos_id = self._hf.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"{d}/tokenizer_config.json names no eos_token (needed to end documents and stop "
                             "generation)")
        self.pad_id = self._hf.pad_token_id if self._hf.pad_token_id is not None else self.eos_id
        self.vocab_size = max(self._hf.get_vocab().values()) + 1
        plain = self._backend.encode("a", add_special_tokens=False).ids
        full = self._backend.encode("a").ids
        n = len(full) - len(plain)
        starts = [i for i in range(n + 1) if full[i:i + len(plain)] == plain]
        if not starts:
            raise ValueError(f"{d}: cannot tell what the tokenizer adds around plain text ({full} vs {plain})")
        self._start = full[:starts[0]]
        stops = {self.eos_id}
        gen = d / "generation_config.json"
        if gen.is_file():
            try:
                eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{gen}: not valid JSON ({e}); the file is truncated or damaged") from None
            stops |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.stop_tokens = sorted(stops)

    @property
    def adds_bos(self) -> bool:
        """Whether plain text starts with a special token in this tokenizer (Llama: BOS; SmolLM2: no)."""
        return bool(self._start)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return (list(self._start) if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ \d+$")


def hf_tokenizer(checkpoint_dir):
    """The tokenizer of an HF model directory (config builder): ``tokenizer.json`` through transformers
    (``HFTokenizer``), else ``tokenizer.model`` through torchtune -- SentencePiece as Llama-2's
    (``llama2_tokenizer``), tiktoken as Llama-3's (``llama3_tokenizer``, told apart by its text lines of
    ``<base64 token> <rank>``); those add BOS, as Llama's own tokenizer configs say."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise ValueError(f"config section 'tokenizer': checkpoint_dir {str(d)!r} does not exist (or is not a "
                         "directory)")
    if (d / "tokenizer.json").is_file():
        return HFTokenizer(d)
    model_file = d / "tokenizer.model"
    if model_file.is_file():
        with open(model_file, "rb") as f:
            first = f.readline().rstrip(b"\n")
        if _TIKTOKEN_LINE.match(first):
            from torchtune.models.llama3 import llama3_tokenizer
            return llama3_tokenizer(str(model_file))
        from torchtune.models.llama2 import llama2_tokenizer
        try:
            return llama2_tokenizer(str(model_file))
        except Exception as e:  # sentencepiece raises RuntimeError / OSError for a damaged model file
            raise ValueError(f"{model_file}: not a SentencePiece or tiktoken tokenizer ({type(e).__name__}: {e})") \
                from None
    raise ValueError(f"config section 'tokenizer': {d} has neither tokenizer.json nor tokenizer.model")


def sequence_start(tokenizer) -> list[int]:
    """The ids a sequence starts with (``encode("", add_bos=True)``): ``[bos_id]``, or none where the tokenizer starts
    plain text without one (SmolLM2)."""
    return tokenizer.encode("", add_bos=True, add_eos=False)


def check_fits(tokenizer, model_vocab_size: int) -> None:
    """Refuse a tokenizer whose ids reach past the model's embedding table (its text would index garbage rows or
    crash), naming both sizes. A smaller tokenizer is fine (padded embedding tables)."""
    n = getattr(tokenizer, "vocab_size", None)
    if not isinstance(n, int):
        raise ValueError(f"config section 'tokenizer': {type(tokenizer).__name__} has no integer vocab_size, so it "
                         "cannot be checked against the model's vocabulary")
    if n > model_vocab_size:
        raise ValueError(f"config section 'tokenizer': the tokenizer has {n} ids (0..{n - 1}) but the model's "
                         f"vocabulary has {model_vocab_size}: ids >= {model_vocab_size} have no embedding. Use the "
                         "model's own tokenizer (flexgen_long.tokenizers.hf_tokenizer with the model's checkpoint_dir)"
                         " or a model with a vocabulary of at least the tokenizer's size")
