"""The finetuning recipe's config, validated and planned for a world size, on any machine -- no GPU, no weights, no
memory: the model is built on the meta device.

    python recipes/longgen_plan.py --config recipes/configs/llama2_7b_longgen_128k.yaml --world-size 8 \\
        [--gpu-memory-gib 139.8] [key=value ...]

The config and its ``key=value`` / ``~key`` overrides are read exactly as ``tune run`` reads them, then checked by the
recipe's own ``validate_config`` and ``validate_model`` (every field, each ``_component_`` section, the paths the run
would read) -- except the device: ``device: cuda`` is checked for its form only when this machine has no GPU, since the
plan is for another machine. Then it prints the memory plan (``flexgen_long.train_plan``): the FSDP2 units, what each
rank holds, and the estimated peak per GPU. Exit code 1 with a one-line error naming the field when the config is
invalid or the estimated peak exceeds ``--gpu-memory-gib`` (default: an H200 as torch reports it; about 79 for an 80 GB
H100).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from flexgen_long import cli
from flexgen_long import recipe_config as rc
from flexgen_long import retrieval, train_plan

RECIPE = Path(__file__).resolve().parent / "longgen_finetune.py"


def load_config(path, overrides=()) -> DictConfig:
    """The config file (a path, or the name of a finetuning config in recipes/configs) with its command-line
    overrides (``key=value``, ``~key`` removes one), merged by torchtune's own code as ``tune run`` does."""
    return cli.load_config(cli.resolve_config(str(path), RECIPE.parent / "configs"), overrides)


def _finetune_recipe():
    """recipes/longgen_finetune.py as a module, by its path (the name ``recipes`` may be torchtune's stub here)."""
    spec = importlib.util.spec_from_file_location("_longgen_finetune", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its config schema's annotations are resolved in its module
    spec.loader.exec_module(module)
    return module


def validate(cfg: DictConfig) -> torch.nn.Module:
    """The recipe's checks of ``cfg``; returns the model on the meta device (in the config's dtype)."""
    from torchtune import training

    recipe = _finetune_recipe()
    checked = cfg
    device = rc.get(cfg, "device", "cpu")
    if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            rc.fail("device", f"must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
        # planned for a GPU machine: the rest is checked here (flex_backend=flash: whether it imports is the GPU's)
        checked = OmegaConf.merge(cfg, {"device": "cpu", **({"flex_backend": None}
                                                            if rc.get(cfg, "flex_backend", None) == "flash" else {})})
    recipe.validate_config(checked)
    with training.set_default_dtype(rc.dtype_field(cfg)), torch.device("meta"):
        # full_layers: retrieval is chosen when the run starts; the plan counts as many full layers (the same memory)
        model = rc.instantiate("model", retrieval.provisional_model_cfg(cfg.model))
    recipe.validate_model(model, checked)
    return model


def main(argv=None) -> train_plan.TrainPlan:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the finetuning config (YAML)")
    ap.add_argument("--world-size", type=int, required=True, help="GPUs (torchrun's --nproc_per_node x nodes)")
    ap.add_argument("--gpu-memory-gib", type=float, default=train_plan.H200_GIB,
                    help=f"memory of one GPU as torch reports it (default {train_plan.H200_GIB}: an H200)")
    ap.add_argument("overrides", nargs="*", help="key=value or ~key, as for tune run")
    a = ap.parse_args(argv)
    with cli.user_errors():
        cfg = load_config(a.config, a.overrides)
        model = validate(cfg)
        plan = train_plan.plan_from_config(cfg, a.world_size, model)
        print(f"Config: {a.config}" + (f" {' '.join(a.overrides)}" if a.overrides else "")
              + " -- valid (device checked for its form only)" * (not torch.cuda.is_available()
                                                                   and str(cfg.get("device")).startswith("cuda")))
        print(plan.describe(a.gpu_memory_gib))
        train_plan.check_fits(plan, a.gpu_memory_gib)
    return plan


if __name__ == "__main__":
    main()
    sys.exit(0)
