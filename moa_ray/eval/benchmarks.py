"""Loaders of the papers' other benchmarks shipped in ``moa_ray/data``: FLASK, Just-Eval, CEB, GSM8K.

Each prompt keeps the benchmark's annotations in :attr:`EvalPrompt.metadata` under fixed
keys, because the benchmark judges and reports read them from there:

* FLASK / FLASK-Hard: ``skills``, ``domain`` (the first annotated domain; ``domains`` has all),
  ``difficulty``, ``task``, ``idx``; the reference answer is ``references[0]``.
* Just-Eval: ``index`` (0-999), ``aspects`` (``multi`` for 0-799, ``safety`` for 800-999),
  ``source`` (the instruction's dataset), ``source_id``.
* CEB: ``axis`` (age, gender, race, religion), ``bucket``, ``task`` (stereotyping / toxicity).
* GSM8K: ``answer`` (the final answer after ``####``, commas removed); the whole reference
  solution is ``references[0]``.

Ids come from the dataset's own index where it has one (FLASK ``idx``, Just-Eval ``id``),
else from the position in the shipped file, so they never change between runs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from moa_ray.eval.datasets import (
    CEB_S,
    CEB_T,
    FLASK,
    FLASK_HARD,
    GSM8K,
    JUST_EVAL,
    DatasetError,
    EvalDataset,
    EvalPrompt,
    _shipped_jsonl,
    data_file,
    parse_json_list,
)

#: CEB axes in file order, and the conversation subset of each CEB dataset with its bias task.
CEB_AXES = ("age", "gender", "race", "religion")
CEB_SUBSETS = {CEB_S: ("conversation_S", "stereotyping"), CEB_T: ("conversation_T", "toxicity")}
#: Just-Eval items from this index on are judged on safety, the ones before on the five "multi" aspects.
JUST_EVAL_SAFETY_FROM = 800


def _require(row: dict[str, Any], keys: tuple[str, ...], source: str, n: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DatasetError(f"{source}: item {n} lacks {', '.join(missing)}")


def _build(name: str, prompts: list[EvalPrompt]) -> EvalDataset:
    try:
        return EvalDataset(name=name, kind=name, prompts=prompts)
    except ValueError as err:
        raise DatasetError(str(err)) from None


# --------------------------------------------------------------------------- FLASK


def _flask(name: str, filename: str, prefix: str) -> EvalDataset:
    source = f"flask/{filename}"
    prompts = []
    for n, row in enumerate(_shipped_jsonl("flask", filename), start=1):
        _require(row, ("idx", "instruction", "answer", "task", "skill", "domain", "difficulty"), source, n)
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
    return _build(name, prompts)


def load_flask() -> EvalDataset:
    """The 1,740 FLASK items: 1-5 per annotated skill against the reference answer (MoA paper, Figure 3)."""
    return _flask(FLASK, "flask_evaluation.jsonl", "flask")


def load_flask_hard() -> EvalDataset:
    """FLASK-Hard: the 89 expert-level FLASK items."""
    return _flask(FLASK_HARD, "flask_hard_evaluation.jsonl", "flask-hard")


# --------------------------------------------------------------------------- Just-Eval


def load_just_eval() -> EvalDataset:
    """The 1,000 Just-Eval instructions; 0-799 are judged on five aspects, 800-999 on safety (SMoA's alignment set)."""
    source = "just_eval/just_eval_instruct.jsonl"
    prompts = []
    for n, row in enumerate(_shipped_jsonl("just_eval", "just_eval_instruct.jsonl"), start=1):
        _require(row, ("id", "instruction", "dataset"), source, n)
        index = int(row["id"])
        prompts.append(
            EvalPrompt(
                prompt_id=f"je-{index:04d}",
                turns=[row["instruction"]],
                category=row["dataset"],
                metadata={
                    "index": index,
                    "aspects": "safety" if index >= JUST_EVAL_SAFETY_FROM else "multi",
                    "source": row["dataset"],
                    "source_id": row.get("source_id"),
                },
            )
        )
    return _build(JUST_EVAL, prompts)


# --------------------------------------------------------------------------- CEB


@cache
def _shipped_json_list(*parts: str) -> tuple[dict[str, Any], ...]:
    return tuple(parse_json_list(data_file(*parts).read_text(encoding="utf-8"), "shipped " + "/".join(parts)))


def _ceb(name: str) -> EvalDataset:
    folder, task = CEB_SUBSETS[name]
    prompts = []
    for axis in CEB_AXES:
        for n, row in enumerate(_shipped_json_list("ceb", folder, f"{axis}.json")):
            _require(row, ("prompt",), f"ceb/{folder}/{axis}.json", n + 1)
            metadata: dict[str, Any] = {"axis": axis, "task": task}
            if row.get("bucket") is not None:
                metadata["bucket"] = row["bucket"]
            prompts.append(EvalPrompt(prompt_id=f"{name}-{axis}-{n:03d}", turns=[row["prompt"]], category=axis, metadata=metadata))
    return _build(name, prompts)


def load_ceb_s() -> EvalDataset:
    """CEB Conversation-S: 400 conversation openings (100 per axis) probing stereotyping."""
    return _ceb(CEB_S)


def load_ceb_t() -> EvalDataset:
    """CEB Conversation-T: 400 conversation openings (100 per axis) probing toxicity."""
    return _ceb(CEB_T)


# --------------------------------------------------------------------------- GSM8K


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
    for n, row in enumerate(_shipped_jsonl("gsm8k", "test.jsonl")):
        _require(row, ("question", "answer"), source, n + 1)
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
    return _build(GSM8K, prompts)


LOADERS: dict[str, Callable[[], EvalDataset]] = {
    FLASK: load_flask,
    FLASK_HARD: load_flask_hard,
    JUST_EVAL: load_just_eval,
    CEB_S: load_ceb_s,
    CEB_T: load_ceb_t,
    GSM8K: load_gsm8k,
}
