"""A LongGen model as a transformers model: ``AutoModelForCausalLM.from_pretrained``, ``generate()``, pipelines.

Importing this module registers, with transformers (5.17 to 5.24), the model type ``flexgen_long_llama``::

    import flexgen_long.hf_model                     # registers "flexgen_long_llama" with transformers
    model = AutoModelForCausalLM.from_pretrained(d)  # d written by `python -m flexgen_long.export_hf`
    model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=64)

A ``flexgen_long_llama`` directory is a Llama checkpoint (same tensors, same names) whose config.json adds the layout:
``layer_types`` (one of ``full_attention`` / ``sink_attention`` / ``block_sparse_attention`` per layer),
``attention_sink_size`` + ``sliding_window`` (AttnSink: the window counts the query, as HF's ``sliding_window``) or
``block_sparse`` (BlockSparse's fields), and ``attn_implementation: "flexgen_long"``. Pattern semantics are
flexgen_long.patterns'; positions are counted within each row's real tokens (its ``attention_mask`` ones), so a
left-padded row has its own sinks and equals its prompt alone.

What runs where:

* attention (``longgen_attention``, registered as ``attn_implementation="flexgen_long"``): each layer builds its mask
  from its pattern and the positions of the keys its cache returned. Small problems (decode, short prompts) run SDPA
  with a dense mask of the token rule; long ones run compiled FlexAttention with the analytic BlockMasks of
  flexgen_long.masks, one row at a time -- never a q_len x kv_len mask. Full layers over an unpadded prompt run
  SDPA's causal kernel, no mask at all.
* caches: ``sink_attention`` layers keep their sink columns plus the last ``window - 1`` columns (``SinkCacheLayer``;
  ``StaticSinkCacheLayer`` for ``cache_implementation="static"`` / ``torch.compile``), so a generation holds
  ``T`` keys per full layer and ``sink + window - 1`` per AttnSink layer. ``block_sparse_attention`` layers keep every
  key (exact attention, untrimmed cache: HF's cache layers return one contiguous key tensor per layer, and the keys a
  per-head BlockSparse layer keeps differ between heads).

The transformers traps, each handled here (the comment at each place says what upstream lacks):

1. ``save_pretrained`` drops ``attn_implementation`` and HF then runs plain SDPA over every layer -> the model classes
   default to ours and refuse any other implementation (``_LongGenAttentionOnly``).
2. Config validation rejects unknown layer types -> ``LongGenLlamaConfig.validate_layer_type``.
3. Custom cache layers receive no settings -> ``LongGenLlamaModel.forward`` configures them before their first update.
4. StaticCache and cropping (assisted decoding) do not know the layer type -> ``StaticSinkCacheLayer``,
   ``SinkCacheLayer.crop`` / ``activate_past_recording``.
5. ``AttentionMaskInterface`` builds one mask per forward, sized for the first full layer, and never sees the cache ->
   the decoder describes the batch once (``_Batch``) and every layer derives its own mask from it.
6. For compiled decoding HF builds masks outside the compiled step only for the layer types it knows -> our
   ``create_masks_for_generate`` gives the step a fixed-size mask.
7. One dense bool mask at 128K is 16 GiB -> FlexAttention with analytic BlockMasks for long prompts.

Without this module imported, transformers refuses the unknown model type ``flexgen_long_llama`` (its error names
it, hence the package) rather than running the layers as full attention: a stock ``model_type`` would let any Llama
loader (transformers with another ``attn_implementation``, serving engines) run every layer as full attention
without a word.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import AttentionInterface, AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticLayer
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

from .attention import flex_attend
from .masks import build_block_mask, build_cached_block_mask, position_mask
from .patterns import AttnSink, BlockSparse, Full, Pattern
from .shapes import BLOCK, pad_seq, padded_len

__all__ = ["MODEL_TYPE", "ATTN_IMPLEMENTATION", "FULL", "SINK", "BLOCK_SPARSE", "LongGenLlamaConfig",
           "LongGenLlamaModel", "LongGenLlamaForCausalLM", "SinkCacheLayer", "StaticSinkCacheLayer",
           "longgen_attention", "layout_fields", "cache_bytes"]

MODEL_TYPE = "flexgen_long_llama"
ATTN_IMPLEMENTATION = "flexgen_long"
FULL, SINK, BLOCK_SPARSE = "full_attention", "sink_attention", "block_sparse_attention"
#: The sparse patterns this adapter exports, with their transformers layer types (each has its config fields and cache
#: layer below): a pattern needs an entry here, and a cache layer, to run inside transformers.
SPARSE_LAYER_TYPES = {AttnSink: SINK, BlockSparse: BLOCK_SPARSE}
LAYER_TYPES = (FULL, SINK, BLOCK_SPARSE)
BLOCK_SPARSE_FIELDS = ("block", "local_blocks", "vertical_stride", "per_head")
#: The keyword under which the decoder hands every attention call the batch geometry (``_Batch``).
BATCH_KWARG = "longgen_batch"
#: Trap 7: transformers' SDPA path masks with one dense bool tensor per call (16 GiB at 128K). Ours builds a dense mask
#: only up to this many batch x queries x keys (16 Mi bools: 16 MiB, 64 MiB as SDPA's float mask); larger problems go
#: through FlexAttention with analytic BlockMasks.
DENSE_MASK_LIMIT = 1 << 24
# Query / key lengths reaching compiled FlexAttention are padded to the project's buckets (flexgen_long.shapes), one
# compiled function per bucketed shape: no recompile limit to raise, no query block shorter than a block.


# -- config -----------------------------------------------------------------------------------------------------------
@strict  # as transformers' own configs: type-checks the fields and runs the validate_* methods after __init__
class LongGenLlamaConfig(LlamaConfig):
    """A ``LlamaConfig`` plus the LongGen layout (see the module docstring). ``patterns()`` gives each layer's
    flexgen_long pattern."""

    model_type = MODEL_TYPE

    layer_types: list[str] | None = None
    sliding_window: int | None = None
    attention_sink_size: int | None = None
    block_sparse: dict | None = None

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = [FULL] * self.num_hidden_layers
        # HF's configs default to "sdpa"; ours has one implementation (trap 1: the saved field is dropped on save)
        kwargs.setdefault("attn_implementation", ATTN_IMPLEMENTATION)
        super().__post_init__(**kwargs)
        self.validate_layer_type()  # here, so that a bad layout fails in one line (strict's validate() wraps it)

    def validate_layer_type(self):
        """Trap 2: transformers accepts only the layer types it implements (ALLOWED_ATTN_LAYER_TYPES); ours adds
        sink_attention and block_sparse_attention, with the settings each needs."""
        types = self.layer_types
        if not isinstance(types, (list, tuple)) or len(types) != self.num_hidden_layers:
            raise ValueError(f"layer_types must be a list of {self.num_hidden_layers} entries (num_hidden_layers), "
                             f"got {types!r}")
        bad = sorted({t for t in types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(f"layer_types entries must be in {list(LAYER_TYPES)}, got {bad}")
        self.patterns()  # the settings of the types in use

    def patterns(self) -> tuple[Pattern, ...]:
        """The flexgen_long pattern of every layer (BlockSparse bound to the KV heads), built once."""
        key = (tuple(self.layer_types), self.attention_sink_size, self.sliding_window,
               tuple(sorted((self.block_sparse or {}).items())), self.num_key_value_heads)
        cached = self.__dict__.get("_longgen_patterns")
        if cached is not None and cached[0] == key:
            return cached[1]
        sparse = {}
        if SINK in self.layer_types:
            try:
                sparse[SINK] = AttnSink(self.attention_sink_size, self.sliding_window)
            except ValueError as e:  # AttnSink names its own fields: name the config's
                rule, _, got = str(e).partition(", got ")
                for ours, theirs in (("AttnSink.sink", "attention_sink_size"), ("AttnSink.window", "sliding_window")):
                    rule = rule.replace(ours, theirs)
                raise ValueError(f"{rule} for sink_attention layers, got {got}") from None
        if BLOCK_SPARSE in self.layer_types:
            fields_ = self.block_sparse
            if not isinstance(fields_, dict) or set(fields_) != set(BLOCK_SPARSE_FIELDS):
                raise ValueError(f"block_sparse must be an object with exactly {list(BLOCK_SPARSE_FIELDS)} for "
                                 f"block_sparse_attention layers, got {fields_!r}")
            sparse[BLOCK_SPARSE] = BlockSparse(**fields_).bind_heads(self.num_key_value_heads)
        full = Full()
        patterns = tuple(full if t == FULL else sparse[t] for t in self.layer_types)
        self.__dict__["_longgen_patterns"] = (key, patterns)
        return patterns

    def to_dict(self):
        out = super().to_dict()
        out.pop("_longgen_patterns", None)
        out["attn_implementation"] = ATTN_IMPLEMENTATION  # trap 1: to_dict drops it; written for readers of the file
        return out


def layout_fields(patterns) -> dict:
    """config.json's layout fields for a list of per-layer patterns (every sparse layer with the same pattern, as
    flexgen_long.layout makes them)."""
    sparse = {p for p in patterns if not p.is_full}
    if len(sparse) > 1:
        raise ValueError(f"the sparse layers must share one pattern, got {sorted(map(repr, sparse))}")
    for p in sparse:
        if type(p) not in SPARSE_LAYER_TYPES:
            raise ValueError(f"only {sorted(c.__name__ for c in SPARSE_LAYER_TYPES)} sparse layers have a transformers "
                             f"layer type and cache here, got {p!r}")
    out = {"layer_types": [FULL if p.is_full else SPARSE_LAYER_TYPES[type(p)] for p in patterns]}
    for p in sparse:
        if type(p) is AttnSink:
            out.update(attention_sink_size=p.sink, sliding_window=p.window)
        else:
            out["block_sparse"] = {f: getattr(p, f) for f in BLOCK_SPARSE_FIELDS}
    return out


# -- caches -----------------------------------------------------------------------------------------------------------
# Trap 3: transformers builds a cache layer from its layer type alone (DYNAMIC/STATIC_LAYER_TYPE_MAPPING, filled by
# ``_layer_type``) and passes it settings only for the types it knows. Ours get theirs from LongGenLlamaModel.forward
# (``configure``) before their first update: the sink and window from the config, and the sink columns from the
# prompt's padding -- a left-padded row's sinks are its first real tokens, so a batch keeps the first
# ``sink + (most padding columns of any row)`` columns.

class _Configured:
    sink_columns: int | None = None
    window: int = 0

    def configure(self, window: int, sink_columns: int) -> None:
        self.window, self.sink_columns = window, sink_columns

    def _require_configured(self) -> None:
        if self.sink_columns is None:
            raise RuntimeError(f"{type(self).__name__} was updated before LongGenLlamaModel configured it: run the "
                               f"model through LongGenLlamaModel / LongGenLlamaForCausalLM ({MODEL_TYPE}), and its "
                               "first call on a fresh cache uncompiled (as generate() runs the prefill)")


class SinkCacheLayer(_Configured, DynamicLayer):
    """Dynamic cache of an AttnSink layer: columns ``[0, a) + [b, total)`` -- the sink columns and a tail of at least
    the last ``window - 1`` columns (the current query is the window's last key). ``returned_span`` describes the keys
    the last ``update`` returned: ``(a, b, total)``, i.e. columns ``[0, a) + [b, total)``."""

    _layer_type = SINK
    is_sliding = True

    def __init__(self, **kwargs):
        super().__init__()
        self.cumulative_length = 0
        self.kept_sink = 0  # a
        self.tail_start = 0  # b
        self.record_past = False
        self.returned_span = (0, 0, 0)

    def activate_past_recording(self):
        """Trap 4 (assisted decoding): keep every new column until ``crop`` says which ones stay."""
        self.record_past = True

    def update(self, key_states, value_states, *args, **kwargs):
        self._require_configured()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        self.returned_span = (self.kept_sink, self.tail_start, self.cumulative_length)
        keys, values = self.keys, self.values
        if not self.record_past:
            self._trim()
        return keys, values

    def _trim(self) -> None:
        """Drop the columns no later query can see: keep ``[0, sink_columns)`` and the last ``window - 1``."""
        a, b, total = self.kept_sink, self.tail_start, self.cumulative_length
        if a == b:  # nothing dropped yet: the stored columns are [0, total)
            a = b = min(self.sink_columns, total)
        new_b = max(b, total - (self.window - 1))
        if new_b > b:
            tail = total - new_b  # columns kept at the end
            keep = lambda t: torch.cat([t[..., :a, :], t[..., t.shape[-2] - tail:, :]], dim=-2)  # noqa: E731
            self.keys, self.values = keep(self.keys), keep(self.values)
        self.kept_sink, self.tail_start = a, new_b

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` columns (assisted decoding's rollback), then trim."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop of a sink_attention cache takes a negative count of columns to remove, got "
                             f"{tokens_to_remove}")
        n = -tokens_to_remove
        if n and self.is_initialized:
            contiguous = self.kept_sink == self.tail_start  # the stored columns are [0, total)
            if self.cumulative_length - n < (0 if contiguous else self.tail_start):
                raise RuntimeError(f"cannot remove {n} columns from a sink_attention cache that no longer holds them "
                                   "(rollback needs activate_past_recording() before the forward to undo)")
            self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
            self.cumulative_length -= n
            if contiguous:
                self.kept_sink = self.tail_start = min(self.kept_sink, self.cumulative_length)
        if self.is_initialized:
            self._trim()

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = 0 if not self.is_initialized else self.keys.shape[-2]
        return stored + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.kept_sink = self.tail_start = 0
        self.returned_span = (0, 0, 0)
        self.sink_columns = None  # the next prompt's padding decides them again


class StaticSinkCacheLayer(_Configured, StaticLayer):
    """Trap 4: transformers' StaticCache has no layer for a sink + window pattern (its sliding layer drops the sinks).
    Static cache of an AttnSink layer for ``cache_implementation="static"`` and compiled decoding: slots
    ``[0, sink_columns)`` hold the sink columns, the next ``window`` slots a ring (column ``c`` in slot
    ``sink_columns + (c - sink_columns) % window``). ``returned_columns`` [keys] gives the column each returned key
    holds (-1: empty slot). ``max_cache_len`` stays the column capacity the cache was made for."""

    _layer_type = SINK
    is_sliding = True
    # the buffers' size depends on the prompt's padding: allocated at the first update, never ahead of time
    supports_early_init = False

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len)
        self.returned_columns: Tensor | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        slots = self.sink_columns + self.window
        self.keys = key_states.new_zeros((self.batch_size, self.num_heads, slots, key_states.shape[-1]))
        self.values = value_states.new_zeros((self.batch_size, self.num_heads, slots, value_states.shape[-1]))
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def _slot(self, col: Tensor) -> Tensor:
        s = self.sink_columns
        return torch.where(col < s, col, s + torch.remainder(col - s, self.window))

    def slot_columns(self, total: Tensor | int) -> Tensor:
        """The column each slot holds after ``total`` columns were written (-1: none yet)."""
        s, w = self.sink_columns, self.window
        j = torch.arange(s + w, device=self.device)
        total = torch.as_tensor(total, device=self.device)
        latest = s + (j - s) + w * torch.div(total - 1 - j, w, rounding_mode="floor")  # ring slots
        ring = torch.where(total - 1 >= j, latest, -1)
        return torch.where(j < s, torch.where(j < total, j, -1), ring)

    def update(self, key_states, value_states, *args, **kwargs):
        self._require_configured()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if n == 1:  # a decode step: static shapes, no host sync (it may run compiled)
            slot = self._slot(self.cumulative_length).view(1)
            self.keys.index_copy_(2, slot, key_states)
            self.values.index_copy_(2, slot, value_states)
            self.cumulative_length.add_(1)
            self.returned_columns = self.slot_columns(self.cumulative_length)
            return self.keys, self.values
        # a prompt or a chunk of one (eager): attend over what the slots held plus the new keys, then store
        t = int(self.cumulative_length)
        new_cols = torch.arange(t, t + n, device=self.device)
        if t == 0:
            keys, values, cols = key_states, value_states, new_cols
        else:
            keys = torch.cat([self.keys, key_states], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
            cols = torch.cat([self.slot_columns(t), new_cols])
        keep = (new_cols < self.sink_columns) | (new_cols >= t + n - self.window)
        slots = self._slot(new_cols[keep])
        self.keys.index_copy_(2, slots, key_states[:, :, keep])
        self.values.index_copy_(2, slots, value_states[:, :, keep])
        self.cumulative_length.add_(n)
        self.returned_columns = cols
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (0 if self.keys is None else self.keys.shape[-2]) + query_length, 0

    def reset(self) -> None:
        self.keys = self.values = None  # reallocated at the next update: its size follows the next prompt's padding
        self.is_initialized = False
        self.cumulative_length = torch.zeros_like(self.cumulative_length)
        self.sink_columns, self.returned_columns = None, None

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a static sink_attention cache cannot be cropped (its ring overwrites old columns); use "
                           "the dynamic cache (the default) for assisted decoding")

    @property
    def is_croppable(self) -> bool:
        return False


class BlockSparseCacheLayer(DynamicLayer):
    """A BlockSparse layer's dynamic cache: every key (see the module docstring)."""

    _layer_type = BLOCK_SPARSE


class StaticBlockSparseCacheLayer(StaticLayer):
    """A BlockSparse layer's static cache: every key."""

    _layer_type = BLOCK_SPARSE


def cache_bytes(cache) -> int:
    """Bytes of keys and values a transformers ``Cache`` holds."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, Tensor))


# -- the batch, described once per forward ----------------------------------------------------------------------------
def _seen(cache) -> Tensor | int:
    """Columns the cache has seen (an int, or a 0-d tensor for static layers)."""
    for layer in getattr(cache, "layers", ()):
        if layer.is_initialized and hasattr(layer, "get_seq_length"):
            return layer.get_seq_length()
    return 0


def _static_capacity(cache) -> int | None:
    caps = [layer.max_cache_len for layer in getattr(cache, "layers", ()) if hasattr(layer, "max_cache_len")]
    return max(caps) if caps else None


@dataclass
class _Batch:
    """What every layer's attention needs to know of one forward call, built once by ``LongGenLlamaModel.forward``.

    ``key_pos`` [B, K]: for each column of the sequence so far (every column of a static cache's capacity), its
    position among its row's real tokens (its attention_mask ones), -1 for padding or a column not yet written.
    ``query_pos`` [B, q]: the same for this call's tokens. ``padded``: some column is padding (True when unknown, i.e.
    under torch.compile). ``memo``: per-call masks, shared by the layers of one type (same keys, same pattern)."""

    key_pos: Tensor
    query_pos: Tensor
    cache: object
    padded: bool
    static: bool
    memo: dict = field(default_factory=dict)

    @classmethod
    def of(cls, config, attention_mask, cache, batch: int, q_len: int, device) -> "_Batch":
        compiling = torch.compiler.is_compiling()
        past = 0 if cache is None else _seen(cache)
        capacity = _static_capacity(cache)
        total = past + q_len
        width = capacity if capacity is not None else int(total)
        cols = torch.arange(width, device=device)
        if attention_mask is None:
            valid = (cols < total).expand(batch, width)
        elif attention_mask.dim() == 2:
            valid = attention_mask.to(device=device, dtype=torch.bool)
            if capacity is None and valid.shape[1] != width:
                raise ValueError(f"attention_mask has {valid.shape[1]} columns, but the cache holds {past} and the "
                                 f"input {q_len} tokens: pass the mask of every token so far")
            valid = F.pad(valid, (0, width - valid.shape[1])) if valid.shape[1] < width else valid[:, :width]
        elif attention_mask.dim() == 4 and attention_mask.dtype == torch.bool and attention_mask.shape[1:3] == (1, 1):
            valid = attention_mask[:, 0, 0, :width]  # ours, from create_masks_for_generate
        else:
            raise ValueError(f"attention_mask must be a [batch, tokens] padding mask (1 = token, 0 = padding), got "
                             f"shape {tuple(attention_mask.shape)} {attention_mask.dtype}: LongGen layers build their "
                             "own masks from their patterns")
        key_pos = torch.where(valid, valid.cumsum(1) - 1, -1)
        query_pos = key_pos[:, past + torch.arange(q_len, device=device)]
        padded = True if compiling else bool(not valid[:, :int(total)].all())
        out = cls(key_pos, query_pos, cache, padded, capacity is not None)
        # prompts and chunks check the padding; one-token steps (generate()'s decode, maybe compiled) add a token
        if not compiling and (q_len > 1 or past == 0):
            left = out._check_padding(valid[:, :int(total)]) if padded else 0
            if cache is not None:
                out._configure(config, left)
        return out

    @staticmethod
    def _check_padding(valid: Tensor) -> int:
        """The most padding columns before any row's first token; refuses a row without tokens, and padding between
        a row's tokens (a cache keeps columns: a gap would shift the window)."""
        count = valid.sum(1)
        if bool((count == 0).any()):
            raise ValueError("attention_mask has a row without any token (all zeros)")
        first = valid.int().argmax(1)
        last = valid.shape[1] - 1 - valid.flip(1).int().argmax(1)
        if bool((last - first + 1 != count).any()):
            raise ValueError("attention_mask must pad rows on the left (zeros before a row's first token) or after "
                             "its last token, not between its tokens")
        return int(first.max())

    def _configure(self, config, left_padding: int) -> None:
        """Give fresh sink_attention cache layers their settings (trap 3): the batch keeps ``sink + the most left
        padding of any row`` columns as sinks."""
        for layer in self.cache.layers:
            if isinstance(layer, _Configured) and layer.sink_columns is None:
                layer.configure(config.sliding_window, config.attention_sink_size + left_padding)

    def key_positions(self, layer_idx: int, layer_type: str, n_keys: int) -> tuple[Tensor, bool]:
        """Positions [B, n_keys] of the keys a layer's cache returned, and whether they are the plain columns
        ``0 .. n_keys - 1`` (HF's own cache layers, and no cache at all)."""
        layer = self.cache.layers[layer_idx] if self.cache is not None else None
        if isinstance(layer, SinkCacheLayer):
            a, b, total = layer.returned_span
            if a == b:
                return self.key_pos[:, :n_keys], True
            key = ("key_pos", layer_type, a, b, total)
            if key not in self.memo:
                cols = torch.cat([torch.arange(a), torch.arange(b, total)]).to(self.key_pos.device)
                self.memo[key] = self.key_pos[:, cols]
            return self.memo[key], False
        if isinstance(layer, StaticSinkCacheLayer):
            key = ("key_pos", layer_type, "static")
            if key not in self.memo:
                cols = layer.returned_columns
                self.memo[key] = torch.where(cols >= 0, self.key_pos[:, cols.clamp(min=0)], -1)
            return self.memo[key], False
        return self.key_pos[:, :n_keys], not self.static


# -- attention --------------------------------------------------------------------------------------------------------
def _dense_mask(pattern: Pattern, query_pos: Tensor, key_pos: Tensor, num_heads: int, num_kv_heads: int) -> Tensor:
    """[B, 1 or num_heads, q, k] bool from the token rule (``position_mask``); a padding query (position -1) sees
    nothing by the rule, and a query that sees nothing sees every key, so that its output (which nobody reads) stays
    finite."""
    kpos = key_pos[:, None].expand(-1, num_kv_heads if pattern.head_dependent else 1, -1)
    vis = position_mask(pattern, query_pos, kpos, num_heads) & (query_pos >= 0)[:, None, :, None]
    return vis | ~vis.any(-1, keepdim=True)


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask, scale) -> Tensor:
    """Compiled FlexAttention under the project's shape policy (flexgen_long.attention.flex_attend: one compiled
    function per bucketed shape, never the eager path on long sequences). Llama's scale is flex's default."""
    if scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-6 * scale:
        raise NotImplementedError(f"attention scale {scale} differs from 1/sqrt(head_dim): not supported")
    return flex_attend(q, k, v, block_mask)


def _real_run(pos: list[int]) -> tuple[int, int]:
    """[first, end) of the entries >= 0 (a row's real tokens), which must be contiguous."""
    real = [i for i, p in enumerate(pos) if p >= 0]
    if real and real[-1] - real[0] + 1 != len(real):
        raise ValueError("a row's tokens must be contiguous (padding only before or after them)")
    return (real[0], real[-1] + 1) if real else (0, 0)


def _flex_rows(query, key, value, query_pos, key_pos, pattern, scale, memo, layer_type) -> Tensor:
    """Long problems, one row at a time over its real tokens: either the keys are the row's plain sequence with the
    queries at its end (a prompt, or a full layer's cache), masked by ``build_block_mask``; or the keys are a cache's
    kept columns followed by the queries' own keys (a later chunk over a trimmed cache), masked by
    ``build_cached_block_mask``. Padding queries get zeros."""
    B, Hq, lq, D = query.shape
    Hkv, lk = key.shape[1], key.shape[2]
    out = query.new_zeros(B, Hq, lq, value.shape[-1])
    for b, (qp, kp) in enumerate(zip(query_pos.tolist(), key_pos.tolist())):
        (i0, i1), (j0, j1) = _real_run(qp), _real_run(kp)
        nq, n = i1 - i0, j1 - j0
        if nq == 0:
            continue  # a row of padding only
        if kp[j0:j1] == list(range(n)) and qp[i0:i1] == list(range(n - nq, n)):
            pq, pk = padded_len(nq), padded_len(n)
            mkey = ("flex", layer_type, "plain", n, nq)
            if mkey not in memo:
                memo[mkey] = build_block_mask(pattern, nq, n, q_offset=n - nq, num_heads=Hq, num_kv_heads=Hkv,
                                              device=query.device, padded_lengths=(pq, pk))
            k_b, v_b = key[b:b + 1, :, j0:j1], value[b:b + 1, :, j0:j1]  # flex_attend pads them to the mask's pk
        elif nq == lq and kp[lk - lq:] == qp and qp == list(range(qp[0], qp[0] + lq)):
            ns = lk - lq
            ps, pq = max(BLOCK, -(-ns // BLOCK) * BLOCK), padded_len(lq)
            mkey = ("flex", layer_type, "cached", b, ns, lq)
            if mkey not in memo:
                slot_pos = torch.tensor(kp[:ns], dtype=torch.int32, device=query.device)[None]
                if pattern.head_dependent:
                    slot_pos = slot_pos.expand(Hkv, -1).contiguous()
                memo[mkey] = build_cached_block_mask(pattern, slot_pos, lq, q_offset=qp[0], num_heads=Hq,
                                                     num_kv_heads=Hkv, padded_lengths=(ps, pq))
            k_b = torch.cat([pad_seq(key[b:b + 1, :, :ns], ps), pad_seq(key[b:b + 1, :, ns:], pq)], dim=-2)
            v_b = torch.cat([pad_seq(value[b:b + 1, :, :ns], ps), pad_seq(value[b:b + 1, :, ns:], pq)], dim=-2)
        else:
            raise NotImplementedError(f"row {b}: a {lq}-token call over {lk} keys whose positions are neither one "
                                      "sequence ending in the queries nor a trimmed cache followed by them")
        o = _flex(query[b:b + 1, :, i0:i1], k_b, v_b, memo[mkey], scale)
        out[b, :, i0:i1] = o[0, :, :nq]
    return out


def longgen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                      dropout: float = 0.0, **kwargs):
    """transformers attention function for ``attn_implementation="flexgen_long"``: query [B, Hq, q, D] over the keys
    and values [B, Hkv, k, D] the layer's cache returned -> ([B, q, Hq, D], None). The mask comes from the layer's
    pattern (``module.config.patterns()[module.layer_idx]``) and the batch geometry that LongGenLlamaModel passes as
    ``longgen_batch``; ``attention_mask`` is unused (it is None: no mask function is registered for this
    implementation, trap 5)."""
    batch: _Batch | None = kwargs.get(BATCH_KWARG)
    if batch is None:
        raise RuntimeError(f"attn_implementation={ATTN_IMPLEMENTATION!r} runs only inside LongGenLlamaModel "
                           f"(model_type {MODEL_TYPE!r}), which passes each layer the batch geometry")
    config, i = module.config, module.layer_idx
    pattern, layer_type = config.patterns()[i], config.layer_types[i]
    B, Hq, lq, _ = query.shape
    Hkv, lk = key.shape[1], key.shape[2]
    key_pos, plain = batch.key_positions(i, layer_type, lk)
    if pattern.is_full and plain and not batch.padded and (lq == lk or lq == 1):
        # every key is visible (decode) or the mask is causal (a whole prompt): SDPA needs no mask
        out = F.scaled_dot_product_attention(query, key, value, is_causal=lq > 1, dropout_p=dropout, scale=scaling,
                                             enable_gqa=Hq != Hkv)
    elif B * lq * lk <= DENSE_MASK_LIMIT or torch.compiler.is_compiling():
        mkey = ("dense", layer_type, lq, lk)
        if mkey not in batch.memo:
            batch.memo[mkey] = _dense_mask(pattern, batch.query_pos, key_pos, Hq, Hkv)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=batch.memo[mkey], dropout_p=dropout,
                                             scale=scaling, enable_gqa=Hq != Hkv)
    else:
        if dropout:
            raise ValueError("attention dropout is not supported on the FlexAttention path (long sequences)")
        out = _flex_rows(query, key, value, batch.query_pos, key_pos, pattern, scaling, batch.memo, layer_type)
    return out.transpose(1, 2).contiguous(), None


# -- models -----------------------------------------------------------------------------------------------------------
class _LongGenAttentionOnly:
    """Trap 1: transformers picks an attention implementation per model (the config's, else SDPA) and runs it on every
    layer; ``save_pretrained`` does not even keep the choice. A LongGen model has one implementation: requested or not,
    it is ours; any other request fails at load time in one line."""

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        requested = attn_implementation.get("") if isinstance(attn_implementation, dict) else attn_implementation
        if requested not in (None, ATTN_IMPLEMENTATION):
            raise ValueError(f"attn_implementation={requested!r} is not supported by {MODEL_TYPE} models: their layers "
                             f"follow per-layer LongGen patterns (config.layer_types) that only "
                             f"attn_implementation={ATTN_IMPLEMENTATION!r} (the default) runs; leave it unset")
        return ATTN_IMPLEMENTATION


def _cache_keyword() -> str:
    """The name LlamaModel.forward gives its cache argument: ``cache`` (transformers >= 5.24) or
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


_CACHE_KW = _cache_keyword()


class LongGenLlamaModel(_LongGenAttentionOnly, LlamaModel):
    """``LlamaModel`` whose forward first describes the batch for the attention layers (``_Batch``) and makes sure
    the cache it will fill is one whose LongGen layers are configured (trap 3)."""

    config_class = LongGenLlamaConfig

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if self.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"config._attn_implementation={self.config._attn_implementation!r}: {MODEL_TYPE} models "
                             f"run only {ATTN_IMPLEMENTATION!r}")
        name = "past_key_values" if "past_key_values" in kwargs else _CACHE_KW
        cache = kwargs.get(name)
        use_cache = kwargs.get("use_cache")
        if cache is None and (self.config.use_cache if use_cache is None else use_cache):
            cache = kwargs[name] = DynamicCache(config=self.config)  # as LlamaModel would, but visible to us
        x = input_ids if input_ids is not None else kwargs["inputs_embeds"]
        kwargs[BATCH_KWARG] = _Batch.of(self.config, attention_mask, cache, x.shape[0], x.shape[1], x.device)
        return super().forward(input_ids=input_ids, attention_mask=None, **kwargs)


class LongGenLlamaForCausalLM(_LongGenAttentionOnly, LlamaForCausalLM):
    """``LlamaForCausalLM`` over ``LongGenLlamaModel`` (same modules, same weights, same names)."""

    config_class = LongGenLlamaConfig

    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)  # LlamaForCausalLM.__init__ would build a plain LlamaModel
        self.model = LongGenLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, **kwargs):
        """Trap 6: for a compiled decode step generate() builds the mask outside the step with this hook; its default
        hands our layer types the raw [B, tokens so far] mask, one column longer at every step (a new graph each
        time). Ours is the same mask padded to the static cache's capacity, as [B, 1, 1, capacity] bool."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        capacity = _static_capacity(cache)
        if attention_mask is None or attention_mask.dim() != 2 or capacity is None:
            return attention_mask
        valid = attention_mask.to(torch.bool)
        return F.pad(valid, (0, capacity - valid.shape[1]))[:, None, None, :]


def register() -> None:
    """Register the config, the models and the attention with transformers (done when this module is imported; the
    cache layer classes register themselves through ``_layer_type``)."""
    AutoConfig.register(MODEL_TYPE, LongGenLlamaConfig, exist_ok=True)
    AutoModel.register(LongGenLlamaConfig, LongGenLlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(LongGenLlamaConfig, LongGenLlamaForCausalLM, exist_ok=True)
    AttentionInterface.register(ATTN_IMPLEMENTATION, longgen_attention)


register()
