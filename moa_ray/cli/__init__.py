"""The ``moa-ray`` command line: main.py (the group, ``run``, ``config``, ``models``), eval.py and serve.py (their
command groups), options.py (the options they share), render.py (the views), errors.py (the exit policy)."""

from moa_ray.cli.main import main

__all__ = ["main"]
