"""Exact-match scoring of a generation table (GSM8K): ``moa-ray eval judge`` without a judge model.

Rows of exact-match datasets are scored in-process by the benchmark's own rule (the final number
of the answer against the reference's, :mod:`moa_ray.eval.gsm8k`) into ``OUT/exact``, one row per
(prompt, pipeline, turn); keys already scored are skipped, so a rerun only scores new answers.
No Ray and no model are involved: scoring 1,319 answers takes well under a second.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from moa_ray.eval.benchmarks import gsm8k_final_answer
from moa_ray.eval.datasets import GSM8K, DatasetError
from moa_ray.eval.gsm8k import answers_match, extract_answer
from moa_ray.eval.lease import WriterLease
from moa_ray.eval.schema import ExactRow
from moa_ray.eval.store import RowTable, join

EXACT_DIR = "exact"
#: Datasets scored by exact match instead of a judge.
EXACT_DATASETS = (GSM8K,)


def is_exact_dataset(name: str | None) -> bool:
    return name in EXACT_DATASETS


def exact_table(out: str) -> RowTable[ExactRow]:
    return RowTable(join(out, EXACT_DIR), ExactRow)


def plan_exact(
    generations: Mapping[tuple[Any, ...], dict[str, Any]],
    done: Mapping[tuple[Any, ...], dict[str, Any]],
    *,
    pipelines: list[str] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The finished generation rows of exact-match datasets not scored yet (at most ``limit`` prompts per pipeline)."""
    per_pipeline: dict[str, int] = defaultdict(int)
    todo = []
    for key in sorted(generations):
        row = generations[key]
        if row["status"] != "ok" or not is_exact_dataset(row["dataset"]) or (pipelines is not None and row["pipeline"] not in pipelines):
            continue
        if limit is not None and per_pipeline[row["pipeline"]] >= limit:
            continue
        per_pipeline[row["pipeline"]] += 1
        prev = done.get(key)
        if prev is None or prev["status"] != "ok":
            todo.append(row)
    return todo


def score_row(row: Mapping[str, Any], run_id: str, attempt: int = 1) -> ExactRow:
    """Score one generation row; a row without a usable reference is a failed score, never a silent zero."""
    base = {
        "run_id": run_id,
        "prompt_id": row["prompt_id"],
        "pipeline": row["pipeline"],
        "turn": row["turn"],
        "dataset": row["dataset"],
        "category": row["category"],
        "attempt": attempt,
    }
    prediction = extract_answer(row["output"])
    try:
        answer = gsm8k_final_answer(row["reference"] or "")
    except DatasetError as err:
        return ExactRow(**base, prediction=prediction, status="error", error=str(err))
    return ExactRow(**base, prediction=prediction, answer=answer, correct=answers_match(prediction, answer))


class ExactSummary(BaseModel):
    run_id: str
    out: str
    scored: int
    correct: int
    failed: int
    done_before: int


def run_exact(
    generations: Mapping[tuple[Any, ...], dict[str, Any]],
    out: str,
    run_id: str,
    *,
    pipelines: list[str] | None = None,
    limit: int | None = None,
) -> ExactSummary:
    """Score the unscored exact-match answers into ``OUT/exact`` as the output's only writer."""
    table = exact_table(out)
    done = table.latest()
    todo = plan_exact(generations, done, pipelines=pipelines, limit=limit)
    rows = [score_row(r, run_id, attempt=(prev["attempt"] + 1) if (prev := done.get(_key(r))) else 1) for r in todo]
    if rows:
        with WriterLease(out, run_id):
            with table.writer(run_id, flush_rows=len(rows)) as writer:
                writer.add(rows)
            table.compact(run_id)
    wanted = [k for k, r in generations.items() if is_exact_dataset(r["dataset"]) and (pipelines is None or r["pipeline"] in pipelines)]
    already = sum(1 for k in wanted if (prev := done.get(k)) is not None and prev["status"] == "ok")
    return ExactSummary(
        run_id=run_id,
        out=out,
        scored=sum(r.status == "ok" for r in rows),
        correct=sum(bool(r.correct) for r in rows),
        failed=sum(r.status == "error" for r in rows),
        done_before=already,
    )


def _key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(row[c] for c in ExactRow.KEY)
