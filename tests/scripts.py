"""Import a script of the repository (analysis/*.py, recipes/*.py) as a module by its path: they are run as
``python path``, not installed, and ``recipes`` as a package name is torchtune's."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(path: str, name: str | None = None):
    """The module of ``REPO/path`` (registered in sys.modules as ``name``, default the file's stem)."""
    name = name or Path(path).stem
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
