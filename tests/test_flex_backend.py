"""FlexAttention's kernel backend (flexgen_long.flex_backend): the policy resolves Triton off CUDA and refuses an
explicit FLASH there in one line, the resolution is said once per process, routes carry the backend (Triton for
float32), flex_attend hands it to flex_attention as kernel_options and keys compiled graphs by it, FLASH's input
rules, and the training fallback to Triton with its line. CPU only: FLASH itself runs in tests/gpu/."""

import sys

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

import flexgen_long.attention as A
import flexgen_long.flex_backend as FB
import flexgen_long.models as M
from flexgen_long.masks import build_block_mask, build_cached_block_mask
from flexgen_long.patterns import AttnSink, BlockSparse, Full, Pattern
from flexgen_long.policy import Policy
from flexgen_long.routes import route
from flexgen_long.shapes import flex_graph_key

SINK = AttnSink(4, 60)
FLASH_HERE = (True, "flash_attn.cute 4.0.0b36, sm90")


@pytest.fixture
def said(capsys):
    """The lines flex_backend says from now on (its say-once memory cleared first)."""
    FB.log_once.cache_clear()
    capsys.readouterr()
    return lambda: [line for line in capsys.readouterr().err.splitlines() if line.startswith("flex attention:")]


@pytest.fixture
def flash_on_cuda(monkeypatch):
    """A machine where FLASH can run on CUDA (the probe answers so; nothing is allocated on a GPU)."""
    monkeypatch.setattr(FB, "flash_status", lambda device: FLASH_HERE if torch.device(device).type == "cuda"
                        else (False, f"the model is on {torch.device(device).type}"))


def test_policy_resolves_triton_off_cuda_and_refuses_explicit_flash():
    assert Policy().on("cpu").flex_backend == "triton" and Policy(flex_backend="triton").on("cpu").flex_backend == \
        "triton"
    assert Policy().on("cuda").flex_backend == "triton"  # this machine has no CUDA
    for device, why in (("cpu", "the model is on cpu"), ("cuda", "CUDA is not available")):
        with pytest.raises(ValueError) as e:
            Policy(flex_backend="flash").on(device)
        assert str(e.value) == f"Policy.flex_backend='flash' cannot run on {device}: {why} (use None or 'triton')"
    with pytest.raises(ValueError, match=r"^Policy.flex_backend must be None .*'triton' or 'flash', got 'FLASH'$"):
        Policy(flex_backend="FLASH")
    # hashable (a policy keys compiled graphs), resolved or not
    assert len({Policy(flex_backend="flash"), Policy(), Policy().on("cpu"), Policy().on("cpu")}) == 3


def test_the_backend_is_said_once_per_process(said, flash_on_cuda):
    for _ in range(3):
        Policy().on("cpu")
    assert said() == ["flex attention: Triton backend (the model is on cpu)"]
    for _ in range(3):
        assert Policy().on("cuda").flex_backend == Policy(flex_backend="flash").on("cuda").flex_backend == "flash"
    assert said() == ["flex attention: FLASH backend (flash_attn.cute 4.0.0b36, sm90)"]
    Policy(flex_backend="triton").on("cuda")
    assert said() == ["flex attention: Triton backend (Policy.flex_backend='triton')"]


def test_the_probe_catches_any_import_failure(monkeypatch, tmp_path, said):
    """On a (pretended) sm90 device the probe imports flash_attn.cute once; any exception there means Triton, with
    its first line as the reason."""
    pkg = tmp_path / "flash_attn"
    (pkg / "cute").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cute" / "__init__.py").write_text("raise OSError('libcuda.so.1: cannot open shared object file\\nmore')")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    FB._cuda_flash_status.cache_clear()
    try:
        why = "flash_attn.cute not importable: OSError: libcuda.so.1: cannot open shared object file"
        assert FB.flash_status("cuda") == (False, why)
        assert Policy().on("cuda").flex_backend == "triton"
        assert said() == [f"flex attention: Triton backend ({why})"]
        with pytest.raises(ValueError, match=r"^Policy.flex_backend='flash' cannot run on cuda: flash_attn.cute not "):
            Policy(flex_backend="flash").on("cuda")
        FB._cuda_flash_status.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
        assert FB.flash_status("cuda:0") == (False, "sm80: FLASH needs sm90 or newer")
    finally:
        FB._cuda_flash_status.cache_clear()
        for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
            del sys.modules[name]


def test_routes_carry_the_backend(flash_on_cuda):
    flash, triton = Policy().on("cuda"), Policy(flex_backend="triton").on("cuda")
    r = lambda pattern, phase, policy=flash, **kw: route(pattern, phase, device="cuda", policy=policy,  # noqa: E731
                                                         **{"q_len": 300, **kw})
    later = dict(offset=700, chunk=300, slots=1200)
    assert r(SINK, "first").backend == r(SINK, "train").backend == "flash"
    assert r(SINK, "first", itemsize=4).backend == "triton"  # FLASH takes 16-bit inputs only
    assert r(SINK, "first", triton).backend == "triton"
    assert (r(SINK, "later", **later).kernel, r(SINK, "later", **later).backend) == ("flex_over_slots", "flash")
    assert (r(Full(), "later", **later).kernel, r(Full(), "later", **later).backend) == ("flex_full_chunk", "flash")
    assert r(Full(), "first").backend is None  # causal SDPA
    assert r(SINK, "decode", q_len=1, slots=64).backend is None  # decode never runs flex
    assert r(SINK, "first", Policy().on("cpu"), q_len=4096, itemsize=2).backend == "triton"


def _spy(monkeypatch):
    """flex_attend's compiled function run eagerly, and flex_attention replaced by a recorder."""
    keys, options = [], []
    monkeypatch.setattr(A, "compiled", lambda fn, key, **kw: keys.append(key) or fn)
    monkeypatch.setattr(A, "flex_attention", lambda q, k, v, **kw: options.append(kw["kernel_options"])
                        or torch.zeros_like(q))
    return keys, options


def test_flex_attend_passes_the_backend_and_keys_graphs_by_it(monkeypatch):
    keys, options = _spy(monkeypatch)
    bm = build_block_mask(SINK, 100, 100, num_heads=4, num_kv_heads=2, padded_lengths=(128, 128))
    q = torch.randn(1, 4, 100, 16, dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, 2, 100, 16, dtype=torch.bfloat16)
    assert A.flex_attend(q, k, v, bm, "flash").shape == q.shape
    A.flex_attend(q, k, v, bm)  # the default: Triton
    assert options == [{"BACKEND": "FLASH"}, None]
    assert keys[0][-1] == "flash" and keys[1][-1] == "triton" and keys[0][:-1] == keys[1][:-1]
    with pytest.raises(ValueError, match=r"^flex backend must be one of \('triton', 'flash'\), got 'cute'$"):
        A.flex_attend(q, k, v, bm, "cute")
    x = torch.zeros(1, 1, 128, 8)
    assert flex_graph_key(x, x, x, bm) == flex_graph_key(x, x, x, bm, "triton") != flex_graph_key(x, x, x, bm, "flash")


def test_flash_refuses_what_it_cannot_take(monkeypatch):
    _spy(monkeypatch)
    q = torch.randn(1, 2, 128, 16, dtype=torch.bfloat16)
    bm = build_block_mask(SINK, 128, 128, num_heads=2)
    with pytest.raises(ValueError, match=r"^flex backend 'flash' takes q, k, v of one dtype, float16 or bfloat16, "
                                         r"got torch.float32, torch.float32, torch.float32 \("):
        A.flex_attend(q.float(), q.float(), q.float(), bm, "flash")
    with pytest.raises(ValueError, match="one dtype"):
        A.flex_attend(q, q.half(), q, bm, "flash")
    small = build_block_mask(SINK, 128, 128, num_heads=2, block_size=64)
    with pytest.raises(ValueError, match=r"^flex backend 'flash' needs 128 x 128 BlockMask blocks \(Hopper's tile\), "
                                         r"got \(64, 64\)$"):
        A.flex_attend(q, q, q, small, "flash")
    no_full = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, BLOCK_SIZE=128, mask_mod=bm.mask_mod,
                                       seq_lengths=(128, 128))
    with pytest.raises(ValueError, match="lists its full blocks"):
        A.flex_attend(q, q, q, no_full, "flash")
    A.flex_attend(q.float(), q.float(), q.float(), small)  # Triton takes all of them


def test_mask_set_routes_by_dtype_and_trains_on_triton_where_flash_backward_fails(monkeypatch, said):
    """Where FLASH can run (pretended, here on the CPU; flex routes forced with kind="block"): 16-bit no-grad routes
    run FLASH, float32 ones Triton; with a gradient the route keeps FLASH where its backward passes the probe, and
    falls back to Triton -- said once, with the probe's reason -- where it fails."""
    monkeypatch.setattr(FB, "flash_status", lambda device: FLASH_HERE)
    probed, verdict = [], {"why": None}
    monkeypatch.setattr(FB, "backward_error", lambda pattern, **kind: probed.append((pattern, kind)) or verdict["why"])
    ms = lambda **kw: A.MaskSet([SINK, Full()], 300, num_heads=4, num_kv_heads=2, device="cpu",  # noqa: E731
                                **{"kind": "block", "dtype": torch.bfloat16, "head_dim": 64, **kw})
    assert [(r.kernel, r.backend) for r, _ in ms().routes.values()] == [("flex", "flash"), ("sdpa_causal", None)]
    assert ms(dtype=torch.float32).route(SINK).backend == "triton"
    assert A.MaskSet([SINK], 300, num_heads=4, num_kv_heads=2, device="cpu", kind="block").route(SINK).backend == \
        "triton"  # the default dtype, float32
    assert probed == []  # no gradient: no probe
    said()

    assert ms(grad=True).route(SINK).backend == "flash"
    assert probed == [(SINK, dict(num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, device="cpu",
                                  doc_batch=None))]
    assert said() == []
    verdict["why"] = "FLASH backward failed: NotImplementedError: no block-sparse backward for this mask"
    doc = torch.tensor([0] * 100 + [1] * 200).expand(2, 300)
    for _ in range(3):
        r = ms(grad=True, doc_ids=doc)
        assert r.route(SINK).kernel == r.route(Full()).kernel == "flex"
        assert r.route(SINK).backend == r.route(Full()).backend == "triton"
        assert isinstance(r[SINK], BlockMask)
    assert probed[-1][1]["doc_batch"] == 2
    ms(grad=True, doc_ids=doc[0])
    assert probed[-1][1]["doc_batch"] == 1  # one layout for the batch
    assert said() == [f"flex attention: Triton backend for training {p!r} ({verdict['why']})" for p in (SINK, Full())]
    assert ms(grad=True, dtype=torch.float32).route(SINK).backend == "triton"


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torchtune's RMSNorm on a CPU
def test_the_model_tells_its_mask_set_dtype_and_head_dim(monkeypatch):
    seen = []
    real = M.MaskSet
    monkeypatch.setattr(M, "MaskSet", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    model = M.longgen_llama(97, 2, 4, 2, 32, 64, 256, full_layers=[1], sparse_pattern=SINK).to(torch.bfloat16).eval()
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 20)))
    assert seen[0]["dtype"] == torch.bfloat16 and seen[0]["head_dim"] == 8


@pytest.mark.parametrize("pattern", [SINK, BlockSparse(16, 1, 3, per_head=True), Full()], ids=repr)
def test_every_mask_mod_captures_device_tensors_only(pattern):
    """FLASH bakes Python scalars captured by a mask_mod into its kernel and refuses 0-d CPU tensors on a GPU: the
    per-call values of our mask_mods (the offset, document layouts, key positions) are tensors on the mask's device,
    and every other capture is a constant of the graph key (the bound pattern, the GQA group, whether the layout is
    per row)."""
    docs = torch.tensor([0] * 120 + [1] * 180)
    slot_pos = torch.arange(64, dtype=torch.int32)[None].expand(2 if pattern.head_dependent else 1, 64).contiguous()
    for bm in (build_block_mask(pattern, 100, 300, q_offset=200, num_heads=4, num_kv_heads=2),
               build_block_mask(pattern, 300, 300, num_heads=4, num_kv_heads=2, doc_ids=docs),
               build_cached_block_mask(pattern, slot_pos, 100, q_offset=200, num_heads=4, num_kv_heads=2)):
        cells = [c.cell_contents for c in bm.mask_mod.__closure__]
        assert any(isinstance(c, torch.Tensor) for c in cells)
        for c in cells:
            assert isinstance(c, (Pattern, int)) or (isinstance(c, torch.Tensor) and c.device == bm.kv_indices.device)
