"""FLASK and FLASK-Hard: the dataset, its judge (kaistAI/FLASK ``gpt_review/gpt4_eval.py``), its report tables.

The judge scores 1-5 per annotated skill against the reference answer.

The prompt is FLASK's review prompt 2 ("with sample answer", the one ``gpt4_eval.py``
sends; prompt 1 only for an item without a reference), filled with the item's skills
and their rubric from ``skillset_description.json`` in the order annotated, at
temperature 0. The judge ends with a Python dict of skill -> score; it is read the way
``parse_score`` reads it (the last ``{...}``, newlines dropped, ``_`` -> space,
lower-cased, ``ast.literal_eval``; "na" / "n/a" / "not applicable" = N/A), and a skill
is matched to its key the way FLASK's ``aggregate_skill.py`` does (the word after
"logical", else the first word). Stricter than FLASK, which silently logs a broken
dict: a missing annotated skill or a score outside 1-5 makes the judgment malformed.

The report (``aggregate_skill.py``, ``aggregate_domain.py``, ``aggregate_difficulty_skill.py``): mean score per
skill, per domain (an item counts once for each of its domains) and per difficulty, N/A left out.

Each prompt keeps FLASK's annotations in its metadata: ``skills``, ``domain`` (the first annotated domain;
``domains`` has all), ``difficulty``, ``task``, ``idx``; the reference answer is ``references[0]``.
"""

from __future__ import annotations

import ast
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from functools import cache
from typing import Any

from pydantic import BaseModel

from moa_ray.chat import ChatMessage
from moa_ray.eval.benchmarks.base import Benchmark, BenchmarkTable, Cell, Record
from moa_ray.eval.benchmarks.rubric import (
    COST_COLUMNS,
    RUBRIC_MODE,
    MalformedJudgment,
    RubricInputError,
    RubricItem,
    RubricJudge,
    by_pipeline,
    mean,
    ordered,
    pipeline_rows,
    row_labels,
    row_scores,
    rubric_score,
    with_cost,
)
from moa_ray.eval.datasets import DatasetError, EvalDataset, EvalPrompt, build_dataset, data_file, require_keys, shipped_jsonl
from moa_ray.eval.schema import AspectScore, RubricLabel

FLASK = "flask"
FLASK_HARD = "flask-hard"

#: FLASK's own spellings of a judge's "not applicable" (after lower-casing).
NA_VALUES = ("na", "n/a", "not applicable")
_DICT = re.compile(r"{[^}]+}")


class ReviewPrompt(BaseModel):
    """One line of FLASK's ``review_prompt.jsonl``."""

    prompt_id: int
    system_prompt: str
    prompt_template: str
    defaults: dict[str, str]
    description: str = ""


class Skill(BaseModel):
    """One entry of FLASK's ``skillset_description.json``."""

    Skill: str
    Criteria: str
    Scoring: dict[str, str]


@cache
def review_prompts() -> dict[int, ReviewPrompt]:
    text = data_file("flask", "review_prompt.jsonl").read_text(encoding="utf-8")
    prompts = (ReviewPrompt.model_validate(json.loads(line)) for line in text.splitlines() if line.strip())
    return {p.prompt_id: p for p in prompts}


@cache
def skillset() -> tuple[Skill, ...]:
    raw = json.loads(data_file("flask", "skillset_description.json").read_text(encoding="utf-8"))
    return tuple(Skill.model_validate(s) for s in raw)


def find_skill(label: str) -> Skill:
    """FLASK's lookup: the first skill whose name contains the label."""
    for skill in skillset():
        if label in skill.Skill:
            return skill
    raise RubricInputError(f"unknown FLASK skill {label!r} (skills: {', '.join(s.Skill for s in skillset())})")


def skills_text(labels: list[str]) -> str:
    """The ``{skills}`` block of the review prompt, built as ``gen_prompt`` builds it."""
    text = ""
    for label in labels:
        skill = find_skill(label)
        text += f"\n{skill.Skill}: {skill.Criteria}"
        for level in ("1", "2", "3", "4", "5"):
            text += f"\nScore {level}: {skill.Scoring[level]}"
        text += "\n\n"
    return text


def skill_key(name: str) -> str:
    """FLASK's aggregation key of a skill name: 'logical correctness' -> 'correctness', 'readability' -> 'readability'."""
    words = name.replace("_", " ").lower().split()
    if not words:
        return ""
    return words[1] if "logical" in words[0] and len(words) > 1 else words[0]


def parse_score_dict(judgment: str) -> dict[Any, Any]:
    """The judge's last ``{...}`` as FLASK's ``parse_score`` reads it; MalformedJudgment when there is none."""
    found = _DICT.findall(judgment)
    if not found:
        raise MalformedJudgment("no {skill: score} dictionary in the judgment")
    text = found[-1].replace("\n", "").replace("_", " ").lower()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
        raise MalformedJudgment(f"the last {{...}} is not a Python dict literal ({type(err).__name__})") from None
    if not isinstance(value, dict):
        raise MalformedJudgment(f"the last {{...}} is a {type(value).__name__}, not a dict")
    return {k: ("N/A" if isinstance(v, str) and v.strip() in NA_VALUES else v) for k, v in value.items()}


def parse_flask(judgment: str, skills: list[str]) -> list[AspectScore]:
    """A 1-5 score (or N/A) for every annotated skill, named as annotated, in annotation order."""
    scores = parse_score_dict(judgment)
    by_key: dict[str, Any] = {}
    for key, value in scores.items():
        if isinstance(key, str):
            by_key.setdefault(skill_key(key), value)
    out = []
    for skill in skills:
        key = skill_key(skill)
        if key not in by_key:
            raise MalformedJudgment(f"no score for {skill!r} (keys: {', '.join(map(str, scores)) or 'none'})")
        out.append(rubric_score(skill, by_key[key]))
    return out


def _skills(item: RubricItem) -> list[str]:
    skills = item.metadata.get("skills")
    if not isinstance(skills, list) or not skills or not all(isinstance(s, str) and s for s in skills):
        raise RubricInputError(f"FLASK prompt {item.prompt_id!r} has no 'skills' list in its metadata")
    return skills


class FlaskJudge(RubricJudge):
    """FLASK and FLASK-Hard (same prompt, same rubric)."""

    def _prompt(self, item: RubricItem) -> ReviewPrompt:
        return review_prompts()[2 if item.reference is not None else 1]

    def prompt_name(self, item: RubricItem) -> str:
        return f"flask-review-{self._prompt(item).prompt_id}"

    def messages(self, item: RubricItem) -> list[ChatMessage]:
        prompt = self._prompt(item)
        content = prompt.prompt_template.format(
            question=item.instruction,
            response=item.output,
            skills=skills_text(_skills(item)),
            num=3,
            sample_answer=item.reference or "",
            **prompt.defaults,
        )
        return [ChatMessage(role="system", content=prompt.system_prompt), ChatMessage(role="user", content=content)]

    def parse(self, item: RubricItem, judgment: str) -> list[AspectScore]:
        return parse_flask(judgment, _skills(item))

    def labels(self, item: RubricItem) -> list[RubricLabel]:
        # the loader keeps every annotated domain in "domains" ("domain" is the first); an item counts in each
        domains = item.metadata.get("domains") or item.metadata.get("domain") or []
        domains = [domains] if isinstance(domains, str) else domains
        labels = [RubricLabel(name="domain", value=str(d)) for d in domains]
        for name in ("difficulty", "task"):
            value = item.metadata.get(name)
            if value is not None:
                labels.append(RubricLabel(name=name, value=str(value)))
        return labels

    def tables(self, benchmark: str, rows: Sequence[Record], costs: dict[str, dict[str, Cell]]) -> list[BenchmarkTable]:
        return flask_tables(benchmark, rows, costs)


# --------------------------------------------------------------------------- report

#: FLASK's orders (aggregate_domain.py, aggregate_difficulty_skill.py); unknown values follow, sorted.
FLASK_DOMAINS = (
    "Humanities",
    "Language",
    "Social Science",
    "History",
    "Culture",
    "Technology",
    "Coding",
    "Math",
    "Natural Science",
    "Health",
)
FLASK_DIFFICULTIES = (
    "simple lifestyle knowledge",
    "advanced lifestyle knowledge",
    "formal education knowledge",
    "major level knowledge",
    "expert level knowledge",
)


def flask_tables(benchmark: str, rows: Sequence[Record], costs: dict[str, dict[str, Cell]]) -> list[BenchmarkTable]:
    """Per skill (with the overall mean), per domain and per difficulty, for FLASK or FLASK-Hard."""
    skills = ordered({s.aspect for r in rows for s in row_scores(r)}, [s.Skill for s in skillset()])
    domains = ordered({d for r in rows for d in row_labels(r, "domain")}, FLASK_DOMAINS)
    levels = ordered({d for r in rows for d in row_labels(r, "difficulty")}, FLASK_DIFFICULTIES)
    per_skill: dict[str, dict[str, Cell]] = {}
    per_domain: dict[str, dict[str, Cell]] = {}
    per_level: dict[str, dict[str, Cell]] = {}
    for pipeline, prows in by_pipeline(rows).items():
        by_skill: dict[str, list[float]] = defaultdict(list)
        by_domain: dict[str, list[float]] = defaultdict(list)
        by_level: dict[str, list[float]] = defaultdict(list)
        for row in prows:
            numbers = []
            for s in row_scores(row):
                if s.score is not None:  # N/A is left out, as FLASK's aggregation does
                    by_skill[s.aspect].append(s.score)
                    numbers.append(s.score)
            for domain in row_labels(row, "domain"):
                by_domain[domain].extend(numbers)
            for level in row_labels(row, "difficulty"):
                by_level[level].extend(numbers)
        every = [v for vs in by_skill.values() for v in vs]
        per_skill[pipeline] = {**{k: mean(by_skill[k]) for k in skills}, "overall": mean(every), "n": len(prows)}
        per_domain[pipeline] = {d: mean(by_domain[d]) for d in domains}
        per_level[pipeline] = {d: mean(by_level[d]) for d in levels}
    title = "FLASK-Hard" if benchmark == FLASK_HARD else "FLASK"
    return [
        BenchmarkTable(
            name=f"{benchmark}_skills",
            title=f"{title}: mean score per skill (1-5)",
            columns=[*skills, "overall", "n", *COST_COLUMNS],
            rows=with_cost(per_skill, costs),
            plot_columns=skills,
            ylabel="mean score (1-5)",
        ),
        BenchmarkTable(
            name=f"{benchmark}_domains", title=f"{title}: mean score per domain", columns=domains, rows=pipeline_rows(per_domain)
        ),
        BenchmarkTable(
            name=f"{benchmark}_difficulty", title=f"{title}: mean score per difficulty", columns=levels, rows=pipeline_rows(per_level)
        ),
    ]


# --------------------------------------------------------------------------- dataset


def _flask(name: str, filename: str, prefix: str) -> EvalDataset:
    source = f"flask/{filename}"
    prompts = []
    for n, row in enumerate(shipped_jsonl("flask", filename), start=1):
        require_keys(row, ("idx", "instruction", "answer", "task", "skill", "domain", "difficulty"), source, n)
        domains = row["domain"] if isinstance(row["domain"], list) else [row["domain"]]
        if not domains or not isinstance(row["skill"], list) or not row["skill"]:
            raise DatasetError(f"{source}: item {n} has no domain or no skills")
        prompts.append(
            EvalPrompt(
                prompt_id=f"{prefix}-{int(row['idx']):04d}",
                turns=[row["instruction"]],
                category=str(domains[0]),
                references=[row["answer"]],
                reference_generator="flask",
                metadata={
                    "skills": [str(s) for s in row["skill"]],
                    "domain": str(domains[0]),
                    "domains": [str(d) for d in domains],
                    "difficulty": row["difficulty"],
                    "task": row["task"],
                    "idx": int(row["idx"]),
                },
            )
        )
    return build_dataset(name, prompts)


def load_flask() -> EvalDataset:
    """The 1,740 FLASK items: 1-5 per annotated skill against the reference answer (MoA paper, Figure 3)."""
    return _flask(FLASK, "flask_evaluation.jsonl", "flask")


def load_flask_hard() -> EvalDataset:
    """FLASK-Hard: the 89 expert-level FLASK items."""
    return _flask(FLASK_HARD, "flask_hard_evaluation.jsonl", "flask-hard")


JUDGE = FlaskJudge()
BENCHMARKS = (
    Benchmark(name=FLASK, load=load_flask, auto_kind=RUBRIC_MODE, rubric=JUDGE),
    Benchmark(name=FLASK_HARD, load=load_flask_hard, auto_kind=RUBRIC_MODE, rubric=JUDGE),
)
