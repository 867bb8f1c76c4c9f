"""Recipe configs: one schema per recipe, the single source of its checks, its ``--help`` and its documented keys.

A recipe declares its keys as a dataclass (``recipes/longgen_finetune.py``'s ``FinetuneConfig``): each field's type
annotation, default (``REQUIRED`` for none), allowed range and one-line meaning (``key(...)``); nested dataclasses are
sections (``checkpoint.*``), and ``Component`` fields are torchtune ``_component_`` sections, checked against the
component's own signature. Keys several recipes have come from base classes the schemas inherit: ``RuntimeKeys``
(device, dtype) and ``InferenceModelKeys`` (checkpoint_dir, model, tokenizer). ``check(cfg, Schema)`` then checks a
whole config before a recipe builds, reads or writes anything, and fills in the defaults; every error is one line
naming the field, the value and what is allowed (``ConfigError``, a ``ValueError``)::

    config field 'optimizer.lr': must be a number, got 'abc'
    unknown config key 'max_step' (did you mean 'max_steps'?); the recipe's --help lists every key

Why not OmegaConf's structured configs, which take dataclasses too: they convert instead of refusing (``2`` into
``true``, ``"3"`` into ``3``), know no ranges, and word their errors over several lines; a typo'd value has to fail
here before minutes of data preparation. torchtune instantiates ``_component_`` sections only when a recipe reaches
them, and then the component's own error surfaces (``'<=' not supported between instances of 'float' and 'str'`` for
``optimizer.lr=abc``, with no field named); ``check_component`` therefore checks a section against the component's
signature first: unknown arguments, and the types that its defaults and annotations imply.

The helpers live in the library rather than beside the recipes because the name ``recipes`` is taken by torchtune's
wheel (a stub package that raises on import): ``python recipes/x.py`` could not import ``recipes._common``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple, Optional, Union

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from .quantize import SCHEMES

__all__ = ["ConfigError", "fail", "get", "REQUIRED", "key", "section", "Component", "check", "help_text", "fields",
           "integer", "boolean", "device_field", "dtype_field", "DTYPES", "check_component", "instantiate",
           "existing_dir", "existing_file", "hf_dir", "check_hf_sections", "tokenizer_fits", "checkpoint_dir_field",
           "uses_model_section", "check_model_sections", "build_model", "user_errors", "Interrupted", "RuntimeKeys",
           "InferenceModelKeys", "TOKENIZER_HELP", "load_for_inference", "Loaded"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REQUIRED = dataclasses.MISSING
_UNIONS = (Union, types.UnionType)  # Optional[int] and int | None
_ABSENT = object()


class ConfigError(ValueError):
    """A config field has a value the recipe cannot use; the message names the field, the value and what is allowed."""


def fail(field: str, message: str):
    raise ConfigError(f"config field '{field}': {message}")


# -- reading fields ------------------------------------------------------------------------------------------------------
def get(cfg: DictConfig, field: str, default: Any = _ABSENT) -> Any:
    """The value of the dotted ``field``; ``default`` when it is absent (an error when no default is given). A
    required value left as ``???`` and an interpolation that cannot be resolved are errors naming the field."""
    parent, _, name = field.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    if isinstance(node, dict):  # a plain dict (a section built in Python): no ??? or interpolations
        return node[name] if name in node else _required(field) if default is _ABSENT else default
    if not isinstance(node, DictConfig) or name not in node.keys():  # (`in node` is False for a ??? value)
        return _required(field) if default is _ABSENT else default
    if OmegaConf.is_missing(node, name):
        fail(field, f"is required (the config leaves it as ???); give it on the command line as {field}=<value>")
    try:
        return node[name]
    except InterpolationResolutionError as e:
        fail(field, f"{str(e).splitlines()[0]} (set the field it refers to)")


def _required(field: str):
    fail(field, "is required but missing from the config")


# -- schemas -------------------------------------------------------------------------------------------------------------
class Component(dict):
    """The type of a torchtune ``_component_`` section (``{_component_: dotted.path, arg: value, ...}``); ``check``
    checks it against the component's signature (``check_component``)."""


def key(default: Any = REQUIRED, help: str = "", *, min=None, max=None, above=None, nonempty: bool = False,
        unique: bool = False, positional: int = 0, passed: dict[str, str] | None = None, hint: str = "", check=None):
    """A schema field: ``default`` (``REQUIRED``: none), its one-line meaning, and its range -- ``min`` / ``max``
    inclusive, ``above`` exclusive (numbers, or each item of a list); ``nonempty`` / ``unique`` for lists;
    ``positional``: how many leading arguments the recipe passes a ``Component`` itself (an optimizer's
    parameters) and ``passed`` which keyword arguments, each with the config key it comes from (the section may not
    give them); ``hint``: added to its error (how to write the value); ``check(cfg, name)``: a check of its own after
    the type's (``device_field``: the device exists on this machine)."""
    meta = {"help": help, "min": min, "max": max, "above": above, "nonempty": nonempty, "unique": unique,
            "positional": positional, "passed": passed, "hint": hint, "check": check}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: OmegaConf.create(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(schema, help: str = "", *, check=None):
    """A nested section (``checkpoint.*``) whose keys are the dataclass ``schema``'s; absent = all its defaults.
    ``Optional[schema]``: the section may be null, and is by default. ``check(cfg, name)``: a check of the whole
    section after its keys' (as ``key``'s)."""
    meta = {"help": help, "section": True, "check": check}
    if _section_schema(schema) is not schema:
        return dataclasses.field(default=None, metadata=meta)
    return dataclasses.field(default_factory=schema, metadata=meta)


def _section_schema(tp) -> type:
    """The dataclass of a section of type ``tp``: ``tp`` itself, or X of ``Optional[X]``."""
    if typing.get_origin(tp) in _UNIONS:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def fields(schema: type, prefix: str = ""):
    """(dotted name, type, field) of every key of ``schema``, sections flattened, in declaration order; an optional
    section (null by default) is also listed itself, before its keys."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if not f.metadata.get("section") or _section_schema(tp) is not tp:
            yield f"{prefix}{f.name}", tp, f
        if f.metadata.get("section"):
            yield from fields(_section_schema(tp), f"{prefix}{f.name}.")


def _default(f: dataclasses.Field):
    """The default of a schema field (``REQUIRED``: none)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN is no number here


def _in_range(v, m: dict) -> bool:
    return ((m.get("min") is None or v >= m["min"]) and (m.get("max") is None or v <= m["max"])
            and (m.get("above") is None or v > m["above"]))


def _fits(v, tp, m: dict) -> bool:
    """Whether the config value ``v`` is one of the type ``tp`` allows, within the range of ``m``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in _UNIONS:
        return any(_fits(v, a, m) for a in args)
    if tp is type(None):
        return v is None
    if origin is Literal:
        return any(v == a and type(v) is type(a) for a in args)
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return _is_int(v) and _in_range(v, m)
    if tp is float:
        return _is_number(v) and _in_range(v, m)
    if tp is str:
        return isinstance(v, str) and bool(v)
    if origin is list:
        if not isinstance(v, (list, tuple, ListConfig)) or (m.get("nonempty") and not len(v)) \
                or m.get("length", len(v)) != len(v):
            return False
        items = list(v)
        return all(_fits(x, args[0], m) for x in items) and not (m.get("unique") and len(set(items)) < len(items))
    if tp is Component:
        return isinstance(v, (dict, DictConfig)) and "_component_" in v
    raise TypeError(f"schema type {tp!r} is not supported")  # a programming error in a schema, not a user's


def _range(m: dict) -> str:
    lo, hi, above = m.get("min"), m.get("max"), m.get("above")
    if (lo is not None or above is not None) and hi is not None:
        return f" in {'[' if lo is not None else '('}{lo if lo is not None else above}, {hi}]"
    return f" >= {lo}" if lo is not None else f" > {above}" if above is not None else \
        f" <= {hi}" if hi is not None else ""


def describe(tp, m: dict | None = None, plural: bool = False) -> str:
    """What ``tp`` with the range of ``m`` allows, in words: ``null or an int >= 1``."""
    m = m or {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNIONS:
        parts = [w for a in args for w in (["true", "false"] if a is bool else [describe(a, m, plural)])]
        parts.sort(key=lambda s: s != "null")
        return ", ".join(parts[:-1]) + " or " + parts[-1]
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a section of keys {', '.join(g.name for g in dataclasses.fields(tp))}"
    if origin is Literal:
        if len(args) == 1:
            return repr(args[0])
        return f"{'names from' if plural else 'one of'} {list(args)}"
    words = {bool: ("true or false", "booleans"), int: ("an int", "ints"), float: ("a number", "numbers"),
             str: ("a non-empty string", "non-empty strings"), Any: ("anything", "anything"),
             Component: ("a section with a _component_ (a dotted import path)", "sections")}
    if origin is list:
        size = f"{m['length']} " if m.get("length") else ""
        return (f"a {'non-empty ' if m.get('nonempty') else ''}list of {size}{'distinct ' if m.get('unique') else ''}"
                + describe(args[0], {**m, "nonempty": False, "unique": False, "length": None}, plural=True))
    return words[tp][plural] + (_range(m) if tp in (int, float) else "")


def _is_component(tp) -> bool:
    return tp is Component or (typing.get_origin(tp) in _UNIONS and Component in typing.get_args(tp))


def _check_value(field: str, v, tp, m: dict) -> None:
    if not _fits(v, tp, m):
        fail(field, f"must be {describe(tp, m)}{' (' + m['hint'] + ')' if m.get('hint') else ''}, got {v!r}")


def _unknown(node, allowed: list[str], prefix: str) -> str | None:
    unknown = [k for k in node.keys() if k not in allowed]
    if not unknown:
        return None
    words = []
    for k in unknown:
        close = difflib.get_close_matches(str(k), allowed, n=1, cutoff=0.6)
        words.append(f"'{prefix}{k}'" + (f" (did you mean '{prefix}{close[0]}'?)" if close else ""))
    return (f"unknown config key{'s' if len(words) > 1 else ''} {', '.join(words)}; the recipe's --help lists "
            f"every key")


def check(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    """Check ``cfg`` against the dataclass ``schema`` (see the module docstring) and fill in the defaults of absent
    keys, so that a recipe reads ``cfg.<key>`` with nothing to default twice. Errors: ``ConfigError``, one line."""
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    problem = _unknown(cfg, names, prefix)
    if problem:
        raise ConfigError(problem)
    # plain fields, then sections, then _component_ sections (those may interpolate the others)
    order = lambda f: 2 if _is_component(hints[f.name]) else 1 if f.metadata.get("section") else 0  # noqa: E731
    for f in sorted(dataclasses.fields(schema), key=order):
        field, tp, m = prefix + f.name, hints[f.name], f.metadata
        if m.get("section"):
            _check_section(cfg, prefix, f.name, tp)
        else:
            default = _default(f)
            v = _field_get(cfg, prefix, f.name, _ABSENT if default is REQUIRED else default)
            if _is_component(tp) and v is not None:
                check_component(field, v, m.get("positional", 0), m.get("passed"))
            else:
                _check_value(field, v, tp, m)
            if f.name not in cfg:
                _set(cfg, f.name, default)
        if m.get("check"):
            m["check"](cfg, f.name)


def _check_section(cfg, prefix: str, name: str, tp) -> None:
    """``check`` of the section ``name`` of type ``tp`` (a dataclass, or ``Optional`` of one); an absent one is
    filled in: null if optional, else all its defaults."""
    schema, field = _section_schema(tp), prefix + name
    optional = schema is not tp
    node = _field_get(cfg, prefix, name, None)
    if node is None and optional:
        _set(cfg, name, None)
        return
    if node is None:
        _set(cfg, name, {})
        node = cfg[name]
    if not isinstance(node, (DictConfig, dict)):
        fail(field, f"must be {'null or ' if optional else ''}a section of keys "
                    f"{[g.name for g in dataclasses.fields(schema)]}, got {node!r}")
    check(node, schema, field + ".")


def _set(cfg, name: str, value) -> None:
    if isinstance(cfg, DictConfig):
        with open_dict(cfg):  # a struct config (torchtune's) accepts no new key otherwise
            cfg[name] = value
    else:
        cfg[name] = value


def _show(v) -> str:
    if isinstance(v, (DictConfig, ListConfig)):
        v = OmegaConf.to_container(v)
    if isinstance(v, dict) and "_component_" in v:
        return v["_component_"]
    return "null" if v is None else "true" if v is True else "false" if v is False else str(v)


def help_text(schema: type, cfg: DictConfig | None = None) -> str:
    """Every key of ``schema``: its name and default (or, with ``cfg``, the config's value), what it allows and what
    it means -- the recipe's ``--help``."""
    lines = []
    for name, tp, f in fields(schema):
        default = _default(f)
        shown = "required" if default is REQUIRED else _show(default)
        if cfg is not None:
            v = OmegaConf.select(cfg, name, default=_ABSENT, throw_on_missing=False)
            shown = f"{_show(v) if v is not _ABSENT else shown}" + ("" if v is _ABSENT else f" (default: {shown})")
        kind = describe(tp, dict(f.metadata))
        lines.append(f"  {name} = {shown}\n      {f.metadata.get('help', '')} [{kind}]")
    return "\n".join(lines)


# -- single fields (for code outside a schema: the training memory plan) ------------------------------------------------
def integer(cfg, field: str, default: Any = _ABSENT, minimum: int | None = None, maximum: int | None = None,
            nullable: bool = False) -> int | None:
    v = get(cfg, field, default)
    _check_value(field, v, int | None if nullable else int, {"min": minimum, "max": maximum})
    return v


def boolean(cfg, field: str, default: Any = _ABSENT) -> bool:
    v = get(cfg, field, default)
    _check_value(field, v, bool, {})
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
    v = get(cfg, field, default)
    _check_value(field, v, Literal[tuple(DTYPES)], {})
    return DTYPES[v]


# -- keys several recipes share (a recipe's schema inherits them) ------------------------------------------------------
TOKENIZER_HELP = "flexgen_long.tokenizers.byte_tokenizer, hf_tokenizer or a torchtune one"


@dataclasses.dataclass(kw_only=True)
class RuntimeKeys:
    """Where and in which dtype a recipe runs its model."""
    device: str = key("cpu", "cpu, cuda or cuda:<index> (must exist on this machine)", check=device_field)
    dtype: Literal[tuple(DTYPES)] = key("fp32", "weights' dtype (bf16 on GPUs)")


def _check_quantize(cfg, name: str) -> None:
    """``quantize`` runs on the recipe's device with its dtype (``flexgen_long.quantize.check_scheme``)."""
    from .quantize import check_scheme

    try:
        check_scheme(cfg[name], device_field(cfg), dtype_field(cfg))
    except ValueError as e:
        fail(name, str(e))


@dataclasses.dataclass(kw_only=True)
class InferenceModelKeys:
    """The model and tokenizer of an inference recipe, and how its weights are quantized (``load_for_inference``)."""
    checkpoint_dir: Optional[str] = key(None, "an HF model directory or a checkpoint of recipes/longgen_finetune.py; "
                                              "null: the model section with random weights")
    model: Optional[Component] = key(None, "the model builder: without checkpoint_dir, or a layout for an HF "
                                           "directory (flexgen_long.models.from_hf_config)")
    tokenizer: Component = key(REQUIRED, TOKENIZER_HELP)
    quantize: Optional[Literal[tuple(SCHEMES)]] = key(
        None, "weights quantized for inference by torchao (flexgen_long.quantize): int8wo (int8, a scale per row), "
              "fp8 (CUDA capability >= 8.9, bf16), int4wo (CUDA, bf16); null: as loaded", check=_check_quantize)


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
_SIMPLE = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None), "NoneType": type(None)}


def _annotation_type(ann):
    """The scalar types an annotation allows a config value to be, as one type (``int | None``), or None when it
    cannot tell (no annotation, or one that admits containers). Members a config value can never be (``torch.Tensor``
    in ``float | Tensor``) are ignored. Annotations may be strings (``from __future__ import annotations``)."""
    if ann is inspect.Parameter.empty:
        return None
    text = ann if isinstance(ann, str) else ann.__name__ if isinstance(ann, type) else str(ann)
    names = {n.rsplit(".", 1)[-1] for n in re.findall(r"[A-Za-z_][A-Za-z_0-9.]*", text)} - {"Optional"}
    if names & _OPEN and not (names == {"Union"} | (names & set(_SIMPLE))):
        return None
    kinds = [_SIMPLE[n] for n in sorted(names) if n in _SIMPLE]
    return Union[tuple(kinds)] if kinds else None


def _expected(param: inspect.Parameter) -> tuple[Any, dict] | None:
    """(type, range) a config value for ``param`` must have: from its annotation, else from a bool or number default
    (a string default says little: builders often take a name or a list there, e.g. ``full_layers``); a default tuple
    of numbers (AdamW's ``betas``) asks for a list of as many numbers."""
    tp, default = _annotation_type(param.annotation), param.default
    if isinstance(default, (tuple, list)) and default and all(_is_number(x) for x in default):
        return list[float], {"length": len(default)}
    if tp is None:
        if param.annotation is not inspect.Parameter.empty:
            return None  # annotated with something a config value cannot be checked against here: leave it
        if isinstance(default, bool):
            tp = bool
        elif _is_int(default):
            tp = int
        elif isinstance(default, float):
            tp = float
        else:
            return None
    return (Union[tp, None] if default is None else tp), {}


def _field_get(node, prefix: str, name: str, default: Any = _ABSENT):
    """``get`` for a key of a section node, with errors naming the whole dotted field (``prefix`` ends in a dot)."""
    try:
        return get(node, name, default)
    except ConfigError as e:
        raise ConfigError(str(e).replace(f"config field '{name}'", f"config field '{prefix}{name}'", 1)) from None


def check_component(section: str, node, positional: int = 0, passed: Mapping[str, str] | None = None) -> None:
    """Check a ``_component_`` section against the component's signature before anything is instantiated: the
    component imports, every key is one of its arguments (unless it takes ``**kwargs``), every argument without a
    default is given, and every value has a type its annotation or default allows (nested ``_component_`` sections
    are checked the same way). ``positional``: how many leading arguments the recipe passes itself (e.g. the
    optimizer's parameters); ``passed``: the keyword arguments it passes, each with the config key it comes from
    (the LR schedule's num_training_steps, from max_steps), which the section must not give."""
    if not isinstance(node, (DictConfig, dict)) or "_component_" not in node:
        fail(section, f"must be a section with a _component_ (a dotted import path), got {node!r}")
    component = _component(section, _field_get(node, section + ".", "_component_"))
    passed = passed or {}
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
        if key in passed:
            fail(field, f"is set by the recipe from {passed[key]}; remove it")
        if key not in named:
            if takes_kwargs:
                continue
            fail(field, f"is not an argument of {node['_component_']}; it takes {sorted(named)}")
        v = _field_get(node, section + ".", key)
        if isinstance(v, (DictConfig, dict)) and "_component_" in v:
            check_component(field, v)
            continue
        expected = _expected(named[key])
        if expected is not None:
            _check_value(field, v, *expected)
    missing = [n for n, p in named.items() if p.default is p.empty and n not in node and n not in passed]
    if missing:
        fail(section, f"{node['_component_']} needs {', '.join(missing)}, which the section does not give (add "
                      f"{section}.{missing[0]}=<value>)")


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


# -- failures: one line ----------------------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM, with the one line that says what was reached and how to continue."""


@contextlib.contextmanager
def user_errors():
    """An error in what the user gave ends the command with its one-line message (exit code 1), an interrupt with
    one line (exit code 130), not with a traceback through library code. FLEXGEN_LONG_TRACEBACK=1 shows it."""
    from .checkpoint_io import OutputDirInUse, OutputDirNotEmpty
    from .hf import CheckpointError

    try:
        yield
    except KeyboardInterrupt as e:
        if os.environ.get("FLEXGEN_LONG_TRACEBACK"):
            raise
        print(f"error: {str(e) or 'interrupted (Ctrl-C)'}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (ConfigError, CheckpointError, OutputDirInUse, OutputDirNotEmpty, FloatingPointError, OSError) as e:
        if os.environ.get("FLEXGEN_LONG_TRACEBACK"):
            raise
        raise SystemExit(f"error: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    """The message on one line; an OS error as ``<path>: <cause>`` (``out/step_5/model.safetensors: no space left on
    device``)."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        return f"{where}: {e.strerror.lower()}"
    return " ".join(str(e).split())


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
        hf_dir("model.checkpoint_dir", _field_get(model, "model.", "checkpoint_dir"), weights=False)
    tokenizer = get(cfg, "tokenizer", None)
    if isinstance(tokenizer, (DictConfig, dict)) and get(tokenizer, "_component_", None) == HF_TOKENIZER:
        d = existing_dir("tokenizer.checkpoint_dir", _field_get(tokenizer, "tokenizer.", "checkpoint_dir"),
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


class Loaded(NamedTuple):
    """What ``load_for_inference`` returns."""
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


def load_for_inference(cfg: DictConfig, checkpoint: Path | None, build=build_model, log=print) -> Loaded:
    """The model and tokenizer of an inference recipe whose config was ``check``ed against a schema of
    ``InferenceModelKeys``, ``RuntimeKeys`` (device and dtype are taken as checked there) and a ``seed``: torch seeded
    (random weights, sampling), the model built in eval mode by ``build(cfg, checkpoint, device, dtype, log)``
    (``build_model``, or a recipe's own around it: one that fuses projections gets its fused matrices quantized), its
    weights quantized by ``quantize`` (one log line: what, and the weight bytes before and after), then the
    tokenizer, which must fit the model's vocabulary."""
    torch.manual_seed(cfg.seed)
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    model = build(cfg, checkpoint, device, dtype, log)
    if cfg.quantize is not None:
        from .quantize import quantize_weights, quantized_matrices, weight_bytes

        before = weight_bytes(model)
        quantize_weights(model, cfg.quantize)
        after, names = weight_bytes(model), quantized_matrices(model)
        fused = sum(n.endswith(("._wqkv", "._w13")) for n in names)
        log(f"quantize={cfg.quantize}: {len(names)} weight matrices ({fused} of them fused q/k/v or gate/up) hold "
            f"{SCHEMES[cfg.quantize]}; embeddings and norms stay {cfg.dtype}; weight bytes {before:,} -> {after:,} "
            f"({after / before:.2f}x)")
    tokenizer = instantiate("tokenizer", cfg.tokenizer)
    tokenizer_fits(tokenizer, model.tok_embeddings.num_embeddings)
    return Loaded(model, tokenizer, device, dtype)
