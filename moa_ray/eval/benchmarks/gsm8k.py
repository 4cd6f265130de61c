"""GSM8K: the dataset and its exact-match scoring, the final number of a free-form answer against the reference, no LLM judge.

Where the answer is, in order of trust: after the last ``####`` (GSM8K's own format), inside the
last ``\\boxed{...}``, after the last "answer is" / "answer:" marker (first number on that line),
else the last number of the text. Numbers are read as written by people and models: thousands
commas, ``$``, ``%``, units and trailing sentences are ignored, negatives, decimals and fractions
(``3/4``, ``\\frac{3}{4}``) are understood. Two answers match when they are the same number
(``12`` == ``12.0`` == ``12.00``), compared exactly as fractions, never as floats.

``eval judge`` scores a generation table's GSM8K answers in this process, without a judge model (the ``exact``
kind), into ``OUT/exact``, one row per (prompt, pipeline, turn); keys already scored are skipped, so a rerun only
scores new answers. Each prompt keeps the final answer (after ``####``, commas removed) in its metadata as
``answer``; the whole reference solution is ``references[0]``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from moa_ray.errors import MoARayError
from moa_ray.eval.benchmarks.base import (
    Aggregate,
    Benchmark,
    Generations,
    JudgeContext,
    JudgmentKind,
    Key,
    PlanRequest,
    ReportScope,
    is_done,
    next_attempt,
)
from moa_ray.eval.datasets import DatasetError, EvalDataset, EvalPrompt, build_dataset, read_json_list, require_keys, shipped_jsonl
from moa_ray.eval.report_data import is_ok, of_pipelines
from moa_ray.eval.schema import ExactRow, GenerationRow
from moa_ray.eval.store import RowTable, join

GSM8K = "gsm8k"
EXACT_MODE = "exact"
EXACT_DIR = "exact"


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
    return accuracy_of_counts(sum(bool(c) for c in correct), len(correct))


def accuracy_of_counts(k: int, n: int) -> Accuracy:
    """Accuracy of ``k`` correct items out of ``n`` (what a report counts with Arrow, without a flag per item)."""
    if n == 0:
        raise GSM8KError("no items to score")
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
    return {p.turns[0].strip(): p.metadata["answer"] for p in load_gsm8k().prompts}


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
    return score_outputs(read_json_list(path, GSM8KError))


# --------------------------------------------------------------------------- the exact kind


class ExactItem(BaseModel):
    """One finished answer of an exact-match dataset to score (no model involved)."""

    kind: Literal["exact"] = "exact"
    prompt_id: str
    pipeline: str
    turn: int
    dataset: str
    category: str | None
    output: str | None
    reference: str | None
    attempt: int = 1


class ExactKind(JudgmentKind[ExactItem, ExactRow]):
    """GSM8K's exact match: the final number of the answer against the reference's, in this process."""

    mode: ClassVar[str] = EXACT_MODE
    table_dir: ClassVar[str] = EXACT_DIR
    row_type: ClassVar[type[ExactRow]] = ExactRow
    needs_judge: ClassVar[bool] = False
    report_columns: ClassVar[tuple[str, ...] | None] = ("prompt_id", "pipeline", "turn", "dataset", "status", "correct")

    def plan(self, answers: Generations, done: Mapping[Key, ExactRow], request: PlanRequest) -> list[ExactItem]:
        return [
            ExactItem(
                prompt_id=row.prompt_id,
                pipeline=row.pipeline,
                turn=row.turn,
                dataset=row.dataset,
                category=row.category,
                output=row.output,
                reference=row.reference,
                attempt=next_attempt(done.get(row.row_key())),
            )
            for row in plan_exact(answers, done, pipelines=request.pipelines, limit=request.limit)
        ]

    async def judge(self, item: ExactItem, ctx: JudgeContext) -> ExactRow:
        return score_answer(item, ctx.run_id)

    def failed(self, item: ExactItem, error: str, ctx: JudgeContext) -> ExactRow:
        return ExactRow(**_base(item, ctx.run_id), status="error", error=error)

    def aggregate(self, rows: pa.Table, scope: ReportScope) -> Aggregate:
        """Per pipeline: GSM8K accuracy of the scored rows (counted by Arrow's group_by)."""
        rows = of_pipelines(rows, scope.pipelines)
        scored = pc.and_(
            pc.and_(is_ok(rows), pc.fill_null(pc.equal(rows.column("dataset"), GSM8K), False)), pc.is_valid(rows.column("correct"))
        )
        counts = rows.filter(scored).group_by("pipeline").aggregate([("correct", "count"), ("correct", "sum")])
        columns = {}
        for group in counts.to_pylist():  # a row per pipeline
            acc = accuracy_of_counts(int(group["correct_sum"]), int(group["correct_count"]))
            columns[group["pipeline"]] = {"gsm8k_accuracy": acc.accuracy, "gsm8k_standard_error": acc.standard_error, "gsm8k_n": acc.n}
        return Aggregate(columns=columns)


def _base(item: ExactItem, run_id: str) -> dict[str, Any]:
    fields = ("prompt_id", "pipeline", "turn", "dataset", "category", "attempt")
    return {"run_id": run_id, **{k: getattr(item, k) for k in fields}}


def score_answer(item: ExactItem, run_id: str) -> ExactRow:
    """Score one answer; one without a usable reference is a failed score, never a silent zero."""
    prediction = extract_answer(item.output)
    try:
        answer = gsm8k_final_answer(item.reference or "")
    except DatasetError as err:
        return ExactRow(**_base(item, run_id), prediction=prediction, status="error", error=str(err))
    return ExactRow(**_base(item, run_id), prediction=prediction, answer=answer, correct=answers_match(prediction, answer))


EXACT = ExactKind()


def plan_exact(
    generations: Generations, done: Mapping[Key, ExactRow], *, pipelines: list[str] | None = None, limit: int | None = None
) -> list[GenerationRow]:
    """The finished GSM8K answers not scored yet (at most ``limit`` prompts per pipeline)."""
    per_pipeline: dict[str, int] = defaultdict(int)
    todo = []
    for key in sorted(generations):
        row = generations[key]
        if row.status != "ok" or row.dataset != GSM8K or (pipelines is not None and row.pipeline not in pipelines):
            continue
        if limit is not None and per_pipeline[row.pipeline] >= limit:
            continue
        per_pipeline[row.pipeline] += 1
        if not is_done(done.get(key)):
            todo.append(row)
    return todo


def exact_table(out: str) -> RowTable[ExactRow]:
    return RowTable(join(out, EXACT_DIR), ExactRow)


# --------------------------------------------------------------------------- dataset


def gsm8k_final_answer(solution: str) -> str:
    """The final answer of a GSM8K reference solution: what follows ``####``, thousands commas removed."""
    _, sep, tail = solution.rpartition("####")
    answer = tail.strip().replace(",", "")
    if not sep or not answer:
        raise DatasetError(f"a GSM8K solution has no final answer after '####': {solution[-80:]!r}")
    return answer


def load_gsm8k() -> EvalDataset:
    """The 1,319 GSM8K test problems, scored by exact match of the final number (no judge)."""
    source = "gsm8k/test.jsonl"
    prompts = []
    for n, row in enumerate(shipped_jsonl("gsm8k", "test.jsonl")):
        require_keys(row, ("question", "answer"), source, n + 1)
        prompts.append(
            EvalPrompt(
                prompt_id=f"gsm8k-{n:04d}",
                turns=[row["question"]],
                category=GSM8K,
                references=[row["answer"]],
                reference_generator="gsm8k",
                metadata={"answer": gsm8k_final_answer(row["answer"])},
            )
        )
    return build_dataset(GSM8K, prompts)


BENCHMARKS = (Benchmark(name=GSM8K, load=load_gsm8k, auto_kind=EXACT_MODE),)
