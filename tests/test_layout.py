"""Layer layouts: the documented index rules, written out by hand, and the ValueErrors for bad values."""

import pytest

from flexgen_long.layout import DEFAULT_SPARSE_PATTERN, as_sparse_pattern, full_layer_indices, layer_patterns, \
    retrieval_budget
from flexgen_long.patterns import AttnSink, BlockSparse, Full


@pytest.mark.parametrize("L, spec, want", [
    (32, "middle", list(range(10, 21))),     # the paper: 11 of 32 layers, the middle third
    (16, "middle", [5, 6, 7, 8, 9]),
    (4, "middle", [1]),
    (1, "middle", [0]),
    (32, 1 / 3, list(range(10, 21))),        # a fraction is placed like "middle"
    (10, 0.5, [2, 3, 4, 5, 6]),
    (5, 1.0, [0, 1, 2, 3, 4]),
    (32, "bottom", list(range(11))),
    (32, "top", list(range(21, 32))),
    (8, "interleave:2", [1, 3, 5, 7]),
    (7, "interleave:3", [2, 5]),
    (3, "interleave:1", [0, 1, 2]),
    (6, "all", [0, 1, 2, 3, 4, 5]),
    (6, "none", []),
    (6, [4, 0, 2], [0, 2, 4]),
    (6, (), []),
])
def test_full_layer_indices(L, spec, want):
    assert list(full_layer_indices(L, spec)) == want


def test_layer_patterns_share_objects():
    sink = AttnSink(sink=4, window=8)
    pats = layer_patterns(6, [1, 2], sink)
    assert [type(p) for p in pats] == [AttnSink, Full, Full, AttnSink, AttnSink, AttnSink]
    assert all(p is sink for i, p in enumerate(pats) if i not in (1, 2))
    assert layer_patterns(3)[0] == DEFAULT_SPARSE_PATTERN


def test_yaml_node_becomes_pattern():
    # torchtune's config.instantiate hands nested nodes over as plain dicts
    p = as_sparse_pattern({"_component_": "flexgen_long.patterns.BlockSparse", "block": 16, "local_blocks": 2,
                           "vertical_stride": 4})
    assert p == BlockSparse(block=16, local_blocks=2, vertical_stride=4)


@pytest.mark.parametrize("spec, field", [
    ([0, 6], "index 6 out of range"),
    ([-1], "index -1 out of range"),
    ([1, 1], "more than once"),
    ([1.0], "must be ints"),
    (0.0, r"fraction must lie in \(0, 1\]"),
    (1.5, r"fraction must lie in \(0, 1\]"),
    ("middel", "unknown string 'middel'"),
    ("interleave:0", "interleave:k"),
    ("interleave:x", "interleave:k"),
    (3, "full_layers must be one of"),
    (True, "full_layers must be one of"),
    (None, "full_layers must be one of"),
])
def test_bad_full_layers(spec, field):
    with pytest.raises(ValueError, match="full_layers") as e:
        full_layer_indices(6, spec)
    assert e.match(field)


@pytest.mark.parametrize("pattern, msg", [
    (Full(), "must be a sparse pattern such as AttnSink or BlockSparse"),
    ("sink", "must be a sparse pattern such as AttnSink or BlockSparse"),
    ({"_component_": "flexgen_long.patterns.Full"}, "must be a sparse flexgen_long.patterns pattern"),
    ({"_component_": "flexgen_long.patterns.Nope"}, "cannot be imported"),
    ({"sink": 4, "window": 8}, "needs '_component_'"),
])
def test_bad_sparse_pattern(pattern, msg):
    with pytest.raises(ValueError, match="sparse_pattern") as e:
        layer_patterns(4, "middle", pattern)
    assert e.match(msg)


def test_bad_pattern_arguments_name_the_field():
    with pytest.raises(ValueError, match="AttnSink.window"):
        as_sparse_pattern({"_component_": "flexgen_long.patterns.AttnSink", "sink": 4, "window": 0})


def test_bad_num_layers():
    with pytest.raises(ValueError, match="num_layers"):
        full_layer_indices(0)


@pytest.mark.parametrize("spec, L, want", [
    ("retrieval", 30, 10), ("retrieval", 32, 11), ("Retrieval", 4, 1),   # as many as "middle"
    ("retrieval:6", 30, 6), ("retrieval:30", 30, 30), ("retrieval:1", 30, 1),
    ("retrieval:0.2", 30, 6), ("retrieval:1.0", 7, 7), ("retrieval:0.01", 30, 1),  # n(f) = max(1, floor(f*L + 1/2))
    ("retrieval:0.25", 9, 2),
])
def test_retrieval_budget(spec, L, want):
    assert retrieval_budget(spec, L) == want
    assert retrieval_budget(spec, None) is None  # the form alone, before the model's size is known


@pytest.mark.parametrize("spec, msg", [
    ("retrieval:0", r"layer count must be an int in \[1, 30\]"),
    ("retrieval:31", r"layer count must be an int in \[1, 30\]"),
    ("retrieval:1.5", r"expected 'retrieval'"),
    ("retrieval:0.0", r"expected 'retrieval'"),
    ("retrieval:abc", r"expected 'retrieval'"),
    ("retrieval:", r"expected 'retrieval'"),
    ("retrieval:1e-1", r"expected 'retrieval'"),
])
def test_bad_retrieval_budget(spec, msg):
    with pytest.raises(ValueError, match=msg):
        retrieval_budget(spec, 30)


def test_a_builder_cannot_take_retrieval_and_says_who_resolves_it():
    with pytest.raises(ValueError, match=r"full_layers 'retrieval' names the layers of a pretrained model's "
                                         r"retrieval heads.*recipes/longgen_layers.py MODEL_DIR"):
        full_layer_indices(30, "retrieval")
    with pytest.raises(ValueError, match=r"layer count must be an int in \[1, 30\]"):
        full_layer_indices(30, "retrieval:40")  # a malformed budget is named as such
