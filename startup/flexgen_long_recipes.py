"""Lets ``tune run recipes/<name>.py`` import a project's own ``recipes`` package (installed by flexgen_long).

``tune run recipes/x.py`` imports the module ``recipes.x`` after appending the current directory to ``sys.path``. The
torchtune wheel also installs a top-level package ``recipes`` into site-packages whose ``__init__`` only raises
(it exists to keep torchtune's own tests from importing its recipes). site-packages precedes the appended directory,
so that stub shadows every project's ``recipes/`` directory and ``tune run recipes/x.py`` cannot work as documented.

This finder, put first on ``sys.meta_path`` by ``flexgen_long_recipes.pth`` at interpreter start, answers for the name
``recipes`` only: it searches ``sys.path`` as usual but skips entries whose ``recipes`` is torchtune's raising stub. If
no other ``recipes`` exists it returns None and the stub is imported as before (with torchtune's own message), so
nothing changes except where the stub would have raised. torchtune's built-in recipes are run from their file paths
(``runpy.run_path``) and never import ``recipes``; they are unaffected. Kept free of imports beyond the standard
library: it runs in every interpreter of the environment.

It also lets ``tune run`` take a recipe by an absolute path, from any folder, or by its name from the project's root
(``tune run longgen_finetune --config tiny_longgen``; see ``_convert_to_dotpath``): torchtune 0.6.1 turns the path into
a module name relative to the current directory and fails on anything else. And it hides torchao's expected
cpp-extension line (``_QuietTorchao``).
"""

import importlib.machinery
import os
import sys

_STUB_MARK = "The torchtune recipes directory isn't a package"


def _is_torchtune_stub(entry: str) -> bool:
    init = os.path.join(entry or os.curdir, "recipes", "__init__.py")
    try:
        with open(init, encoding="utf-8") as f:
            return _STUB_MARK in f.read(4096)
    except OSError:
        return False


def _convert_to_dotpath(original):
    """``tune run <recipe path>`` for a custom recipe imports the module named by the path relative to the current
    directory (``recipes/x.py`` -> ``recipes.x``), so an absolute path, or one outside the current directory, has no
    module name (runpy: "Relative module names not supported"). This replacement keeps paths inside the current
    directory as they were (normalised: ``./recipes/x.py`` works too) and imports any other existing recipe file as
    ``<its folder>.<its name>`` from its folder's parent, which it puts first on ``sys.path`` and on ``PYTHONPATH``
    (torchrun's worker processes import the recipe too)."""

    def convert(self, recipe_path):
        if not recipe_path.endswith(".py") and os.sep not in recipe_path:  # a name, as for torchtune's own recipes
            if os.path.isfile(os.path.join("recipes", recipe_path + ".py")):
                return f"recipes.{recipe_path}"  # `tune run longgen_finetune` from the repository root
            self._parser.error(f"recipe {recipe_path!r}: neither one of torchtune's (tune ls) nor ./recipes/"
                               f"{recipe_path}.py; run this project's recipes from its root as `tune run "
                               f"recipes/<name>.py --config <file or name>`")
        absolute = os.path.abspath(recipe_path)
        relative = os.path.relpath(absolute)
        if not relative.startswith(os.pardir):
            return original(self, relative)
        if not os.path.isfile(absolute):
            self._parser.error(f"recipe {recipe_path!r}: no such file")
        root, package = os.path.split(os.path.dirname(absolute))
        name = os.path.splitext(os.path.basename(absolute))[0]
        if not (package.isidentifier() and name.isidentifier()):
            self._parser.error(f"recipe {recipe_path!r}: run it from its folder's parent as "
                               f"`tune run {package}/{name}.py` (its folder and file name must be Python names)")
        sys.path.insert(0, root)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        return f"{package}.{name}"

    return convert


class _PatchTuneRun:
    """Loader of ``torchtune._cli.run`` that replaces ``Run._convert_to_dotpath`` after the module has run."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.Run._convert_to_dotpath = _convert_to_dotpath(module.Run._convert_to_dotpath)


class RecipesFinder:
    """Meta-path finder for the top-level name ``recipes`` that looks past torchtune's stub, and for
    ``torchtune._cli.run``, whose recipe-path conversion it extends to absolute paths."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == "torchtune._cli.run":
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchTuneRun(spec.loader)
            return spec
        if fullname != "recipes":
            return None
        entries = [p for p in sys.path if isinstance(p, str) and not _is_torchtune_stub(p)]
        return importlib.machinery.PathFinder.find_spec(fullname, entries)

    @classmethod
    def invalidate_caches(cls):
        pass


class _QuietTorchao:
    """A logging filter for the one line torchao 0.15.0 logs on every import under torch 2.13 ("Skipping import of
    cpp extensions due to incompatible torch version ..."): expected with the pinned versions and harmless (its C++
    kernels are not used here), yet printed by every command, since ``import torchtune`` imports torchao. Set
    FLEXGEN_LONG_SHOW_TORCHAO=1 to see it. Installed here because torchao logs before any of our code runs."""

    @staticmethod
    def filter(record) -> bool:
        return not str(record.msg).startswith("Skipping import of cpp extensions due to incompatible torch version")


def install() -> None:
    if RecipesFinder not in sys.meta_path:
        sys.meta_path.insert(0, RecipesFinder)
    if not os.environ.get("FLEXGEN_LONG_SHOW_TORCHAO"):
        import logging

        logging.getLogger("torchao").addFilter(_QuietTorchao)


install()
