"""Rows of the evaluation tables: a pydantic model per table, and the pyarrow schema derived from it.

The pydantic model validates a row where it is made (inside a Ray worker); its pyarrow schema (``SCHEMA``, derived
from the fields by :func:`arrow_schema`) fixes the column types on disk, so every part file of a table has the same
schema whoever wrote it, and readers never have to guess types from data. A table is declared once: a field's
type says its column's (``str`` string, ``int`` int64 or :data:`Int32`, ``float`` float64, ``bool``, ``datetime``
UTC microseconds, a list, a model as a struct), ``| None`` that the column is nullable.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

RowStatus = Literal["ok", "error"]


@dataclass(frozen=True)
class ArrowType:
    """A field's column type where the Python type alone does not say it (``Annotated[int, ArrowType(pa.int32())]``)."""

    type: pa.DataType


#: An int stored as a 32-bit column (turns, attempts, counts of calls); a plain ``int`` is int64.
Int32 = Annotated[int, ArrowType(pa.int32())]
#: What the columns of every table end with, after the row's own fields.
TAIL_COLUMNS = ("status", "error", "attempt", "created_at")


def _optional(annotation: Any) -> tuple[Any, bool]:
    """The type inside ``X | None``, and whether None was allowed."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"no column type for the union {annotation}")
        return args[0], True
    return annotation, False


def _arrow_type(annotation: Any, metadata: list[Any]) -> pa.DataType:
    declared = [m.type for m in metadata if isinstance(m, ArrowType)]
    if declared:
        return declared[0]
    annotation, _ = _optional(annotation)
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        inner, *extra = typing.get_args(annotation)
        return _arrow_type(inner, extra)
    if origin is Literal and all(isinstance(v, str) for v in typing.get_args(annotation)):
        return pa.string()
    if origin is list:
        (item,) = typing.get_args(annotation)
        return pa.list_(_arrow_type(item, []))
    simple = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string(), datetime: pa.timestamp("us", tz="UTC")}
    if annotation in simple:
        return simple[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct([_arrow_field(name, f) for name, f in annotation.model_fields.items()])
    raise TypeError(f"no column type for {annotation!r}")


def _arrow_field(name: str, info: FieldInfo) -> pa.Field:
    return pa.field(name, _arrow_type(info.annotation, info.metadata), nullable=_optional(info.annotation)[1])


def arrow_schema(row: type[BaseModel]) -> pa.Schema:
    """The table schema of a row model: ``run_id``, the row's own fields in order, then :data:`TAIL_COLUMNS`
    (fields excluded from dumps are no column)."""
    fields = {name: f for name, f in row.model_fields.items() if not f.exclude}
    own = [name for name in fields if name != "run_id" and name not in TAIL_COLUMNS]
    return pa.schema([_arrow_field(name, fields[name]) for name in ["run_id", *own, *TAIL_COLUMNS]])


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class _Row(BaseModel):
    """Base of every table row: the key columns and the pyarrow schema of the table."""

    model_config = ConfigDict(extra="forbid")

    #: Columns that identify a row; a table holds at most one finished row per key.
    KEY: ClassVar[tuple[str, ...]]
    #: The table's columns, derived from the fields when the class is made (:func:`arrow_schema`).
    SCHEMA: ClassVar[pa.Schema]
    #: Which of a key's rows stands: the first finished one (answers are never replaced), or the latest written
    #: (records of what a run did: a rerun after a kill rewrote them).
    RESOLVE: ClassVar[Literal["first_ok", "latest"]] = "first_ok"

    run_id: str = Field(min_length=1, description="The invocation that wrote this row.")
    status: RowStatus = "ok"
    error: str | None = Field(default=None, description="Why the row failed (status 'error'); retried on the next run.")
    attempt: Int32 = Field(default=1, ge=1, description="How many runs have tried this key, this one included.")
    created_at: datetime = Field(default_factory=utc_now)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.SCHEMA = arrow_schema(cls)

    def row_key(self) -> tuple[Any, ...]:
        """The values of the :attr:`KEY` columns (not ``key``: the call table has a column of that name)."""
        return tuple(getattr(self, c) for c in self.KEY)


class RoleTokens(BaseModel):
    """Token totals of one call role (proposer, aggregator, judge...) within one answer."""

    role: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: Int32 = 0


class GenerationRow(_Row):
    """One pipeline answer to one turn of one prompt."""

    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "turn")

    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    turn: Int32 = Field(ge=1, description="1-based turn; MT-Bench turn 2 saw the pipeline's own turn-1 answer.")
    dataset: str = Field(description="Dataset name (alpaca_eval, mt_bench) or the file it came from.")
    category: str | None = Field(default=None, description="AlpacaEval subset or MT-Bench category.")
    instruction: str = Field(description="The user message of this turn.")
    output: str | None = None
    finish_reason: str | None = None
    reference: str | None = Field(default=None, description="Reference answer for this turn, when the dataset has one.")
    reference_generator: str | None = None
    config_hash: str = Field(description="Fingerprint of the pipeline and model settings that shaped the answer.")
    tokens_by_role: list[RoleTokens] = Field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: Int32 = 0
    latency_s: float | None = Field(default=None, description="Wall time of the pipeline request.")
    critical_path_s: float | None = None
    layers_run: Int32 | None = None
    cost_usd: float | None = Field(default=None, description="From the trace's accounting; None when prices are unknown.")
    tflops: float | None = Field(default=None, description="From the trace's accounting; None when sizes are unknown.")
    trace: str | None = Field(default=None, description="The request's trace as JSON (moa-ray run --json format).")
    #: The rows of this answer's calls, carried from the worker to the driver's call table (never a column here).
    call_rows: list[CallRow] = Field(default_factory=list, exclude=True, repr=False)


class PairwiseRow(_Row):
    """An AlpacaEval-style preference between the reference (output_1) and a pipeline (output_2).

    Column names follow AlpacaEval's annotation files, so ``moa-ray eval metrics`` reads
    both. ``preference`` is 1 when the reference wins, 2 when the pipeline wins, the mean
    of the two presentation orders (reference first, pipeline first) to cancel position bias.
    """

    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "turn", "judge")

    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    turn: Int32 = Field(default=1, ge=1)
    judge: str = Field(min_length=1, description="Config name of the judge model.")
    judge_prompt: str = Field(description="Name of the judge prompt in judge_prompts.jsonl.")
    instruction: str
    dataset: str | None = Field(default=None, description="AlpacaEval subset (helpful_base, koala...).")
    output_1: str = Field(description="The reference output.")
    generator_1: str
    output_2: str = Field(description="The pipeline's output.")
    generator_2: str
    preference: float | None = Field(default=None, ge=1.0, le=2.0)
    verdict_reference_first: str | None = Field(default=None, description="A, B or C with the reference shown as A.")
    verdict_pipeline_first: str | None = Field(default=None, description="A, B or C with the pipeline shown as A.")
    judgment_reference_first: str | None = None
    judgment_pipeline_first: str | None = None
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    latency_s: float | None = None


class GradeRow(_Row):
    """An MT-Bench single-answer grade (1-10) of one turn of one pipeline's conversation."""

    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "turn", "judge")

    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    turn: Int32 = Field(ge=1)
    judge: str = Field(min_length=1)
    judge_prompt: str
    category: str | None = None
    score: float | None = Field(default=None, ge=1.0, le=10.0, description="The median of the repeats' scores.")
    judgment: str | None = Field(default=None, description="The first repeat's judgment.")
    scores: list[float | None] | None = Field(
        default=None, description="Every repeat's rating (None: no rating in it); None in tables written before repeats."
    )
    judgments: list[str] | None = Field(default=None, description="Every repeat's judgment text (or its error).")
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    latency_s: float | None = None


class BaselinePairRow(_Row):
    """One MT-Bench pairwise-baseline match: a pipeline's turn against the baseline pipeline's, played twice.

    Game 1 shows the pipeline as assistant A, game 2 the baseline as A (FastChat's g1 / g2);
    ``outcome`` is FastChat's reading of the pair: win only if both games say so.
    """

    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "baseline", "turn", "judge")

    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    baseline: str = Field(min_length=1, description="The pipeline of the same generation run compared against.")
    turn: Int32 = Field(ge=1)
    judge: str = Field(min_length=1)
    judge_prompt: str
    category: str | None = None
    g1_winner: str | None = Field(default=None, description="pipeline, baseline, tie or error (pipeline shown as A).")
    g2_winner: str | None = Field(default=None, description="pipeline, baseline, tie or error (baseline shown as A).")
    outcome: str | None = Field(default=None, description="win, loss or tie for the pipeline.")
    g1_judgment: str | None = None
    g2_judgment: str | None = None
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    latency_s: float | None = None


class OfficialAnnotationRow(_Row):
    """An annotation by AlpacaEval's ``weighted_alpaca_eval_gpt4_turbo`` annotator (column names are AlpacaEval's).

    ``preference`` is in [1, 2] with output_1 the reference: from the logprobs of "m" and "M"
    when the judge endpoint returned them (``preference_source`` "logprobs"), else 1 or 2 from
    the generated token ("token"). ``is_switched_outputs``: the pipeline was shown first, as
    AlpacaEval's seeded random order decided.
    """

    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "turn", "judge")

    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    turn: Int32 = Field(default=1, ge=1)
    judge: str = Field(min_length=1)
    judge_prompt: str = Field(description="The annotator's name.")
    instruction: str
    dataset: str | None = None
    output_1: str = Field(description="The reference output.")
    generator_1: str
    output_2: str = Field(description="The pipeline's output.")
    generator_2: str
    preference: float | None = Field(default=None, ge=1.0, le=2.0)
    preference_source: str | None = Field(default=None, description="logprobs or token.")
    is_switched_outputs: bool = False
    raw_completion: str | None = Field(default=None, description="The judge's generated text.")
    top_logprobs: str | None = Field(
        default=None, description="JSON: the first generated token with its top candidates (OpenAI's logprobs.content[0])."
    )
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    latency_s: float | None = None


class ExactRow(_Row):
    """An exact-match score (GSM8K) of one answer: the number extracted from the output against the reference's."""

    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "turn")

    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    turn: Int32 = Field(default=1, ge=1)
    dataset: str = Field(description="The benchmark whose rule scored the row (gsm8k).")
    category: str | None = None
    prediction: str | None = Field(default=None, description="The final answer extracted from the output; None when it has no number.")
    answer: str | None = Field(default=None, description="The reference's final answer.")
    correct: bool | None = Field(default=None, description="prediction == answer as numbers; None on a failed row.")


class RubricLabel(BaseModel):
    """A grouping of a judged prompt the report breaks scores down by (FLASK domain, CEB axis...)."""

    name: str = Field(min_length=1)
    value: str


class AspectScore(BaseModel):
    """One rubric aspect's score: a FLASK skill, a Just-Eval aspect or CEB's bias.

    ``na`` marks a judge's "N/A" (FLASK leaves it out of means, Just-Eval counts it as 5.0),
    kept apart from the number so no reader mistakes it for a score.
    """

    aspect: str = Field(min_length=1)
    score: float | None = None
    na: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> AspectScore:
        if self.na == (self.score is not None):
            raise ValueError(f"aspect {self.aspect!r}: give a score or mark it N/A, not both or neither")
        return self


class RubricRow(_Row):
    """A rubric judgment (FLASK, Just-Eval or CEB) of one pipeline answer, with a score per aspect.

    A judgment the parser rejects is asked again (``judge_attempts`` counts the calls,
    ``rejected`` says why each earlier one failed); when every attempt is malformed the
    row is an error, never a score.
    """

    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "turn", "judge", "benchmark")

    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    turn: Int32 = Field(default=1, ge=1)
    judge: str = Field(min_length=1)
    benchmark: str = Field(min_length=1, description="flask, flask-hard, just-eval, ceb-s or ceb-t (the generation's dataset).")
    judge_prompt: str = Field(description="Which official template judged it (flask-review-2, just-eval-score_multi...).")
    labels: list[RubricLabel] = Field(default_factory=list)
    scores: list[AspectScore] = Field(default_factory=list)
    judgment: str | None = Field(default=None, description="The judge's last raw output.")
    rejected: list[str] = Field(default_factory=list, description="Why each malformed attempt before the last was rejected.")
    judge_attempts: Int32 = Field(default=0, ge=0, description="Judge calls made for this row in this run.")
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    latency_s: float | None = Field(default=None, description="Summed wall time of the judge calls.")


class CallRow(_Row):
    """One model call of one answer (the call store, ``<generations>/_calls/``): what was said, by whom, at what cost.

    Every call of every pipeline has a row, a reused one too (``reused``: answered from the store, at no cost).
    The rows of an answer are written before its generation row, and a key's latest row stands, so a run killed
    between the two and run again leaves one row per call, the rerun's, which made the stored answer.
    """

    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "turn", "attempt", "layer", "role", "index")
    RESOLVE: ClassVar[Literal["first_ok", "latest"]] = "latest"

    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    turn: Int32 = Field(ge=1)
    layer: Int32 = Field(ge=0, description="1-based layer (0: SMoA role generation); the final call's layer is the last.")
    index: Int32 = Field(ge=0)
    role: str
    model: str = Field(description="Config name of the model.")
    label: str = ""
    key: str | None = Field(default=None, description="Content key: model settings, messages, parameters (moa_ray.pipeline.reuse).")
    text: str | None = Field(default=None, description="What the call answered (a judge's raw verdict too), keys redacted.")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cost_usd: float | None = Field(default=None, description="What the call costs at the model's prices (paid only where not reused).")
    finish_reason: str | None = None
    selected: bool | None = Field(default=None, description="Kept by the SMoA judge or picked by the ranker.")
    reused: bool = False
    source: str = Field(default="model", description="model (made in this run), store (an earlier identical call), references (imported).")


GenerationRow.model_rebuild()
