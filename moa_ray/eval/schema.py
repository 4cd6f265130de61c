"""Rows of the evaluation tables: a pydantic model per table and the explicit pyarrow schema it is stored with.

The pydantic model validates a row where it is made (inside a Ray worker); the
pyarrow schema fixes the column types on disk, so every part file of a table has
the same schema whoever wrote it, and readers never have to guess types from data.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

RowStatus = Literal["ok", "error"]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class _Row(BaseModel):
    """Base of every table row: the key columns and the pyarrow schema of the table."""

    model_config = ConfigDict(extra="forbid")

    #: Columns that identify a row; a table holds at most one finished row per key.
    KEY: ClassVar[tuple[str, ...]]
    SCHEMA: ClassVar[pa.Schema]
    #: Which of a key's rows stands: the first finished one (answers are never replaced), or the latest written
    #: (records of what a run did: a rerun after a kill rewrote them).
    RESOLVE: ClassVar[Literal["first_ok", "latest"]] = "first_ok"

    run_id: str = Field(min_length=1, description="The invocation that wrote this row.")
    status: RowStatus = "ok"
    error: str | None = Field(default=None, description="Why the row failed (status 'error'); retried on the next run.")
    attempt: int = Field(default=1, ge=1, description="How many runs have tried this key, this one included.")
    created_at: datetime = Field(default_factory=utc_now)

    def row_key(self) -> tuple[Any, ...]:
        """The values of the :attr:`KEY` columns (not ``key``: the call table has a column of that name)."""
        return tuple(getattr(self, c) for c in self.KEY)


_TIMESTAMP = pa.timestamp("us", tz="UTC")

_COMMON_TAIL = [
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("attempt", pa.int32(), nullable=False),
    pa.field("created_at", _TIMESTAMP, nullable=False),
]


#: Leading and trailing fields shared by the two judgment tables (pairwise annotations and grades).
_JUDGED_HEAD = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("pipeline", pa.string(), nullable=False),
    pa.field("turn", pa.int32(), nullable=False),
    pa.field("judge", pa.string(), nullable=False),
    pa.field("judge_prompt", pa.string(), nullable=False),
]
_JUDGED_TAIL = [
    pa.field("judge_prompt_tokens", pa.int64(), nullable=False),
    pa.field("judge_completion_tokens", pa.int64(), nullable=False),
    pa.field("latency_s", pa.float64()),
    *_COMMON_TAIL,
]


class RoleTokens(BaseModel):
    """Token totals of one call role (proposer, aggregator, judge...) within one answer."""

    role: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0


ROLE_TOKENS_TYPE = pa.list_(
    pa.struct(
        [
            pa.field("role", pa.string(), nullable=False),
            pa.field("prompt_tokens", pa.int64(), nullable=False),
            pa.field("completion_tokens", pa.int64(), nullable=False),
            pa.field("calls", pa.int32(), nullable=False),
        ]
    )
)


class GenerationRow(_Row):
    """One pipeline answer to one turn of one prompt."""

    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "turn")

    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    turn: int = Field(ge=1, description="1-based turn; MT-Bench turn 2 saw the pipeline's own turn-1 answer.")
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
    calls: int = 0
    latency_s: float | None = Field(default=None, description="Wall time of the pipeline request.")
    critical_path_s: float | None = None
    layers_run: int | None = None
    cost_usd: float | None = Field(default=None, description="From the trace's accounting; None when prices are unknown.")
    tflops: float | None = Field(default=None, description="From the trace's accounting; None when sizes are unknown.")
    trace: str | None = Field(default=None, description="The request's trace as JSON (moa-ray run --json format).")
    #: The rows of this answer's calls, carried from the worker to the driver's call table (never a column here).
    call_rows: list[CallRow] = Field(default_factory=list, exclude=True, repr=False)

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("pipeline", pa.string(), nullable=False),
            pa.field("turn", pa.int32(), nullable=False),
            pa.field("dataset", pa.string(), nullable=False),
            pa.field("category", pa.string()),
            pa.field("instruction", pa.string(), nullable=False),
            pa.field("output", pa.string()),
            pa.field("finish_reason", pa.string()),
            pa.field("reference", pa.string()),
            pa.field("reference_generator", pa.string()),
            pa.field("config_hash", pa.string(), nullable=False),
            pa.field("tokens_by_role", ROLE_TOKENS_TYPE, nullable=False),
            pa.field("prompt_tokens", pa.int64(), nullable=False),
            pa.field("completion_tokens", pa.int64(), nullable=False),
            pa.field("calls", pa.int32(), nullable=False),
            pa.field("latency_s", pa.float64()),
            pa.field("critical_path_s", pa.float64()),
            pa.field("layers_run", pa.int32()),
            pa.field("cost_usd", pa.float64()),
            pa.field("tflops", pa.float64()),
            pa.field("trace", pa.string()),
            *_COMMON_TAIL,
        ]
    )


class PairwiseRow(_Row):
    """An AlpacaEval-style preference between the reference (output_1) and a pipeline (output_2).

    Column names follow AlpacaEval's annotation files, so ``moa-ray eval metrics`` reads
    both. ``preference`` is 1 when the reference wins, 2 when the pipeline wins, the mean
    of the two presentation orders (reference first, pipeline first) to cancel position bias.
    """

    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "turn", "judge")

    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    turn: int = Field(default=1, ge=1)
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

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            *_JUDGED_HEAD,
            pa.field("instruction", pa.string(), nullable=False),
            pa.field("dataset", pa.string()),
            pa.field("output_1", pa.string(), nullable=False),
            pa.field("generator_1", pa.string(), nullable=False),
            pa.field("output_2", pa.string(), nullable=False),
            pa.field("generator_2", pa.string(), nullable=False),
            pa.field("preference", pa.float64()),
            pa.field("verdict_reference_first", pa.string()),
            pa.field("verdict_pipeline_first", pa.string()),
            pa.field("judgment_reference_first", pa.string()),
            pa.field("judgment_pipeline_first", pa.string()),
            *_JUDGED_TAIL,
        ]
    )


class GradeRow(_Row):
    """An MT-Bench single-answer grade (1-10) of one turn of one pipeline's conversation."""

    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "turn", "judge")

    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    turn: int = Field(ge=1)
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

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            *_JUDGED_HEAD,
            pa.field("category", pa.string()),
            pa.field("score", pa.float64()),
            pa.field("judgment", pa.string()),
            pa.field("scores", pa.list_(pa.float64())),
            pa.field("judgments", pa.list_(pa.string())),
            *_JUDGED_TAIL,
        ]
    )


class BaselinePairRow(_Row):
    """One MT-Bench pairwise-baseline match: a pipeline's turn against the baseline pipeline's, played twice.

    Game 1 shows the pipeline as assistant A, game 2 the baseline as A (FastChat's g1 / g2);
    ``outcome`` is FastChat's reading of the pair: win only if both games say so.
    """

    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "baseline", "turn", "judge")

    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    baseline: str = Field(min_length=1, description="The pipeline of the same generation run compared against.")
    turn: int = Field(ge=1)
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

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("pipeline", pa.string(), nullable=False),
            pa.field("baseline", pa.string(), nullable=False),
            pa.field("turn", pa.int32(), nullable=False),
            pa.field("judge", pa.string(), nullable=False),
            pa.field("judge_prompt", pa.string(), nullable=False),
            pa.field("category", pa.string()),
            pa.field("g1_winner", pa.string()),
            pa.field("g2_winner", pa.string()),
            pa.field("outcome", pa.string()),
            pa.field("g1_judgment", pa.string()),
            pa.field("g2_judgment", pa.string()),
            *_JUDGED_TAIL,
        ]
    )


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
    turn: int = Field(default=1, ge=1)
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

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            *_JUDGED_HEAD,
            pa.field("instruction", pa.string(), nullable=False),
            pa.field("dataset", pa.string()),
            pa.field("output_1", pa.string(), nullable=False),
            pa.field("generator_1", pa.string(), nullable=False),
            pa.field("output_2", pa.string(), nullable=False),
            pa.field("generator_2", pa.string(), nullable=False),
            pa.field("preference", pa.float64()),
            pa.field("preference_source", pa.string()),
            pa.field("is_switched_outputs", pa.bool_(), nullable=False),
            pa.field("raw_completion", pa.string()),
            pa.field("top_logprobs", pa.string()),
            *_JUDGED_TAIL,
        ]
    )


class ExactRow(_Row):
    """An exact-match score (GSM8K) of one answer: the number extracted from the output against the reference's."""

    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "turn")

    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    turn: int = Field(default=1, ge=1)
    dataset: str = Field(description="The benchmark whose rule scored the row (gsm8k).")
    category: str | None = None
    prediction: str | None = Field(default=None, description="The final answer extracted from the output; None when it has no number.")
    answer: str | None = Field(default=None, description="The reference's final answer.")
    correct: bool | None = Field(default=None, description="prediction == answer as numbers; None on a failed row.")

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("pipeline", pa.string(), nullable=False),
            pa.field("turn", pa.int32(), nullable=False),
            pa.field("dataset", pa.string(), nullable=False),
            pa.field("category", pa.string()),
            pa.field("prediction", pa.string()),
            pa.field("answer", pa.string()),
            pa.field("correct", pa.bool_()),
            *_COMMON_TAIL,
        ]
    )


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


RUBRIC_LABELS_TYPE = pa.list_(pa.struct([pa.field("name", pa.string(), nullable=False), pa.field("value", pa.string(), nullable=False)]))
ASPECT_SCORES_TYPE = pa.list_(
    pa.struct(
        [
            pa.field("aspect", pa.string(), nullable=False),
            pa.field("score", pa.float64()),
            pa.field("na", pa.bool_(), nullable=False),
        ]
    )
)


class RubricRow(_Row):
    """A rubric judgment (FLASK, Just-Eval or CEB) of one pipeline answer, with a score per aspect.

    A judgment the parser rejects is asked again (``judge_attempts`` counts the calls,
    ``rejected`` says why each earlier one failed); when every attempt is malformed the
    row is an error, never a score.
    """

    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "turn", "judge", "benchmark")

    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    turn: int = Field(default=1, ge=1)
    judge: str = Field(min_length=1)
    benchmark: str = Field(min_length=1, description="flask, flask-hard, just-eval, ceb-s or ceb-t (the generation's dataset).")
    judge_prompt: str = Field(description="Which official template judged it (flask-review-2, just-eval-score_multi...).")
    labels: list[RubricLabel] = Field(default_factory=list)
    scores: list[AspectScore] = Field(default_factory=list)
    judgment: str | None = Field(default=None, description="The judge's last raw output.")
    rejected: list[str] = Field(default_factory=list, description="Why each malformed attempt before the last was rejected.")
    judge_attempts: int = Field(default=0, ge=0, description="Judge calls made for this row in this run.")
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    latency_s: float | None = Field(default=None, description="Summed wall time of the judge calls.")

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            *_JUDGED_HEAD[:5],
            pa.field("benchmark", pa.string(), nullable=False),
            _JUDGED_HEAD[5],
            pa.field("labels", RUBRIC_LABELS_TYPE, nullable=False),
            pa.field("scores", ASPECT_SCORES_TYPE, nullable=False),
            pa.field("judgment", pa.string()),
            pa.field("rejected", pa.list_(pa.string()), nullable=False),
            pa.field("judge_attempts", pa.int32(), nullable=False),
            *_JUDGED_TAIL,
        ]
    )


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
    turn: int = Field(ge=1)
    layer: int = Field(ge=0, description="1-based layer (0: SMoA role generation); the final call's layer is the last.")
    index: int = Field(ge=0)
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

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("pipeline", pa.string(), nullable=False),
            pa.field("turn", pa.int32(), nullable=False),
            pa.field("layer", pa.int32(), nullable=False),
            pa.field("index", pa.int32(), nullable=False),
            pa.field("role", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("label", pa.string(), nullable=False),
            pa.field("key", pa.string()),
            pa.field("text", pa.string()),
            pa.field("prompt_tokens", pa.int64(), nullable=False),
            pa.field("completion_tokens", pa.int64(), nullable=False),
            pa.field("latency_s", pa.float64(), nullable=False),
            pa.field("cost_usd", pa.float64()),
            pa.field("finish_reason", pa.string()),
            pa.field("selected", pa.bool_()),
            pa.field("reused", pa.bool_(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            *_COMMON_TAIL,
        ]
    )


GenerationRow.model_rebuild()


def _check_schemas() -> None:
    """Every pydantic field has a column and vice versa (caught at import, not at write time)."""
    for row in (GenerationRow, PairwiseRow, GradeRow, ExactRow, BaselinePairRow, OfficialAnnotationRow, RubricRow, CallRow):
        fields = {name for name, f in row.model_fields.items() if not f.exclude}  # excluded fields never reach a table
        columns = set(row.SCHEMA.names)
        if fields != columns:
            raise AssertionError(f"{row.__name__}: fields and schema differ: {sorted(fields ^ columns)}")


_check_schemas()
