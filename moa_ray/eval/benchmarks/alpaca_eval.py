"""AlpacaEval 2: the dataset and its two judgment kinds, pair-v2 preferences and the leaderboard's annotator.

* **pairwise** (``--mode auto`` for AlpacaEval, and for any dataset file with reference answers): the judge compares
  the pipeline's answer with the reference twice, once in each position (MT-Bench's ``pair-v2``), and the
  preference is the mean of the two verdicts (1 = reference wins, 2 = pipeline wins), which cancels the judge's
  position bias. Rows go to ``OUT/pairwise``.
* **alpaca-eval-official**: AlpacaEval 2's ``weighted_alpaca_eval_gpt4_turbo`` annotator, reproduced step by step
  (below). Rows go to ``OUT/alpaca_eval_official``, and AlpacaEval's own files to
  ``OUT/alpaca_eval_results/<pipeline>/``.

Both report AlpacaEval's win rates (:mod:`moa_ray.eval.metrics`), whichever ``eval report --annotator`` picks.

What AlpacaEval does, and where this module does it:

* **Order**: ``PairwiseAnnotator`` randomly swaps output_1 / output_2 with a seeded choice per
  instruction (``RandomSwitchTwoColumnsProcessor``: ``random.Random("is_switched_outputs" +
  instruction + "0").choices([False, True])``) - :func:`is_switched_outputs`.
* **Prompt**: ``alpaca_eval_clf.txt`` filled by ``utils.make_prompts`` (each ``{key}`` replaced
  once, in order of appearance), its chat-ML markup split into messages by
  ``utils.prompt_to_chatml`` - :func:`prompt_text`, :func:`chatml_messages`.
* **Call**: ``configs.yaml``'s completion settings: max_tokens 1, temperature 1, logprobs,
  top_logprobs 5 - :class:`AnnotatorConfig`.
* **Preference**: ``completion_parsers.logprob_parser`` with numerator "m" (output_1, shown
  first) and denominator "m"/"M", not binarized: ``2 - P(m) / (P(m) + P(M))`` from the
  first token's top logprobs, a token missing from them counting as probability 0 -
  :func:`logprob_preference`; then un-swapped as ``3 - preference``.

When the judge endpoint returns no logprobs (llama.cpp without ``logits_all``, some
providers), the generated token decides: "m" is 1, "M" is 2 (:func:`token_preference`),
and the row says so (``preference_source``).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import cache
from typing import Any, ClassVar, Literal, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import BaseModel, Field

from moa_ray.chat import ChatMessage, ChatParams, Completion, TokenLogprob, TopLogprob
from moa_ray.eval.benchmarks.base import (
    Aggregate,
    Benchmark,
    Generations,
    JudgeContext,
    JudgmentKind,
    Key,
    PlanRequest,
    ReportScope,
    conversations,
    is_done,
    limited,
    next_attempt,
)
from moa_ray.eval.datasets import EvalDataset, EvalPrompt, data_file, shipped_jsonl
from moa_ray.eval.judge_prompts import PAIRWISE_PROMPT, pairwise_messages, parse_verdict, verdict_preference
from moa_ray.eval.metrics import GLMData, MetricsError, WinRate, alpaca_index, generator_win_rate
from moa_ray.eval.report_data import finished, is_ok, keep, numbers, of_pipelines, resolve_table, unique
from moa_ray.eval.schema import OfficialAnnotationRow, PairwiseRow, _Row
from moa_ray.eval.store import RowTable, StoreError, join, resolve

ALPACA_EVAL = "alpaca_eval"
PAIRWISE_MODE = "pairwise"
OFFICIAL_MODE = "alpaca-eval-official"
PAIRWISE_DIR = "pairwise"
OFFICIAL_DIR = "alpaca_eval_official"
#: AlpacaEval's results layout (<pipeline>/model_outputs.json, <pipeline>/<annotator>/annotations.json).
ALPACA_RESULTS_DIR = "alpaca_eval_results"
#: What the win rates read of an annotation: the outputs' lengths, not their texts, nor the judges' texts.
WIN_RATE_COLUMNS = (
    "prompt_id",
    "pipeline",
    "judge",
    "status",
    "instruction",
    "output_1_length",
    "output_2_length",
    "generator_2",
    "preference",
)

ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
_DIR = ("alpaca_eval", ANNOTATOR)
#: The seed AlpacaEval's annotators pass to their processors (BaseAnnotator's default).
SEED = 0
SWITCH_COLUMN = "is_switched_outputs"
#: The columns of AlpacaEval's own annotation files, in their order.
ANNOTATION_KEYS = ("instruction", "output_1", "generator_1", "dataset", "output_2", "generator_2", "annotator", "preference")

PreferenceSource = Literal["logprobs", "token"]


class AnnotatorError(ValueError):
    """The shipped annotator files are unusable (a broken install)."""


class AnnotatorConfig(BaseModel):
    """The parts of ``configs.yaml`` that decide the call and the parse."""

    model_name: str
    max_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0.0, le=2.0)
    logprobs: bool
    top_logprobs: int = Field(ge=0, le=20)
    numerator_token: str
    denominator_tokens: list[str] = Field(min_length=1)
    is_binarize: bool

    def chat_params(self) -> ChatParams:
        return ChatParams(max_tokens=self.max_tokens, temperature=self.temperature, logprobs=self.logprobs, top_logprobs=self.top_logprobs)


@cache
def annotator_config() -> AnnotatorConfig:
    """``configs.yaml`` of the shipped annotator."""
    raw = yaml.safe_load(data_file(*_DIR, "configs.yaml").read_text(encoding="utf-8"))
    try:
        entry = raw[ANNOTATOR]
        kwargs, parser = entry["completions_kwargs"], entry["completion_parser_kwargs"]
        if entry["fn_completion_parser"] != "logprob_parser":
            raise AnnotatorError(f"expected logprob_parser, the config names {entry['fn_completion_parser']!r}")
        config = AnnotatorConfig(**kwargs, **parser)
    except (KeyError, TypeError) as err:
        raise AnnotatorError(f"unexpected {ANNOTATOR} configs.yaml: {err}") from None
    if config.is_binarize:
        raise AnnotatorError(f"{ANNOTATOR} is the weighted (not binarized) annotator; its configs.yaml says is_binarize")
    return config


@cache
def prompt_template() -> str:
    return str(data_file(*_DIR, "alpaca_eval_clf.txt").read_text(encoding="utf-8"))


def prompt_text(template: str, fields: Mapping[str, str]) -> str:
    """``utils.make_prompts`` for one example: every ``{key}`` (no whitespace inside) replaced once, in order.

    The literal braces of the template's JSON-like layout hold whitespace, so they are left alone.
    """
    placeholders = list(dict.fromkeys(re.findall(r"{([^ \s]+?)}", template)))
    missing = [p for p in placeholders if p not in fields]
    if missing:
        raise KeyError(f"the annotator template needs {missing}")
    text = template
    for key in placeholders:
        text = text.replace("{" + key + "}", str(fields[key]), 1)
    return text


def chatml_messages(prompt: str, start: str = "<|im_start|>", end: str = "<|im_end|>") -> list[ChatMessage]:
    """``utils.prompt_to_chatml``: each ``<|im_start|>ROLE\\n...<|im_end|>`` block as a message, contents stripped."""
    prompt = prompt.strip()
    if not prompt.startswith(start) or not prompt.endswith(end):
        raise ValueError(f"a chat-ML prompt starts with {start} and ends with {end}")
    messages = []
    for block in prompt.split(start)[1:]:
        head, _, rest = block.partition("\n")
        role = head.strip()
        if role.startswith("system"):
            role = "system"  # "system name=example_user" carries few-shot names this template does not use
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat-ML role {role!r}")
        messages.append(ChatMessage(role=role, content=rest.split(end, 1)[0].strip()))  # type: ignore[arg-type]
    return messages


def is_switched_outputs(instruction: str, seed: int = SEED) -> bool:
    """AlpacaEval's seeded coin: whether output_2 (the model) is shown first for this instruction."""
    return bool(random.Random(SWITCH_COLUMN + instruction + str(seed)).choices([False, True], k=1)[0])


def annotator_messages(instruction: str, reference: str, output: str) -> tuple[list[ChatMessage], bool]:
    """The judge conversation for one instruction, and whether the outputs were swapped for it."""
    switched = is_switched_outputs(instruction)
    first, second = (output, reference) if switched else (reference, output)
    text = prompt_text(prompt_template(), {"instruction": instruction, "output_1": first, "output_2": second})
    return chatml_messages(text), switched


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def logprob_preference(top_logprobs: Sequence[TopLogprob], numerator: str = "m", denominators: Sequence[str] = ("m", "M")) -> float | None:
    """``logprob_parser`` (not binarized): ``2 - exp(lp[numerator] - logsumexp(lp[denominators]))``.

    A token absent from the candidates has probability 0; None (AlpacaEval's NaN) when none of them is there.
    """
    wanted = set(denominators) | {numerator}
    found: dict[str, float] = {}
    for t in top_logprobs:
        if t.token in wanted:
            found[t.token] = t.logprob  # AlpacaEval's dict comprehension: the last duplicate wins
    if not found:
        return None
    num = found.get(numerator, -math.inf)
    den = _logsumexp([found.get(t, -math.inf) for t in denominators])
    return 2.0 - math.exp(num - den)


def token_preference(text: str) -> float | None:
    """The discrete preference from the generated identifier: "m" (output_1) is 1, "M" (output_2) is 2."""
    token = text.strip()
    return {"m": 1.0, "M": 2.0}.get(token)


class Preference(BaseModel):
    """A parsed annotation, in the presentation order (before un-swapping)."""

    value: float | None
    source: PreferenceSource
    top_logprobs: list[TopLogprob] | None = None


def parse_completion(text: str, logprobs: list[TokenLogprob] | None) -> Preference:
    """From the first token's top logprobs when the engine sent them, else from the text."""
    config = annotator_config()
    if logprobs:
        tops = logprobs[0].top_logprobs
        return Preference(
            value=logprob_preference(tops, config.numerator_token, config.denominator_tokens), source="logprobs", top_logprobs=tops
        )
    return Preference(value=token_preference(text), source="token")


def unswitch(preference: float, switched: bool) -> float:
    """AlpacaEval's ``3 - x`` for a swapped example, so that 1 always means output_1 (the reference) wins."""
    return 3.0 - preference if switched else preference


# --------------------------------------------------------------------------- AlpacaEval's files


def annotation_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """One finished annotation row as AlpacaEval writes it in ``annotations.json`` (its keys, its order)."""
    raw: dict[str, Any] = {"text": row.get("raw_completion")}
    if row.get("top_logprobs"):
        raw["logprobs"] = {"content": [json.loads(row["top_logprobs"])]}
    record = {k: row.get(k) for k in ANNOTATION_KEYS}
    record["annotator"] = ANNOTATOR
    return {**record, "time_per_example": row.get("latency_s"), "raw_completion": raw}


def write_annotations(rows: Sequence[Mapping[str, Any]], out: str) -> dict[str, int]:
    """AlpacaEval's results layout, per pipeline: ``<out>/<pipeline>/model_outputs.json`` and
    ``<out>/<pipeline>/weighted_alpaca_eval_gpt4_turbo/annotations.json`` (finished rows, by prompt id).

    Returns the annotations written per file.
    """
    by_pipeline: dict[str, list[Mapping[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (r["pipeline"], r["prompt_id"])):
        if r.get("status", "ok") == "ok" and r.get("preference") is not None:
            by_pipeline.setdefault(r["pipeline"], []).append(r)
    fs, root = resolve(out)
    written = {}
    for pipeline, selected in by_pipeline.items():
        outputs = [
            {"instruction": r["instruction"], "output": r["output_2"], "generator": pipeline, "dataset": r.get("dataset")} for r in selected
        ]
        files = {
            join(root, pipeline, "model_outputs.json"): outputs,
            join(root, pipeline, ANNOTATOR, "annotations.json"): [annotation_record(r) for r in selected],
        }
        for path, data in files.items():
            try:
                fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                with fs.open_output_stream(path) as stream:
                    stream.write(json.dumps(data, ensure_ascii=False, indent=2).encode("utf-8"))
            except OSError as err:
                raise StoreError(f"cannot write {path}: {err}") from None
        written[join(out, pipeline, ANNOTATOR, "annotations.json")] = len(selected)
    return written


# --------------------------------------------------------------------------- judging one item


class ReferenceComparison(BaseModel):
    """One pipeline's first-turn answer to compare with the prompt's reference answer (pairwise or AlpacaEval's
    official annotator: the same comparison, judged two ways)."""

    prompt_id: str
    pipeline: str
    instruction: str
    category: str | None
    reference: str
    reference_generator: str
    output: str
    attempt: int = 1


def plan_comparisons(answers: Generations, done: Mapping[Key, _Row], request: PlanRequest) -> list[dict[str, Any]]:
    """The first-turn answers with a reference not yet compared ok with it by ``request.judge`` (failed ones again),
    at most ``request.limit`` prompts per pipeline: the fields of a :class:`ReferenceComparison` each."""
    convo = conversations(answers, request)
    comparisons = []
    for prompt_id, pipeline in limited(convo, request.limit):
        first = convo[(prompt_id, pipeline)].get(1)
        if first is None or first.reference is None:
            continue  # nothing to compare with
        prev = done.get((prompt_id, pipeline, 1, request.judge))
        if is_done(prev):
            continue
        comparisons.append(
            {
                "prompt_id": prompt_id,
                "pipeline": pipeline,
                "instruction": first.instruction,
                "category": first.category,
                "reference": first.reference,
                "reference_generator": first.reference_generator or "reference",
                "output": first.output,
                "attempt": next_attempt(prev),
            }
        )
    return comparisons


def win_rate_columns(rows: pa.Table, scope: ReportScope) -> Aggregate:
    """AlpacaEval's win rates per pipeline, of pair-v2 or official annotations alike."""
    wanted = pc.and_(is_ok(rows), pc.is_valid(rows.column("preference")))
    annotated = of_pipelines(keep(rows, wanted), scope.pipelines)
    rates = table_win_rates(annotated, glm_data=scope.glm_data) if annotated.num_rows else {}
    return Aggregate(
        columns={
            p: {
                "win_rate": w.win_rate,
                "standard_error": w.standard_error,
                "discrete_win_rate": w.discrete_win_rate,
                "lc_win_rate": w.lc_win_rate,
                "avg_length": w.avg_length,
                "n_judged": w.n_total,
            }
            for p, w in rates.items()
        }
    )


def output_lengths(rows: pa.Table, column: str) -> np.ndarray:
    """Characters of each row's ``column`` (:func:`~moa_ray.eval.metrics.chars`): its measured ``<column>_length``
    where the reader measured it, else the text's; 0 where there is none."""
    measured = f"{column}_length"
    if measured in rows.column_names:
        lengths = rows.column(measured)
    elif column in rows.column_names:
        lengths = pc.utf8_length(rows.column(column))
    else:
        return np.zeros(rows.num_rows, dtype=np.int64)
    return numbers(pc.cast(pc.fill_null(lengths, 0), pa.int64()))


def table_win_rates(rows: pa.Table, *, glm_data: GLMData | None = None, lc: bool = True) -> dict[str, WinRate]:
    """:func:`~moa_ray.eval.metrics.win_rates` of finished annotations held as an Arrow table: the same numbers,
    from numpy arrays per generator (``generator_2``) in the rows' order, which the LC fit's folds follow."""
    missing = [c for c in ("output_1", "output_2", "preference") if c not in rows.column_names and f"{c}_length" not in rows.column_names]
    if missing:
        raise MetricsError(
            f"annotations lack the columns {missing} (AlpacaEval format: instruction, output_1, output_2, preference, generator_2)"
        )
    if {"created_at", "attempt", "status", *PairwiseRow.KEY} <= set(rows.column_names):
        rows = finished(resolve_table(rows, PairwiseRow.KEY))  # win_rates resolves what it is given (read rows are)
    if not rows.num_rows:
        raise MetricsError("no annotations")
    generator = pc.fill_null(rows.column("generator_2"), "") if "generator_2" in rows.column_names else pa.nulls(rows.num_rows, pa.string())
    generator = pc.if_else(pc.equal(pc.fill_null(generator, ""), ""), "model", generator)
    index = alpaca_index() if glm_data is not None else None
    out = {}
    for name in unique(generator):
        group = keep(rows, pc.equal(generator, name))
        preferences = numbers(pc.cast(pc.fill_null(group.column("preference"), np.nan), pa.float64()))

        def positions(group: pa.Table = group) -> list[int] | None:
            return None if index is None else alpaca_positions(group.column("instruction"), index)

        out[str(name)] = generator_win_rate(  # metrics reads any sequence through numpy
            str(name),
            cast("Sequence[float | None]", preferences),
            cast("Sequence[int]", output_lengths(group, "output_2")),
            cast("Sequence[int]", output_lengths(group, "output_1")),
            positions,
            glm_data,
            lc=lc,
        )
    return out


def alpaca_positions(instructions: pa.ChunkedArray | pa.Array, index: Mapping[str, int]) -> list[int]:
    """Each instruction's position in AlpacaEval (the GLM files' index); a MetricsError names one that is not there."""
    found = pc.index_in(instructions, value_set=pa.array(list(index), pa.string()))
    if found.null_count:
        first = pc.filter(instructions, pc.is_null(found))[0].as_py()
        raise MetricsError(f"instruction not in AlpacaEval, no difficulty for it: {str(KeyError(first))[:80]}")
    positions: list[int] = np.asarray(list(index.values()), dtype=np.int64)[numbers(found)].tolist()
    return positions


# --------------------------------------------------------------------------- pair-v2


class PairwiseItem(ReferenceComparison):
    kind: Literal["pairwise"] = "pairwise"


class PairwiseKind(JudgmentKind[PairwiseItem, PairwiseRow]):
    """pair-v2 against the reference, asked in both orders; the preference is the mean of the two verdicts."""

    mode: ClassVar[str] = PAIRWISE_MODE
    table_dir: ClassVar[str] = PAIRWISE_DIR
    row_type: ClassVar[type[PairwiseRow]] = PairwiseRow
    report_columns: ClassVar[tuple[str, ...] | None] = WIN_RATE_COLUMNS

    def plan(self, answers: Generations, done: Mapping[Key, PairwiseRow], request: PlanRequest) -> list[PairwiseItem]:
        return [PairwiseItem(**c) for c in plan_comparisons(answers, done, request)]

    async def judge(self, item: PairwiseItem, ctx: JudgeContext) -> PairwiseRow:
        (ref_first, t1), (pipe_first, t2) = await asyncio.gather(
            ctx.ask(pairwise_messages(item.instruction, item.reference, item.output)),
            ctx.ask(pairwise_messages(item.instruction, item.output, item.reference)),
        )
        v1, v2 = parse_verdict(ref_first.text), parse_verdict(pipe_first.text)
        error = None
        preference = None
        if v1 is None or v2 is None:
            which = " and ".join(n for n, v in (("reference-first", v1), ("pipeline-first", v2)) if v is None)
            error = f"no [[A]]/[[B]]/[[C]] verdict in the {which} judgment"
        else:
            preference = (verdict_preference(v1, pipeline_is_a=False) + verdict_preference(v2, pipeline_is_a=True)) / 2
        return PairwiseRow(
            **_pairwise_base(item, ctx),
            preference=preference,
            verdict_reference_first=v1,
            verdict_pipeline_first=v2,
            judgment_reference_first=ref_first.text,
            judgment_pipeline_first=pipe_first.text,
            judge_prompt_tokens=ref_first.usage.prompt_tokens + pipe_first.usage.prompt_tokens,
            judge_completion_tokens=ref_first.usage.completion_tokens + pipe_first.usage.completion_tokens,
            latency_s=max(t1, t2),
            status="error" if error else "ok",
            error=error,
        )

    def failed(self, item: PairwiseItem, error: str, ctx: JudgeContext) -> PairwiseRow:
        return PairwiseRow(**_pairwise_base(item, ctx), status="error", error=error)

    def aggregate(self, rows: pa.Table, scope: ReportScope) -> Aggregate:
        return win_rate_columns(rows, scope)


def _pairwise_base(item: PairwiseItem, ctx: JudgeContext) -> dict[str, Any]:
    return {
        "run_id": ctx.run_id,
        "prompt_id": item.prompt_id,
        "pipeline": item.pipeline,
        "turn": 1,
        "judge": ctx.judge,
        "judge_prompt": PAIRWISE_PROMPT,
        "instruction": item.instruction,
        "dataset": item.category,
        "output_1": item.reference,
        "generator_1": item.reference_generator,
        "output_2": item.output,
        "generator_2": item.pipeline,
        "attempt": item.attempt,
    }


# --------------------------------------------------------------------------- the official annotator


class OfficialItem(ReferenceComparison):
    """One AlpacaEval instruction of one pipeline, to annotate against its reference output."""

    kind: Literal["alpaca-eval-official"] = "alpaca-eval-official"


Ask = Callable[[list[ChatMessage], ChatParams], Awaitable[tuple[Completion, float]]]


def official_row_base(item: OfficialItem, *, run_id: str, judge: str) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "prompt_id": item.prompt_id,
        "pipeline": item.pipeline,
        "turn": 1,
        "judge": judge,
        "judge_prompt": ANNOTATOR,
        "instruction": item.instruction,
        "dataset": item.category,
        "output_1": item.reference,
        "generator_1": item.reference_generator,
        "output_2": item.output,
        "generator_2": item.pipeline,
        "is_switched_outputs": is_switched_outputs(item.instruction),
        "attempt": item.attempt,
    }


async def annotate(item: OfficialItem, ask: Ask, *, run_id: str, judge: str) -> OfficialAnnotationRow:
    """One call with the annotator's settings; the preference from logprobs when there are any, else the token."""
    messages, switched = annotator_messages(item.instruction, item.reference, item.output)
    completion, latency = await ask(messages, annotator_config().chat_params())
    parsed = parse_completion(completion.text, completion.logprobs)
    first = completion.logprobs[0].model_dump_json() if completion.logprobs else None
    error = None
    if parsed.value is None:
        error = (
            "neither 'm' nor 'M' among the first token's top logprobs"
            if parsed.source == "logprobs"
            else f"the judge answered {completion.text[:40]!r}, not 'm' or 'M' (and sent no logprobs)"
        )
    return OfficialAnnotationRow(
        **official_row_base(item, run_id=run_id, judge=judge),
        preference=None if parsed.value is None else unswitch(parsed.value, switched),
        preference_source=parsed.source,
        raw_completion=completion.text,
        top_logprobs=first,
        judge_prompt_tokens=completion.usage.prompt_tokens,
        judge_completion_tokens=completion.usage.completion_tokens,
        latency_s=latency,
        status="error" if error else "ok",
        error=error,
    )


class OfficialKind(JudgmentKind[OfficialItem, OfficialAnnotationRow]):
    """AlpacaEval 2's ``weighted_alpaca_eval_gpt4_turbo``; its annotations.json files are written after each run."""

    mode: ClassVar[str] = OFFICIAL_MODE
    table_dir: ClassVar[str] = OFFICIAL_DIR
    row_type: ClassVar[type[OfficialAnnotationRow]] = OfficialAnnotationRow
    report_columns: ClassVar[tuple[str, ...] | None] = WIN_RATE_COLUMNS

    def plan(self, answers: Generations, done: Mapping[Key, OfficialAnnotationRow], request: PlanRequest) -> list[OfficialItem]:
        return [OfficialItem(**c) for c in plan_comparisons(answers, done, request)]

    async def judge(self, item: OfficialItem, ctx: JudgeContext) -> OfficialAnnotationRow:
        return await annotate(item, ctx.ask, run_id=ctx.run_id, judge=ctx.judge)

    def failed(self, item: OfficialItem, error: str, ctx: JudgeContext) -> OfficialAnnotationRow:
        return OfficialAnnotationRow(**official_row_base(item, run_id=ctx.run_id, judge=ctx.judge), status="error", error=error)

    def aggregate(self, rows: pa.Table, scope: ReportScope) -> Aggregate:
        return win_rate_columns(rows, scope)

    def write_files(self, out: str, judge: str) -> dict[str, int]:
        rows = [r for r in self.table(out).latest_records().values() if r["judge"] == judge]  # AlpacaEval's JSON records
        return write_annotations(rows, join(out, ALPACA_RESULTS_DIR))


PAIRWISE = PairwiseKind()
OFFICIAL = OfficialKind()


def pairwise_table(out: str) -> RowTable[PairwiseRow]:
    return RowTable(join(out, PAIRWISE_DIR), PairwiseRow)


def official_table(out: str) -> RowTable[OfficialAnnotationRow]:
    return RowTable(join(out, OFFICIAL_DIR), OfficialAnnotationRow)


# --------------------------------------------------------------------------- dataset


def load_alpaca_eval() -> EvalDataset:
    """The 805 AlpacaEval 2 instructions with the GPT-4-turbo reference outputs."""
    prompts = [
        EvalPrompt(
            prompt_id=r["id"],
            turns=[r["instruction"]],
            category=r.get("dataset"),
            references=[r.get("reference_output")],
            reference_generator=r.get("reference_generator"),
        )
        for r in shipped_jsonl("alpaca_eval", "alpaca_eval.jsonl")
    ]
    return EvalDataset(name=ALPACA_EVAL, kind=ALPACA_EVAL, prompts=prompts)


BENCHMARKS = (Benchmark(name=ALPACA_EVAL, load=load_alpaca_eval, auto_kind=PAIRWISE_MODE),)
