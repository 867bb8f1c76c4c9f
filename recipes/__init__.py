"""flexgen_long's torchtune recipes, run from the repository root as ``tune run recipes/<name>.py --config ...``.

A regular package (this file) so that, wherever the repository root is on ``sys.path`` before site-packages
(``python -m recipes.x``, torchrun's ``-m`` launch, pytest), it wins over the ``recipes`` stub that torchtune's wheel
installs; for plain ``tune run`` (which appends the current directory last) see ``startup/flexgen_long_recipes.py``.
"""
