"""Everything is declared in pyproject.toml; this file only adds the ``recipes`` import hook to the build.

Why: ``tune run recipes/x.py`` imports ``recipes.x``, and torchtune's wheel installs a raising ``recipes`` stub into
site-packages that shadows our recipes/ (its ``__init__`` only raises). ``startup/flexgen_long_recipes.py`` is a small
import hook that looks past that stub; ``startup/flexgen_long_recipes.pth`` loads it at interpreter start. Both must
sit at the top of site-packages, which pyproject.toml cannot express for editable installs: ``data-files`` are dropped
by setuptools' editable_wheel (it asks ``has_data()``, which does not exist, instead of ``has_data_files()``).
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

HOOK_FILES = ["startup/flexgen_long_recipes.pth", "startup/flexgen_long_recipes.py"]


class build_py_with_recipes_hook(build_py):
    def run(self):
        super().run()
        # A regular wheel is made from build_lib. An editable wheel (PEP 660) is made from the unpacked-wheel
        # directory that setuptools' editable_wheel sets as install_lib; build_lib is not packed there.
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        for src in HOOK_FILES:
            self.copy_file(src, os.path.join(target, os.path.basename(src)))

    def get_outputs(self, include_bytecode=True):
        hook = [os.path.join(self.build_lib, os.path.basename(src)) for src in HOOK_FILES]
        return super().get_outputs(include_bytecode) + hook


setup(cmdclass={"build_py": build_py_with_recipes_hook})
