"""Old name of ``flexgen_long.checkpoint_io`` (the module holds checkpoint I/O, not training).

Kept only so that code written against ``flexgen_long.training`` keeps importing; new code imports
``flexgen_long.checkpoint_io`` (writing, listing, the output_dir lock) and ``flexgen_long.hf`` (reading:
``load_hf_state_dict``, ``load_model``, re-exported here under their old names).
"""

from .checkpoint_io import *  # noqa: F401,F403
from .checkpoint_io import __all__ as _checkpoint_io_all
from .hf import load_hf_state_dict, load_model  # noqa: F401

__all__ = [*_checkpoint_io_all, "load_hf_state_dict", "load_model"]
