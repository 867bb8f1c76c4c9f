"""BlockMasks from a pattern's block rule, and the dense reference from its token rule.

``build_block_mask`` never materialises a q_len x kv_len tensor: it evaluates the pattern's rectangle rule once per
(query block, key block) and hands the result to ``BlockMask.from_kv_blocks``. Blocks that are visible in full are
marked *full*, so FlexAttention skips the mask_mod there; only blocks cut by the pattern's edges (the diagonal, the
window's far edge, sink and document boundaries) are *partial*.

``build_cached_block_mask`` does the same for a prefill chunk over a KV cache, keys laid out as [cache slots ; the
chunk's own keys] at arbitrary positions: the rectangle rule per (query block, key block) on the range of positions
each key block holds, and a mask_mod that reads the positions from a tensor.

``dense_mask`` applies the token rule to every (query, key) pair. It is the oracle of the tests, not for long sequences.

Both BlockMask builders suit flex's FLASH backend (flexgen_long.flex_backend) as well as Triton: they list full
blocks, and their mask_mods (``Pattern.mask_mod`` with or without documents, ``Pattern.positional_mask_mod`` with one
key-position row or one per KV head) read every per-call value -- the query offset, the document layout, the key
positions -- from tensors on the mask's device, which FLASH passes to its kernel; the Python values they capture (the
bound pattern's sizes, the GQA group, whether the layout is per row) are fixed for a compiled graph's key, so FLASH
baking them in recompiles nothing. A ``Pattern.mask_mod`` built by hand with an int offset captures a 0-d CPU tensor,
which FLASH refuses on a GPU: the builders here pass the offset on the mask's device.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .patterns import BlockRule, Documents, Pattern, _is_int, _is_pow2, _require, check_doc_ids, check_shape

__all__ = ["build_block_mask", "build_cached_block_mask", "cached_key_positions", "dense_mask", "density",
           "position_mask"]


def _check_pattern(pattern) -> None:
    if not isinstance(pattern, Pattern):
        raise ValueError(f"pattern must be a flexgen_long.patterns pattern (Full, AttnSink, BlockSparse), got "
                         f"{type(pattern).__name__}")


def _documents(doc_ids, kv_len: int, length: int, device) -> Documents | None:
    if doc_ids is None:
        return None
    check_doc_ids(doc_ids, kv_len)
    return Documents.from_ids(doc_ids.to(device) if device is not None else doc_ids, length)


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Block-level bool [..., R, C] -> (count [..., R], column indices [..., R, C]) with the selected columns first, in
    order. A cumsum and a scatter, O(R*C): no sort needed, since the selection order is already the column order."""
    C = dense.shape[-1]
    num = dense.sum(-1, dtype=torch.int32)
    slot = torch.cumsum(dense, dim=-1, dtype=torch.int32) - 1
    slot = torch.where(dense, slot, C).long()  # unselected columns go to a dump slot past the end
    cols = torch.arange(C, dtype=torch.int32, device=dense.device).expand_as(slot)
    idx = torch.zeros(*dense.shape[:-1], C + 1, dtype=torch.int32, device=dense.device)
    idx.scatter_(-1, slot, cols)
    return num.contiguous(), idx[..., :C].contiguous()


def _views(pattern, q_len, kv_len, q_offset, block_size, num_kv_heads, group, docs, device, pad_q_blocks=0):
    """The block rule as the eight index tensors of a BlockMask (query-major and key-major, partial and full);
    ``pad_q_blocks`` query blocks of padding are appended with no key blocks at all."""
    rule = pattern.block_rule(q_len, kv_len, q_offset=q_offset, block_size=block_size, num_kv_heads=num_kv_heads,
                              docs=docs, device=device)
    return _rule_views(rule, group, pad_q_blocks)


def _rule_views(rule: BlockRule, group: int, pad_q_blocks: int = 0):
    """A BlockRule ([B, H, NQ, NK] partial / full, H = 1 or the KV heads) as the eight index tensors of a BlockMask,
    with ``pad_q_blocks`` query blocks of padding (no key blocks) appended and a head-dependent rule's rows repeated
    for the ``group`` query heads of each KV head."""
    # Building a mask is launch-bound (tens of small kernels), so partial and full go through each conversion
    # together: one stacked tensor, half the launches.
    both = torch.stack([rule.partial, rule.full])
    if pad_q_blocks:
        both = torch.nn.functional.pad(both, (0, 0, 0, pad_q_blocks))  # [2, B, H, NQ + pad, NK], False
    kv = _ordered(both)
    q = _ordered(both.transpose(-2, -1))
    if both.shape[2] > 1:  # head-dependent: computed per KV head, then one row of blocks per query head
        kv, q = [tuple(t.repeat_interleave(group, dim=2) for t in view) for view in (kv, q)]
    (kv_num, kv_idx), (q_num, q_idx) = kv, q
    return kv_num[0], kv_idx[0], kv_num[1], kv_idx[1], q_num[0], q_idx[0], q_num[1], q_idx[1]


def build_block_mask(pattern: Pattern, q_len: int, kv_len: int, *, q_offset: int = 0, num_heads: int = 1,
                     num_kv_heads: int | None = None, block_size: int = 128, device=None,
                     doc_ids: Tensor | None = None, padded_lengths: tuple[int, int] | None = None) -> BlockMask:
    """BlockMask of ``pattern`` for queries at absolute positions ``q_offset .. q_offset+q_len-1`` over keys
    ``0 .. kv_len-1``.

    Heads: one mask for all heads unless the pattern depends on the KV head (BlockSparse per_head), then one per query
    head, query head ``h`` using KV head ``h // (num_heads // num_kv_heads)``. ``doc_ids`` ([kv_len] or
    [batch, kv_len]) packs documents: a query sees keys of its own document only, with the pattern applied to positions
    within the document. Memory is O(heads * q_blocks * kv_blocks).

    ``padded_lengths=(Pq, Pk)``: the mask for q / k / v zero-padded to ``Pq`` queries and ``Pk`` keys (the shape
    policy of flexgen_long.shapes; both multiples of ``block_size``), for the same real problem: query blocks made only
    of padding list no key blocks (the kernel skips them), and padded keys count as positions after every real query,
    so causality hides them -- a block holding padded keys is never *full* for a real query. Padded query rows inside
    the last real query block see what a query at their position would see (finite outputs, which the caller drops)."""
    _check_pattern(pattern)
    num_kv_heads = check_shape(q_len, kv_len, q_offset, num_heads, num_kv_heads)
    if not _is_pow2(block_size, 16):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    if padded_lengths is None or tuple(padded_lengths) == (q_len, kv_len):
        pq, pk, rule_kv = q_len, kv_len, kv_len
    else:
        pq, pk = padded_lengths
        for name, p, n in (("padded q_len", pq, q_len), ("padded kv_len", pk, kv_len)):
            if not isinstance(p, int) or p < n or p % block_size:
                raise ValueError(f"{name} must be a multiple of block_size={block_size} and >= {n}, got {p!r}")
        # Padded keys are positions kv_len .. pk-1, after every real query: the causal part of every pattern hides
        # them. The kernel does not bound-check keys below pk, so the rule must see them as keys, never as absent.
        rule_kv = pk
    nq, nk = -(-q_len // block_size), -(-rule_kv // block_size)
    nq_grid = -(-pq // block_size)
    # pad the layout so that the mask_mod's indices stay in bounds on padded rows/columns; positions from kv_len on
    # form one more document (padding), visible to no real query
    docs = _documents(doc_ids, kv_len, max(nk * block_size, q_offset + nq_grid * block_size), device)
    if docs is not None:
        device = docs.run.device
    device = torch.device(device) if device is not None else torch.device("cpu")
    kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx = _views(
        pattern, q_len, rule_kv, q_offset, block_size, num_kv_heads, num_heads // num_kv_heads, docs, device,
        nq_grid - nq)
    off = torch.tensor(q_offset, dtype=torch.int32, device=device)
    mask_mod = pattern.mask_mod(q_offset=off, num_heads=num_heads, num_kv_heads=num_kv_heads, docs=docs)
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                  seq_lengths=(pq, pk), compute_q_blocks=False)
    # The backward pass walks the mask by key block. from_kv_blocks would derive that view by expanding the indices to
    # a dense block matrix and argsorting it (a few ms at 128K with per-head masks); the transposed block rule gives
    # the same indices in one cumsum.
    bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices = q_num, q_idx, full_q_num, full_q_idx
    return bm


def cached_key_positions(slot_pos: Tensor, q_len: int, q_offset: int, padded_lengths: tuple[int, int]) -> Tensor:
    """Key positions [Hp, Ps + Pq] int32 of the layout ``[cache slots ; the chunk's own keys]``: ``slot_pos`` [Hp, n]
    (a cache row's ``pos``, -1 = empty) then empty columns up to ``Ps``, then the chunk's positions ``q_offset ..
    q_offset+q_len-1`` then empty columns up to ``Pq`` (``padded_lengths=(Ps, Pq)``)."""
    ps, pq = padded_lengths
    Hp, n = slot_pos.shape
    if n > ps or q_len > pq:
        raise ValueError(f"padded_lengths {padded_lengths} must hold the {n} slots and the {q_len}-token chunk")
    kpos = torch.full((Hp, ps + pq), -1, dtype=torch.int32, device=slot_pos.device)
    kpos[:, :n] = slot_pos
    kpos[:, ps:ps + q_len] = torch.arange(q_offset, q_offset + q_len, dtype=torch.int32, device=slot_pos.device)
    return kpos


def build_cached_block_mask(pattern: Pattern, slot_pos: Tensor, q_len: int, *, q_offset: int, num_heads: int = 1,
                            num_kv_heads: int | None = None, block_size: int = 128,
                            padded_lengths: tuple[int, int] | None = None) -> BlockMask:
    """BlockMask of ``pattern`` for a prefill chunk of ``q_len`` queries at absolute positions ``q_offset ..`` over
    ``[cache slots ; the chunk's own keys]`` (``cached_key_positions``): ``slot_pos`` [Hp, n] int32 are the positions
    the slots hold (-1 = empty; Hp = num_kv_heads for a head-dependent pattern, else 1).

    ``padded_lengths=(Ps, Pq)`` (multiples of ``block_size``; default: n and q_len rounded up to it): the slot part
    is padded with empty columns to ``Ps`` and the chunk's keys, like the queries, to ``Pq``, so the mask is for
    queries [Pq] x keys [Ps + Pq]. The mask_mod (``Pattern.positional_mask_mod``) reads the key positions from a
    captured tensor and the offset from a captured 0-d tensor: a compiled kernel depends on the shapes only. The
    blocks come from ``Pattern.positional_block_rule`` in O(Hp * (q_blocks * kv_blocks + keys)), never from a
    q_len x keys tensor: empty key blocks (padding, unused slots) list no queries, query blocks made only of padding
    list no key blocks, and a block is *full* only where it holds no empty column and the rule says every pair is
    visible. Padded query rows inside the last real query block see what a query at their position would see among
    these keys (possibly nothing: flex then outputs zeros; finite either way, and the caller drops them)."""
    _check_pattern(pattern)
    _require(_is_int(q_len) and q_len >= 1, "q_len", "an int >= 1", q_len)
    _require(_is_int(q_offset) and q_offset >= 0, "q_offset", "an int >= 0", q_offset)
    num_kv_heads = check_shape(1, 1, 0, num_heads, num_kv_heads)
    if not _is_pow2(block_size, 16):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    pat = pattern.bind_heads(num_kv_heads)
    hp = num_kv_heads if pat.head_dependent else 1
    if not isinstance(slot_pos, Tensor) or slot_pos.dim() != 2 or slot_pos.shape[0] != hp \
            or slot_pos.dtype != torch.int32:
        got = getattr(slot_pos, "dtype", type(slot_pos).__name__)
        raise ValueError(f"slot_pos must be an int32 tensor [{hp}, slots] (a cache row's pos: one row per KV head for "
                         f"a head-dependent pattern, else one), got {got} {tuple(getattr(slot_pos, 'shape', ()))}")
    n = slot_pos.shape[1]
    rounded = lambda x: max(1, -(-x // block_size)) * block_size  # noqa: E731
    ps, pq = padded_lengths if padded_lengths is not None else (rounded(n), rounded(q_len))
    for name, p, least in (("padded slot length", ps, n), ("padded chunk length", pq, q_len)):
        if not _is_int(p) or p < least or p % block_size or p < block_size:
            raise ValueError(f"{name} must be a multiple of block_size={block_size} and >= {max(least, 1)}, got {p!r}")
    kpos = cached_key_positions(slot_pos, q_len, q_offset, (ps, pq))
    rule = pat.positional_block_rule(q_len, kpos, q_offset=q_offset, block_size=block_size,
                                     num_kv_heads=num_kv_heads)
    nq, nq_grid = -(-q_len // block_size), pq // block_size
    kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx = _rule_views(
        rule, num_heads // num_kv_heads, nq_grid - nq)
    off = torch.tensor(q_offset, dtype=torch.int32, device=slot_pos.device)
    mask_mod = pat.positional_mask_mod(kpos, q_offset=off, num_heads=num_heads, num_kv_heads=num_kv_heads)
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                  seq_lengths=(pq, ps + pq), compute_q_blocks=False)
    bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices = q_num, q_idx, full_q_num, full_q_idx
    return bm


def position_mask(pattern: Pattern, qpos: Tensor, kpos: Tensor, num_heads: int | None = None) -> Tensor:
    """Bool [B, Hp, Q, S]: queries at positions ``qpos`` [B, Q] over keys at positions ``kpos`` [B, Hp, S] (-1: no
    key there -- an empty cache slot, padding) by ``pattern``'s token rule (bound to its KV heads; Hp = the KV heads
    for a head-dependent pattern, else 1). ``num_heads``: repeat each KV head's rows for its query heads (SDPA's
    mask layout)."""
    h = torch.arange(kpos.shape[1], device=kpos.device).view(1, -1, 1, 1) if pattern.head_dependent else 0
    q, k = qpos[:, None, :, None].long(), kpos[:, :, None, :].long()
    mask = (k >= 0) & pattern.visible(q, k, h)
    if num_heads is not None and mask.shape[1] > 1:  # GQA groups share their KV head's pattern
        mask = mask.repeat_interleave(num_heads // mask.shape[1], dim=1)
    return mask


def dense_mask(pattern: Pattern, q_len: int, kv_len: int, *, q_offset: int = 0, num_heads: int = 1,
               num_kv_heads: int | None = None, doc_ids: Tensor | None = None, device=None) -> Tensor:
    """Bool [B, H, q_len, kv_len] from the token rule alone: B = doc_ids' batch (1 without), H = num_heads for a
    head-dependent pattern, else 1 (broadcasts over heads). On ``device`` (default: doc_ids' device, else CPU).
    For tests and small shapes only."""
    _check_pattern(pattern)
    num_kv_heads = check_shape(q_len, kv_len, q_offset, num_heads, num_kv_heads)
    pat = pattern.bind_heads(num_kv_heads)
    if device is None:
        device = doc_ids.device if isinstance(doc_ids, Tensor) else None
    if isinstance(doc_ids, Tensor):
        doc_ids = doc_ids.to(device)
    q = (q_offset + torch.arange(q_len, device=device))[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    h = (torch.arange(num_heads, device=device) // (num_heads // num_kv_heads)).view(-1, 1, 1) \
        if pat.head_dependent else torch.zeros(1, 1, 1, dtype=torch.long, device=device)
    docs = _documents(doc_ids, kv_len, kv_len, None)
    if docs is None:
        return pat.visible(q, k, h).expand(h.shape[0], q_len, kv_len).unsqueeze(0)
    run, start = docs.run.long(), docs.start.long()  # [B, kv_len]
    rq, rk = run[:, q.squeeze(1)][:, None, :, None], run[:, None, None, :]
    sq, sk = start[:, q.squeeze(1)][:, None, :, None], start[:, None, None, :]
    return (rq == rk) & pat.visible(q - sq, k - sk, h)


def density(pattern: Pattern, q_len: int, kv_len: int | None = None, *, num_kv_heads: int = 1) -> float:
    """Fraction of the q_len x kv_len score matrix that is visible (queries are the last q_len keys), exact, in
    O(q_len) from the pattern's per-row counts. A causal square has density ~0.5."""
    kv_len = q_len if kv_len is None else kv_len
    check_shape(q_len, kv_len, kv_len - q_len, num_kv_heads, num_kv_heads)
    pat = pattern.bind_heads(num_kv_heads)
    q = torch.arange(kv_len - q_len, kv_len, dtype=torch.int64)
    heads = range(num_kv_heads) if pat.head_dependent else [0]
    total = sum(int(pat.row_count(q, h).sum()) for h in heads) / len(heads)
    return total / (q_len * kv_len)
