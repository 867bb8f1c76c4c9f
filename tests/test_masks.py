"""BlockMasks from the block rule against the dense token rule; FlexAttention with them against SDPA with it."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import _transpose_ordered, flex_attention

from flexgen_long.masks import build_block_mask, dense_mask
from flexgen_long.patterns import AttnSink, BlockSparse, Full

import reference as ref

PATTERNS = [
    Full(),
    AttnSink(sink=4, window=40),
    AttnSink(sink=0, window=1),
    AttnSink(sink=0, window=130),
    AttnSink(sink=33, window=17),
    BlockSparse(block=16, local_blocks=2, vertical_stride=3),
    BlockSparse(block=32, local_blocks=1, vertical_stride=4, per_head=True),
    BlockSparse(block=64, local_blocks=2, vertical_stride=8, per_head=True),
    BlockSparse(block=128, local_blocks=1, vertical_stride=1),
]
# (q_len, kv_len, q_offset): block multiples and not, q_len != kv_len with offsets, decode (q_len = 1)
GEOMETRY = [(1, 1, 0), (127, 127, 0), (128, 128, 0), (129, 129, 0), (1000, 1000, 0), (129, 4097, 3968),
            (1, 4097, 4096), (300, 1000, 517), (77, 513, 100)]


def check_key_major_view(bm):
    """The key-major view (used by the backward pass) equals what torch derives from the query-major one."""
    for num, idx, qnum, qidx in [(bm.kv_num_blocks, bm.kv_indices, bm.q_num_blocks, bm.q_indices),
                                 (bm.full_kv_num_blocks, bm.full_kv_indices, bm.full_q_num_blocks, bm.full_q_indices)]:
        tnum, tidx = _transpose_ordered(num, idx)
        assert torch.equal(qnum, tnum)
        valid = torch.arange(tidx.shape[-1]) < tnum[..., None]
        assert torch.equal(torch.where(valid, qidx, -1), torch.where(valid, tidx, -1))


def check(pat, q_len, kv_len, q_offset, heads, kv_heads, block_size, doc_ids=None):
    bm = build_block_mask(pat, q_len, kv_len, q_offset=q_offset, num_heads=heads, num_kv_heads=kv_heads,
                          block_size=block_size, doc_ids=doc_ids)
    want = dense_mask(pat, q_len, kv_len, q_offset=q_offset, num_heads=heads, num_kv_heads=kv_heads, doc_ids=doc_ids)
    got, full_t, part_t = ref.expand_block_mask(bm, q_len, kv_len)
    assert bm.shape[-2:] == (q_len, kv_len)
    assert torch.equal(got, want.expand_as(got)), "BlockMask expanded to tokens != dense mask"
    want = want.expand_as(got)
    assert not (full_t & ~want).any(), "a block marked full contains a masked element"
    assert want.any(-1).all(), "a query row sees no key"
    # exact block rule: every partial block holds a visible and a masked token (within bounds)
    bq, bk = bm.BLOCK_SIZE
    nk = -(-kv_len // bk)
    nq = -(-q_len // bq)
    pad = lambda x: F.pad(x, (0, nk * bk - kv_len, 0, nq * bq - q_len), value=-1)  # noqa: E731
    w = pad(want.to(torch.int8)).unflatten(2, (nq, bq)).unflatten(4, (nk, bk))
    p = pad(part_t.to(torch.int8)).unflatten(2, (nq, bq)).unflatten(4, (nk, bk))
    is_part = (p == 1).any(dim=(3, 5))
    has_vis = (w == 1).any(dim=(3, 5))
    has_masked = (w == 0).any(dim=(3, 5))
    assert (has_vis & has_masked)[is_part].all(), "a partial block is entirely visible or entirely masked"
    check_key_major_view(bm)
    return bm


@pytest.mark.parametrize("pat", PATTERNS, ids=repr)
@pytest.mark.parametrize("q_len,kv_len,q_offset", GEOMETRY)
def test_block_mask_equals_dense(pat, q_len, kv_len, q_offset):
    heads, kv_heads = (8, 2) if kv_len <= 1000 else (2, 1)
    for block_size in (16, 128) if kv_len <= 1000 else (64,):
        check(pat, q_len, kv_len, q_offset, heads, kv_heads, block_size)


@pytest.mark.parametrize("pat", PATTERNS, ids=repr)
@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (3, 3), (6, 2), (8, 8), (8, 1)])
def test_block_mask_heads_and_gqa(pat, heads, kv_heads):
    check(pat, 200, 333, 133, heads, kv_heads, 32)


def random_docs(batch, length, gen):
    ids = []
    for _ in range(batch):
        cuts = sorted(torch.randint(1, length, (int(torch.randint(0, 12, (1,), generator=gen)),), generator=gen).tolist())
        lens = [b - a for a, b in zip([0] + cuts, cuts + [length]) if b > a]
        ids.append(torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)))
    return torch.stack(ids)


@pytest.mark.parametrize("pat", PATTERNS, ids=repr)
def test_block_mask_packed_documents(pat):
    gen = torch.Generator().manual_seed(1)
    for trial, (q_len, kv_len, q_offset, bs) in enumerate([(600, 600, 0, 16), (257, 700, 443, 32), (1, 390, 389, 64),
                                                           (1000, 1000, 0, 128)]):
        doc_ids = random_docs(3, kv_len, gen)
        check(pat, q_len, kv_len, q_offset, 4, 2, bs, doc_ids=doc_ids)
        check(pat, q_len, kv_len, q_offset, 2, 2, bs, doc_ids=doc_ids[trial % 3])  # one layout for the batch
    # single-token documents, and a document boundary exactly on a block boundary
    check(pat, 64, 64, 0, 2, 1, 16, doc_ids=torch.arange(64))
    check(pat, 96, 96, 0, 2, 1, 16, doc_ids=torch.tensor([0] * 32 + [1] * 64))


def test_full_blocks_are_marked():
    """Inside a causal square, blocks below the diagonal are full and only the diagonal is partial."""
    bm = build_block_mask(Full(), 1024, 1024, block_size=128)
    assert bm.kv_num_blocks.flatten().tolist() == [1] * 8
    assert bm.full_kv_num_blocks.flatten().tolist() == list(range(8))
    bm = build_block_mask(AttnSink(sink=128, window=512), 2048, 2048, block_size=128)
    assert int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) < 16 * 7  # O(window) blocks per row


@pytest.mark.parametrize("kwargs,field", [
    (dict(q_len=0, kv_len=4), "q_len"),
    (dict(q_len=4, kv_len=0), "kv_len"),
    (dict(q_len=4, kv_len=4, q_offset=-1), "q_offset"),
    (dict(q_len=4, kv_len=4, q_offset=1), "q_offset \\+ q_len"),
    (dict(q_len=4, kv_len=4, num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (dict(q_len=4, kv_len=4, num_heads=0), "num_heads"),
    (dict(q_len=4, kv_len=4, block_size=48), "block_size"),
    (dict(q_len=4, kv_len=4, block_size=8), "block_size"),
    (dict(q_len=4, kv_len=4, doc_ids=torch.zeros(5, dtype=torch.long)), "doc_ids"),
    (dict(q_len=4, kv_len=4, doc_ids=torch.zeros(4)), "doc_ids"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_block_mask(AttnSink(4, 8), **kwargs)
    if "block_size" not in kwargs:
        with pytest.raises(ValueError, match=field):
            dense_mask(AttnSink(4, 8), **kwargs)
    with pytest.raises(ValueError, match="pattern"):
        build_block_mask("sink", 4, 4)


def test_no_dense_tensor_in_the_build(monkeypatch):
    """The build touches O(blocks) memory: at 64K tokens no allocation approaches q_len * kv_len elements."""
    seen = []
    real_zeros = torch.zeros

    def spy(*a, **k):
        t = real_zeros(*a, **k)
        seen.append(t.numel())
        return t

    monkeypatch.setattr(torch, "zeros", spy)
    bm = build_block_mask(AttnSink(64, 4096), 65536, 65536, num_heads=32, num_kv_heads=8, block_size=128)
    assert bm.kv_indices.numel() == 512 * 512
    assert max(seen) <= 2 * 512 * 513  # partial and full block views, stacked; a token mask would be 65536**2


# ---- FlexAttention (compiled CPU kernel) with the BlockMask == SDPA with the dense mask --------------------------------
_flex = torch.compile(flex_attention, dynamic=False)


@pytest.mark.parametrize("pat,q_len,kv_len,q_offset,heads,kv_heads,bs,docs", [
    (AttnSink(4, 40), 129, 300, 171, 4, 2, 64, False),
    (BlockSparse(32, 1, 3, per_head=True), 300, 300, 0, 4, 2, 32, False),
    (BlockSparse(64, 2, 4), 250, 250, 0, 2, 2, 64, True),
    (AttnSink(0, 33), 250, 250, 0, 2, 2, 64, True),
])
def test_flex_equals_sdpa(pat, q_len, kv_len, q_offset, heads, kv_heads, bs, docs):
    D = 16
    doc_ids = random_docs(2, kv_len, torch.Generator().manual_seed(3)) if docs else None
    B = 2
    q = torch.randn(B, heads, q_len, D)
    k = torch.randn(B, kv_heads, kv_len, D)
    v = torch.randn(B, kv_heads, kv_len, D)
    bm = build_block_mask(pat, q_len, kv_len, q_offset=q_offset, num_heads=heads, num_kv_heads=kv_heads,
                          block_size=bs, doc_ids=doc_ids)
    out = _flex(q, k, v, block_mask=bm, enable_gqa=kv_heads != heads)
    m = dense_mask(pat, q_len, kv_len, q_offset=q_offset, num_heads=heads, num_kv_heads=kv_heads, doc_ids=doc_ids)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=kv_heads != heads)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


# ---- padded masks (the shape policy: q / k / v zero-padded to a bucket) -------------------------------------------------
def check_padded(pat, q_len, kv_len, q_offset, heads, kv_heads, bs, pq, pk, doc_ids=None):
    bm = build_block_mask(pat, q_len, kv_len, q_offset=q_offset, num_heads=heads, num_kv_heads=kv_heads,
                          block_size=bs, doc_ids=doc_ids, padded_lengths=(pq, pk))
    assert bm.seq_lengths == (pq, pk)
    got, full_t, part_t = ref.expand_block_mask(bm, pq, pk)
    want = ref.dense(pat, q_len, kv_len, q_offset=q_offset, num_heads=heads, num_kv_heads=kv_heads, doc_ids=doc_ids)
    B = max(got.shape[0], want.shape[0])
    got, full_t = got.expand(B, heads, pq, pk), full_t.expand(B, heads, pq, pk)
    want = want.expand(B, heads, q_len, kv_len)
    assert torch.equal(got[:, :, :q_len, :kv_len], want), "real rows x real keys != dense mask"
    assert not got[:, :, :q_len, kv_len:].any(), "a real query sees a padded key"
    assert not full_t[:, :, :q_len, kv_len:].any(), "a block holding padded keys is full for a real query"
    nq_real = -(-q_len // bs)
    listed = bm.kv_num_blocks + (bm.full_kv_num_blocks if bm.full_kv_num_blocks is not None else 0)
    assert (listed[:, :, nq_real:] == 0).all(), "a query block made only of padding lists key blocks"
    if q_offset == 0 and q_len == kv_len:  # self-attention: padded rows of the last real block must not be empty
        assert got[:, :, :nq_real * bs].any(-1).all(), "a row of a real query block sees no key (0/0 in the kernel)"
    check_key_major_view(bm)


@pytest.mark.parametrize("pat", PATTERNS, ids=repr)
@pytest.mark.parametrize("q_len,kv_len,q_offset,bs,pq,pk", [
    (1, 1, 0, 16, 16, 16), (1, 1, 0, 16, 64, 64), (17, 17, 0, 16, 32, 32), (129, 129, 0, 128, 256, 256),
    (100, 100, 0, 32, 128, 128), (77, 177, 100, 32, 96, 192), (1, 300, 299, 64, 64, 384), (33, 33, 0, 16, 48, 48),
])
def test_padded_block_mask(pat, q_len, kv_len, q_offset, bs, pq, pk):
    check_padded(pat, q_len, kv_len, q_offset, 4, 2, bs, pq, pk)


@pytest.mark.parametrize("pat", PATTERNS[:6], ids=repr)
def test_padded_block_mask_packed(pat):
    gen = torch.Generator().manual_seed(5)
    for q_len, bs, p in [(100, 16, 128), (257, 64, 384), (31, 16, 64)]:
        docs = random_docs(2, q_len, gen)
        check_padded(pat, q_len, q_len, 0, 2, 2, bs, p, p, doc_ids=docs)
        check_padded(pat, q_len, q_len, 0, 2, 1, bs, p, p, doc_ids=docs[1])


def test_padded_lengths_are_checked():
    with pytest.raises(ValueError, match="padded q_len"):
        build_block_mask(AttnSink(4, 8), 100, 100, block_size=32, padded_lengths=(64, 128))
    with pytest.raises(ValueError, match="padded kv_len"):
        build_block_mask(AttnSink(4, 8), 100, 100, block_size=32, padded_lengths=(128, 100))
