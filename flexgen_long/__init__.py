"""flexgen_long: LongGen hybrid sparse attention (Ge et al., ICLR 2025) on FlexAttention and torchtune."""

from .layout import full_layer_indices, layer_patterns
from .patterns import AttnSink, BlockSparse, Full, Pattern

__all__ = ["Full", "AttnSink", "BlockSparse", "Pattern", "full_layer_indices", "layer_patterns", "longgen_llama",
           "longgen_tiny", "doc_ids_from_seq_lens"]
__version__ = "0.1.0"

_LAZY = {"longgen_llama", "longgen_tiny", "doc_ids_from_seq_lens"}


def __getattr__(name):
    # the model builders import torchtune (seconds): load them on first use, not on `import flexgen_long.patterns`
    if name in _LAZY:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'flexgen_long' has no attribute {name!r}")
