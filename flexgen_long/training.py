"""Old name of ``flexgen_long.checkpoint_io`` (the module holds checkpoint I/O, not training).

Kept only so that code written against ``flexgen_long.training`` keeps importing; new code imports
``flexgen_long.checkpoint_io``.
"""

from .checkpoint_io import *  # noqa: F401,F403
from .checkpoint_io import __all__  # noqa: F401
