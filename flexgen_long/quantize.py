"""Quantized weights for inference, through torchao: ``quantize_weights(model, scheme)`` on a loaded model.

    fuse_projections(model)                  # optional, first: the fused q/k/v and gate/up matrices are quantized
    quantize_weights(model, "int8wo")        # every nn.Linear weight -> int8 with one scale per output row
    weight_bytes(model)                      # the bytes the model's tensors hold, quantized ones as stored

Schemes (``SCHEMES``), all torchao tensor subclasses put in place by ``torchao.quantization.quantize_``:

- ``"int8wo"``: int8 weights, symmetric, one float32 scale per output row (``Int8WeightOnlyConfig(version=2)``:
  ``Int8Tensor``, made from a float32 copy: see ``_quantize_matrix``); the product runs in the activations' dtype. Any
  device and dtype (the meta device too: plans).
- ``"fp8"``: float8 e4m3 weights with one scale per output row, and each token's activations quantized the same way
  at every product (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``: ``torch._scaled_mm``). CUDA
  capability >= (8, 9), bf16 weights, every matrix's sizes multiples of 16.
- ``"int4wo"``: 4-bit weights, asymmetric, one scale and zero per output row and group of input columns
  (``Int4WeightOnlyConfig`` with tinygemm's tile-packed layout: ``aten._weight_int4pack_mm``). CUDA capability >= 8.0,
  bf16 weights; the group is the largest of 128, 64, 32 that divides every matrix's input size, and tinygemm pads
  the input size to a multiple of 1024 (held as padded: ``weight_bytes`` counts it). torchao 0.15 floors its bf16
  scales at 2**-7: a group whose weights span less than 15 * 2**-7 (about 0.12) is rounded with that coarser step.

What is quantized: every ``nn.Linear`` weight -- attention and MLP projections and an untied output layer.
Embeddings, norms and a tied output layer (it is the embedding) keep their dtype. torchao skips a matrix its kernel
cannot take (with a log line); here that is refused before anything changes.

Fused projections (``flexgen_long.models.fuse_projections``): fuse first, then quantize. Each fused matrix is
quantized as one, and each projection's weight becomes a row slice of it (a view: no byte is held twice, and the
original weights are freed). Every scheme's scales belong to one output row, so a row slice of the quantized fused
matrix is exactly the quantization of that projection alone: fused and unfused models compute the same. The fused
matrix is what runs (an int4 slice's scales are not contiguous, which tinygemm's product refuses). Fusing or
unfusing quantized weights is refused.

Inference only: the quantized weights take no gradient, and a forward of the quantized model with gradients enabled
raises (a training step would silently update only the embeddings and norms). Nothing here saves a quantized model:
quantize after loading, on the device the model runs on (moving a quantized model copies each projection's slice
apart from its fused matrix).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# torchao and flexgen_long.models (torchtune) are imported where they are used: the recipes' schemas read SCHEMES
# before anything heavy is imported (--help, config errors).

__all__ = ["SCHEMES", "quantize_weights", "check_scheme", "weight_bytes", "is_quantized", "quantized_matrices",
           "dequantized_transient_bytes"]

#: scheme -> what it stores (the recipes' ``quantize`` field takes these names, or null).
SCHEMES = {
    "int8wo": "int8 weights, one scale per output row",
    "fp8": "float8 e4m3 weights and per-token activations, one scale per row",
    "int4wo": "int4 weights, a scale and zero per row and group of input columns",
}
#: The CUDA capability each CUDA-only scheme needs, and why.
_NEEDS = {"fp8": ((8, 9), "torch._scaled_mm's float8 products need sm_89 or newer"),
          "int4wo": ((8, 0), "tinygemm's int4 kernel needs sm_80 or newer")}
INT4_GROUPS = (128, 64, 32)


def check_scheme(scheme, device, dtype: torch.dtype) -> None:
    """ValueError, one line naming the scheme and why, unless ``scheme`` is None or a name of ``SCHEMES`` that runs
    with weights of ``dtype`` on ``device`` (fp8 and int4wo: CUDA of sufficient capability, bf16)."""
    if scheme is None:
        return
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be None or one of {list(SCHEMES)}, got {scheme!r}")
    if scheme not in _NEEDS:
        return
    (need, why), device = _NEEDS[scheme], torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"scheme {scheme!r} needs a CUDA device of capability >= {need} ({why}); the model is on "
                         f"{device} (int8wo runs on any device)")
    have = torch.cuda.get_device_capability(device)
    if have < need:
        raise ValueError(f"scheme {scheme!r} needs CUDA capability >= {need} ({why}); {device} "
                         f"({torch.cuda.get_device_name(device)}) has {have} (int8wo runs on any device)")
    if dtype != torch.bfloat16:
        raise ValueError(f"scheme {scheme!r} needs bf16 weights (torchao's {scheme} kernels take bf16), the model's "
                         f"are {dtype}")


def _config(scheme: str, group: int | None = None):
    """torchao's config for ``scheme``; ``set_inductor_config=False``: torchao would otherwise change global settings
    of the whole process (Inductor tuning, float32 matmul precision)."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                      Int8WeightOnlyConfig, PerRow)

    if scheme == "int8wo":
        return Int8WeightOnlyConfig(version=2, granularity=PerRow(), set_inductor_config=False)
    if scheme == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)


def _quantized(t) -> bool:
    """Whether ``t`` is a torchao quantized tensor."""
    if not is_traceable_wrapper_subclass(t):
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(t, TorchAOBaseTensor)


def is_quantized(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is a torchao quantized tensor."""
    return any(_quantized(t) for t in (*model.parameters(), *model.buffers()))


def _fused_groups(model: nn.Module) -> list[tuple[nn.Module, str, list[nn.Linear]]]:
    """(module, fused buffer name, the linears whose weights are its row blocks) of every fused matrix."""
    from .models import FUSED_MATRICES

    return [(m, name, [getattr(m, ln) for ln in members]) for m in model.modules()
            for name, members in FUSED_MATRICES.items() if getattr(m, name, None) is not None]


def _refuse_grad(module: nn.Module, args) -> None:
    """The quantized model's forward pre-hook: no forward with gradients enabled."""
    if torch.is_grad_enabled():
        raise RuntimeError("the model's weights are quantized (flexgen_long.quantize), for inference only: run it "
                           "under torch.inference_mode() or torch.no_grad(); a training step would update only the "
                           "embeddings and norms")


def quantize_weights(model: nn.Module, scheme: str | None) -> nn.Module:
    """Quantize every ``nn.Linear`` weight of ``model`` by ``scheme`` (None: nothing; see the module docstring), in
    place, on the model's device; returns the model. A fused model (``fuse_projections``) has its fused matrices
    quantized and each projection's weight re-pointed to its rows. Checks everything before changing anything:
    the scheme, the device and dtype (``check_scheme``), weights already quantized, sizes the scheme's kernel cannot
    take. Registers a forward pre-hook that refuses a forward with gradients enabled."""
    if scheme is None:
        return model
    param = next(model.parameters())
    check_scheme(scheme, param.device, param.dtype)
    if is_quantized(model):
        raise ValueError(f"quantize_weights: the model's weights are quantized already; load it again to quantize "
                         f"it as {scheme!r}")
    groups = _fused_groups(model)
    members = {id(lin) for _, _, lins in groups for lin in lins}
    plain = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in members]
    names = {id(m): n for n, m in model.named_modules()}
    targets = [(f"{names[id(m)]}.{b}", getattr(m, b).shape, [lin.weight.shape[0] for lin in lins])
               for m, b, lins in groups] + [(f"{n}.weight", m.weight.shape, None) for n, m in plain]
    config = _config(scheme, _check_sizes(scheme, targets))

    for m, buffer, lins in groups:  # each fused matrix quantized whole, its projections pointed at its rows
        fused = _quantize_matrix(getattr(m, buffer), scheme, config)
        setattr(m, buffer, fused)
        row = 0
        for lin in lins:
            n = lin.weight.shape[0]
            lin.weight = nn.Parameter(fused[row: row + n], requires_grad=False)
            row += n
    for _, lin in plain:  # one matrix at a time: the transient copies stay one matrix large
        lin.weight = nn.Parameter(_quantize_matrix(lin.weight, scheme, config), requires_grad=False)
    model.register_forward_pre_hook(_refuse_grad)
    return model


def _quantize_matrix(w: Tensor, scheme: str, config) -> Tensor:
    """``w`` [out, in] quantized by ``torchao.quantization.quantize_`` with ``config`` (as the weight of a bias-free
    linear), as a plain tensor subclass (no Parameter). int8wo quantizes a float32 copy: torchao 0.15's ``Int8Tensor``
    clamps its scales at the eps of the weight's dtype, 2**-7 for bf16, which would leave rows whose largest weight is
    below 1 (most rows of an LLM) with a small part of the int8 range; its scales are then float32 and its products
    still run in the activations' dtype. torchao skips a matrix its kernel cannot take (``_check_sizes`` refuses those
    first): refused here too."""
    from torchao.quantization import quantize_

    shell = nn.Linear(1, 1, bias=False, device="meta")
    shell.weight = nn.Parameter(w.detach().float() if scheme == "int8wo" else w.detach(), requires_grad=False)
    quantize_(shell, config)
    if not _quantized(shell.weight):
        raise RuntimeError(f"quantize_weights: torchao left a [{w.shape[0]}, {w.shape[1]}] matrix unquantized under "
                           f"{scheme!r}")
    return shell.weight.detach()


def _check_sizes(scheme: str, targets: list[tuple[str, torch.Size, list[int] | None]]) -> int | None:
    """ValueError naming the first matrix the scheme's kernel cannot take (torchao would skip it); for int4wo returns
    the group size (the largest of ``INT4_GROUPS`` dividing every input size)."""
    if scheme == "fp8":
        for name, (n, k), _ in targets:
            if n % 16 or k % 16:
                raise ValueError(f"scheme 'fp8' needs every matrix's sizes to be multiples of 16 (torch._scaled_mm); "
                                 f"{name} is [{n}, {k}]")
    if scheme != "int4wo":
        return None
    for name, _, rows in targets:  # tinygemm packs 8 output rows together: a fused matrix is sliced at multiples of 8
        if rows is not None and any(r % 8 for r in rows):
            raise ValueError(f"scheme 'int4wo' slices the fused matrix {name} into rows {rows}: each must be a "
                             "multiple of 8 (tinygemm packs 8 rows together); quantize the unfused model")
    ins = {k for _, (_, k), _ in targets}
    for group in INT4_GROUPS:
        if all(k % group == 0 for k in ins):
            return group
    name, (n, k), _ = next(t for t in targets if t[1][1] % INT4_GROUPS[-1])
    raise ValueError(f"scheme 'int4wo' needs every matrix's input size to be a multiple of {INT4_GROUPS[-1]} (its "
                     f"group); {name} is [{n}, {k}]")


def quantized_matrices(model: nn.Module) -> list[str]:
    """Names of the quantized matrices ``model`` holds, each once (a fused matrix by its buffer, not its slices)."""
    seen, out = set(), []
    for name, t in (*model.named_buffers(), *model.named_parameters()):
        if _quantized(t):
            key = _storages(t)[0]
            if id(key) not in seen:
                seen.add(id(key))
                out.append(name)
    return out


def _storages(t: Tensor) -> list:
    """The untyped storages under ``t``: its own, or its inner tensors' for a tensor subclass (recursively)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [s for n in names if getattr(t, n) is not None for s in _storages(getattr(t, n))]
    return [t.untyped_storage()]


def weight_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes the parameters and buffers of ``model`` hold (weights, the RoPE table), each storage counted once: a
    fused matrix and its projections' row slices, tied weights, a quantized tensor's data and scales as stored. With
    ``dtype``, plain floating-point tensors are counted as if in ``dtype`` (a model built on the meta device in
    fp32 and planned in bf16); quantized tensors always as held."""
    held = {}  # id(storage) -> bytes; the storages are kept alive in `keep`, so ids stay distinct
    keep = []
    for t in (*model.parameters(), *model.buffers()):
        plain = not is_traceable_wrapper_subclass(t)
        for s in _storages(t):
            keep.append(s)
            n = s.nbytes()
            if plain and dtype is not None and t.is_floating_point():
                n = n // t.element_size() * torch.empty((), dtype=dtype).element_size()
            held[id(s)] = n
    return sum(held.values())


def dequantized_transient_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """The largest transient a quantized matrix product allocates beyond its output: an int8wo product converts the
    whole int8 matrix to the activations' ``dtype`` first (torchao ``Int8Tensor``'s weight-only linear), so its
    largest matrix in ``dtype``; 0 for unquantized models and the other schemes (their kernels read the quantized
    data). The memory plan adds it to the activations' peak."""
    quantized = [t for t in (*model.parameters(), *model.buffers()) if _quantized(t)]
    if not quantized:
        return 0
    from torchao.quantization import Int8Tensor

    sizes = [t.numel() for t in quantized if isinstance(t, Int8Tensor) and t.act_quant_kwargs is None]
    return max(sizes, default=0) * torch.empty((), dtype=dtype).element_size()
