"""LongGen length-extension finetuning (Ge et al., ICLR 2025): one light training stage that both extends a pretrained
Llama's context (e.g. 4K -> 128K, with a larger RoPE base) and converts it into the hybrid architecture -- full
attention in the middle third of the layers, a sparse pattern (AttnSink or BlockSparse) in the others.

Run from the repository root::

    tune run recipes/longgen_finetune.py --config recipes/configs/tiny_longgen.yaml [key=value ...]
    tune run recipes/longgen_finetune.py --config recipes/configs/smollm2_135m_longgen_cpu.yaml   # real weights, CPU
    tune run --nproc_per_node 8 recipes/longgen_finetune.py --config recipes/configs/llama2_7b_longgen_128k.yaml

Per step: ``gradient_accumulation_steps`` micro-batches of ``batch_size`` packed sequences of ``seq_len`` tokens
(documents kept apart by ``doc_ids``), the loss summed over their trained tokens and normalised by their count,
gradient clipping, an optimizer step and a warmup + cosine LR step. Every ``checkpoint.save_every_n_steps`` steps and at
the end (unless ``checkpoint.save_final: false``, for speed benchmarks): an HF-format checkpoint plus the recipe
state, written atomically (flexgen_long.checkpoint_io). With
``checkpoint.resume: true`` the run continues from the latest checkpoint in ``output_dir`` on the same loss curve as an
uninterrupted run (weights, optimizer, LR schedule, data position and RNG are restored), after checking that the model
and data config are the ones that checkpoint was trained with.

Nothing is lost: the whole config is checked against ``FinetuneConfig`` (every key, its type, range and meaning:
``--help``) before anything is built, read or written; ``output_dir`` is locked for the run (a second job in it is
refused, naming the first) and test-written before any data or weights are read; a fresh run refuses a non-empty
``output_dir`` unless ``checkpoint.resume: true`` or ``checkpoint.overwrite: true`` says what to do with what is there,
and a run deletes only checkpoints it wrote itself. A step whose loss or gradient norm is not finite stops the run
before its update (``on_nonfinite: skip`` skips the update instead); Ctrl-C or SIGTERM stops it with one line naming
the step, the last complete checkpoint and the command that continues (exit code 130).

Pretrained weights come from ``checkpoint.base_dir``, any HF Llama-family directory, read and checked by
flexgen_long.hf; the model section must have its sizes (``flexgen_long.models.from_hf_config`` reads them from the same
directory) and the tokenizer must fit its vocabulary -- both checked before any weights or data are loaded.

``model.full_layers: retrieval`` (``retrieval:<n>``, ``retrieval:<f>``) puts the full layers on the base model's
strongest retrieval heads: after output_dir is claimed, ``checkpoint.base_dir`` is scored once (flexgen_long.retrieval;
sized by the optional ``retrieval_scoring`` section), the ranking logged and written to ``output_dir/full_layers.json``,
and the chosen list stored in every checkpoint, from which a resumed run takes it.

On several GPUs (torchrun sets WORLD_SIZE > 1) the model is sharded with FSDP2 (torchtune.training.shard_model), one
shard per transformer layer; each rank reads its own slice of every batch.
"""

import json
import math
import os
import random
import resource
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import training, utils
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.recipe_interfaces import FTRecipeInterface

from flexgen_long import checkpoint_io as ckpt
from flexgen_long import cli, hf
from flexgen_long import recipe_config as rc
from flexgen_long import retrieval, train_plan
from flexgen_long.data import CROSS_ENTROPY_IGNORE_INDEX
from flexgen_long.losses import ChunkedLinearCrossEntropy
from flexgen_long.models import builder_config
from flexgen_long.policy import Policy
from flexgen_long.recipe_config import REQUIRED, Component, key, section

log = utils.get_logger("INFO")
_fail = rc.fail



@dataclass(kw_only=True)
class CheckpointConfig:
    base_dir: Optional[str] = key(None, "an HF model directory (config.json + *.safetensors) to start from; null: "
                                        "random init")
    resume: bool = key(False, "continue from the latest checkpoint in output_dir (same model, data and batches)")
    overwrite: bool = key(False, "delete output_dir's step_<N> checkpoints and start from step 0")
    save_every_n_steps: Optional[int] = key(None, "a checkpoint every N steps; null: only at the end", min=1)
    keep_last_n: Optional[int] = key(None, "keep this run's last N checkpoints; null: all", min=1)
    save_final: bool = key(True, "a checkpoint at the end (false: speed benchmarks)")


@dataclass(kw_only=True)
class RetrievalScoringConfig:
    """Scoring the base model's heads for ``model.full_layers: retrieval`` (flexgen_long.retrieval)."""
    length: Optional[int] = key(None, "scoring prompt length in tokens; null: the scoring's default", min=128)
    samples_per_depth: int = key(8, "scoring prompts per needle depth", min=1)
    batch_size: int = key(8, "scoring prompts per forward pass", min=1)


@dataclass(kw_only=True)
class FinetuneConfig(rc.RuntimeKeys):
    """The recipe's keys: the one source of its checks, its --help and its documentation."""
    output_dir: str = key(REQUIRED, "where the checkpoints go; locked for the run")
    seq_len: int = key(REQUIRED, "packed training length (tokens), at most the model's max_seq_len", min=2)
    model: Component = key(REQUIRED, "the model builder (flexgen_long.models.*): sizes, max_seq_len, rope_base, "
                                     "full_layers, sparse_pattern")
    tokenizer: Component = key(REQUIRED, rc.TOKENIZER_HELP)
    dataset: Component = key(REQUIRED, "flexgen_long.data.long_documents (source, max_tokens, synthetic_share, ...) "
                                       "or hf_long_documents", positional=2)
    seed: Optional[int] = key(0, "seeds weights, data order and sampling; null: torchtune draws one",
                              min=0, max=2**32 - 1)
    batch_size: int = key(REQUIRED, "sequences per micro-batch per GPU", min=1)
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step", min=1)
    max_steps: int = key(REQUIRED, "optimizer steps of the whole run (a resumed run continues to it)", min=1)
    optimizer: Component = key(REQUIRED, "torch.optim.AdamW (lr, betas, weight_decay) or torchao.optim.AdamW8bit",
                               positional=1)
    lr_scheduler: Component = key(REQUIRED, "torchtune's get_cosine_schedule_with_warmup (num_warmup_steps)",
                                  positional=1, passed={"num_training_steps": "max_steps"})
    clip_grad_norm: Optional[float] = key(None, "gradient clipping's max norm; null: no clipping", above=0)
    on_nonfinite: Literal["stop", "skip"] = key("stop", "a step whose loss or gradient norm is NaN or Inf: stop the "
                                                        "run there, or skip its update")
    loss: Component = key({"_component_": "torch.nn.CrossEntropyLoss"}, "torch.nn.CrossEntropyLoss, torchtune's "
                          "CEWithChunkedOutputLoss or flexgen_long.losses.ChunkedLinearCrossEntropy")
    checkpoint: CheckpointConfig = section(CheckpointConfig)
    retrieval_scoring: RetrievalScoringConfig = section(RetrievalScoringConfig)
    compile: bool = key(False, "torch.compile each layer and the loss")
    flex_backend: Optional[Literal["triton", "flash"]] = key(None, "compiled flex's kernels: triton, flash "
                                                                   "(flash-attn-4, the flash extra, sm90+); null: "
                                                                   "FLASH where it imports, else Triton")
    enable_activation_checkpointing: bool = key(False, "recompute each layer's activations in backward")
    fsdp_cpu_offload: bool = key(False, "FSDP2: parameters and optimizer states on the CPU (several GPUs)")
    metric_logger: Component = key({"_component_": "torchtune.training.metric_logging.StdoutLogger"},
                                   "torchtune's StdoutLogger (stdout), DiskLogger (log_dir), ...")
    log_every_n_steps: int = key(1, "a metrics line every N steps (and at the first and last)", min=1)
    log_peak_memory_stats: bool = key(True, "add peak memory (RSS on a CPU) to the metrics")


def validate_config(cfg: DictConfig) -> None:
    """Every field that needs no model, before anything is built, read or written: the schema (unknown keys, types
    and ranges; each _component_ section against its component's signature; defaults filled in), the device, then a
    dry run of the optimizer, LR schedule and loss on one dummy parameter (their own range checks), the data source
    and packing arguments, and the paths the run will read (base model, tokenizer file)."""
    rc.check(cfg, FinetuneConfig)
    if cfg.checkpoint.resume and cfg.checkpoint.overwrite:
        _fail("checkpoint.overwrite", "is true together with checkpoint.resume=true: choose one (resume continues from "
                                      "the latest checkpoint in output_dir; overwrite deletes its checkpoints and "
                                      "starts from step 0)")
    base = cfg.checkpoint.base_dir
    if base is not None:
        d = rc.existing_dir("checkpoint.base_dir", base, "an HF model directory (config.json + *.safetensors), or "
                                                          "null for random init")
        if not (d / hf.CONFIG_FILE).is_file():
            _fail("checkpoint.base_dir", f"{base!r} has no {hf.CONFIG_FILE} (expected an HF model directory)")
        rc.hf_dir("checkpoint.base_dir", base)  # config.json parses and is a Llama's; weight files are there
    warmup = rc.get(cfg, "lr_scheduler.num_warmup_steps", 0)  # (its type: the schedule's signature, int)
    if isinstance(warmup, int) and warmup < 0:
        _fail("lr_scheduler.num_warmup_steps", f"must be an int >= 0, got {warmup}")
    if "path" in cfg.tokenizer:
        rc.existing_file("tokenizer.path", rc.get(cfg, "tokenizer.path"), "the tokenizer's model file")
    rc.check_hf_sections(cfg)  # from_hf_config's and hf_tokenizer's directories
    retrieval.check_config(cfg)  # model.full_layers: retrieval needs a base model to score
    try:  # flex_backend=flash where flash-attn-4 cannot run
        Policy(flex_backend=cfg.flex_backend).on(rc.device_field(cfg))
    except ValueError as e:
        _fail("flex_backend", str(e).removeprefix("Policy.flex_backend="))
    _check_dataset(cfg, cfg.seq_len)
    # Dry runs on one dummy CPU parameter: the components' own range checks (e.g. "Invalid learning rate: -1"), in
    # microseconds, instead of after the data and the model are ready. (CPU: a CUDA tensor here would open a context
    # on GPU 0 in every rank before torchrun's ranks pick their GPUs; AdamW's fused=True is accepted on CPU too.)
    dummy = [nn.Parameter(torch.zeros(1))]
    optimizer = rc.instantiate("optimizer", cfg.optimizer, dummy)
    rc.instantiate("lr_scheduler", cfg.lr_scheduler, optimizer, num_training_steps=cfg.max_steps)
    rc.instantiate("loss", cfg.loss)


def _check_dataset(cfg: DictConfig, seq_len: int) -> None:
    """The packing arguments (flexgen_long.data's own checks) and, for local files, that the source exists."""
    from flexgen_long import data

    args = {k: rc.get(cfg, f"dataset.{k}") for k in cfg.dataset.keys() if k != "_component_"}
    args = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in args.items()}  # as instantiated
    component = rc.get(cfg, "dataset._component_")
    defaults = {"max_tokens": None, "synthetic_share": 0.0, "synthetic_length": None,
                "synthetic_tasks": ("passkey", "multikey_needle")}
    try:
        data.check_packing_args(seq_len, *(args.get(k, v) for k, v in defaults.items()))
    except ValueError as e:  # its messages name the dataset.<field>
        raise rc.ConfigError(str(e)) from None
    if component == "flexgen_long.data.long_documents":
        data.text_files(args.get("source", data.PYTHON_STDLIB))
        m = args.get("min_document_tokens")
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 2):
            _fail("dataset.min_document_tokens", f"must be null (one file = one document) or an int >= 2 (consecutive "
                                                 f"files joined into documents of at least that many tokens), got {m!r}")
        if args.get("on_invalid_utf8", "error") not in data.ON_INVALID_UTF8:
            _fail("dataset.on_invalid_utf8", f"must be one of {list(data.ON_INVALID_UTF8)}, got "
                                             f"{args['on_invalid_utf8']!r}")


def validate_model(model: nn.Module, cfg: DictConfig) -> None:
    """Checks that need the model (built on the meta device: no memory, any size): the training length against the
    model's RoPE setting, every sparse layer's pattern against the training length, and the base checkpoint's shape
    (its config.json) against the model's (``flexgen_long.hf.check_model``; RoPE settings and max_seq_len may differ:
    changing them is what length extension does)."""
    seq_len = cfg.seq_len
    for layer in model.layers:  # RoPE theta: a non-positive or non-finite base gives NaN angles, and NaN losses
        base = getattr(getattr(layer.attn, "pos_embeddings", None), "base", 1.0)
        if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 0):
            _fail("model.rope_base", f"must be a number > 0, got {base!r}")
    if seq_len > model.max_seq_len:
        _fail("seq_len", f"{seq_len} exceeds model.max_seq_len={model.max_seq_len}, the length the model's RoPE is "
                         "set up for; raise model.max_seq_len (and model.rope_base for length extension) or lower "
                         "seq_len")
    last = torch.tensor([seq_len - 1])
    for i, layer in enumerate(model.layers):
        p = layer.attn.pattern.bind_heads(layer.attn.num_kv_heads)
        if p.is_full:
            continue
        block = getattr(p, "block", None)  # a pattern laid out in whole blocks (BlockSparse)
        if block is not None and seq_len % block:
            _fail("model.sparse_pattern", f"{p!r} of layer {i}: its block={block} must divide seq_len={seq_len} "
                                          "(the pattern is laid out in whole blocks)")
        if all(int(p.row_count(last, h)) == seq_len for h in range(layer.attn.num_kv_heads)):
            _fail("model.sparse_pattern", f"{p!r} of layer {i} sees every key of a seq_len={seq_len} sequence: the "
                                          "layer would be full attention; make the pattern sparser (a smaller "
                                          "window or fewer local blocks), or use model.full_layers=all for a "
                                          "full-attention model")
    base = rc.get(cfg, "checkpoint.base_dir", None)
    if base is not None:  # the base checkpoint's sizes (its config.json) against the model's, before any weights
        try:
            hf.check_model(model, hf.read_config(base), Path(base) / hf.CONFIG_FILE)
        except hf.CheckpointError as e:
            raise rc.ConfigError(str(e)) from None  # it names the section, the file and every differing field


def recipe_identity(cfg: DictConfig, world_size: int) -> dict:
    """What a resumed run must keep equal besides the model: the data (and its tokenizer), the training length and
    the batch geometry that fixes the data position. Stored in every checkpoint's config.json."""
    return {"seq_len": cfg.seq_len, "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
            "tokenizer": OmegaConf.to_container(cfg.tokenizer, resolve=True), "batch_size": cfg.batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "seed": cfg.seed,
            "world_size": world_size}


def _flatten(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def check_resume_matches(saved: dict, path: Path, model_cfg: dict, recipe: dict) -> None:
    """Refuse to resume from ``path`` (its config.json ``flexgen_long`` section ``saved``) with a model or data config
    that differs from the one it was trained with, naming every differing key."""
    diffs = []
    for name, now, then in (("model", model_cfg, saved.get("model")), ("", recipe, saved.get("recipe"))):
        if then is None:
            continue  # written before the recipe recorded it: recipe_state.pt's checks still apply
        a, b = _flatten(json.loads(json.dumps(then))), _flatten(json.loads(json.dumps(now)))
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                key = f"{name}.{k}" if name else ("nproc_per_node" if k == "world_size" else k)
                diffs.append(f"{key}: {a.get(k, '<absent>')!r} in {path.name}, {b.get(k, '<absent>')!r} now")
    if diffs:
        raise rc.ConfigError(
            f"config field 'checkpoint.resume': {path} was trained with a different config; resuming would continue "
            f"another run's weights and data position under this one. Differences: {'; '.join(diffs)}. Keep those "
            "fields as they were, or start a fresh run in another output_dir (or checkpoint.overwrite=true)")


class LongGenFinetuneRecipe(FTRecipeInterface):
    def __init__(self, cfg: DictConfig) -> None:
        validate_config(cfg)  # includes the device: utils.get_device("cuda") falls back to the CPU without a word
        self._device = utils.get_device(cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        self._world_size, self._rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self._rank == 0
        self._output_dir = Path(cfg.output_dir)
        self._seq_len = cfg.seq_len
        self._batch_size = cfg.batch_size
        self._accum = cfg.gradient_accumulation_steps
        self._max_steps = cfg.max_steps
        self._clip, self._on_nonfinite = cfg.clip_grad_norm, cfg.on_nonfinite
        self._log_every = cfg.log_every_n_steps
        self._log_memory = cfg.log_peak_memory_stats
        ck = cfg.checkpoint
        self._save_every, self._keep_last, self._save_final = ck.save_every_n_steps, ck.keep_last_n, ck.save_final
        self._resume, self._overwrite, self._base_dir = ck.resume, ck.overwrite, ck.base_dir
        self._lock = None  # the output_dir's lock (rank 0), taken in setup
        self._claimed = False  # output_dir claimed: from then on, an interrupt leaves something to resume
        self.written: list[Path] = []  # checkpoints this run wrote, in order
        self._seed = training.set_seed(cfg.seed)
        self.global_step = 0  # optimizer steps done
        self._micro_batches = 0  # micro-batches consumed (per rank): the data position

    # -- setup ----------------------------------------------------------------------------------------------------------
    def setup(self, cfg: DictConfig) -> None:
        # Validate the model shape and patterns on the meta device first: errors before any weights or data exist.
        # (full_layers: retrieval is chosen after output_dir is claimed; until then as many full layers in the middle)
        with torch.device("meta"):
            meta_model = rc.instantiate("model", retrieval.provisional_model_cfg(cfg.model))
        validate_model(meta_model, cfg)
        vocab_size = meta_model.tok_embeddings.num_embeddings
        if self._is_rank_zero:  # the estimate `python recipes/longgen_plan.py` prints whole, beside the logged peaks
            log.info(train_plan.headline(cfg, meta_model, self._world_size, self._device))
        del meta_model
        # The tokenizer is the last thing checked before output_dir is claimed: its ids must fit the model's
        # vocabulary (a real model's tokenizer is read from its directory; loading it takes a moment, not minutes).
        self._tokenizer = rc.instantiate("tokenizer", cfg.tokenizer)
        rc.tokenizer_fits(self._tokenizer, vocab_size)

        # Claim output_dir before anything is written: one job per directory (a lock), and a fresh run refuses a
        # directory that holds anything unless told to resume from it or to overwrite it (flexgen_long.checkpoint_io).
        if self._is_rank_zero:
            self._lock = ckpt.claim_output_dir(self._output_dir, resume=self._resume, overwrite=self._overwrite,
                                               log=log.info)
            ckpt.check_writable(self._output_dir)  # a full or read-only disk fails now, not at the first save
        if self._world_size > 1:
            dist.barrier()
        self._claimed = True
        resume_from = ckpt.latest_checkpoint(self._output_dir) if self._resume else None
        if resume_from is not None:
            self._verify_checkpoint(resume_from)  # before anything reads it
        choice = self._choose_full_layers(cfg, resume_from)
        # saved in every checkpoint's config.json and compared on resume; from_hf_config is written out in full, so
        # that a checkpoint rebuilds without the base model's directory
        self._model_cfg = builder_config(OmegaConf.to_container(cfg.model, resolve=True))
        self._recipe_identity = recipe_identity(cfg, self._world_size)
        if choice is not None:
            self._recipe_identity[retrieval.CHECKPOINT_KEY] = choice.to_dict()
        if resume_from is not None:  # before data and weights: a mismatch is refused in a second, not minutes
            saved = hf.read_config(resume_from).get("flexgen_long", {})
            check_resume_matches(saved, resume_from, self._model_cfg, self._recipe_identity)
        elif self._resume and self._is_rank_zero:
            log.info(f"checkpoint.resume=true but {self._output_dir} holds no checkpoint yet: starting from step 0")

        self._metric_logger = rc.instantiate("metric_logger", cfg.metric_logger) if self._is_rank_zero else None
        self._cfg = cfg  # saved into output_dir when training starts (save_config)
        self._dataset = rc.instantiate("dataset", cfg.dataset, self._tokenizer, self._seq_len)
        per_epoch = len(self._dataset) // (self._batch_size * self._world_size)
        if per_epoch < 1:
            _fail("batch_size", f"{self._batch_size} x {self._world_size} rank(s) exceeds the dataset's "
                                f"{len(self._dataset)} sequences of seq_len={self._seq_len}")
        self._batches_per_epoch = per_epoch

        self._model = self._setup_model(cfg)
        self._optimizer = rc.instantiate("optimizer", cfg.optimizer, self._model.parameters())
        self._lr_scheduler = rc.instantiate("lr_scheduler", cfg.lr_scheduler, self._optimizer,
                                            num_training_steps=self._max_steps)
        self._loss_fn = rc.instantiate("loss", cfg.loss)
        if hasattr(self._loss_fn, "num_output_chunks"):  # torchtune's CEWithChunkedOutputLoss: no [S, V] fp32 logits
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
        if isinstance(self._loss_fn, ChunkedLinearCrossEntropy):  # no logits beyond one chunk's (flexgen_long.losses)
            self._loss_fn.set_model_output(self._model)  # the model returns its final-normed hidden states
            if self._world_size > 1:
                # The loss calls model.output after the model's forward (per chunk, and again per chunk when backward
                # recomputes it). The output belongs to FSDP2's root unit, resharded after forward by default: keep
                # the root gathered through the loss instead (what torchtune does for its linear cross-entropy), or
                # the loss would meet a sharded DTensor weight. Its post-backward still reduce-scatters and reshards.
                self._model.set_reshard_after_forward(False, recurse=False)
        if cfg.compile:
            if isinstance(self._loss_fn, ChunkedLinearCrossEntropy):  # the upcast + cross-entropy, not the chunking
                self._loss_fn.cross_entropy = torch.compile(  # torchtune's compile_loss reads the same variable
                    self._loss_fn.cross_entropy, backend=os.environ.get("TORCH_COMPILE_BACKEND", "inductor"))
            else:
                self._loss_fn = training.compile_loss(self._loss_fn, verbose=self._is_rank_zero)

        if resume_from is not None:
            self._load_recipe_state(resume_from)
        if self._is_rank_zero:
            s = self._dataset.stats
            log.info(f"Data: {s['sequences']} sequences of {self._seq_len} tokens from {s['documents']} documents "
                     f"+ {s['synthetic_documents']} synthetic tasks ({s['synthetic_tokens']} of "
                     f"{s['natural_tokens'] + s['synthetic_tokens']} tokens, each task whole in one sequence"
                     + (f"; {s['padding_tokens']} untrained padding tokens" if s.get("padding_tokens") else "")
                     + f"); {self._batches_per_epoch} micro-batches per epoch")
            if s.get("skipped_files"):
                names = s["skipped_file_names"]
                log.info(f"Data: skipped {s['skipped_files']} file(s) that are not UTF-8 text "
                         f"(dataset.on_invalid_utf8=skip): {', '.join(names[:5])}"
                         + (f", ... ({len(names) - 5} more)" if len(names) > 5 else ""))

    def _verify_checkpoint(self, path: Path) -> None:
        """Every file of the checkpoint resumed from against its checksums (flexgen_long.hf.verify_checksums), once:
        on rank 0, its error raised on every rank (the others would wait for rank 0 forever). Its files are read
        unverified after this."""
        error = [None]
        if self._is_rank_zero:
            try:
                hf.verify_checksums(path)
            except Exception as e:  # noqa: BLE001 -- raised on every rank below
                error[0] = e
        if self._world_size > 1:
            dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise error[0]

    def _choose_full_layers(self, cfg: DictConfig, resume_from: Path | None):
        """``model.full_layers: retrieval[:n or :f]``: the layers of the base model's retrieval heads, chosen once
        (flexgen_long.retrieval.choose_for_run: from the checkpoint resumed, else by scoring checkpoint.base_dir) on
        rank 0 and shared with every rank; ``cfg.model.full_layers`` becomes that list. Other values: None."""
        spec = cfg.model.get("full_layers")
        if not retrieval.is_retrieval(spec):
            return None
        choice = [None]
        if self._is_rank_zero:
            try:
                choice[0] = retrieval.choose_for_run(spec, base_dir=self._base_dir, tokenizer=self._tokenizer,
                                                     output_dir=self._output_dir, resume=self._resume,
                                                     resume_from=resume_from, device=self._device, dtype=self._dtype,
                                                     log=log.info, **OmegaConf.to_container(cfg.retrieval_scoring))
            except Exception as e:  # every rank raises it (the others would wait for the choice forever)
                choice[0] = e
        if self._world_size > 1:
            dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], Exception):
            raise choice[0]
        cfg.model.full_layers = list(choice[0].layers)
        return choice[0]

    def _setup_model(self, cfg: DictConfig) -> nn.Module:
        base_sd = hf.load_hf_state_dict(self._base_dir)[0] if self._base_dir else None
        compile_model = cfg.compile
        act_ckpt = cfg.enable_activation_checkpointing
        if self._world_size == 1:
            with training.set_default_dtype(self._dtype), self._device:
                model = rc.instantiate("model", cfg.model)
            if base_sd is not None:
                model.load_state_dict(base_sd, strict=True)
            if act_ckpt:
                training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
            if compile_model:
                training.compile_model(model, verbose=self._is_rank_zero)
        else:
            # FSDP2: without base weights every rank builds the same seeded random init on CPU as the full state dict.
            if base_sd is None:
                with training.set_default_dtype(self._dtype):
                    base_sd = rc.instantiate("model", cfg.model).state_dict()
            with training.set_default_dtype(self._dtype), torch.device("meta"):
                model = rc.instantiate("model", cfg.model)
            if compile_model:
                training.compile_model(model, verbose=self._is_rank_zero)
            if act_ckpt:
                training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
            training.shard_model(model, [lambda name, m: isinstance(m, TransformerSelfAttentionLayer)],
                                 cpu_offload=cfg.fsdp_cpu_offload)
            with training.set_default_dtype(self._dtype), self._device:
                for m in model.modules():  # RoPE tables are buffers outside the state dict: rebuild off meta
                    if hasattr(m, "rope_init"):
                        m.rope_init()
            training.load_from_full_model_state_dict(model, base_sd, self._device, strict=True,
                                                     cpu_offload=cfg.fsdp_cpu_offload)
            training.validate_no_params_on_meta_device(model)
        # resolved per forward (flexgen_long.flex_backend says once which runs); validate_config refused an impossible one
        model.policy = Policy(flex_backend=cfg.flex_backend)
        if self._is_rank_zero:
            n = sum(p.numel() for p in model.parameters()) * (self._world_size if self._world_size > 1 else 1)
            full = [i for i, layer in enumerate(model.layers) if layer.attn.pattern.is_full]
            sparse = {repr(layer.attn.pattern) for layer in model.layers if not layer.attn.pattern.is_full}
            log.info(f"Model: {n / 1e6:.2f}M parameters, {len(model.layers)} layers, full attention in {full}, "
                     f"sparse: {', '.join(sorted(sparse)) or 'none'}; {self._dtype}, {self._device}, world size "
                     f"{self._world_size}" + (f", from {self._base_dir}" if self._base_dir else ", random init"))
        return model

    # -- data -----------------------------------------------------------------------------------------------------------
    def _batch(self, index: int) -> dict:
        """Micro-batch ``index`` of this rank: epoch ``index // batches_per_epoch`` visits the dataset in a permutation
        seeded by (seed, epoch); a pure function of the index, so the data position is one integer."""
        epoch, j = divmod(index, self._batches_per_epoch)
        if getattr(self, "_perm_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self._seed * 100003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self._dataset), generator=g), epoch
        start = (j * self._world_size + self._rank) * self._batch_size
        items = [self._dataset[int(k)] for k in self._perm[start: start + self._batch_size]]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        # Every row one document (long-document data, the paper's setting): no document mask is needed, so full layers
        # take SDPA's causal kernel (cuDNN / flash on GPU) instead of flex with a document BlockMask, and sparse layers'
        # masks skip the document lookup. The same attention: positions 0..S-1 are each row's in-document positions.
        # Checked here on the host copy, before the transfer: no device sync.
        single = bool((batch["doc_ids"] == batch["doc_ids"][:, :1]).all())
        batch = {k: v.to(self._device) for k, v in batch.items()}
        if single:
            batch["doc_ids"] = None
        return batch

    # -- train ----------------------------------------------------------------------------------------------------------
    def _loss(self, batch: dict) -> torch.Tensor:
        """The mean loss over the micro-batch's trained tokens (labels != -100), whichever loss the config names."""
        out = self._model(batch["tokens"], doc_ids=batch["doc_ids"])
        labels = batch["labels"]
        # hidden states for ChunkedLinearCrossEntropy, a list of logit chunks for CEWithChunkedOutputLoss
        if isinstance(self._loss_fn, ChunkedLinearCrossEntropy) or isinstance(out, list):
            return self._loss_fn(out, labels)
        return self._loss_fn(out.reshape(-1, out.shape[-1]).float(), labels.reshape(-1))

    def save_config(self) -> None:
        """The run's config into output_dir, once training starts (a setup that fails leaves nothing that would
        block the corrected rerun): torchtune_config.yaml through the metric logger on a fresh run; a resumed run
        keeps the earlier file and writes its own beside it."""
        if not self._is_rank_zero:
            return
        if self.global_step == 0 and not (self._output_dir / "torchtune_config.yaml").exists():
            self._metric_logger.log_config(self._cfg)
        else:
            path = self._output_dir / f"torchtune_config.resumed_at_step_{self.global_step}.yaml"
            ckpt.write_atomic(path, OmegaConf.to_yaml(self._cfg).encode())

    def train(self) -> None:
        self._model.train()
        if self.global_step >= self._max_steps:
            log.info(f"Already trained to max_steps={self._max_steps} ({self._output_dir}); nothing to do")
            return
        self.save_config()
        bar = cli.progress(self._max_steps, "train", initial=self.global_step, enabled=self._is_rank_zero)
        t0 = time.perf_counter()
        tokens_seen = 0
        while self.global_step < self._max_steps:
            self._optimizer.zero_grad(set_to_none=True)
            batches = [self._batch(self._micro_batches + i) for i in range(self._accum)]
            num_tokens = torch.stack([(b["labels"] != CROSS_ENTROPY_IGNORE_INDEX).sum() for b in batches]).sum()
            if self._world_size > 1:
                dist.all_reduce(num_tokens)
            running_loss = torch.zeros((), device=self._device)
            for b in batches:
                n = (b["labels"] != CROSS_ENTROPY_IGNORE_INDEX).sum()
                loss = self._loss(b) * n  # mean over this micro-batch's tokens -> sum
                loss.backward()
                running_loss += loss.detach()
                tokens_seen += b["tokens"].numel()
            self._micro_batches += self._accum
            if self._world_size > 1:
                dist.all_reduce(running_loss)
            # Gradients hold sum(loss over all trained tokens) / world size (FSDP averages): scale to the mean.
            training.scale_grads(self._model, self._world_size / num_tokens)
            # the norm is always taken (max_norm inf clips nothing): a non-finite one must not reach the weights
            grad_norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(),
                                                       max_norm=float(self._clip or math.inf))
            if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
                grad_norm = grad_norm.full_tensor()
            loss_value, grad_norm = (running_loss / num_tokens).item(), float(grad_norm)
            if math.isfinite(loss_value) and math.isfinite(grad_norm):
                self._optimizer.step()
            else:
                self._nonfinite_step(loss_value, grad_norm)
            self._lr_scheduler.step()
            self.global_step += 1
            bar.update(1)
            bar.set_description(f"step {self.global_step} loss {loss_value:.4f}")

            if self.global_step % self._log_every == 0 or self.global_step in (1, self._max_steps):
                elapsed = time.perf_counter() - t0
                metrics = {"loss": round(loss_value, 4), "lr": float(f"{self._optimizer.param_groups[0]['lr']:.4g}"),
                           "tokens_per_second_per_rank": round(tokens_seen / elapsed)}
                metrics["grad_norm"] = round(grad_norm, 4)
                if self._log_memory:
                    metrics.update(self._memory_stats())
                if self._metric_logger is not None:
                    self._metric_logger.log_dict(metrics, step=self.global_step)
                t0, tokens_seen = time.perf_counter(), 0
            if self._save_every and self.global_step % self._save_every == 0 and self.global_step < self._max_steps:
                self.save_checkpoint(epoch=self._micro_batches // self._batches_per_epoch)
        bar.close()
        if self._save_final:
            self.save_checkpoint(epoch=self._micro_batches // self._batches_per_epoch)
        elif self._is_rank_zero:
            log.info(f"checkpoint.save_final=false: no checkpoint written at step {self.global_step}")

    def _nonfinite_step(self, loss: float, grad_norm: float) -> None:
        """A step whose loss or gradient norm is NaN or Inf, caught before the optimizer step (the weights are still
        those of the step before): stop the run, naming the step, or skip its update (``on_nonfinite``)."""
        step = self.global_step + 1
        if self._on_nonfinite == "skip":
            self._optimizer.zero_grad(set_to_none=True)
            if self._is_rank_zero:
                log.warning(f"step {step}: loss {loss}, grad norm {grad_norm}: update skipped (on_nonfinite=skip)")
            return
        latest = ckpt.latest_checkpoint(self._output_dir)
        raise FloatingPointError(
            f"training diverged at step {step}: loss {loss}, grad norm {grad_norm}; stopped before its update, no "
            f"checkpoint of it written; last complete checkpoint: {latest or 'none'}. Lower optimizer.lr or set "
            "clip_grad_norm (then checkpoint.resume=true), or on_nonfinite=skip to skip such steps")

    def _memory_stats(self) -> dict:
        if self._device.type == "cpu":  # torchtune's get_memory_stats supports accelerators only
            return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
        return {k: round(v, 3) for k, v in training.get_memory_stats(self._device, reset_stats=True).items()}

    # -- checkpoints ------------------------------------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int) -> None:
        if self._world_size > 1:
            model_sd = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
            opt_sd = training.get_full_optimizer_state_dict(self._model, self._optimizer, self._is_rank_zero,
                                                            device=self._device)
        else:
            model_sd = {k: v.cpu() for k, v in self._model.state_dict().items()}
            opt_sd = self._optimizer.state_dict()
        if self._is_rank_zero:
            model_sd = {k.replace("._orig_mod", "").replace("._checkpoint_wrapped_module", ""): v
                        for k, v in model_sd.items()}  # torch.compile / activation-checkpoint wrapper prefixes
            state = {"global_step": self.global_step, "micro_batches": self._micro_batches, "epoch": epoch,
                     "optimizer": opt_sd, "lr_scheduler": self._lr_scheduler.state_dict(),
                     "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                     "seed": self._seed, "world_size": self._world_size, "batch_size": self._batch_size,
                     "gradient_accumulation_steps": self._accum}
            path = ckpt.save_checkpoint(self._output_dir, self.global_step, model_sd,
                                        ckpt.hf_config(self._model, self._model_cfg, self._dtype,
                                                       recipe=self._recipe_identity), state)
            self.written.append(path)
            removed = []
            if self._keep_last:  # only checkpoints this run wrote: a resumed run keeps the earlier run's
                for old in self.written[:-self._keep_last]:
                    if old.exists():
                        ckpt.remove_checkpoint(old)
                        removed.append(old.name)
            log.info(f"Checkpoint: {path}" + (f" (removed {', '.join(removed)})" if removed else ""))
        if self._world_size > 1:
            dist.barrier()

    def _load_recipe_state(self, path: Path) -> None:
        sd, _ = hf.load_hf_state_dict(path, verify=False)  # every file was checked in setup (_verify_checkpoint)
        try:
            state = torch.load(path / ckpt.STATE_FILE, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError, ValueError) as e:  # truncated zip, unpickling errors
            raise hf.CheckpointError(f"{path / ckpt.STATE_FILE}: not readable ({' '.join(str(e).split())[:160]}); "
                                     "the file is truncated or damaged") from None
        for key, now in (("world_size", self._world_size), ("batch_size", self._batch_size),
                         ("gradient_accumulation_steps", self._accum), ("seed", self._seed)):
            if state[key] != now:
                _fail(key if key != "world_size" else "nproc_per_node",
                      f"is {now} but {path} was trained with {state[key]}; resuming must keep it (the data "
                      "position would not match)")
        if self._world_size > 1:
            training.load_from_full_model_state_dict(self._model, sd, self._device, strict=True)
            training.load_from_full_optimizer_state_dict(self._model, self._optimizer, state["optimizer"],
                                                         self._device)
        else:
            target = getattr(self._model, "_orig_mod", self._model)
            target.load_state_dict(sd, strict=True)
            self._optimizer.load_state_dict(state["optimizer"])
        self._lr_scheduler.load_state_dict(state["lr_scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.global_step, self._micro_batches = state["global_step"], state["micro_batches"]
        if self._is_rank_zero:
            log.info(f"Resumed from {path} at step {self.global_step}")

    def cleanup(self) -> None:
        if getattr(self, "_metric_logger", None) is not None:
            self._metric_logger.close()
        self.release()
        if self._world_size > 1:
            # every rank idle before any tears the group down: a rank destroying gloo's pairs while its peer still
            # uses them aborted the peer at exit ("terminate called without an active exception"), on a loaded CPU
            dist.barrier()
            dist.destroy_process_group()

    def stopped(self, e: KeyboardInterrupt, resume: str) -> str:
        """The line an interrupted run ends with: the step reached, the last complete checkpoint and the command that
        continues (nothing to continue when output_dir was not claimed yet)."""
        how = "SIGTERM" if str(e) == "SIGTERM" else "Ctrl-C (SIGINT)"
        if not self._claimed:
            return f"stopped by {how} before training started; nothing was written"
        latest = ckpt.latest_checkpoint(self._output_dir)
        return (f"stopped by {how} at step {self.global_step} of {self._max_steps}; last complete checkpoint: "
                f"{latest or 'none yet (a resume starts at step 0)'}; continue with: {resume}")

    def release(self) -> None:
        """Release the output_dir lock (also done by the kernel if the process dies)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def resume_command(argv: list[str], world_size: int) -> str:
    """The command that continues this run: the same arguments with ``checkpoint.resume=true``."""
    kept = [a for a in argv if not a.startswith(("checkpoint.resume=", "checkpoint.overwrite="))]
    nproc = ["--nproc_per_node", str(world_size)] if world_size > 1 else []
    return shlex.join(["tune", "run", *nproc, cli._shown(Path(__file__)), *kept, "checkpoint.resume=true"])


@cli.parse(FinetuneConfig, __file__)
def recipe_main(cfg: DictConfig) -> None:
    """LongGen finetuning: length extension + conversion to the hybrid model in one run (module docstring)."""
    if training.is_distributed():
        # NCCL for GPU tensors; gloo for CPU ones (FSDP2 CPU offload). utils.get_device picks cuda:LOCAL_RANK.
        training.init_distributed(backend="cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
    with cli.stop_on_signals():
        recipe = LongGenFinetuneRecipe(cfg)
        try:
            recipe.setup(cfg)
            recipe.train()
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through stop_on_signals: say where it stopped
            raise cli.Interrupted(recipe.stopped(e, resume_command(sys.argv[1:], recipe._world_size))) from None
        finally:
            recipe.release()
    recipe.cleanup()
    for path in recipe.written:  # the last lines: what this run wrote (results on stdout, logs on stderr)
        if path.exists():
            print(f"Wrote {path}", flush=True)


if __name__ == "__main__":
    sys.exit(recipe_main())
