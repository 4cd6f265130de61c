"""Rubric judges of FLASK, Just-Eval and CEB: the official prompts and parsers, one module per benchmark."""

from moa_ray.eval.rubric.base import MalformedJudgment, RubricInputError, RubricItem, RubricJudge
from moa_ray.eval.rubric.plan import RUBRIC_MODE, RUBRICS, plan_rubric, rubric_for, rubric_table, uses_rubric

__all__ = [
    "RUBRICS",
    "RUBRIC_MODE",
    "MalformedJudgment",
    "RubricInputError",
    "RubricItem",
    "RubricJudge",
    "plan_rubric",
    "rubric_for",
    "rubric_table",
    "uses_rubric",
]
