"""Tokenizers for the recipes.

The tiny default job uses ``byte_tokenizer()``: UTF-8 bytes are the tokens, so it needs no file and no network.
Real models use torchtune's own tokenizers, named directly in the YAML (they take the model's tokenizer file)::

    tokenizer:
      _component_: torchtune.models.llama2.llama2_tokenizer     # SentencePiece tokenizer.model
      path: /models/Llama-2-7b-hf/tokenizer.model
    tokenizer:
      _component_: torchtune.models.llama3.llama3_tokenizer     # tiktoken tokenizer.model
      path: /models/Llama-3.1-8B/original/tokenizer.model

Everything in flexgen_long.data uses only what those share: ``encode(text, add_bos=, add_eos=)``, ``decode(ids)``,
``bos_id``, ``eos_id``.
"""

from __future__ import annotations

__all__ = ["ByteTokenizer", "byte_tokenizer"]


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
