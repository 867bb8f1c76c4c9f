"""Which layer gets which pattern.

LongGen keeps full attention in a contiguous block of layers (the middle third in the paper) and gives every other layer
one sparse pattern. ``full_layers`` names the full layers; ``sparse_pattern`` is the pattern of the rest.

``full_layers`` (L = num_layers, ``n(f) = max(1, floor(f * L + 1/2))`` full layers for a fraction f):

=================  ====================================================================================================
``"middle"``       the middle third: ``n = n(1/3)`` layers starting at ``(L - n) // 2`` (32 layers -> 10..20, 16 -> 5..9,
                   4 -> [1]) -- the paper's layout, the default
a float f in (0,1] ``n(f)`` layers placed in the middle the same way (``1/3`` == ``"middle"``, ``1.0`` == ``"all"``)
``"bottom"``       the first ``n(1/3)`` layers (next to the embeddings)
``"top"``          the last ``n(1/3)`` layers (next to the output)
``"interleave:k"`` every k-th layer counting from 1: layer i is full when ``(i + 1) % k == 0`` (k >= 1; k = 1 is all)
``"all"``          every layer (the model is then the plain Llama)
``"none"``         no layer (all sparse)
a list of ints     exactly these 0-based indices (no duplicates, each in [0, L))
``"retrieval"``    the layers of a pretrained model's strongest retrieval heads, ``n(1/3)`` of them (as many as
                   ``"middle"``); ``"retrieval:n"`` n of them (an int in [1, L]), ``"retrieval:f"`` ``n(f)`` of them (a
                   fraction in (0, 1], written with a point). Chosen from the model's weights
                   (``flexgen_long.retrieval``), so a builder cannot take it: the finetuning recipe resolves it into a
                   list before it builds the model, and ``python recipes/longgen_layers.py MODEL_DIR`` prints that list
=================  ====================================================================================================

``sparse_pattern`` is an ``AttnSink`` or ``BlockSparse`` instance, or -- as torchtune's ``config.instantiate`` passes
nested YAML nodes through as plain dicts -- a mapping ``{"_component_": "flexgen_long.patterns.AttnSink", ...}``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence

from .patterns import AttnSink, Full, Pattern

__all__ = ["full_layer_indices", "layer_patterns", "as_sparse_pattern", "is_retrieval", "retrieval_budget",
           "DEFAULT_SPARSE_PATTERN", "RETRIEVAL"]

#: 128 sink tokens + a 1920-token window: 2048 keys per query, the paper's budget of about 2K of 128K (1/64), with the
#: sink and the window's far edge on 128-token block boundaries, so fewer key blocks are partial (masked per token):
#: faster than AttnSink(64, 1984), the same keys per query (measured: analysis/README.md, "sink alignment").
DEFAULT_SPARSE_PATTERN = AttnSink(sink=128, window=1920)

_NAMED = ('"middle", "bottom", "top", "interleave:k", "all", "none", a float in (0, 1], a list of layer indices, or '
          '"retrieval[:n or :f]" (resolved by the finetuning recipe)')
#: The ``full_layers`` name of the layers chosen from a pretrained model's retrieval heads.
RETRIEVAL = "retrieval"
_RETRIEVAL_FORMS = ("'retrieval' (as many full layers as 'middle'), 'retrieval:<n>' (an int in [1, num_layers]) or "
                    "'retrieval:<f>' (a fraction in (0, 1] written with a point, e.g. 'retrieval:0.25')")


def _count(fraction: float, num_layers: int) -> int:
    return max(1, math.floor(fraction * num_layers + 0.5))


def is_retrieval(full_layers) -> bool:
    """Whether ``full_layers`` asks for the layers of a model's retrieval heads (``"retrieval"``, ``"retrieval:..."``)."""
    if not isinstance(full_layers, str):
        return False
    name = full_layers.strip().lower()
    return name == RETRIEVAL or name.startswith(RETRIEVAL + ":")


def retrieval_budget(full_layers: str, num_layers: int | None) -> int | None:
    """How many full layers a ``"retrieval[:n or :f]"`` value asks for in a model of ``num_layers`` layers. With
    ``num_layers=None`` only the value's form is checked (before the model's size is known) and None is returned.
    Raises ``ValueError`` naming the allowed forms."""
    if not is_retrieval(full_layers):
        raise ValueError(f"full_layers {full_layers!r} is not a retrieval budget; expected {_RETRIEVAL_FORMS}")
    _, colon, budget = full_layers.strip().lower().partition(":")
    if num_layers is not None and (not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1):
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    if not colon:
        return None if num_layers is None else _count(1 / 3, num_layers)
    if budget.isdigit():
        n = int(budget)
        if n < 1 or (num_layers is not None and n > num_layers):
            bound = f"in [1, {num_layers}]" if num_layers is not None else ">= 1"
            raise ValueError(f"full_layers {full_layers!r}: the layer count must be an int {bound}; expected "
                             f"{_RETRIEVAL_FORMS}")
        return None if num_layers is None else n
    try:
        f = float(budget) if "." in budget else None
    except ValueError:
        f = None
    if f is None or not 0.0 < f <= 1.0:
        raise ValueError(f"full_layers {full_layers!r}: expected {_RETRIEVAL_FORMS}")
    return None if num_layers is None else _count(f, num_layers)


def full_layer_indices(num_layers: int, full_layers="middle") -> tuple[int, ...]:
    """Sorted indices of the full-attention layers (see the module docstring for the rules)."""
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    L = num_layers
    if isinstance(full_layers, str):
        name = full_layers.strip().lower()
        if is_retrieval(name):
            retrieval_budget(name, L)  # a malformed budget is named as such
            raise ValueError(f"full_layers {full_layers!r} names the layers of a pretrained model's retrieval heads, "
                             "which only its weights can tell: the finetuning recipe chooses them from "
                             "checkpoint.base_dir, and `python recipes/longgen_layers.py MODEL_DIR` prints the list to "
                             "give here instead")
        n = _count(1 / 3, L)
        if name == "middle":
            return _middle(n, L)
        if name == "bottom":
            return tuple(range(n))
        if name == "top":
            return tuple(range(L - n, L))
        if name == "all":
            return tuple(range(L))
        if name == "none":
            return ()
        if name.startswith("interleave:"):
            k = name.split(":", 1)[1]
            if not k.isdigit() or int(k) < 1:
                raise ValueError(f"full_layers 'interleave:k' needs an int k >= 1, got {full_layers!r}")
            k = int(k)
            return tuple(i for i in range(L) if (i + 1) % k == 0)
        raise ValueError(f"full_layers must be one of {_NAMED}; unknown string {full_layers!r}")
    if isinstance(full_layers, float):
        if not 0.0 < full_layers <= 1.0:
            raise ValueError(f"full_layers as a fraction must lie in (0, 1], got {full_layers!r}")
        return _middle(_count(full_layers, L), L)
    if isinstance(full_layers, Sequence) and not isinstance(full_layers, (str, bytes)):
        idx = list(full_layers)
        for i in idx:
            if not isinstance(i, int) or isinstance(i, bool):
                raise ValueError(f"full_layers list entries must be ints, got {i!r} in {idx!r}")
            if not 0 <= i < L:
                raise ValueError(f"full_layers index {i} out of range [0, {L}) for num_layers={L}")
        dup = sorted({i for i in idx if idx.count(i) > 1})
        if dup:
            raise ValueError(f"full_layers lists layer(s) {dup} more than once: {idx!r}")
        return tuple(sorted(idx))
    # an int is ambiguous (a count? an index?) and a bool is surely a mistake
    raise ValueError(f"full_layers must be one of {_NAMED}, got {full_layers!r} ({type(full_layers).__name__}); "
                     "for one layer write a list, e.g. [5]")


def _middle(n: int, L: int) -> tuple[int, ...]:
    n = min(n, L)
    start = (L - n) // 2
    return tuple(range(start, start + n))


def as_sparse_pattern(sparse_pattern) -> Pattern:
    """A sparse pattern (AttnSink, BlockSparse, any sparse Pattern subclass) from an instance or from a YAML node
    ``{"_component_": dotted.path, **kwargs}``."""
    if isinstance(sparse_pattern, Mapping):
        node = dict(sparse_pattern)
        path = node.pop("_component_", None)
        if not isinstance(path, str) or "." not in path:
            raise ValueError(f"sparse_pattern as a mapping needs '_component_': 'flexgen_long.patterns.AttnSink' (or "
                             f"BlockSparse), got {sparse_pattern!r}")
        module, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"sparse_pattern _component_ {path!r} cannot be imported: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, Pattern)) or cls.is_full:
            raise ValueError(f"sparse_pattern _component_ must be a sparse flexgen_long.patterns pattern (AttnSink, "
                             f"BlockSparse or a Pattern subclass of your own), got {path!r}")
        sparse_pattern = cls(**node)
    if not isinstance(sparse_pattern, Pattern) or sparse_pattern.is_full:
        raise ValueError("sparse_pattern must be a sparse pattern such as AttnSink or BlockSparse (for full attention "
                         f"everywhere use full_layers='all'), got {sparse_pattern!r}")
    return sparse_pattern


def layer_patterns(num_layers: int, full_layers="middle", sparse_pattern=DEFAULT_SPARSE_PATTERN) -> tuple[Pattern, ...]:
    """The pattern of every layer: ``Full()`` at ``full_layer_indices``, ``sparse_pattern`` elsewhere. Layers of one
    kind share one pattern object, so a forward pass builds one mask per distinct pattern."""
    full = set(full_layer_indices(num_layers, full_layers))
    sparse = as_sparse_pattern(sparse_pattern)  # validated even when unused: a bad config should not lie dormant
    dense = Full()
    return tuple(dense if i in full else sparse for i in range(num_layers))
