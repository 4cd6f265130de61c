"""The benchmarks eval knows: one module each (its dataset loader and its judgment kinds), and their registry.

:mod:`.base` is what a benchmark module provides (:class:`~.base.Benchmark`, :class:`~.base.JudgmentKind`) and what
the stages hand it; :mod:`.rubric` the rubric kind that FLASK, Just-Eval and CEB share; :mod:`.registry` lists the
built-ins and takes others through :func:`~.registry.register`.
"""
