"""Independent oracles for the tests: the patterns' semantics (README, "Exact semantics") written out token by
token in plain Python, and the expansion
of a BlockMask to tokens. Nothing here imports the rules under test."""

from __future__ import annotations

import torch

from flexgen_long.patterns import AttnSink, BlockSparse, Full


def visible(pat, q: int, k: int, kv_head: int, num_kv_heads: int) -> bool:
    """The README's table of exact semantics, literally (q, k positions within the document)."""
    if k > q:
        return False
    if isinstance(pat, Full):
        return True
    if isinstance(pat, AttnSink):
        return k < pat.sink or q - k < pat.window
    if isinstance(pat, BlockSparse):
        qb, kb = q // pat.block, k // pat.block
        shift = kv_head * max(1, pat.vertical_stride // num_kv_heads) if pat.per_head else 0
        return qb - kb < pat.local_blocks or (kb + shift) % pat.vertical_stride == 0
    raise TypeError(pat)


def doc_starts(ids: list[int]) -> tuple[list[int], list[int]]:
    """(run index, first position of the run) per token; a document is a maximal run of equal ids."""
    runs, starts, r, s = [], [], -1, 0
    for t, d in enumerate(ids):
        if t == 0 or d != ids[t - 1]:
            r, s = r + 1, t
        runs.append(r)
        starts.append(s)
    return runs, starts


def dense(pat, q_len, kv_len, q_offset=0, num_heads=1, num_kv_heads=None, doc_ids=None) -> torch.Tensor:
    """Bool [B, num_heads, q_len, kv_len] by loops."""
    num_kv_heads = num_kv_heads or num_heads
    group = num_heads // num_kv_heads
    batch = [None] if doc_ids is None else (doc_ids.reshape(-1, kv_len).tolist())
    out = torch.zeros(len(batch), num_heads, q_len, kv_len, dtype=torch.bool)
    for b, ids in enumerate(batch):
        runs, starts = doc_starts(ids) if ids is not None else ([0] * kv_len, [0] * kv_len)
        for h in range(num_heads):
            for i in range(q_len):
                q = q_offset + i
                for k in range(q + 1 if q < kv_len else kv_len):
                    if runs[k] == runs[q]:
                        out[b, h, i, k] = visible(pat, q - starts[q], k - starts[k], h // group, num_kv_heads)
    return out


def expand_block_mask(bm, q_len: int, kv_len: int):
    """Token-level mask that FlexAttention applies for ``bm``: partial blocks through bm.mask_mod, full blocks all
    true, absent blocks false. Returns (mask [B, H, q_len, kv_len], full_tokens, partial_tokens)."""
    Bsz, H, nq = bm.kv_num_blocks.shape
    bq, bk = bm.BLOCK_SIZE
    nk = -(-kv_len // bk)

    def blocks(num, idx):
        valid = torch.arange(idx.shape[-1]) < num[..., None].long()
        assert ((idx >= 0) & (idx < nk))[valid].all(), "kv block index out of range"
        sel = torch.where(valid, idx.long(), nk)
        cnt = torch.zeros(Bsz, H, nq, nk + 1, dtype=torch.int32).scatter_add_(-1, sel, torch.ones_like(sel, dtype=torch.int32))
        assert cnt[..., :nk].max() <= 1, "kv block listed twice in a row"
        return cnt[..., :nk] > 0

    part = blocks(bm.kv_num_blocks, bm.kv_indices)
    full = blocks(bm.full_kv_num_blocks, bm.full_kv_indices) if bm.full_kv_num_blocks is not None else part & False
    assert not (part & full).any(), "a block is both partial and full"
    tok = lambda x: x.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :q_len, :kv_len]  # noqa: E731
    part_t, full_t = tok(part), tok(full)
    b = torch.arange(Bsz).view(-1, 1, 1, 1)
    h = torch.arange(H).view(1, -1, 1, 1)
    q = torch.arange(q_len).view(1, 1, -1, 1)
    k = torch.arange(kv_len).view(1, 1, 1, -1)
    mm = bm.mask_mod(b, h, q, k).expand(Bsz, H, q_len, kv_len)
    return full_t | (part_t & mm), full_t, part_t


def rel_err(got, want) -> float:
    """||got - want|| / ||want||; a (near) zero reference -- dq of a query that sees only itself is exactly 0 -- is
    compared at the inputs' scale instead (RMS 1: ||want|| replaced by sqrt(numel))."""
    got, want = got.detach().float(), want.detach().float()
    scale = float(want.norm())
    if scale < 1e-3 * want.numel() ** 0.5:
        scale = want.numel() ** 0.5
    return float((got - want).norm()) / scale


def planted_copy_model(copy_layer: int = 4, prev_layer: int = 1, num_layers: int = 6, seed: int = 0):
    """A byte-level Llama (``longgen_llama``: vocab 259, dim 72, one head of 64, every layer full, RoPE base 1e8) whose
    weights are set by hand so that exactly one layer, ``copy_layer``, copies the passkey out of the needle: an
    induction head. ``prev_layer`` (< copy_layer) is a previous-token head that writes each position's preceding token
    into the residual stream; ``copy_layer``'s query is the current token and its key that preceding token, so a query
    attends to the position after an earlier occurrence of its own token -- inside the needle for the passkey's
    digits, which occur nowhere else -- and that position holds the next digit, the token being produced. Every other
    attention and every MLP is zero (uniform attention, nothing written).

    Residual stream: dims 0-31 a random unit vector per token, 32-63 the previous token's vector (written by
    prev_layer), 64 a constant 1, 65-71 copy_layer's output. RoPE pairs are consecutive dims of a head; the
    previous-token head uses the 8 fastest pairs (its key rotated by one position's angle, so q.k peaks one position
    back: sum of cos(theta_i * (n - m + 1)) is 8 there, 7.31 at the query itself, lower elsewhere), the copy head the
    16 slowest (rotation below 0.1 rad over 1K tokens: a match of token vectors, nearly position-free)."""
    import math

    from flexgen_long.models import longgen_llama

    if not 0 <= prev_layer < copy_layer < num_layers:
        raise ValueError("need 0 <= prev_layer < copy_layer < num_layers")
    E, D, base = 72, 64, 1e8
    model = longgen_llama(259, num_layers, 1, 1, E, 16, 1024, base, full_layers="all", head_dim=D)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(259, 32, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # RoPE angle per pair and position
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith("norm.scale"):
                p.fill_(1.0)
        model.tok_embeddings.weight[:, :32] = u.float()
        model.tok_embeddings.weight[:, 64] = 1.0
        a = model.layers[prev_layer].attn
        c = math.sqrt(E / 2)   # RMSNorm scales the embedding (|x|^2 = 2) by this
        alpha = 25.0           # margin 0.69 * alpha^2 / 8 = 54 nats over the query itself
        for i in range(8):
            a.q_proj.weight[2 * i, 64] = alpha / c
            a.k_proj.weight[2 * i, 64] = alpha * math.cos(theta[i]) / c
            a.k_proj.weight[2 * i + 1, 64] = alpha * math.sin(theta[i]) / c
        for j in range(32):
            a.v_proj.weight[j, j] = 1.0 / c
            a.output_proj.weight[32 + j, j] = 1.0
        b = model.layers[copy_layer].attn
        c = math.sqrt(E / 3)   # |x|^2 = 3 once prev_layer has written the previous token
        for j in range(32):
            b.q_proj.weight[32 + j, j] = 12.0 / c
            b.k_proj.weight[32 + j, 32 + j] = 12.0 / c
            b.v_proj.weight[j, j] = 1.0 / c
        for j in range(7):
            b.output_proj.weight[65 + j, j] = 1.0
    return model.eval()
