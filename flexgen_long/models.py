"""torchtune builders for LongGen hybrid Llamas: full attention in some layers, a sparse pattern in the others.

The module tree and state-dict keys are torchtune's llama ones (``tok_embeddings``, ``layers.{i}.attn.q_proj`` ...,
``norm``, ``output``), so torchtune's HF / Meta checkpointers load real weights unchanged; only the attention kernels
differ. Every builder is usable as ``_component_`` in a torchtune YAML config::

    model:
      _component_: flexgen_long.models.longgen_llama2_7b
      max_seq_len: 131072
      rope_base: 5000000
      full_layers: middle
      sparse_pattern:
        _component_: flexgen_long.patterns.AttnSink
        sink: 128
        window: 1920

Forward: ``model(tokens, doc_ids=None)`` -> logits [B, S, vocab]. ``doc_ids`` [B, S] packs documents (a document is a
maximal run of equal ids; see ``doc_ids_from_seq_lens`` for torchtune's packed datasets): attention stays inside each
document and RoPE positions restart at every document. With ``model.skip_output_layer = True`` (set by
``flexgen_long.losses.ChunkedLinearCrossEntropy.set_model_output``) it returns the final-normed hidden states
[B, S, dim] instead, for a loss that applies ``model.output`` itself, a chunk of tokens at a time.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchtune.models.llama3._component_builders import llama3_mlp
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import FeedForward, RMSNorm, RotaryPositionalEmbeddings, TiedLinear, TransformerDecoder

from . import hf
from .attention import HybridAttention, HybridLayer, KVStep, MaskSet, attention_layers, positions_in_documents
from .layout import DEFAULT_SPARSE_PATTERN, layer_patterns
from .patterns import AttnSink, check_doc_ids
from .policy import Policy

__all__ = ["HybridDecoder", "longgen_llama", "fuse_projections", "unfuse_projections", "FUSED_MATRICES",
           "GateUpFeedForward", "from_hf_config", "builder_config", "doc_ids_from_seq_lens", "relayout", "longgen_llama2_7b", "longgen_llama2_13b",
           "longgen_llama2_70b", "longgen_llama3_1_8b", "longgen_llama3_1_70b", "longgen_llama3_2_1b",
           "longgen_llama3_2_3b", "longgen_tiny", "LLAMA3_1_ROPE_SCALING", "LLAMA3_2_ROPE_SCALING"]

#: HF ``rope_scaling`` of Llama-3.1 and Llama-3.2 (config.json), as torchtune's Llama3ScaledRoPE applies it.
LLAMA3_1_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}
LLAMA3_2_ROPE_SCALING = {**LLAMA3_1_ROPE_SCALING, "factor": 32.0}


class HybridDecoder(TransformerDecoder):
    """torchtune's ``TransformerDecoder`` whose forward builds the masks of all layers once (one per distinct
    pattern) and passes them down through each layer's ``mask`` keyword."""

    #: True: forward stops after the final norm and returns the hidden states [B, S, dim], not logits -- for a loss
    #: that applies ``self.output`` itself in chunks (flexgen_long.losses; torchtune 0.6.1's ``set_num_output_chunks``
    #: still makes every chunk's logits inside forward). A mode set by the recipe, like ``set_num_output_chunks``, so
    #: that every wrapper (FSDP2, activation checkpointing, compile) sees the same forward signature.
    skip_output_layer: bool = False
    #: The runtime policy of a forward without caches (its masks' routes: e.g. ``flex_backend``); None: ``Policy()``.
    #: Set by the finetuning recipe; generation passes its own through the engine.
    policy: Policy | None = None

    def forward(self, tokens: Tensor, *, mask: MaskSet | None = None, input_pos: Tensor | None = None,
                doc_ids: Tensor | None = None, kv: KVStep | None = None):
        """tokens [B, S] -> logits [B, S, vocab] (a list with hidden states if ``output_hidden_states`` is set), or
        the final-normed hidden states [B, S, dim] in their place when ``skip_output_layer`` is set.

        ``doc_ids`` [B, S] or [S]: per-token document ids of a packed batch. ``input_pos``: RoPE positions; by default
        0..S-1, or positions within each document when ``doc_ids`` is given. ``mask``: a prebuilt ``MaskSet`` (else
        built here; torchtune's bool masks / BlockMasks are refused: they would override the layer patterns). ``kv``:
        run over KV caches instead (flexgen_long.engine builds the step; its logits are the last token's only when
        the step says so)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq_len], got shape {tuple(tokens.shape)}")
        seq_len = tokens.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(f"seq_len {seq_len} exceeds max_seq_len={self.max_seq_len} (raise max_seq_len in the "
                             "builder; RoPE tables are built up to it)")
        if kv is not None and (mask is not None or doc_ids is not None):
            raise ValueError("a forward over KV caches takes no mask and no doc_ids (prompts are prefilled one "
                             "sequence at a time)")
        if doc_ids is not None:
            check_doc_ids(doc_ids, seq_len, batch=tokens.shape[0])
        h = self.tok_embeddings(tokens)
        if kv is None and mask is None:
            attn = attention_layers(self)
            grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
            mask = MaskSet([a.pattern for a in attn], seq_len, num_heads=attn[0].num_heads,
                           num_kv_heads=attn[0].num_kv_heads, device=tokens.device, doc_ids=doc_ids, grad=grad,
                           dtype=h.dtype, head_dim=attn[0].head_dim, policy=self.policy)
        elif kv is None and not isinstance(mask, MaskSet):
            raise ValueError("mask must be None or a flexgen_long.attention.MaskSet; pass packing as doc_ids "
                             "(torchtune masks would override the per-layer patterns; generation over KV caches goes "
                             f"through flexgen_long.engine), got {type(mask).__name__}")
        elif kv is None and doc_ids is not None:
            raise ValueError("pass doc_ids or a prebuilt MaskSet, not both (the MaskSet already holds its doc_ids)")
        if input_pos is None and mask is not None and mask.doc_ids is not None:
            input_pos = positions_in_documents(mask.doc_ids)

        hidden = []
        for i, layer in enumerate(self.layers):
            if i in self.output_hidden_states:
                hidden.append(h)
            h = layer(h, mask=mask, input_pos=input_pos) if kv is None else kv.layer_fn(layer, h, input_pos, kv)
        if kv is not None and kv.last_only:
            h = h[:, -1:]
        out = self.norm(h) if self.skip_output_layer else self.unembed(h)
        return [*hidden, out] if hidden else out

    def setup_caches(self, *args, **kwargs):
        raise NotImplementedError("torchtune's KVCache keeps every key of every layer; the hybrid model uses compact "
                                  "per-pattern KV caches: flexgen_long.engine.Engine allocates them")


def relayout(model: nn.Module, full_layers="none", sparse_pattern=DEFAULT_SPARSE_PATTERN) -> nn.Module:
    """Give an existing model a new layout in place (``flexgen_long.layout`` rules) and return it. Weights are
    untouched: patterns only decide which keys each query sees, and every forward / cache reads ``attn.pattern``.

    The StreamingLLM baseline is ``relayout(full_model, "none", AttnSink(sink, window))``: a model trained with full
    attention, run with sink + window attention on every layer, so generation keeps a ring cache of sink + window
    keys per layer. Keys keep their absolute RoPE positions (no re-rotation inside the cache, unlike the original
    StreamingLLM), which is what our caches store; positions up to the model's trained length stay in distribution."""
    attn = attention_layers(model)
    for a, pattern in zip(attn, layer_patterns(len(attn), full_layers, sparse_pattern)):
        a.pattern = pattern
    return model


class GateUpFeedForward(FeedForward):
    """torchtune's ``FeedForward`` (same submodules and state-dict keys) whose gate and up projections run as one matrix
    product when ``fuse_projections`` has laid their weights out as row blocks of one matrix (``_w13``) and no gradient
    is being recorded; otherwise exactly torchtune's forward."""

    def forward(self, x: Tensor) -> Tensor:
        w13 = getattr(self, "_w13", None)
        if w13 is None or torch.is_grad_enabled():
            return super().forward(x)
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return self.w2(self.activation(gate) * up)


#: The matrices ``fuse_projections`` makes: buffer name -> the linears whose weights are its row blocks, in order.
FUSED_MATRICES = {"_wqkv": ("q_proj", "k_proj", "v_proj"), "_w13": ("w1", "w3")}


def _plain_weights(linears, what: str) -> None:
    """Refuse weights of a tensor subclass (quantized: flexgen_long.quantize), whose storage cannot be re-pointed."""
    odd = [type(l.weight).__name__ for l in linears if type(l.weight) is not nn.Parameter]
    if odd:
        raise ValueError(f"{what}: the weights are {odd[0]}, not plain parameters (quantized weights cannot be fused "
                         "or unfused: fuse first, then quantize -- flexgen_long.quantize.quantize_weights quantizes "
                         "the fused matrices)")


def _fuse_rows(linears: list[nn.Linear]) -> Tensor:
    """One matrix whose row blocks are the linears' weights, each weight's data re-pointed to its block (the modules,
    parameters and state-dict keys stay; no memory is added once the old storages are freed)."""
    _plain_weights(linears, "fuse_projections")
    fused = torch.cat([l.weight.detach() for l in linears], dim=0)
    row = 0
    for l in linears:
        n = l.weight.shape[0]
        l.weight.data = fused[row: row + n]
        row += n
    return fused


def fuse_projections(model: nn.Module) -> nn.Module:
    """Lay out each layer's q/k/v weights, and its MLP's gate/up weights, as row blocks of one matrix, so that
    inference computes each group with one matrix product (at batch 1 in decode: one larger matrix-vector product in
    place of three, or two, smaller ones). In place; returns the model. Values are unchanged (same weights), outputs
    equal up to the matrix kernels' rounding.

    Inference only: with gradients enabled the layers run the separate projections (so training after fusing still
    trains every weight). The fused parameters share storage, so save checkpoints from an unfused model (safetensors
    refuses shared tensors): ``unfuse_projections`` gives each weight its own storage back. Moving the model to
    another device or dtype afterwards keeps values consistent (the fused matrices are non-persistent buffers and move
    with it) but undoes the sharing: fuse after ``.to()``. Quantize after fusing (``flexgen_long.quantize``: it
    quantizes the fused matrices); quantized weights are refused here."""
    for a in attention_layers(model):
        lin = [a.q_proj, a.k_proj, a.v_proj]
        if any(not isinstance(l, nn.Linear) or l.bias is not None for l in lin):
            raise ValueError("fuse_projections: q/k/v projections must be nn.Linear without bias, got "
                             f"{[type(l).__name__ for l in lin]}")
        a.register_buffer("_wqkv", _fuse_rows(lin), persistent=False)
    for m in list(model.modules()):
        if isinstance(m, FeedForward) and m.w3 is not None:
            if any(not isinstance(l, nn.Linear) or l.bias is not None for l in (m.w1, m.w3)):
                raise ValueError("fuse_projections: MLP gate/up projections must be nn.Linear without bias")
            m.__class__ = GateUpFeedForward
            m.register_buffer("_w13", _fuse_rows([m.w1, m.w3]), persistent=False)
    return model


def unfuse_projections(model: nn.Module) -> nn.Module:
    """Undo ``fuse_projections``: every weight in its own storage again, the fused matrices dropped. Refuses quantized
    weights (reload the model instead)."""
    for m in model.modules():
        for name, linears in FUSED_MATRICES.items():
            if getattr(m, name, None) is not None:
                _plain_weights([getattr(m, ln) for ln in linears], "unfuse_projections")
                for ln in linears:
                    w = getattr(m, ln).weight
                    w.data = w.data.clone()
                if name == "_wqkv":
                    m._wqkv = None  # HybridAttention's own (empty) buffer slot
                else:
                    delattr(m, name)
        if isinstance(m, GateUpFeedForward):
            m.__class__ = FeedForward
    return model


def doc_ids_from_seq_lens(seq_lens) -> Tensor:
    """Per-token document ids [B, S] from torchtune packed datasets' ``seq_lens`` (per sample, the lengths of the
    packed documents, padding included as the last one, summing to the packed length): a list of 1-D int tensors, or
    a 1-D tensor for a single sample."""
    if isinstance(seq_lens, Tensor) and seq_lens.dim() == 1:
        seq_lens = [seq_lens]
    if isinstance(seq_lens, Tensor) and seq_lens.dim() == 2:
        seq_lens = list(seq_lens)
    if not isinstance(seq_lens, (list, tuple)) or not seq_lens:
        raise ValueError(f"seq_lens must be a non-empty list of 1-D integer tensors, got {type(seq_lens).__name__}")
    rows = []
    for i, lens in enumerate(seq_lens):
        lens = torch.as_tensor(lens)
        if lens.dim() != 1 or lens.is_floating_point() or (lens < 0).any():
            raise ValueError(f"seq_lens[{i}] must be a 1-D tensor of non-negative ints, got {lens!r}")
        lens = lens[lens > 0]  # an empty document has no tokens (and would not separate its neighbours)
        rows.append(torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens))
    total = {int(r.numel()) for r in rows}
    if len(total) != 1:
        raise ValueError(f"seq_lens must sum to the same packed length in every sample, got totals {sorted(total)}")
    return torch.stack(rows)


def _rope(head_dim: int, max_seq_len: int, rope_base: float, rope_scaling: Mapping | None) -> nn.Module:
    if rope_scaling is None:
        return RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)
    if not isinstance(rope_scaling, Mapping) or rope_scaling.get("rope_type", rope_scaling.get("type")) != "llama3":
        raise ValueError("rope_scaling must be None or an HF-style dict with rope_type 'llama3' (factor, "
                         f"low_freq_factor, high_freq_factor, original_max_position_embeddings), got {rope_scaling!r}")
    allowed = {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    extra = set(rope_scaling) - allowed
    if extra:
        raise ValueError(f"rope_scaling has unknown keys {sorted(extra)}; allowed: {sorted(allowed)}")
    return Llama3ScaledRoPE(dim=head_dim, max_seq_len=max_seq_len, base=rope_base,
                            scale_factor=rope_scaling.get("factor", 8),
                            low_freq_factor=rope_scaling.get("low_freq_factor", 1),
                            high_freq_factor=rope_scaling.get("high_freq_factor", 4),
                            old_context_len=rope_scaling.get("original_max_position_embeddings", 8192))


def longgen_llama(vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
                  intermediate_dim: int, max_seq_len: int, rope_base: float = 500_000, norm_eps: float = 1e-5, *,
                  full_layers="middle", sparse_pattern=DEFAULT_SPARSE_PATTERN, rope_scaling: Mapping | None = None,
                  tie_word_embeddings: bool = False, head_dim: int | None = None) -> HybridDecoder:
    """A Llama (torchtune's llama2/llama3 structure) whose layers follow a LongGen layout.

    ``full_layers`` / ``sparse_pattern``: see ``flexgen_long.layout``. ``rope_base``: RoPE theta (raise it for length
    extension). ``rope_scaling``: None, or HF's llama3 dict (``LLAMA3_1_ROPE_SCALING``) for Llama-3.1-style scaled
    RoPE. ``tie_word_embeddings``: output projection shares the embedding (Llama-3.2 1B/3B). ``head_dim``: per-head
    size, default ``embed_dim // num_heads`` (HF config.json ``head_dim``; some Llama-family models differ)."""
    for name, val in (("vocab_size", vocab_size), ("num_layers", num_layers), ("num_heads", num_heads),
                      ("num_kv_heads", num_kv_heads), ("embed_dim", embed_dim), ("intermediate_dim", intermediate_dim),
                      ("max_seq_len", max_seq_len), ("head_dim", embed_dim // num_heads if head_dim is None
                                                     else head_dim)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be an int >= 1, got {val!r}")
    if embed_dim % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}), and num_heads by "
                         f"num_kv_heads ({num_kv_heads})")
    patterns = layer_patterns(num_layers, full_layers, sparse_pattern)
    head_dim = embed_dim // num_heads if head_dim is None else head_dim
    rope = _rope(head_dim, max_seq_len, rope_base, rope_scaling)  # one table shared by all layers, as in torchtune
    layers = nn.ModuleList()
    for pattern in patterns:
        attn = HybridAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=False),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
            pos_embeddings=rope, max_seq_len=max_seq_len, pattern=pattern)
        layers.append(HybridLayer(
            attn=attn, mlp=llama3_mlp(dim=embed_dim, hidden_dim=intermediate_dim),
            sa_norm=RMSNorm(dim=embed_dim, eps=norm_eps), mlp_norm=RMSNorm(dim=embed_dim, eps=norm_eps)))
    tok_embeddings = nn.Embedding(vocab_size, embed_dim)
    output = TiedLinear(tok_embeddings) if tie_word_embeddings else nn.Linear(embed_dim, vocab_size, bias=False)
    return HybridDecoder(tok_embeddings=tok_embeddings, layers=layers, max_seq_len=max_seq_len, num_heads=num_heads,
                         head_dim=head_dim, norm=RMSNorm(embed_dim, eps=norm_eps), output=output)


# -- presets: torchtune's shapes (torchtune.models.llama2 / llama3_1 / llama3_2) ------------------------------------------

def longgen_llama2_7b(full_layers="middle", sparse_pattern=DEFAULT_SPARSE_PATTERN, max_seq_len: int = 4096,
                      rope_base: float = 10_000, rope_scaling=None) -> HybridDecoder:
    return longgen_llama(32_000, 32, 32, 32, 4096, 11008, max_seq_len, rope_base, 1e-5, full_layers=full_layers,
                         sparse_pattern=sparse_pattern, rope_scaling=rope_scaling)


def longgen_llama2_13b(full_layers="middle", sparse_pattern=DEFAULT_SPARSE_PATTERN, max_seq_len: int = 4096,
                       rope_base: float = 10_000, rope_scaling=None) -> HybridDecoder:
    return longgen_llama(32_000, 40, 40, 40, 5120, 13824, max_seq_len, rope_base, 1e-5, full_layers=full_layers,
                         sparse_pattern=sparse_pattern, rope_scaling=rope_scaling)


def longgen_llama2_70b(full_layers="middle", sparse_pattern=DEFAULT_SPARSE_PATTERN, max_seq_len: int = 4096,
                       rope_base: float = 10_000, rope_scaling=None) -> HybridDecoder:
    return longgen_llama(32_000, 80, 64, 8, 8192, 28672, max_seq_len, rope_base, 1e-5, full_layers=full_layers,
                         sparse_pattern=sparse_pattern, rope_scaling=rope_scaling)


def longgen_llama3_1_8b(full_layers="middle", sparse_pattern=DEFAULT_SPARSE_PATTERN, max_seq_len: int = 131072,
                        rope_base: float = 500_000, rope_scaling=LLAMA3_1_ROPE_SCALING) -> HybridDecoder:
    return longgen_llama(128_256, 32, 32, 8, 4096, 14336, max_seq_len, rope_base, 1e-5, full_layers=full_layers,
                         sparse_pattern=sparse_pattern, rope_scaling=rope_scaling)


def longgen_llama3_1_70b(full_layers="middle", sparse_pattern=DEFAULT_SPARSE_PATTERN, max_seq_len: int = 131072,
                         rope_base: float = 500_000, rope_scaling=LLAMA3_1_ROPE_SCALING) -> HybridDecoder:
    return longgen_llama(128_256, 80, 64, 8, 8192, 28672, max_seq_len, rope_base, 1e-5, full_layers=full_layers,
                         sparse_pattern=sparse_pattern, rope_scaling=rope_scaling)


def longgen_llama3_2_1b(full_layers="middle", sparse_pattern=DEFAULT_SPARSE_PATTERN, max_seq_len: int = 131072,
                        rope_base: float = 500_000, rope_scaling=LLAMA3_2_ROPE_SCALING) -> HybridDecoder:
    return longgen_llama(128_256, 16, 32, 8, 2048, 8192, max_seq_len, rope_base, 1e-5, full_layers=full_layers,
                         sparse_pattern=sparse_pattern, rope_scaling=rope_scaling, tie_word_embeddings=True)


def longgen_llama3_2_3b(full_layers="middle", sparse_pattern=DEFAULT_SPARSE_PATTERN, max_seq_len: int = 131072,
                        rope_base: float = 500_000, rope_scaling=LLAMA3_2_ROPE_SCALING) -> HybridDecoder:
    return longgen_llama(128_256, 28, 24, 8, 3072, 8192, max_seq_len, rope_base, 1e-5, full_layers=full_layers,
                         sparse_pattern=sparse_pattern, rope_scaling=rope_scaling, tie_word_embeddings=True)


#: tiny's sparse default: small enough that sequences of a few hundred tokens are really sparse.
TINY_SPARSE_PATTERN = AttnSink(sink=4, window=60)


def longgen_tiny(full_layers="middle", sparse_pattern=TINY_SPARSE_PATTERN, max_seq_len: int = 2048,
                 rope_base: float = 10_000, rope_scaling=None, vocab_size: int = 256) -> HybridDecoder:
    """Byte-level toy (vocab 256, 4 layers, dim 64, 4 heads, 2 KV heads, FFN 256; layer 1 full by default): a CPU
    forward+backward takes milliseconds."""
    return longgen_llama(vocab_size, 4, 4, 2, 64, 256, max_seq_len, rope_base, 1e-5, full_layers=full_layers,
                         sparse_pattern=sparse_pattern, rope_scaling=rope_scaling)


# -- any HF Llama-family checkpoint ---------------------------------------------------------------------------------------

def from_hf_config(checkpoint_dir, full_layers="all", sparse_pattern=DEFAULT_SPARSE_PATTERN, *,
                   max_seq_len: int | None = None, rope_base: float | None = None) -> HybridDecoder:
    """The Llama that ``checkpoint_dir/config.json`` describes -- sizes, head_dim, RoPE theta and llama3 scaling,
    tied embeddings, norm eps (``flexgen_long.hf.llama_args``) -- with a LongGen layout on top. Builds the
    architecture only; the recipes load the directory's weights (``flexgen_long.hf.load_hf_state_dict``)::

        model:
          _component_: flexgen_long.models.from_hf_config
          checkpoint_dir: outputs/smollm2-135m-instruct
          full_layers: middle            # default "all": the original model
          sparse_pattern: {_component_: flexgen_long.patterns.AttnSink, sink: 64, window: 448}

    ``max_seq_len`` / ``rope_base``: length-extension overrides of config.json's ``max_position_embeddings`` /
    ``rope_theta`` (None keeps them)."""
    args = hf.llama_args(hf.read_config(checkpoint_dir), f"{checkpoint_dir}/{hf.CONFIG_FILE}")
    if max_seq_len is not None:
        args["max_seq_len"] = max_seq_len
    if rope_base is not None:
        if not isinstance(rope_base, (int, float)) or isinstance(rope_base, bool) or rope_base <= 0:
            raise ValueError(f"rope_base must be a number > 0 (RoPE theta), got {rope_base!r}")
        args["rope_base"] = float(rope_base)
    return longgen_llama(**args, full_layers=full_layers, sparse_pattern=sparse_pattern)


def builder_config(model_cfg: Mapping) -> dict:
    """A model config that needs no other directory: ``from_hf_config`` written out as the ``longgen_llama`` call it
    makes (every size explicit), other configs unchanged. Checkpoints store this, so they rebuild after the base
    model's directory is gone."""
    cfg = dict(model_cfg)
    if cfg.get("_component_") != "flexgen_long.models.from_hf_config":
        return cfg
    d = cfg.pop("checkpoint_dir")
    args = hf.llama_args(hf.read_config(d), f"{d}/{hf.CONFIG_FILE}")
    for key in ("max_seq_len", "rope_base"):
        if cfg.get(key) is not None:
            args[key] = cfg[key]
        cfg.pop(key, None)
    cfg.pop("_component_")
    cfg.setdefault("full_layers", "all")  # from_hf_config's default; longgen_llama's is "middle"
    return {"_component_": "flexgen_long.models.longgen_llama", **args, **cfg}
