"""Token rules, rectangle rules and row counts of the patterns against their semantics written out token by token
(tests/reference.py)."""

import itertools

import pytest
import torch

from flexgen_long.masks import dense_mask, density
from flexgen_long.patterns import AttnSink, BlockSparse, Documents, Full

import reference as ref

PATTERNS = [
    Full(),
    AttnSink(sink=4, window=8),
    AttnSink(sink=0, window=1),
    AttnSink(sink=0, window=5),
    AttnSink(sink=20, window=3),
    BlockSparse(block=16, local_blocks=1, vertical_stride=1),
    BlockSparse(block=16, local_blocks=2, vertical_stride=3),
    BlockSparse(block=16, local_blocks=1, vertical_stride=4, per_head=True),
    BlockSparse(block=32, local_blocks=3, vertical_stride=2, per_head=True),
    BlockSparse(block=16, local_blocks=1, vertical_stride=16, per_head=True),
]


@pytest.mark.parametrize("pat", PATTERNS, ids=repr)
@pytest.mark.parametrize("q_len,kv_len,q_offset,heads,kv_heads", [
    (1, 1, 0, 1, 1), (37, 37, 0, 2, 1), (20, 90, 70, 4, 2), (1, 131, 130, 8, 4), (65, 100, 10, 3, 3),
])
def test_dense_mask_matches_the_written_out_rule(pat, q_len, kv_len, q_offset, heads, kv_heads):
    got = dense_mask(pat, q_len, kv_len, q_offset=q_offset, num_heads=heads, num_kv_heads=kv_heads)
    want = ref.dense(pat, q_len, kv_len, q_offset, heads, kv_heads)
    assert got.shape[1] in (1, heads)
    assert torch.equal(got.expand_as(want), want)


@pytest.mark.parametrize("pat", PATTERNS, ids=repr)
def test_dense_mask_documents_match_the_written_out_rule(pat):
    ids = torch.tensor([5] * 23 + [2] * 40 + [9] + [5] * 30 + [7] * 27)  # ids may repeat: documents are runs
    for q_len, q_offset in [(121, 0), (50, 71), (1, 120)]:
        got = dense_mask(pat, q_len, 121, q_offset=q_offset, num_heads=4, num_kv_heads=2, doc_ids=ids)
        want = ref.dense(pat, q_len, 121, q_offset, 4, 2, ids)
        assert torch.equal(got.expand_as(want), want)


def test_documents_layout():
    ids = torch.tensor([[3, 3, 1, 1, 1, 3, 4], [0, 0, 0, 0, 0, 0, 0]])
    d = Documents.from_ids(ids, length=9)
    runs, starts = ref.doc_starts(ids[0].tolist())
    assert d.run[0, :7].tolist() == runs and d.start[0, :7].tolist() == starts
    assert d.end[0, :7].tolist() == [1, 1, 4, 4, 4, 5, 6]
    assert d.run[1].tolist() == [0] * 7 + [1, 1] and d.start[1, 7:].tolist() == [7, 7]  # padding is its own document


@pytest.mark.parametrize("pat", PATTERNS, ids=repr)
def test_rect_rule_is_exact(pat):
    """any/all of every small rectangle equal the any/all of the token rule over it."""
    pat = pat.bind_heads(4)
    heads = range(4) if pat.head_dependent else [0]
    n = 70
    rng = range(0, n, 7)
    q0, q1, k0, k1 = zip(*[(a, b, c, d) for a, b in itertools.combinations_with_replacement(rng, 2)
                           for c, d in itertools.combinations_with_replacement(rng, 2)])
    t = lambda x: torch.tensor(x)  # noqa: E731
    for h in heads:
        any_, all_ = pat.rect(t(q0), t(q1), t(k0), t(k1), h)
        q = torch.arange(n)[:, None]
        k = torch.arange(n)[None, :]
        vis = pat.visible(q, k, h)
        for i in range(len(q0)):
            block = vis[q0[i]: q1[i] + 1, k0[i]: k1[i] + 1]
            assert bool(any_[i]) == bool(block.any()), (h, q0[i], q1[i], k0[i], k1[i])
            assert bool(all_[i]) == bool(block.all()), (h, q0[i], q1[i], k0[i], k1[i])


@pytest.mark.parametrize("pat", PATTERNS, ids=repr)
def test_row_count_and_density(pat):
    for kv_heads in (1, 4):
        m = dense_mask(pat, 300, 300, num_heads=kv_heads, num_kv_heads=kv_heads)
        p = pat.bind_heads(kv_heads)
        for h in range(m.shape[1]):
            assert torch.equal(p.row_count(torch.arange(300), h), m[0, h].sum(-1))
        assert density(pat, 300, num_kv_heads=kv_heads) == pytest.approx(m.float().mean().item())
        assert density(pat, 100, 300, num_kv_heads=kv_heads) == pytest.approx(m[..., 200:, :].float().mean().item())


@pytest.mark.parametrize("make,field", [
    (lambda: AttnSink(sink=-1, window=4), "AttnSink.sink"),
    (lambda: AttnSink(sink=0, window=0), "AttnSink.window"),
    (lambda: AttnSink(sink=1.5, window=4), "AttnSink.sink"),
    (lambda: BlockSparse(block=48, local_blocks=1, vertical_stride=2), "BlockSparse.block"),
    (lambda: BlockSparse(block=8, local_blocks=1, vertical_stride=2), "BlockSparse.block"),
    (lambda: BlockSparse(block=64, local_blocks=0, vertical_stride=2), "BlockSparse.local_blocks"),
    (lambda: BlockSparse(block=64, local_blocks=1, vertical_stride=0), "BlockSparse.vertical_stride"),
    (lambda: BlockSparse(block=64, local_blocks=1, vertical_stride=2, per_head=1), "BlockSparse.per_head"),
])
def test_bad_parameters_name_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as e:
        make()
    assert "must be" in str(e.value)


def test_patterns_are_hashable_values():
    assert AttnSink(4, 64) == AttnSink(4, 64) and len({AttnSink(4, 64), AttnSink(4, 64), Full()}) == 2


def test_check_doc_ids_is_the_one_validator():
    from flexgen_long.patterns import check_doc_ids

    ids = torch.tensor([0, 0, 1, 1])
    assert check_doc_ids(ids, 4) is ids and check_doc_ids(ids[None].expand(3, 4), 4, batch=3).shape == (3, 4)
    for bad, message in [([0, 0, 1], "integer tensor of shape"), (ids.bool(), "dtype torch.bool"),
                         (ids.float(), "dtype torch.float32"), (ids[:3], r"shape \[length=4\].*got \(3,\)"),
                         (ids.view(1, 1, 4), r"got \(1, 1, 4\)")]:
        with pytest.raises(ValueError, match=message):
            check_doc_ids(bad, 4)
    with pytest.raises(ValueError, match="doc_ids batch 2 must be 1 or the tokens' batch 3"):
        check_doc_ids(ids[None].expand(2, 4), 4, batch=3)
    # the entry points go through it: the same message from Documents and the masks
    for call in (lambda: Documents.from_ids(ids.bool()), lambda: dense_mask(Full(), 4, 4, doc_ids=ids.bool())):
        with pytest.raises(ValueError, match="doc_ids must be an integer tensor, got dtype torch.bool"):
            call()
