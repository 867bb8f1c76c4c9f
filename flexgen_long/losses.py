"""Cross-entropy over the vocabulary without the whole [tokens, vocab] logits: the output projection and the loss,
a chunk of tokens at a time, each chunk recomputed in backward.

Why our own: at long context the loss head, not the layers, sets the finetuning peak. torchtune 0.6.1 (the version
this project is pinned to) has only ``CEWithChunkedOutputLoss``, which takes logits: the model's ``chunked_output``
makes every chunk's logits up front (at 128K tokens x 128,256 ids, 33.6 GB in bf16, all alive at once) and each
chunk's fp32 log-softmax is saved for backward. Newer torchtune has ``LinearCrossEntropyLoss`` (the projection inside
the loss); 0.6.1 has nothing of the kind, hence this module. Use it in a recipe config::

    loss:
      _component_: flexgen_long.losses.ChunkedLinearCrossEntropy
      num_chunks: 32

The recipe then calls ``loss.set_model_output(model)``: the model (``flexgen_long.models.HybridDecoder``) returns its
final-normed hidden states instead of logits, and the loss applies the model's own output module -- ``model.output``,
an ``nn.Linear`` or torchtune's ``TiedLinear`` over the embedding -- to one chunk at a time. Each chunk runs under
``torch.utils.checkpoint`` (non-reentrant): forward keeps only the chunk's input (a view of the hidden states, which
the final norm's output holds anyway) and drops its logits; backward recomputes them. What is alive at once is one
chunk's logits, their fp32 copy / log-softmax and gradients -- not every chunk's.

Under FSDP2 (the recipe's world size > 1): the output module belongs to the root unit, which the recipe's
``shard_model`` reshards after forward (torchtune passes ``reshard_after_forward=True``, which torch honours for the
root too). Calling ``model.output`` after the model's forward would then meet a sharded DTensor weight and fail
("mixed torch.Tensor and DTensor"). So the recipe keeps the root gathered after its forward
(``model.set_reshard_after_forward(False, recurse=False)``), as torchtune does for its own linear cross-entropy
(https://github.com/meta-pytorch/torchtune/pull/2800): the loss's calls -- once per chunk in forward, and again per
chunk when backward recomputes it -- then all read the same gathered weight, whose gradient accumulates in the
gathered parameter until the root's post-backward reduce-scatters it at the end of backward. The cost is the root's
gathered parameters (embeddings, final norm, output) during the loss. The loss calls the output module and never reads
its ``.weight`` itself, so that a TiedLinear still reaches the embedding's current (gathered) parameter, and an output
made an FSDP2 unit of its own (torchtune's ``custom_sharded_layers``; not this recipe's sharding) would be gathered by
its own pre-forward hook at each call -- a unit called once per chunk and again per recompute, which is not checked
here. Checked on the CPU (tests/test_losses.py): over a fake process group (without the root kept gathered the loss
fails as above) and in a real two-process run of the recipe (gloo), whose losses and gradient norms equal those of
CEWithChunkedOutputLoss; not yet on GPUs (NCCL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .data import CROSS_ENTROPY_IGNORE_INDEX

__all__ = ["ChunkedLinearCrossEntropy"]


class ChunkedLinearCrossEntropy(nn.Module):
    """Mean cross-entropy over the tokens whose label is not ``ignore_index`` (-100, ``flexgen_long.data``'s
    convention), computed from the final-normed hidden states [B, S, D] and the model's output projection in
    ``num_chunks`` chunks of tokens -- the same value and gradients as ``torch.nn.CrossEntropyLoss`` (mean) on the
    full logits, upcast to fp32, and as torchtune's ``CEWithChunkedOutputLoss``. A batch without any trained token
    gives 0 (those give NaN), still through every chunk, so that each rank of a sharded run calls the output module
    as often as the others.

    Call ``set_model_output(model)`` once before the first forward (the finetuning recipe does)."""

    def __init__(self, num_chunks: int = 8, ignore_index: int = CROSS_ENTROPY_IGNORE_INDEX):
        super().__init__()
        if not isinstance(num_chunks, int) or isinstance(num_chunks, bool) or num_chunks < 1:
            raise ValueError(f"config field 'loss.num_chunks': must be an int >= 1 (chunks of tokens the logits are "
                             f"made in; e.g. 32 at 128K tokens), got {num_chunks!r}")
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise ValueError(f"config field 'loss.ignore_index': must be an int (the label of untrained tokens; the "
                             f"recipe's data uses {CROSS_ENTROPY_IGNORE_INDEX}), got {ignore_index!r}")
        self.num_chunks = num_chunks
        self.ignore_index = ignore_index
        # The model's output module, kept outside nn.Module's registry: its parameters are the model's (trained,
        # sharded and saved there); registered here they would also appear in this loss's parameters and state dict.
        # TiedLinear is not even an nn.Module.
        self.__dict__["_projection"] = None

    def set_model_output(self, model: nn.Module) -> None:
        """Make ``model`` return its final-normed hidden states (``skip_output_layer``) and project them here with its
        own ``model.output``."""
        if not hasattr(model, "skip_output_layer") or not hasattr(model, "output"):
            raise ValueError("config field 'loss._component_': flexgen_long.losses.ChunkedLinearCrossEntropy needs a "
                             "model built by flexgen_long.models (a HybridDecoder, which can return its hidden states "
                             f"before the output projection), got {type(model).__name__}")
        model.skip_output_layer = True
        self.__dict__["_projection"] = model.output

    def chunk_loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Summed cross-entropy of one chunk: hidden [N, D], labels [N] -> a scalar. Its logits are temporaries: under
        the chunk's checkpoint none of them is kept for backward."""
        return self.cross_entropy(self._projection(hidden), labels)

    def cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Summed cross-entropy of logits [N, V] upcast to fp32 (kept when wider, e.g. fp64). Apart from the
        projection so that ``compile: true`` can compile this part alone, as torchtune compiles
        ``CEWithChunkedOutputLoss.compute_cross_entropy`` (the upcast fused into the log-softmax)."""
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels,
                               ignore_index=self.ignore_index, reduction="sum")

    def forward(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """hidden [B, S, D] (the model's final-normed hidden states), labels [B, S] -> the mean loss over the tokens
        whose label is not ``ignore_index``."""
        if self._projection is None:
            raise RuntimeError("ChunkedLinearCrossEntropy.set_model_output(model) must be called before the first "
                               "forward (recipes/longgen_finetune.py does it when the config's loss is this one)")
        if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
            raise ValueError(f"hidden states must be [batch, seq_len, dim] and labels [batch, seq_len], got "
                             f"{tuple(hidden.shape)} and {tuple(labels.shape)} (does the model return hidden states? "
                             "set_model_output sets model.skip_output_layer)")
        hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        count = (labels != self.ignore_index).sum()
        total = None
        # tensor_split: num_chunks pieces whose sizes differ by at most one token, any length (torch.chunk would
        # make fewer, uneven ones when num_chunks does not divide it); with fewer tokens than chunks, one per token.
        n = min(self.num_chunks, len(labels))
        for h, y in zip(hidden.tensor_split(n), labels.tensor_split(n)):
            part = checkpoint(self.chunk_loss, h, y, use_reentrant=False)
            total = part if total is None else total + part
        return total / count.clamp(min=1)  # no trained token: total is 0, and stays a graph of every chunk
