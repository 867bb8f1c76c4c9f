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


class RecipesFinder:
    """Meta-path finder for the top-level name ``recipes`` that looks past torchtune's stub."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "recipes":
            return None
        entries = [p for p in sys.path if isinstance(p, str) and not _is_torchtune_stub(p)]
        return importlib.machinery.PathFinder.find_spec(fullname, entries)

    @classmethod
    def invalidate_caches(cls):
        pass


def install() -> None:
    if RecipesFinder not in sys.meta_path:
        sys.meta_path.insert(0, RecipesFinder)


install()
