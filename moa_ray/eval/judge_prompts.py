"""Judge prompts (MT-Bench's ``judge_prompts.jsonl``, shipped verbatim) and the parsers of their verdicts.

* AlpacaEval-style pairwise preference: ``pair-v2`` ("[[A]]", "[[B]]" or "[[C]]" for a tie),
  asked twice with the two answers swapped.
* MT-Bench single-answer grading: ``single-v1`` (or ``single-math-v1`` with the reference
  answer for math, reasoning and coding), ``-multi-turn`` variants for turn 2; the
  rating is "[[N]]" on a 1-10 scale.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Literal

from pydantic import BaseModel

from moa_ray.chat import ChatMessage
from moa_ray.eval.datasets import shipped_jsonl

PAIRWISE_PROMPT = "pair-v2"
#: MT-Bench categories graded against a reference answer (FastChat's NEED_REF_CATS).
MT_BENCH_REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
Verdict = Literal["A", "B", "C"]

_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
_VERDICTS: dict[str, Verdict] = {"[[A]]": "A", "[[B]]": "B", "[[C]]": "C"}


class JudgePrompt(BaseModel):
    """One entry of judge_prompts.jsonl."""

    name: str
    type: Literal["pairwise", "single"]
    system_prompt: str
    prompt_template: str
    description: str = ""
    category: str = "general"
    output_format: str

    def messages(self, **fields: str) -> list[ChatMessage]:
        """The judge conversation: the prompt's system text, then the filled template as the user turn."""
        return [
            ChatMessage(role="system", content=self.system_prompt),
            ChatMessage(role="user", content=self.prompt_template.format(**fields)),
        ]


@cache
def judge_prompts() -> dict[str, JudgePrompt]:
    return {p.name: p for p in (JudgePrompt.model_validate(r) for r in shipped_jsonl("mt_bench", "judge_prompts.jsonl"))}


def needs_reference(category: str | None) -> bool:
    return category in MT_BENCH_REFERENCE_CATEGORIES


def single_prompt_name(turn: int, with_reference: bool) -> str:
    """FastChat's choice of single-answer prompt for a turn."""
    base = "single-math-v1" if with_reference else "single-v1"
    return base if turn == 1 else f"{base}-multi-turn"


def single_grade_messages(
    turn: int, questions: list[str], answers: list[str], references: list[str | None] | None = None
) -> tuple[str, list[ChatMessage]]:
    """The prompt name and messages that grade ``answers[turn - 1]`` (turn 2 sees the whole conversation)."""
    refs = list(references or []) + [None] * turn
    with_ref = all(refs[i] is not None for i in range(turn))
    name = single_prompt_name(turn, with_ref)
    prompt = judge_prompts()[name]
    if turn == 1:
        fields = {"question": questions[0], "answer": answers[0]}
        if with_ref:
            fields["ref_answer_1"] = refs[0] or ""
    elif turn == 2:
        fields = {"question_1": questions[0], "question_2": questions[1], "answer_1": answers[0], "answer_2": answers[1]}
        if with_ref:
            fields.update(ref_answer_1=refs[0] or "", ref_answer_2=refs[1] or "")
    else:
        raise ValueError(f"MT-Bench grading prompts cover turns 1 and 2, not {turn}")
    return name, prompt.messages(**fields)


def pairwise_messages(question: str, answer_a: str, answer_b: str) -> list[ChatMessage]:
    return judge_prompts()[PAIRWISE_PROMPT].messages(question=question, answer_a=answer_a, answer_b=answer_b)


def parse_rating(judgment: str) -> float | None:
    """The "[[N]]" rating (FastChat's patterns), or None when the judge gave none in 1-10."""
    match = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
    if match is None:
        return None
    value = float(match.group(1))
    return value if 1.0 <= value <= 10.0 else None


def parse_verdict(judgment: str) -> Verdict | None:
    """ "[[A]]", "[[B]]" or "[[C]]"; None when missing or ambiguous (several different verdicts)."""
    found = {v for tag, v in _VERDICTS.items() if tag in judgment}
    return found.pop() if len(found) == 1 else None


def verdict_preference(verdict: Verdict, pipeline_is_a: bool) -> float:
    """AlpacaEval encoding: 1 = reference wins, 2 = pipeline wins, 1.5 = tie."""
    if verdict == "C":
        return 1.5
    pipeline_won = (verdict == "A") == pipeline_is_a
    return 2.0 if pipeline_won else 1.0
