"""What a query may see: LongGen's attention patterns.

Every pattern answers three questions, all on positions *within one document* (``q`` the query's, ``k`` the key's):

* the token rule ``visible(q, k, kv_head)`` -- the exact semantics (each class's docstring; the authors' Triton
  kernels and dkernel's ``get_sparse_attn_mask`` use the same rule for BlockSparse), vectorised over tensors;
* the rectangle rule ``rect(q0, q1, k0, k1, kv_head) -> (any, all)`` -- whether *some* / *every* pair of the
  rectangle ``[q0, q1] x [k0, k1]`` is visible (bounds inclusive). This is what makes block masks cheap: a BlockMask is
  the rectangle rule evaluated once per (query block, key block), no token pair is ever enumerated;
* ``row_count(q)`` -- how many keys a query at position ``q`` sees (for densities and cache sizes).

``Pattern.mask_mod`` turns the token rule into a FlexAttention ``mask_mod`` for queries at absolute positions
``q_offset + q_idx`` (decode, chunked prefill), GQA heads, and packed documents; ``Pattern.block_rule`` evaluates the
rectangle rule for a whole (q_len, kv_len) grid, documents included. ``positional_mask_mod`` and
``positional_block_rule`` do the same for keys at arbitrary positions given per column (a KV cache's slots followed by a
chunk's own keys). ``flexgen_long.masks`` builds BlockMasks from them.

Documents: a packed sequence carries one id per token; a *document* is a maximal run of equal ids. A key is visible
only inside the query's own document, and the pattern sees positions relative to the document's first token (so every
document has its own sinks and its own block grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = ["Pattern", "Full", "AttnSink", "BlockSparse", "Documents", "BlockRule", "check_shape", "check_doc_ids"]


def _require(ok: bool, field: str, allowed: str, got) -> None:
    if not ok:
        raise ValueError(f"{field} must be {allowed}, got {got!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_pow2(x, minimum: int) -> bool:
    return _is_int(x) and x >= minimum and x & (x - 1) == 0


def check_doc_ids(doc_ids, length: int | None = None, batch: int | None = None) -> Tensor:
    """The one check of per-token document ids (every module that takes ``doc_ids`` calls it); returns them unchanged.

    ``doc_ids`` must be an integer tensor (not bool, float or complex) of shape [length] or [batch', length], where
    ``length`` (when given) is the sequence the ids describe and ``batch'`` is 1 or ``batch`` (when given)."""
    L = "length" if length is None else f"length={length}"
    shape = f"[{L}] or [{'batch' if batch is None else f'1 or batch={batch}'}, {L}]"
    if not isinstance(doc_ids, Tensor):
        raise ValueError(f"doc_ids must be an integer tensor of shape {shape}, got {type(doc_ids).__name__}")
    if doc_ids.is_floating_point() or doc_ids.is_complex() or doc_ids.dtype == torch.bool:
        raise ValueError(f"doc_ids must be an integer tensor, got dtype {doc_ids.dtype}")
    if doc_ids.dim() not in (1, 2) or (length is not None and doc_ids.shape[-1] != length):
        raise ValueError(f"doc_ids must have shape {shape}, got {tuple(doc_ids.shape)}")
    if batch is not None and doc_ids.dim() == 2 and doc_ids.shape[0] not in (1, batch):
        raise ValueError(f"doc_ids batch {doc_ids.shape[0]} must be 1 or the tokens' batch {batch}")
    return doc_ids


class Documents(NamedTuple):
    """Per-token document layout of a packed batch, padded past the sequence so out-of-range indices stay in bounds.

    ``run``: [B, L] int32 run index of each token's document (non-decreasing, consecutive);
    ``start``/``end``: [B, L] int32 absolute position of the first/last token of that document.
    """

    run: Tensor
    start: Tensor
    end: Tensor

    @staticmethod
    def from_ids(doc_ids: Tensor, length: int | None = None) -> "Documents":
        """Build the layout from per-token ids ([L] or [B, L]); positions from ``L`` to ``length`` become one more
        document of padding (never visible to a real query)."""
        ids = check_doc_ids(doc_ids)
        ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
        B, L = ids.shape
        length = L if length is None else max(length, L)
        new = torch.ones(B, length, dtype=torch.bool, device=ids.device)
        new[:, 1:L] = ids[:, 1:] != ids[:, :-1]  # a new run starts wherever the id changes
        if length > L:
            new[:, L + 1 :] = False  # [L, length) is one padding run
        pos = torch.arange(length, device=ids.device, dtype=torch.int32).expand(B, length)
        run = torch.cumsum(new, dim=1, dtype=torch.int32) - 1
        start = torch.where(new, pos, 0).cummax(dim=1).values.to(torch.int32)
        last = torch.ones_like(new)  # token is the last of its run
        last[:, :-1] = new[:, 1:]
        end = torch.where(last, pos, length).flip(1).cummin(dim=1).values.flip(1).to(torch.int32)
        return Documents(run.contiguous(), start.contiguous(), end.contiguous())


class BlockRule(NamedTuple):
    """Block-level classification of a (q_len, kv_len) grid: ``partial`` blocks need the mask_mod, ``full`` blocks are
    entirely visible, the rest are skipped. Both [B, H, num_q_blocks, num_kv_blocks] bool, H = num_kv_heads for a
    head-dependent pattern else 1, B = 1 without documents."""

    partial: Tensor
    full: Tensor


def check_shape(q_len, kv_len, q_offset, num_heads, num_kv_heads) -> int:
    """Validate query/key geometry; returns num_kv_heads (defaulting to num_heads).

    Queries sit at absolute positions q_offset .. q_offset+q_len-1 over keys 0 .. kv_len-1, and every query is also a
    key (self-attention with a cache), hence q_offset + q_len <= kv_len."""
    _require(_is_int(q_len) and q_len >= 1, "q_len", "an int >= 1", q_len)
    _require(_is_int(kv_len) and kv_len >= 1, "kv_len", "an int >= 1", kv_len)
    _require(_is_int(q_offset) and q_offset >= 0, "q_offset", "an int >= 0", q_offset)
    _require(q_offset + q_len <= kv_len, "q_offset + q_len", f"<= kv_len={kv_len} (queries are keys too)",
             q_offset + q_len)
    _require(_is_int(num_heads) and num_heads >= 1, "num_heads", "an int >= 1", num_heads)
    if num_kv_heads is None:
        num_kv_heads = num_heads
    _require(_is_int(num_kv_heads) and num_kv_heads >= 1 and num_heads % num_kv_heads == 0, "num_kv_heads",
             f"a divisor of num_heads={num_heads}", num_kv_heads)
    return num_kv_heads


class Pattern:
    """Base class. Subclasses define ``visible``, ``rect`` and ``row_count`` on document-relative positions, and may
    refine the cache layout below (a plain buffer by default).

    The cache layout (flexgen_long.cache keeps one compact KV cache per layer from it, and nothing outside this module
    asks which class a pattern is): ``cache_slots(max_len)`` slots; position ``p`` lives in slot ``slot_of(p)``; a
    write that ends at position ``end`` keeps the positions ``kept(p, end)``; a cache that received every position up
    to ``q`` holds exactly the keys query ``q`` sees when ``holds_exactly(q, slots)`` (attention over it needs no mask).
    Compact caches rely on one property of every pattern here: a key that a query stops seeing stays unseen by every
    later query."""

    #: True when the rule depends on the KV head (BlockSparse with per_head=True).
    head_dependent: bool = False
    #: True for plain causal attention (``Full``): SDPA's causal kernels compute it without any mask.
    is_full: bool = False
    #: The most slots a cache of this pattern needs at any length (None: it grows with the length).
    max_slots: int | None = None

    # -- the rules (overridden) ---------------------------------------------------------------------------------------
    def visible(self, q: Tensor, k: Tensor, kv_head: Tensor | int = 0) -> Tensor:
        raise NotImplementedError

    def rect(self, q0: Tensor, q1: Tensor, k0: Tensor, k1: Tensor, kv_head: Tensor | int = 0) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def row_count(self, q: Tensor, kv_head: Tensor | int = 0) -> Tensor:
        raise NotImplementedError

    def bind_heads(self, num_kv_heads: int) -> "Pattern":
        """The pattern as used with ``num_kv_heads`` KV heads (only BlockSparse's per-head shift depends on it)."""
        return self

    # -- the cache layout (overridable) --------------------------------------------------------------------------------
    def cache_slots(self, max_len: int) -> int:
        """Slots a cache needs for sequences of up to ``max_len`` tokens."""
        return max_len if self.max_slots is None else min(max_len, self.max_slots)

    def slot_of(self, p: Tensor, kv_head: Tensor | int = 0) -> Tensor:
        """The slot of position ``p`` (any shape; ``kv_head`` broadcasts against it): a plain buffer holds p at p."""
        return p

    def kept(self, p: Tensor, end: int, kv_head: Tensor | int = 0) -> Tensor:
        """Whether position ``p`` (< ``end``) is still seen by some query at ``end - 1`` or later: by the property in
        the class docstring, exactly when query ``end - 1`` sees it. A write keeps only those, so no two kept positions
        share a slot."""
        return self.visible(end - 1, p, kv_head)

    def holds_exactly(self, q: int, slots: int) -> bool:
        """Whether a cache of ``slots`` slots that received every position up to ``q`` holds exactly the keys that
        query ``q`` sees (then attention over it needs no mask). Never, unless a pattern says so."""
        return False

    # -- FlexAttention ------------------------------------------------------------------------------------------------
    def mask_mod(self, *, q_offset: Tensor | int = 0, num_heads: int = 1, num_kv_heads: int | None = None,
                 docs: Documents | None = None) -> Callable:
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for queries at absolute ``q_offset + q_idx``.

        ``h`` is the query head; its KV head is ``h // (num_heads // num_kv_heads)``. The offset is captured as a 0-d
        tensor so that a compiled kernel is reused across offsets (a Python int would be a new constant each time)."""
        num_kv_heads = num_kv_heads or num_heads
        pat = self.bind_heads(num_kv_heads)
        group = num_heads // num_kv_heads
        off = q_offset if isinstance(q_offset, Tensor) else torch.tensor(q_offset, dtype=torch.int32)

        if docs is None:
            def mask_mod(b, h, q_idx, kv_idx):
                return pat.visible(q_idx + off, kv_idx, h // group)
        else:
            run, start = docs.run, docs.start
            batched = run.shape[0] > 1  # one layout for every sequence of the batch, or one per sequence

            def mask_mod(b, h, q_idx, kv_idx):
                b = b if batched else 0
                q = q_idx + off
                same = run[b, q] == run[b, kv_idx]
                return same & pat.visible(q - start[b, q], kv_idx - start[b, kv_idx], h // group)

        mask_mod.__name__ = f"{type(self).__name__.lower()}_mask"
        # What a compiled flex graph depends on besides tensor shapes (flexgen_long.shapes.flex_graph_key): the rule's
        # constants and the layout tensors' shapes. The offset and the document ids are tensors: their values are
        # read at run time and never force a recompile.
        mask_mod.graph_key = (type(self).__name__, pat, group,
                              None if docs is None else (tuple(docs.run.shape), docs.run.shape[0] > 1))
        return mask_mod

    def positional_mask_mod(self, key_pos: Tensor, *, q_offset: Tensor | int = 0, num_heads: int = 1,
                            num_kv_heads: int | None = None) -> Callable:
        """FlexAttention ``mask_mod`` for queries at absolute ``q_offset + q_idx`` over keys whose positions are given
        column by column: ``key_pos`` [Hp, K] int32, -1 for a column that holds no key (an empty cache slot, padding),
        Hp = num_kv_heads for a head-dependent pattern, else 1. A column is visible iff it holds a key and the token
        rule allows it (``LayerCache.visible``'s rule). The positions and the offset are captured tensors: a compiled
        kernel depends on their shapes only, never on their values."""
        num_kv_heads = num_kv_heads or num_heads
        pat = self.bind_heads(num_kv_heads)
        group = num_heads // num_kv_heads
        hp = num_kv_heads if pat.head_dependent else 1
        if not isinstance(key_pos, Tensor) or key_pos.dim() != 2 or key_pos.shape[0] != hp \
                or key_pos.dtype != torch.int32:
            raise ValueError(f"key_pos must be an int32 tensor [{hp}, K] (one row per KV head for a head-dependent "
                             f"pattern, else one), got {getattr(key_pos, 'dtype', type(key_pos).__name__)} "
                             f"{tuple(getattr(key_pos, 'shape', ()))}")
        off = q_offset if isinstance(q_offset, Tensor) else torch.tensor(q_offset, dtype=torch.int32,
                                                                           device=key_pos.device)
        if pat.head_dependent:
            def mask_mod(b, h, q_idx, kv_idx):
                kv_head = h // group
                k = key_pos[kv_head, kv_idx]
                return (k >= 0) & pat.visible(q_idx + off, k, kv_head)
        else:
            pos = key_pos[0]

            def mask_mod(b, h, q_idx, kv_idx):
                k = pos[kv_idx]
                return (k >= 0) & pat.visible(q_idx + off, k, 0)

        mask_mod.__name__ = f"{type(self).__name__.lower()}_positional_mask"
        # As in mask_mod: the rule's constants and the captured tensors' shapes (flexgen_long.shapes.flex_graph_key).
        # A tag first, and the pattern not at index 1, so that no key of this kind equals a mask_mod key.
        mask_mod.graph_key = ("positional", (type(self).__name__, pat, group), tuple(key_pos.shape))
        return mask_mod

    # -- the block rule over a whole grid ------------------------------------------------------------------------------
    def block_rule(self, q_len: int, kv_len: int, *, q_offset: int = 0, block_size: int = 128,
                   num_kv_heads: int = 1, docs: Documents | None = None, device=None) -> BlockRule:
        """Classify every (query block, key block) of the grid. Query block ``i`` covers absolute positions
        ``q_offset + i*block_size`` .. (clipped to the last query); key block ``j`` covers ``j*block_size`` .. (clipped
        to kv_len-1). Memory and time are O(num_q_blocks * num_kv_blocks * heads), never O(q_len * kv_len)."""
        pat = self.bind_heads(num_kv_heads)
        dev = docs.run.device if docs is not None else device
        i32 = dict(dtype=torch.int32, device=dev)
        nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
        q0 = q_offset + torch.arange(nq, **i32) * block_size
        q1 = torch.clamp(q0 + block_size - 1, max=q_offset + q_len - 1)
        k0 = torch.arange(nk, **i32) * block_size
        k1 = torch.clamp(k0 + block_size - 1, max=kv_len - 1)
        h = torch.arange(num_kv_heads, **i32).view(-1, 1, 1) if pat.head_dependent else 0
        if docs is None:
            q0, q1, k0, k1 = q0[:, None], q1[:, None], k0[None, :], k1[None, :]
            any_, all_ = pat.rect(q0, q1, k0, k1, h)
            shape = (1, num_kv_heads if pat.head_dependent else 1, nq, nk)
            any_, all_ = any_.expand(shape), all_.expand(shape)
        else:
            any_, all_ = pat._doc_rect(docs, q0, q1, k0, k1, h)
        return BlockRule(partial=any_ & ~all_, full=all_)

    def positional_block_rule(self, q_len: int, key_pos: Tensor, *, q_offset: int = 0, block_size: int = 128,
                              num_kv_heads: int = 1) -> BlockRule:
        """Classify every (query block, key block) for queries at ``q_offset .. q_offset+q_len-1`` over keys at the
        positions ``key_pos`` [Hp, K] (-1: no key; K a multiple of ``block_size``; see ``positional_mask_mod``), in
        O(Hp * (K + num_q_blocks * num_kv_blocks)): never a q_len x K tensor. Key block ``j`` is summarised by the
        range ``[kmin, kmax]`` of the positions it holds, in any order; then

        * *partial* where the rectangle rule says some pair of [query block] x [kmin, kmax] is visible (a superset of
          the block's visible pairs, since its positions lie in that range; the mask_mod decides per token);
        * *full* only where every column holds a key and the rule says every pair of the rectangle is visible: every
          position of the block lies in the range, so every pair of the block is visible (exact for any key order,
          whether cache slots or a chunk's own keys);
        * skipped where the block holds no key at all.

        Returns BlockRule [1, Hp, num_q_blocks, K // block_size]."""
        pat = self.bind_heads(num_kv_heads)
        Hp, K = key_pos.shape
        if K % block_size:
            raise ValueError(f"key_pos length {K} must be a multiple of block_size={block_size}")
        kp = key_pos.reshape(Hp, K // block_size, block_size).long()
        held = kp >= 0
        kmax = kp.amax(-1)  # -1: the block holds no key
        has = kmax >= 0
        kmin = torch.where(held, kp, torch.iinfo(torch.int64).max).amin(-1)
        kmin, kmax = torch.where(has, kmin, 0), torch.where(has, kmax, 0)  # empty blocks: any range, masked below
        nq = -(-q_len // block_size)
        q0 = q_offset + torch.arange(nq, dtype=torch.int64, device=key_pos.device) * block_size
        q1 = torch.clamp(q0 + block_size - 1, max=q_offset + q_len - 1)
        h = torch.arange(Hp, device=key_pos.device).view(-1, 1, 1) if pat.head_dependent else 0
        any_, all_ = pat.rect(q0.view(1, -1, 1), q1.view(1, -1, 1), kmin[:, None, :], kmax[:, None, :], h)
        shape = (Hp, nq, K // block_size)
        full = all_.expand(shape) & held.all(-1)[:, None, :]
        partial = any_.expand(shape) & has[:, None, :] & ~full
        return BlockRule(partial=partial.unsqueeze(0), full=full.unsqueeze(0))

    def _doc_rect(self, docs: Documents, q0, q1, k0, k1, h):
        """Rectangle rule for packed documents, exactly: the pairs of a rectangle that can be visible lie in the
        documents common to its query range and key range. Documents strictly between the first and the last common
        one lie wholly inside both ranges, so their diagonal (k == q, visible in every pattern) is in the rectangle;
        the first and the last common document are checked on their sub-rectangles. A rectangle is full only if it
        lies in one document and that sub-rectangle is full."""
        run, start, end = docs.run, docs.start, docs.end
        B = run.shape[0]
        H = h.shape[0] if isinstance(h, Tensor) else 1
        g = lambda t, idx: t.gather(1, idx.reshape(1, -1).expand(B, -1))  # noqa: E731  [B, n]
        dq0, dq1, dk0, dk1 = g(run, q0), g(run, q1), g(run, k0), g(run, k1)
        sq0, eq0, sq1, eq1 = g(start, q0), g(end, q0), g(start, q1), g(end, q1)
        sk0, ek0, sk1, ek1 = g(start, k0), g(end, k0), g(start, k1), g(end, k1)
        # broadcast to [B, 1, NQ, NK]
        Q = lambda t: t[:, None, :, None]  # noqa: E731
        K = lambda t: t[:, None, None, :]  # noqa: E731
        dq0, dq1, sq0, eq0, sq1, eq1 = map(Q, (dq0, dq1, sq0, eq0, sq1, eq1))
        dk0, dk1, sk0, ek0, sk1, ek1 = map(K, (dk0, dk1, sk0, ek0, sk1, ek1))
        q0, q1, k0, k1 = q0[None, None, :, None], q1[None, None, :, None], k0[None, None, None, :], k1[None, None, None, :]

        first_from_q = dq0 >= dk0  # first common document = the later of the two first documents
        s_f = torch.where(first_from_q, sq0, sk0)
        e_f = torch.where(first_from_q, eq0, ek0)
        last_from_q = dq1 <= dk1  # last common document = the earlier of the two last documents
        s_l = torch.where(last_from_q, sq1, sk1)
        e_l = torch.where(last_from_q, eq1, ek1)
        d_first = torch.maximum(dq0, dk0)
        d_last = torch.minimum(dq1, dk1)
        overlap = d_first <= d_last

        def sub_any(s, e):
            a, _ = self.rect(torch.maximum(q0, s) - s, torch.minimum(q1, e) - s,
                             torch.maximum(k0, s) - s, torch.minimum(k1, e) - s, h)
            return a

        any_ = overlap & (sub_any(s_f, e_f) | sub_any(s_l, e_l) | (d_last - d_first >= 2))
        one_doc = (dq0 == dq1) & (dk0 == dk1) & (dq0 == dk0)
        _, all_in = self.rect(q0 - sq0, q1 - sq0, k0 - sq0, k1 - sq0, h)
        all_ = one_doc & all_in
        shape = (B, H, q0.shape[2], k0.shape[3])
        return any_.expand(shape), all_.expand(shape)


@dataclass(frozen=True)
class Full(Pattern):
    """Causal attention: ``k <= q``."""

    is_full = True

    def holds_exactly(self, q, slots):
        return q >= slots - 1  # the buffer filled to its last slot
    def visible(self, q, k, kv_head=0):
        return k <= q

    def rect(self, q0, q1, k0, k1, kv_head=0):
        return k0 <= q1, k1 <= q0

    def row_count(self, q, kv_head=0):
        return q + 1


@dataclass(frozen=True)
class AttnSink(Pattern):
    """Attention sink + sliding window: ``k <= q and (k < sink or q - k < window)``.

    The window counts the query itself (``window`` keys, as HF's ``sliding_window``); ``sink=0`` is a plain sliding
    window."""

    sink: int
    window: int

    def __post_init__(self):
        _require(_is_int(self.sink) and self.sink >= 0, "AttnSink.sink", "an int >= 0", self.sink)
        _require(_is_int(self.window) and self.window >= 1, "AttnSink.window", "an int >= 1", self.window)

    @property
    def max_slots(self) -> int:  # type: ignore[override]
        return self.sink + self.window

    def slot_of(self, p, kv_head=0):
        # sinks in their own slots, then a ring: the slot of p was last held by p - window, which no query >= p sees
        return torch.where(p < self.sink, p, self.sink + torch.remainder(p - self.sink, self.window))

    def holds_exactly(self, q, slots):
        return q >= slots - 1  # a full ring holds the sinks and the last window - 1 keys (or every key, if smaller)

    def visible(self, q, k, kv_head=0):
        return (k <= q) & ((k < self.sink) | (q - k < self.window))

    def rect(self, q0, q1, k0, k1, kv_head=0):
        # some pair: a sink key at or before the last query, or some q - k in [0, window - 1]
        any_ = (k0 <= q1) & ((k0 < self.sink) | (q0 - k1 < self.window))
        # every pair: causal everywhere, and every non-sink key within the window of the last query
        all_ = (k1 <= q0) & ((k1 < self.sink) | (q1 - torch.clamp(k0, min=self.sink) < self.window))
        return any_, all_

    def row_count(self, q, kv_head=0):
        sink = torch.clamp(q + 1, max=self.sink)
        win = torch.clamp(q + 1, max=self.window)
        overlap = torch.clamp(sink - torch.clamp(q - self.window + 1, min=0), min=0)
        return sink + win - overlap


@dataclass(frozen=True)
class BlockSparse(Pattern):
    """Local blocks + blocks on a fixed vertical stride (LongGen / Sparse-Transformer style).

    With ``qb = q // block`` and ``kb = k // block``: ``k <= q and (qb - kb < local_blocks or
    (kb + shift(h)) % vertical_stride == 0)``. ``local_blocks`` counts the query's own block. ``shift(h) = 0`` unless
    ``per_head``, then ``h * max(1, vertical_stride // num_kv_heads)`` for KV head ``h`` -- all query heads of a GQA
    group share their KV head's pattern. With shift 0, block 0 is on the stride (it acts as a sink)."""

    block: int
    local_blocks: int
    vertical_stride: int
    per_head: bool = False
    num_kv_heads: int | None = None  # set by bind_heads(); only the per-head shift uses it

    def __post_init__(self):
        _require(_is_pow2(self.block, 16), "BlockSparse.block", "a power of two >= 16", self.block)
        _require(_is_int(self.local_blocks) and self.local_blocks >= 1, "BlockSparse.local_blocks", "an int >= 1",
                 self.local_blocks)
        _require(_is_int(self.vertical_stride) and self.vertical_stride >= 1, "BlockSparse.vertical_stride",
                 "an int >= 1", self.vertical_stride)
        _require(isinstance(self.per_head, bool), "BlockSparse.per_head", "True or False", self.per_head)
        _require(self.num_kv_heads is None or (_is_int(self.num_kv_heads) and self.num_kv_heads >= 1),
                 "BlockSparse.num_kv_heads", "None or an int >= 1", self.num_kv_heads)

    @property
    def head_dependent(self) -> bool:  # type: ignore[override]
        # with one KV head (or a stride of 1) every head has shift 0 mod the stride: one mask serves all heads
        return self.per_head and self.vertical_stride > 1 and self.num_kv_heads != 1

    def bind_heads(self, num_kv_heads: int) -> "BlockSparse":
        if not self.per_head or self.num_kv_heads == num_kv_heads:
            return self
        return BlockSparse(self.block, self.local_blocks, self.vertical_stride, True, num_kv_heads)

    def shift(self, kv_head: Tensor | int):
        if not self.per_head:
            return 0
        if self.num_kv_heads is None:
            raise ValueError("BlockSparse(per_head=True) needs the number of KV heads: call bind_heads(num_kv_heads)")
        return kv_head * max(1, self.vertical_stride // self.num_kv_heads)

    def _on_stride(self, kb, kv_head):
        return (kb + self.shift(kv_head)) % self.vertical_stride == 0

    def cache_slots(self, max_len):
        # an off-stride ring of local_blocks blocks (none with stride 1: every block is on it) + one block per on-stride
        # block; per KV head, each its own shift
        nblocks = -(-max_len // self.block)
        local = 0 if self.vertical_stride == 1 else self.local_blocks * self.block
        return local + (-(-nblocks // self.vertical_stride)) * self.block

    def slot_of(self, p, kv_head=0):
        bs, L, V = self.block, self.local_blocks, self.vertical_stride
        if V == 1:  # every block is on the stride: a plain buffer
            return p
        kb, off = p // bs, p % bs
        # on-stride blocks keep a slot each forever; off-stride ones share a ring of L blocks, whose slot for block kb
        # was last held by kb - L, outside every later query's local window
        return torch.where(self._on_stride(kb, kv_head), L * bs + (kb // V) * bs + off, (kb % L) * bs + off)

    def visible(self, q, k, kv_head=0):
        qb, kb = q // self.block, k // self.block
        return (k <= q) & ((qb - kb < self.local_blocks) | self._on_stride(kb, kv_head))

    def rect(self, q0, q1, k0, k1, kv_head=0):
        bs, L, V = self.block, self.local_blocks, self.vertical_stride
        s = self.shift(kv_head)
        kb0, kb1 = k0 // bs, k1 // bs
        # local: the diagonal if the ranges overlap, else the closest pair (q0, k1)
        any_local = (k0 <= q1) & ((q0 <= k1) | (q0 // bs - kb1 < L))
        # stride: the first on-stride block at or after kb0 must start at or before min(k1, q1)
        kb_on = kb0 + torch.remainder(-(kb0 + s), V)
        any_stride = kb_on <= torch.minimum(k1, q1) // bs
        any_ = (k0 <= q1) & (any_local | any_stride)
        # every pair: causal everywhere, and the first off-stride key block (if any) local to the last query
        kb_off = torch.where(self._on_stride(kb0, kv_head), kb0 + 1, kb0)
        no_off = (kb_off > kb1) | (V == 1)
        all_ = (k1 <= q0) & (no_off | (q1 // bs - kb_off < L))
        return any_, all_

    def row_count(self, q, kv_head=0):
        bs, L, V = self.block, self.local_blocks, self.vertical_stride
        qb = q // bs
        lo = torch.clamp(qb - L + 1, min=0)  # first local block
        local = q + 1 - lo * bs
        # on-stride blocks among [0, lo): kb with (kb + s) % V == 0
        s = torch.remainder(torch.as_tensor(self.shift(kv_head)), V)
        first = torch.remainder(-s, V)  # first on-stride block index
        n_stride = torch.where(lo > first, (lo - 1 - first) // V + 1, 0)
        return local + n_stride * bs
