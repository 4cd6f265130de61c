"""What every rubric judge shares: build the official messages, ask, parse, ask again on malformed output, make a row.

A benchmark's judge (:mod:`.flask`, :mod:`.just_eval_judge`, :mod:`.ceb`) only says how
its prompt is built and how its judge's answer is parsed; the retry policy and the row
live here, so the three behave alike: a judgment the parser rejects is asked again up
to ``max_attempts`` calls in all, each rejection is recorded, and when none parses the
row is an error that names the reason, never a score.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from moa_ray.chat import ChatMessage, ChatParams
from moa_ray.errors import MoARayError
from moa_ray.eval.schema import AspectScore, RubricLabel, RubricRow
from moa_ray.pipeline.agents import Agent

#: One call plus two more when the judge's output cannot be parsed.
DEFAULT_MAX_ATTEMPTS = 3


class MalformedJudgment(ValueError):
    """The judge answered, but not in the form the benchmark's parser accepts."""


class RubricInputError(MoARayError):
    """A prompt lacks what its benchmark's judge needs (reference answer, skills, template kind...)."""


class RubricItem(BaseModel):
    """One answer to judge with a rubric, carrying the dataset metadata its prompt needs (workers load no data)."""

    kind: Literal["rubric"] = "rubric"
    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    turn: int = Field(default=1, ge=1)
    benchmark: str = Field(min_length=1)
    instruction: str
    output: str
    reference: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    attempt: int = Field(default=1, ge=1, description="Run attempt of this key (1 + earlier failed rows).")


class RubricJudge(ABC):
    """A benchmark's official judge: its template, its parser, and the labels its report groups by."""

    #: Dataset names this judge scores.
    benchmarks: ClassVar[tuple[str, ...]]

    @abstractmethod
    def prompt_name(self, item: RubricItem) -> str:
        """Name of the template used for ``item`` (recorded in the row)."""

    @abstractmethod
    def messages(self, item: RubricItem) -> list[ChatMessage]:
        """The judge conversation, exactly as the official code sends it; RubricInputError if the item cannot be judged."""

    @abstractmethod
    def parse(self, item: RubricItem, judgment: str) -> list[AspectScore]:
        """Scores of every aspect the item is judged on; MalformedJudgment if any is missing or invalid."""

    def labels(self, item: RubricItem) -> list[RubricLabel]:
        """Groupings of the item for the report (none by default)."""
        return []

    def check(self, item: RubricItem) -> None:
        """Fail now, not in a worker, when the item cannot be judged."""
        self.messages(item)


def _base(item: RubricItem, rubric: RubricJudge, judge: str, run_id: str) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "prompt_id": item.prompt_id,
        "pipeline": item.pipeline,
        "turn": item.turn,
        "judge": judge,
        "benchmark": item.benchmark,
        "judge_prompt": rubric.prompt_name(item),
        "labels": rubric.labels(item),
        "attempt": item.attempt,
    }


async def judge_item(
    rubric: RubricJudge,
    item: RubricItem,
    agent: Agent,
    params: ChatParams,
    *,
    judge: str,
    run_id: str,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> RubricRow:
    """Ask until the judgment parses or ``max_attempts`` calls are spent; transport errors propagate (the run retries them)."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    messages = rubric.messages(item)
    rejected: list[str] = []
    prompt_tokens = completion_tokens = 0
    latency = 0.0
    text = ""
    for calls in range(1, max_attempts + 1):
        start = time.perf_counter()
        completion = await agent.chat(messages, params)
        latency += time.perf_counter() - start
        prompt_tokens += completion.usage.prompt_tokens
        completion_tokens += completion.usage.completion_tokens
        text = completion.text
        try:
            scores = rubric.parse(item, text)
        except MalformedJudgment as err:
            rejected.append(str(err))
            continue
        return RubricRow(
            **_base(item, rubric, judge, run_id),
            scores=scores,
            judgment=text,
            rejected=rejected,
            judge_attempts=calls,
            judge_prompt_tokens=prompt_tokens,
            judge_completion_tokens=completion_tokens,
            latency_s=latency,
        )
    return RubricRow(
        **_base(item, rubric, judge, run_id),
        judgment=text,
        rejected=rejected[:-1],
        judge_attempts=max_attempts,
        judge_prompt_tokens=prompt_tokens,
        judge_completion_tokens=completion_tokens,
        latency_s=latency,
        status="error",
        error=f"malformed judgment after {max_attempts} attempt(s): {rejected[-1]}",
    )


def failed_row(rubric: RubricJudge, item: RubricItem, error: str, *, judge: str, run_id: str) -> RubricRow:
    """The error row of an item whose judge call failed (its worker died, the endpoint refused...)."""
    return RubricRow(**_base(item, rubric, judge, run_id), status="error", error=error)
