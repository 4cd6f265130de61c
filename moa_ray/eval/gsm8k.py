"""GSM8K exact-match scoring: the final number of a free-form answer against the reference, no LLM judge.

Where the answer is, in order of trust: after the last ``####`` (GSM8K's own format), inside the
last ``\\boxed{...}``, after the last "answer is" / "answer:" marker (first number on that line),
else the last number of the text. Numbers are read as written by people and models: thousands
commas, ``$``, ``%``, units and trailing sentences are ignored, negatives, decimals and fractions
(``3/4``, ``\\frac{3}{4}``) are understood. Two answers match when they are the same number
(``12`` == ``12.0`` == ``12.00``), compared exactly as fractions, never as floats.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from moa_ray.errors import MoARayError


class GSM8KError(MoARayError):
    """Outputs cannot be scored against GSM8K (unknown problems, malformed records)."""


_BOUNDARY = r"(?<![\w.,/])"  # a number starts after a non-word character: "16-3" is 16 and 3, "-3" alone is negative
_NUMBER = re.compile(
    _BOUNDARY
    + r"(-?(?:\d+\s*/\s*\d+(?![\w./])"  # a fraction 3/4 (not a date 3/4/2020 or units km/h)
    + r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?"  # 1,234,567.89
    + r"|\d+(?:\.\d+)?"  # 1234 or 12.5
    + r"|\.\d+))"  # .5
)
_MARKER = re.compile(r"\banswer\s*(?:is\b|was\b|:|=)", re.IGNORECASE)
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")


def _normalize(text: str) -> str:
    """Plain-text numbers: unicode minus, LaTeX fractions, ``{,}`` separators, escaped ``$`` and ``%``."""
    text = text.replace("\u2212", "-").replace("{,}", ",").replace("\\$", "$").replace("\\%", "%")
    return _LATEX_FRACTION.sub(r"\1/\2", text)


def _clean(number: str) -> str:
    return re.sub(r"[,\s]", "", number)


def _numbers(text: str) -> list[str]:
    return [_clean(m.group(1)) for m in _NUMBER.finditer(text)]


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[begin : i - 1] if depth == 0 else text[begin:]


def extract_answer(text: str | None) -> str | None:
    """The final numeric answer of a free-form solution, as a plain number string (``"1000"``, ``"-3.5"``, ``"3/4"``),
    or None when the text holds no number."""
    if not text:
        return None
    text = _normalize(text)
    if "####" in text:
        found = _numbers(text.rsplit("####", 1)[1])
        if found:
            return found[0]
    boxed = _last_boxed(text)
    if boxed is not None:
        found = _numbers(boxed)
        if found:
            return found[-1]
    for marker in reversed(list(_MARKER.finditer(text))):
        line = text[marker.end() :].lstrip().split("\n", 1)[0]
        found = _numbers(line)
        if found:
            return found[0]
    found = _numbers(text)
    return found[-1] if found else None


def to_number(answer: str | None) -> Fraction | None:
    """An answer string as an exact number (``"1,000"``, ``"$12.50"``, ``"3/4"``), or None if it is not one."""
    if answer is None:
        return None
    cleaned = _clean(answer).lstrip("$").rstrip("%")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(prediction: str | None, reference: str) -> bool:
    """Whether an extracted answer is the reference's number (``12`` == ``12.0`` == ``12.00``)."""
    predicted, expected = to_number(prediction), to_number(reference)
    if expected is None:
        raise GSM8KError(f"the reference answer {reference!r} is not a number")
    return predicted is not None and predicted == expected


def is_correct(output: str | None, reference: str) -> bool:
    """Whether a free-form output's final answer equals the reference answer."""
    return answers_match(extract_answer(output), reference)


class Accuracy(BaseModel):
    """Exact-match accuracy with its binomial standard error sqrt(p (1 - p) / n)."""

    accuracy: float = Field(ge=0, le=1)
    standard_error: float = Field(ge=0)
    n: int = Field(ge=1)
    n_correct: int = Field(ge=0)


def accuracy(correct: Sequence[bool]) -> Accuracy:
    """Accuracy of per-item correctness flags."""
    n = len(correct)
    if n == 0:
        raise GSM8KError("no items to score")
    k = sum(bool(c) for c in correct)
    p = k / n
    return Accuracy(accuracy=p, standard_error=math.sqrt(p * (1 - p) / n), n=n, n_correct=k)


# --------------------------------------------------------------------------- outputs files


class OutputsScore(BaseModel):
    """``moa-ray eval metrics --dataset gsm8k --outputs FILE --json``: accuracy and per-item correctness in file order."""

    accuracy: float
    standard_error: float
    n: int
    correct: list[bool]


def reference_answers() -> dict[str, str]:
    """The shipped GSM8K problems: question text (stripped) -> final answer."""
    from moa_ray.eval.datasets import GSM8K, load_dataset

    return {p.turns[0].strip(): p.metadata["answer"] for p in load_dataset(GSM8K).prompts}


def score_outputs(records: Sequence[Any], answers: Mapping[str, str] | None = None) -> OutputsScore:
    """Score AlpacaEval-style outputs (``{"instruction", "output"}`` records) against GSM8K, matched by instruction text."""
    answers = reference_answers() if answers is None else answers
    if not records:
        raise GSM8KError("the outputs file holds no records")
    unknown: list[str] = []
    correct: list[bool] = []
    for n, record in enumerate(records, start=1):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) or "output" not in record:
            raise GSM8KError(f"record {n} is not an object with a string 'instruction' and an 'output'")
        output = record["output"]
        if output is not None and not isinstance(output, str):
            raise GSM8KError(f"record {n}: 'output' must be a string or null")
        reference = answers.get(record["instruction"].strip())
        if reference is None:
            unknown.append(record["instruction"])
            continue
        correct.append(is_correct(output, reference))
    if unknown:
        shown = "; ".join(repr(u[:60] + ("..." if len(u) > 60 else "")) for u in unknown[:3])
        raise GSM8KError(f"{len(unknown)} instruction(s) are not GSM8K test problems, e.g. {shown}")
    acc = accuracy(correct)
    return OutputsScore(accuracy=acc.accuracy, standard_error=acc.standard_error, n=acc.n, correct=correct)


def score_outputs_file(path: str | Path) -> OutputsScore:
    """:func:`score_outputs` of an AlpacaEval-style outputs file (a JSON list of ``{"instruction", "output"}``)."""
    from moa_ray.eval.datasets import read_json_list

    return score_outputs(read_json_list(path, GSM8KError))
