"""Config checks shared by the recipes (recipes/longgen_finetune.py, longgen_generate.py, longgen_eval.py).

Every recipe checks its whole config before it builds, reads or writes anything, and every error names the field, the
value it got and what is allowed (``ConfigError``, a ``ValueError``)::

    config field 'optimizer.lr': must be a number, got 'abc'

torchtune instantiates ``_component_`` sections only when a recipe reaches them, and then the component's own error
surfaces (``'<=' not supported between instances of 'float' and 'str'`` for ``optimizer.lr=abc``, with no field named,
possibly after minutes of data preparation). ``check_component`` therefore checks a section against the component's
signature first: unknown arguments, and the types that its defaults and annotations imply.

The helpers live in the library rather than beside the recipes because the name ``recipes`` is taken by torchtune's
wheel (a stub package that raises on import): ``python recipes/x.py`` could not import ``recipes._common``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

__all__ = ["ConfigError", "fail", "get", "check_keys", "integer", "number", "boolean", "choice", "string",
           "device_field", "dtype_field", "DTYPES", "check_component", "instantiate", "existing_dir",
           "existing_file", "hf_dir", "check_hf_sections", "tokenizer_fits", "checkpoint_dir_field",
           "uses_model_section", "check_model_sections", "build_model", "user_errors"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ABSENT = object()


class ConfigError(ValueError):
    """A config field has a value the recipe cannot use; the message names the field, the value and what is allowed."""


def fail(field: str, message: str):
    raise ConfigError(f"config field '{field}': {message}")


# -- reading fields ------------------------------------------------------------------------------------------------------
def get(cfg: DictConfig, field: str, default: Any = _ABSENT) -> Any:
    """The value of the dotted ``field``; ``default`` when it is absent (an error when no default is given). A
    required value left as ``???`` and an interpolation that cannot be resolved are errors naming the field."""
    parent, _, key = field.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    if isinstance(node, dict):  # a plain dict (a section built in Python): no ??? or interpolations
        return node[key] if key in node else _required(field) if default is _ABSENT else default
    if not isinstance(node, DictConfig) or key not in node.keys():  # (`in node` is False for a ??? value)
        return _required(field) if default is _ABSENT else default
    if OmegaConf.is_missing(node, key):
        fail(field, "is required (the config leaves it as ???); give it on the command line as "
                    f"{field}=<value>")
    try:
        return node[key]
    except InterpolationResolutionError as e:
        fail(field, f"{str(e).splitlines()[0]} (set the field it refers to)")


def _required(field: str):
    fail(field, "is required but missing from the config")


def check_keys(node, allowed: Iterable[str], section: str | None = None, required: Iterable[str] = ()) -> None:
    """No key outside ``allowed`` (a typo would otherwise be ignored silently), every key of ``required`` present."""
    if node is None:
        return
    if not isinstance(node, (DictConfig, dict)):
        fail(section, f"must be a section of keys {sorted(allowed)}, got {node!r}")
    prefix = f"{section}." if section else ""
    unknown = sorted(set(node.keys()) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                          f"{'the recipe reads' if not section else 'allowed'}: {sorted(prefix + k for k in allowed)}")
    missing = sorted(set(required) - set(node.keys()))
    if missing:
        raise ConfigError(f"missing config key(s) {[prefix + k for k in missing]}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(cfg, field: str, default: Any = _ABSENT, minimum: int | None = None, maximum: int | None = None,
            nullable: bool = False) -> int | None:
    v = get(cfg, field, default)
    if v is None and nullable:
        return None
    if not _is_int(v) or (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        bounds = " and ".join(b for b in ((f">= {minimum}" if minimum is not None else ""),
                                          (f"<= {maximum}" if maximum is not None else "")) if b)
        fail(field, f"must be {'null or ' if nullable else ''}an int{' ' + bounds if bounds else ''}, got {v!r}")
    return v


def number(cfg, field: str, default: Any = _ABSENT, minimum: float | None = None, positive: bool = False,
           nullable: bool = False) -> float | None:
    v = get(cfg, field, default)
    if v is None and nullable:
        return None
    if not _is_number(v) or v != v or (positive and v <= 0) or (minimum is not None and v < minimum):
        bound = " > 0" if positive else (f" >= {minimum}" if minimum is not None else "")
        fail(field, f"must be {'null or ' if nullable else ''}a number{bound}, got {v!r}")
    return v


def boolean(cfg, field: str, default: Any = _ABSENT) -> bool:
    v = get(cfg, field, default)
    if not isinstance(v, bool):
        fail(field, f"must be true or false, got {v!r}")
    return v


def choice(cfg, field: str, choices: Iterable, default: Any = _ABSENT):
    v = get(cfg, field, default)
    choices = list(choices)
    if v not in choices:
        fail(field, f"must be one of {choices}, got {v!r}")
    return v


def string(cfg, field: str, default: Any = _ABSENT, nullable: bool = False) -> str | None:
    v = get(cfg, field, default)
    if v is None and nullable:
        return None
    if not isinstance(v, str) or not v:
        fail(field, f"must be {'null or ' if nullable else ''}a non-empty string, got {v!r}")
    return v


def device_field(cfg, field: str = "device", default: str = "cpu") -> torch.device:
    """The device the recipe runs on, which must exist on this machine. (torchtune's ``utils.get_device("cuda")``
    returns the CPU when torch has no CUDA -- a GPU job would train on the CPU without a word.)"""
    v = get(cfg, field, default)
    try:
        device = torch.device(v)
    except (RuntimeError, TypeError):
        fail(field, f"must be 'cpu', 'cuda' or 'cuda:<index>', got {v!r}")
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        fail(field, f"must be 'cpu', 'cuda' or 'cuda:<index>', got {v!r}")
    if not torch.cuda.is_available():
        fail(field, f"{v!r} was requested but this machine has no usable CUDA device (torch {torch.__version__}, "
                    "torch.cuda.is_available() is False); use device=cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        fail(field, f"{v!r}: this machine has {torch.cuda.device_count()} CUDA device(s), indices 0.."
                    f"{torch.cuda.device_count() - 1}")
    return device


def dtype_field(cfg, field: str = "dtype", default: str = "fp32") -> torch.dtype:
    return DTYPES[choice(cfg, field, DTYPES, default)]


def _existing(field: str, path, what: str, directory: bool) -> Path:
    if not isinstance(path, str) or not path:
        fail(field, f"must be a path to {what}, got {path!r}")
    p = Path(path).expanduser()
    if not p.exists():
        fail(field, f"{path!r} does not exist (expected {what})")
    if p.is_dir() != directory:
        fail(field, f"{path!r} {'is not a directory' if directory else 'is a directory'} (expected {what})")
    return p


def existing_dir(field: str, path, what: str) -> Path:
    return _existing(field, path, what, directory=True)


def existing_file(field: str, path, what: str) -> Path:
    return _existing(field, path, what, directory=False)


def _component(section: str, path):
    from torchtune.config._utils import _get_component_from_path

    if not isinstance(path, str) or not path:
        fail(f"{section}._component_", f"must be a dotted import path (e.g. torch.optim.AdamW), got {path!r}")
    try:
        return _get_component_from_path(path)
    except Exception as e:  # noqa: BLE001 -- torchtune wraps import errors in InstantiationError; name the field
        fail(f"{section}._component_", f"{path!r} cannot be imported ({str(e).splitlines()[-1].strip()})")


#: Annotation names under which a config value could be a container or anything: such parameters are not checked.
_OPEN = {"Any", "object", "Dict", "dict", "Mapping", "List", "list", "Sequence", "Tuple", "tuple", "Iterable",
         "Literal", "Callable", "Union"}
_SIMPLE = {"int": "int", "float": "float", "bool": "bool", "str": "str", "None": "none", "NoneType": "none"}


def _annotation_kinds(ann) -> set[str] | None:
    """{'int', 'float', 'bool', 'str', 'none'} that an annotation allows a config value to be, or None when it cannot
    tell (no annotation, or one that admits containers). Members a config value can never be (``torch.Tensor`` in
    ``float | Tensor``) are ignored."""
    if ann is inspect.Parameter.empty:
        return None
    text = ann if isinstance(ann, str) else ann.__name__ if isinstance(ann, type) else str(ann)
    names = {n.rsplit(".", 1)[-1] for n in re.findall(r"[A-Za-z_][A-Za-z_0-9.]*", text)} - {"Optional"}
    if names & _OPEN and not (names == {"Union"} | (names & set(_SIMPLE))):
        return None
    kinds = {_SIMPLE[n] for n in names if n in _SIMPLE}
    return kinds or None


def _expected(param: inspect.Parameter) -> tuple[set[str], Any] | None:
    """What a config value for ``param`` must be: kinds from its annotation, else from a bool or number default
    (a string default says little: builders often take a name or a list there, e.g. ``full_layers``)."""
    kinds = _annotation_kinds(param.annotation)
    default = param.default
    if kinds is None:
        if param.annotation is not inspect.Parameter.empty:
            return None  # annotated with something a config value cannot be checked against here: leave it
        if isinstance(default, bool):
            kinds = {"bool"}
        elif _is_int(default):
            kinds = {"int"}
        elif isinstance(default, float):
            kinds = {"float"}
        elif isinstance(default, (tuple, list)) and default and all(_is_number(x) for x in default):
            return {"numbers"}, len(default)
        else:
            return None
    if default is None:
        kinds = kinds | {"none"}
    return kinds, None


def _value_ok(v, kinds: set[str], length) -> bool:
    if v is None:
        return "none" in kinds
    if "numbers" in kinds:
        return isinstance(v, (list, tuple, ListConfig)) and len(v) == length and all(_is_number(x) for x in v)
    return (("bool" in kinds and isinstance(v, bool)) or ("int" in kinds and _is_int(v))
            or ("float" in kinds and _is_number(v)) or ("str" in kinds and isinstance(v, str)))


def _describe(kinds: set[str], length) -> str:
    if "numbers" in kinds:
        return f"a list of {length} numbers"
    words = {"bool": "true or false", "int": "an int", "float": "a number", "str": "a string", "none": "null"}
    order = [k for k in ("float", "int", "bool", "str", "none") if k in kinds and not (k == "int" and "float" in kinds)]
    return " or ".join(words[k] for k in order)


def _field_get(node, section: str, key: str):
    """``get`` for a key of a section node, with errors naming ``section.key``."""
    try:
        return get(node, key)
    except ConfigError as e:
        raise ConfigError(str(e).replace(f"config field '{key}'", f"config field '{section}.{key}'", 1)) from None


def check_component(section: str, node, positional: int = 0) -> None:
    """Check a ``_component_`` section against the component's signature before anything is instantiated: the
    component imports, every key is one of its arguments (unless it takes ``**kwargs``), and every value has a type
    its annotation or default allows (nested ``_component_`` sections are checked the same way). ``positional``: how
    many leading arguments the recipe passes itself (e.g. the optimizer's parameters)."""
    if not isinstance(node, (DictConfig, dict)) or "_component_" not in node:
        fail(section, f"must be a section with a _component_ (a dotted import path), got {node!r}")
    component = _component(section, _field_get(node, section, "_component_"))
    try:
        params = list(inspect.signature(component).parameters.values())
    except (TypeError, ValueError):
        return  # a builtin without a signature: its own errors are all we have
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name: p for p in params[positional:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key in node.keys():
        if key == "_component_":
            continue
        field = f"{section}.{key}"
        if key not in named:
            if takes_kwargs:
                continue
            fail(field, f"is not an argument of {node['_component_']}; it takes {sorted(named)}")
        v = _field_get(node, section, key)
        if isinstance(v, (DictConfig, dict)) and "_component_" in v:
            check_component(field, v)
            continue
        expected = _expected(named[key])
        if expected is not None and not _value_ok(v, *expected):
            fail(field, f"must be {_describe(*expected)}, got {v!r}")


def instantiate(section: str, node, *args, **kwargs):
    """torchtune's ``config.instantiate``, with the section named in the errors its component raises for its
    arguments (a ValueError from a builder's own checks, a TypeError from a call that does not fit)."""
    from torchtune import config

    try:
        return config.instantiate(node, *args, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        message = str(e)
        if message.startswith((f"config section '{section}'", f"config field '{section}.")):  # names it already
            raise ConfigError(message) from e
        raise ConfigError(f"config section '{section}': {message}") from e


@contextlib.contextmanager
def user_errors():
    """Around a recipe's main: an error in what the user gave (a config field, a path, a file that cannot be read, an
    output_dir in use or not empty, non-finite results) ends the command with its one-line message and exit code 1,
    not with a traceback through library code. Set FLEXGEN_LONG_TRACEBACK=1 to see the traceback."""
    from .checkpoint_io import OutputDirInUse, OutputDirNotEmpty
    from .hf import CheckpointError

    try:
        yield
    except (ConfigError, CheckpointError, OutputDirInUse, OutputDirNotEmpty, FileNotFoundError,
            FloatingPointError) as e:
        if os.environ.get("FLEXGEN_LONG_TRACEBACK"):
            raise
        raise SystemExit(f"error: {e}") from None


# -- HF model directories (flexgen_long.hf reads them) -----------------------------------------------------------------
HF_MODEL = "flexgen_long.models.from_hf_config"
HF_TOKENIZER = "flexgen_long.tokenizers.hf_tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def hf_dir(field: str, path, weights: bool = True) -> Path:
    """An HF Llama directory for config field ``field``: it exists, its config.json parses and describes a Llama the
    builder has (``flexgen_long.hf.llama_args``), and -- with ``weights`` -- it holds safetensors weights (files are
    only listed here; their tensors are checked when loaded). Errors name the field and the file."""
    from . import hf

    d = existing_dir(field, path, "an HF model directory (config.json + *.safetensors)")
    try:
        hf.llama_args(hf.read_config(d), d / hf.CONFIG_FILE)
        if weights:
            hf.weight_files(d)
    except hf.CheckpointError as e:
        fail(field, str(e))
    return d


def check_hf_sections(cfg, model_section: bool = True) -> None:
    """The directories that a ``model`` section of ``from_hf_config`` (unless ``model_section`` is False: the section
    is not used) and a ``tokenizer`` section of ``hf_tokenizer`` read, before anything is built: the model's
    config.json (the architecture; weights are the recipe's checkpoint_dir / checkpoint.base_dir), the tokenizer's
    files."""
    model = get(cfg, "model", None) if model_section else None
    if isinstance(model, (DictConfig, dict)) and get(model, "_component_", None) == HF_MODEL:
        hf_dir("model.checkpoint_dir", _field_get(model, "model", "checkpoint_dir"), weights=False)
    tokenizer = get(cfg, "tokenizer", None)
    if isinstance(tokenizer, (DictConfig, dict)) and get(tokenizer, "_component_", None) == HF_TOKENIZER:
        d = existing_dir("tokenizer.checkpoint_dir", _field_get(tokenizer, "tokenizer", "checkpoint_dir"),
                         "an HF model directory with a tokenizer")
        if not any((d / name).is_file() for name in TOKENIZER_FILES):
            fail("tokenizer.checkpoint_dir", f"{str(d)!r} has neither {' nor '.join(TOKENIZER_FILES)} (a checkpoint "
                                             "written by recipes/longgen_finetune.py holds no tokenizer: point "
                                             "tokenizer.checkpoint_dir at its base model's directory)")


def tokenizer_fits(tokenizer, vocab_size: int) -> None:
    """``flexgen_long.tokenizers.check_fits`` as a ``ConfigError``: a tokenizer whose ids reach past the model's
    embedding table is refused, naming both sizes."""
    from .tokenizers import check_fits

    try:
        check_fits(tokenizer, vocab_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# -- models for inference recipes --------------------------------------------------------------------------------------
def checkpoint_dir_field(cfg, field: str = "checkpoint_dir") -> Path | None:
    """``checkpoint_dir``: null, or an existing directory (a missing one is reported as missing, not as a directory
    without config.json)."""
    v = get(cfg, field, None)
    if v is None:
        return None
    return existing_dir(field, v, "an HF model directory or a checkpoint written by recipes/longgen_finetune.py")


def uses_model_section(cfg, checkpoint: Path | None) -> bool:
    """Whether an inference recipe builds its model from the ``model`` section: without ``checkpoint`` always (random
    weights), with one unless recipes/longgen_finetune.py wrote it (such a checkpoint is rebuilt as trained, from the
    model config in its config.json)."""
    from . import hf

    if get(cfg, "model", None) is None:
        return False
    if checkpoint is None or not (Path(checkpoint) / hf.CONFIG_FILE).is_file():
        return True  # (a directory without config.json is refused when it is loaded, naming it)
    return not hf.is_recipe_checkpoint(hf.read_config(checkpoint))


def check_model_sections(cfg, checkpoint: Path | None) -> None:
    """An inference recipe's ``checkpoint_dir`` / ``model`` / ``tokenizer`` before anything is built: one of the first
    two is needed; the model section is checked against its component (and ``from_hf_config``'s directory) when it
    will build the model (``uses_model_section``); the tokenizer's directory (``hf_tokenizer``) always."""
    if checkpoint is None and get(cfg, "model", None) is None:
        raise ConfigError("config needs 'checkpoint_dir' (an HF model directory or a checkpoint written by "
                          "recipes/longgen_finetune.py) or a 'model' section (random weights)")
    used = uses_model_section(cfg, checkpoint)
    if used:
        check_component("model", get(cfg, "model"))
    check_hf_sections(cfg, model_section=used)


def build_model(cfg: DictConfig, checkpoint: Path | None, device: torch.device, dtype: torch.dtype,
                log=print) -> torch.nn.Module:
    """The model of an inference recipe, in eval mode. Without ``checkpoint``: the ``model`` section, random weights.
    With it, the directory's weights (checked on load, ``flexgen_long.hf.load_model``) in the architecture of: the
    checkpoint itself when recipes/longgen_finetune.py wrote it (rebuilt as trained), else the ``model`` section when
    given (e.g. ``flexgen_long.models.from_hf_config`` with a LongGen layout applied at inference), else the original
    HF model (every layer full)."""
    if checkpoint is not None:
        from . import hf

        section = get(cfg, "model", None)
        if section is not None and not uses_model_section(cfg, checkpoint):
            log(f"{checkpoint} was written by recipes/longgen_finetune.py: rebuilt as trained (the model config in "
                "its config.json); the config's model section is not used")
            section = None
        return hf.load_model(checkpoint, device=device, dtype=dtype, model_cfg=section).eval()
    with torch.device(device):
        model = instantiate("model", cfg.model)
    return model.to(dtype=dtype).eval()
