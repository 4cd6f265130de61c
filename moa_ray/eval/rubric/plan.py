"""Which generations a rubric judge scores, with what, and where its rows go (``OUT/rubric``).

The benchmark follows from the generation rows' ``dataset`` (flask, flask-hard,
just-eval, ceb-s, ceb-t): ``eval judge`` picks the rubric by itself, ``--mode rubric``
forces it (and refuses a dataset that has none). Each item carries its prompt's
metadata (skills, aspects, axis...) looked up in the dataset at planning time, so a
bad prompt fails before Ray starts and workers load no data.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from moa_ray.chat import ChatParams
from moa_ray.eval.rubric.base import RubricInputError, RubricItem, RubricJudge, failed_row, judge_item
from moa_ray.eval.rubric.ceb import CebJudge
from moa_ray.eval.rubric.flask import FlaskJudge
from moa_ray.eval.rubric.just_eval_judge import JustEvalJudge
from moa_ray.eval.schema import RubricRow
from moa_ray.eval.store import RowTable, join
from moa_ray.pipeline.agents import Agent

RUBRIC_DIR = "rubric"
RUBRIC_MODE = "rubric"
RUBRICS: dict[str, RubricJudge] = {b: j for j in (FlaskJudge(), JustEvalJudge(), CebJudge()) for b in j.benchmarks}

#: dataset name -> {prompt id: the prompt as a dict (EvalPrompt.model_dump(): metadata, references...)}
PromptLookup = Callable[[str], Mapping[str, Mapping[str, Any]]]


def uses_rubric(dataset: str | None) -> bool:
    return dataset in RUBRICS


def rubric_for(benchmark: str) -> RubricJudge:
    try:
        return RUBRICS[benchmark]
    except KeyError:
        raise RubricInputError(f"no rubric judge for dataset {benchmark!r} (rubric benchmarks: {', '.join(RUBRICS)})") from None


def rubric_table(out: str) -> RowTable[RubricRow]:
    return RowTable(join(out, RUBRIC_DIR), RubricRow)


def dataset_prompts(name: str) -> dict[str, dict[str, Any]]:
    """The shipped dataset's prompts by id, as plain dicts (its ``metadata`` included)."""
    from moa_ray.eval.datasets import load_dataset

    return {pid: p.model_dump() for pid, p in load_dataset(name).by_id().items()}


def plan_rubric(
    generations: Mapping[tuple[Any, ...], dict[str, Any]],
    judge: str,
    done: Mapping[tuple[Any, ...], dict[str, Any]],
    *,
    mode: str = "auto",
    pipelines: list[str] | None = None,
    limit: int | None = None,
    prompts: PromptLookup | None = None,
) -> list[RubricItem]:
    """Rubric items for finished turn-1 answers of rubric benchmarks not yet judged ok by ``judge`` (failed ones again).

    ``prompts`` looks a dataset's prompts up by name (default :func:`dataset_prompts`, resolved at call time).
    """
    lookup = prompts or dataset_prompts
    if mode not in ("auto", RUBRIC_MODE):
        return []
    rows = sorted(
        (
            r
            for (_, pipeline, turn), r in generations.items()
            if turn == 1 and r["status"] == "ok" and (pipelines is None or pipeline in pipelines)
        ),
        key=lambda r: (r["prompt_id"], r["pipeline"]),
    )
    if mode == RUBRIC_MODE:
        other = sorted({r["dataset"] for r in rows if not uses_rubric(r["dataset"])})
        if other:
            raise RubricInputError(
                f"--mode rubric: no rubric judge for dataset(s) {', '.join(other)} (rubric benchmarks: {', '.join(RUBRICS)})"
            )
    lookups: dict[str, Mapping[str, Mapping[str, Any]]] = {}
    per_pipeline: dict[str, int] = defaultdict(int)
    items: list[RubricItem] = []
    for row in rows:
        dataset = row["dataset"]
        if not uses_rubric(dataset):
            continue
        if limit is not None and per_pipeline[row["pipeline"]] >= limit:
            continue
        per_pipeline[row["pipeline"]] += 1
        prev = done.get((row["prompt_id"], row["pipeline"], 1, judge, dataset))
        if prev is not None and prev["status"] == "ok":
            continue
        if dataset not in lookups:
            lookups[dataset] = lookup(dataset)
        info = lookups[dataset].get(row["prompt_id"])
        if info is None:
            raise RubricInputError(f"prompt {row['prompt_id']!r} of the generations is not in dataset {dataset!r}")
        references = list(info.get("references") or [])
        item = RubricItem(
            prompt_id=row["prompt_id"],
            pipeline=row["pipeline"],
            benchmark=dataset,
            instruction=row["instruction"],
            output=row["output"] or "",
            reference=row["reference"] if row["reference"] is not None else (references[0] if references else None),
            metadata=dict(info.get("metadata") or {}),
            attempt=prev["attempt"] + 1 if prev else 1,
        )
        rubric_for(dataset).check(item)
        items.append(item)
    return items


async def judge_rubric(item: RubricItem, agent: Agent, params: ChatParams, *, judge: str, run_id: str) -> RubricRow:
    """The row of one item, judged by its benchmark's rubric (what :class:`~moa_ray.eval.judge.JudgeHandler` calls)."""
    return await judge_item(rubric_for(item.benchmark), item, agent, params, judge=judge, run_id=run_id)


def rubric_failed(item: RubricItem, error: str, *, judge: str, run_id: str) -> RubricRow:
    return failed_row(rubric_for(item.benchmark), item, error, judge=judge, run_id=run_id)
