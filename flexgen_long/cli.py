"""The recipes' command line: ``--help`` from the recipe's schema, ``--config`` by path or by a shipped config's name,
one line for every failure a user can cause, and progress that suits where stderr goes.

Conventions every recipe keeps: results on stdout, logs and progress on stderr, the paths of written files in the last
lines of stdout. A failure the user can cause (a config field, a path, a file that cannot be read or written, an
``output_dir`` in use) ends the command with one line ``error: ...`` and exit code 1; Ctrl-C or SIGTERM with one line
and exit code 130 (the finetuning recipe names the step reached, its last complete checkpoint and the command that
continues). ``FLEXGEN_LONG_TRACEBACK=1`` shows the traceback instead.

torchtune's ``config.parse`` needs ``--config`` even for ``--help``, prints a traceback for a config file that does not
exist, and knows no keys but ``--config``; ``parse`` below wraps the same merge of YAML and ``key=value`` overrides
(torchtune's ``_merge_yaml_and_cli_args``) with those three things.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from . import recipe_config as rc
from .recipe_config import Interrupted, user_errors

__all__ = ["parse", "load_config", "resolve_config", "user_errors", "Interrupted", "stop_on_signals", "progress"]


def _shipped(configs: Path) -> list[Path]:
    """A recipe's shipped configs: the YAML files in ``configs``, by name."""
    return sorted(configs.glob("*.yaml"))


def resolve_config(value: str, configs: Path) -> Path:
    """``--config`` as given: a YAML file, or the name of one of the recipe's shipped configs in ``configs``
    (``tiny_longgen`` for ``recipes/configs/tiny_longgen.yaml``, torchtune's short form)."""
    for p in (Path(value).expanduser(), configs / value, configs / f"{value}.yaml"):
        if p.is_file():
            return p
    raise rc.ConfigError(f"--config {value!r}: no such file (a YAML path, or one of this recipe's configs in "
                         f"{_shown(configs)}: {', '.join(p.stem for p in _shipped(configs))})")

def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it lies inside it (as a user would type it)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_config(path: Path, overrides=()) -> DictConfig:
    """The config file with its ``key=value`` / ``~key`` overrides, merged by torchtune's own code as ``tune run``
    does; a file that cannot be read or parsed is one line naming it."""
    from torchtune.config._utils import _merge_yaml_and_cli_args

    try:
        yaml = OmegaConf.load(path)
    except OSError as e:
        raise rc.ConfigError(f"--config {str(path)!r}: cannot read it ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001 -- yaml's ScannerError / ParserError and OmegaConf's errors: name the file
        raise rc.ConfigError(f"--config {str(path)!r}: not a valid YAML config ({' '.join(str(e).split())})") from None
    if not isinstance(yaml, DictConfig):
        raise rc.ConfigError(f"--config {str(path)!r}: must hold a mapping of keys, got a {type(yaml).__name__}")
    try:
        return _merge_yaml_and_cli_args(Namespace(**OmegaConf.to_container(yaml, resolve=False)), list(overrides))
    except ValueError as e:  # an override that is not key=value, or ~key of a key the config lacks
        raise rc.ConfigError(f"config overrides: {e}") from None


def _split(argv: list[str]) -> tuple[str | None, list[str], bool]:
    """(--config value, overrides, --help asked)."""
    config, rest, wants_help, i = None, [], False, 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            wants_help = True
        elif a == "--config" and i + 1 < len(argv):
            config, i = argv[i + 1], i + 1
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif a.startswith("--"):
            raise rc.ConfigError(f"unknown option {a!r}: the recipe takes --config <file or name>, --help and "
                                 "key=value overrides")
        else:
            rest.append(a)
        i += 1
    return config, rest, wants_help


def parse(schema: type, recipe_file: str, configs: str = "") -> Callable:
    """Decorator for a recipe's main (in place of torchtune's ``config.parse``): reads ``--config`` (a path or the
    name of a config in ``recipes/configs/<configs>``) and the ``key=value`` overrides, prints the keys of ``schema``
    for ``--help`` (with the config's values when ``--config`` is given), and runs the recipe inside
    ``user_errors``."""
    recipe = Path(recipe_file).resolve()
    config_dir = recipe.parent / "configs" / configs

    def decorate(main: Callable[[DictConfig], None]) -> Callable:
        @functools.wraps(main)
        def wrapper(argv: list[str] | None = None) -> int:
            argv = sys.argv[1:] if argv is None else list(argv)
            with user_errors():
                config, overrides, wants_help = _split(argv)
                cfg = load_config(resolve_config(config, config_dir), overrides) if config else None
                if wants_help:
                    print(f"usage: tune run {_shown(recipe)} --config <file or name> [key=value ...]\n"
                          f"{(main.__doc__ or '').strip()}\nconfigs in {_shown(config_dir)}: "
                          f"{', '.join(p.stem for p in _shipped(config_dir))}\n"
                          f"keys ({'value in ' + config + ', ' if config else ''}what is allowed, meaning):\n"
                          + rc.help_text(schema, cfg))
                    return 0
                if cfg is None:
                    shipped = sorted(_shipped(config_dir), key=lambda p: "tiny" not in p.stem)
                    raise rc.ConfigError(f"--config is required (e.g. --config {_shown(shipped[0])}); --help lists "
                                         "every key")
                main(cfg)
            return 0
        return wrapper
    return decorate


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM (a scheduler's stop, ``kill``) raises ``Interrupted`` like Ctrl-C raises ``KeyboardInterrupt``, so
    that a run stops the same way (its lock released, its message printed); the previous handler comes back after."""
    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Lines:
    """tqdm's interface where stderr is a file or a pipe: a line every ``every`` seconds and a last one, no carriage
    returns (tqdm's redraws would make one very long line in a log)."""

    def __init__(self, total: int, desc: str, initial: int = 0, every: float = 10.0):
        self.total, self.desc, self.n, self.every = total, desc, initial, every
        self.start = self.last = time.monotonic()
        self.initial, self.shown = initial, initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self._line()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.shown != self.n:
            self._line()

    def _line(self) -> None:
        self.last, self.shown = time.monotonic(), self.n
        elapsed = self.last - self.start
        done = self.n - self.initial
        left = f", {elapsed / done * (self.total - self.n):.0f} s left" if 0 < done and self.n < self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} ({elapsed:.0f} s{left})", file=sys.stderr, flush=True)


class _Off:
    def update(self, n: int = 1) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...


def progress(total: int, desc: str, initial: int = 0, enabled: bool = True):
    """A progress bar on stderr (tqdm) when it is a terminal, else a periodic line (``_Lines``)."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr)
    return _Lines(total, desc, initial)
