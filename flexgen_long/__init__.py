"""flexgen_long: LongGen hybrid sparse attention (Ge et al., ICLR 2025) on FlexAttention and torchtune."""

from .patterns import AttnSink, BlockSparse, Full, Pattern

__all__ = ["Full", "AttnSink", "BlockSparse", "Pattern"]
__version__ = "0.1.0"
