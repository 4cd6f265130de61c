"""What every benchmark module provides, and what the generic stages hand it.

A benchmark is a dataset (:class:`Benchmark`: its name, its loader, the judgment kind ``eval judge --mode auto``
gives its answers) and the judgment kinds that score answers (:class:`JudgmentKind`: ``plan`` the items still to
judge, ``judge`` one, the ``failed`` row of one that could not be judged, ``aggregate`` the finished rows into the
report). The stages in :mod:`moa_ray.eval.judging` and :mod:`moa_ray.eval.report` only ever talk to these two, through
:mod:`moa_ray.eval.benchmarks.registry`; nothing here imports a benchmark, so every benchmark module can import it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from moa_ray.chat import ChatMessage, ChatParams, Completion
from moa_ray.eval.datasets import EvalDataset
from moa_ray.eval.schema import GenerationRow, _Row
from moa_ray.eval.store import RowTable, join

if TYPE_CHECKING:
    from moa_ray.eval.benchmarks.rubric import RubricJudge
    from moa_ray.eval.metrics import GLMData
    from moa_ray.pipeline.agents import Agent

#: A table's key values (:attr:`~moa_ray.eval.schema._Row.KEY`).
Key = tuple[Any, ...]
#: The answers judging plans from, by key: every column but the trace (:data:`~moa_ray.eval.judging.ANSWER_COLUMNS`).
Generations = Mapping[Key, GenerationRow]
#: A row as a dict of columns: what the report's table builders (a rubric's :meth:`RubricJudge.tables`) take, one
#: benchmark's rows made from the report's Arrow columns, and a test's rows handed to the report. Judging reads
#: row models (:class:`Generations`, a kind's ``row_type``), never these.
Record = Mapping[str, Any]
#: Records by key (the report's answers as a test hands them).
Records = Mapping[Key, Record]

ItemT = TypeVar("ItemT", bound=BaseModel)
#: A kind's row model: what it writes (:meth:`JudgmentKind.judge`) and reads back as done (:meth:`JudgmentKind.plan`).
RowT = TypeVar("RowT", bound=_Row)


class AnswerTemperature(BaseModel):
    """The temperature of the call that writes each answer, by prompt category.

    All unset: the models' configured temperatures apply (AlpacaEval and files). It is part of a
    pipeline's answer settings, so a resumed run with another temperature is refused.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    forced: float | None = Field(default=None, ge=0.0, le=2.0, description="One temperature for every prompt.")
    by_category: dict[str, float] = Field(default_factory=dict)
    default: float | None = Field(default=None, ge=0.0, le=2.0, description="For a category not in by_category.")

    @property
    def is_set(self) -> bool:
        return self.forced is not None or bool(self.by_category) or self.default is not None

    def for_category(self, category: str | None) -> float | None:
        """The temperature of a prompt of this category; None: the model's own."""
        if self.forced is not None:
            return self.forced
        if category is not None and category in self.by_category:
            return self.by_category[category]
        return self.default

    def settings(self) -> dict[str, Any] | None:
        """What goes into the answer settings (None when nothing overrides the models)."""
        return self.model_dump(mode="json") if self.is_set else None


@dataclass(frozen=True)
class Benchmark:
    """A dataset ``eval generate --dataset`` accepts by name, and how ``eval judge --mode auto`` scores its answers."""

    name: str
    load: Callable[[], EvalDataset]
    #: The judgment kind (its mode) of this benchmark's answers under ``--mode auto``.
    auto_kind: str
    #: The benchmark's own judge, for the ``rubric`` kind (FLASK, Just-Eval, CEB).
    rubric: RubricJudge | None = None
    #: The answering call's temperature by category (MT-Bench's FastChat values); None: the models' own.
    answer_temperature: AnswerTemperature | None = None


class Catalog(Protocol):
    """The benchmarks known (the registry): what the stages hand the kinds, so no kind imports the registry."""

    def find(self, name: str) -> Benchmark | None:
        """The benchmark of a dataset name; None for a dataset that is not one (a file)."""
        ...

    def benchmarks(self) -> list[Benchmark]:
        """Every benchmark, in the order they were registered."""
        ...


class _NoBenchmarks:
    def find(self, name: str) -> Benchmark | None:
        return None

    def benchmarks(self) -> list[Benchmark]:
        return []


NO_BENCHMARKS: Catalog = _NoBenchmarks()
#: dataset name -> {prompt id: the prompt as a dict (EvalPrompt.model_dump(): metadata, references...)}
PromptLookup = Callable[[str], Mapping[str, Mapping[str, Any]]]


@dataclass(frozen=True)
class PlanRequest:
    """What ``eval judge`` asked for, as every kind's :meth:`JudgmentKind.plan` reads it."""

    judge: str
    mode: str = "auto"
    pipelines: list[str] | None = None
    limit: int | None = None
    baseline: str | None = None
    repeats: int = 1
    catalog: Catalog = NO_BENCHMARKS
    prompts: PromptLookup | None = None

    def wants(self, pipeline: str) -> bool:
        return self.pipelines is None or pipeline in self.pipelines


@dataclass
class JudgeContext:
    """One worker's judge: the model to ask (none for a kind that needs none), and what every row it writes records."""

    agent: Agent | None
    judge: str
    run_id: str
    params: ChatParams
    catalog: Catalog = NO_BENCHMARKS

    def model(self) -> Agent:
        if self.agent is None:
            raise RuntimeError("this judging has no judge model (a kind that needs one was given none)")
        return self.agent

    async def ask(self, messages: list[ChatMessage], params: ChatParams | None = None) -> tuple[Completion, float]:
        """The judge's completion of ``messages`` and how long it took."""
        start = time.perf_counter()
        completion = await self.model().chat(messages, params or self.params)
        return completion, time.perf_counter() - start


Cell = float | int | str | None


class BenchmarkTable(BaseModel):
    """A benchmark's own report table (FLASK skills, Just-Eval aspects, CEB axes...): a row per pipeline."""

    name: str = Field(description="File stem: flask_skills, just-eval_aspects, ceb-s_axes...")
    title: str
    columns: list[str]
    rows: list[dict[str, Cell]]
    plot_columns: list[str] = Field(default_factory=list, description="Columns drawn as bars (none: no plot).")
    ylabel: str = ""


@dataclass
class ReportScope:
    """What a kind's :meth:`JudgmentKind.aggregate` may read besides its own rows.

    ``answers``: the report's answers as Arrow (the key, status and numbers of each: see
    :func:`moa_ray.eval.judging.read_report_answers`), one row per key.
    """

    answers: pa.Table
    pipelines: list[str] | None = None
    glm_data: GLMData | None = None
    catalog: Catalog = NO_BENCHMARKS
    #: Answers, tokens, cost and p50 latency per pipeline of one dataset's generations (the main report's numbers).
    costs: Callable[[str], dict[str, dict[str, Cell]]] = field(default=lambda name: {})

    def wants(self, pipeline: str) -> bool:
        return self.pipelines is None or pipeline in self.pipelines


@dataclass
class Aggregate:
    """A kind's part of the report: columns of the main report's rows (ReportRow fields, per pipeline), and tables."""

    columns: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: list[BenchmarkTable] = field(default_factory=list)


class JudgmentKind(Protocol, Generic[ItemT, RowT]):
    """One way of scoring answers: its ``--mode`` name, its table (``OUT/<table_dir>``), its items and rows.

    Subclass it to get the defaults (:meth:`table`, :meth:`write_files`); the stages use nothing else.
    """

    mode: ClassVar[str]
    table_dir: ClassVar[str]
    row_type: ClassVar[type[_Row]]
    #: False: scored in this process without a judge model (GSM8K's exact match).
    needs_judge: ClassVar[bool] = True
    #: True: :meth:`plan` needs every answer at once; else any set of whole prompts (all their turns and
    #: pipelines) plans as its part of the whole, so a large table is planned a range of prompts at a time.
    plans_whole_table: ClassVar[bool] = False
    #: The columns :meth:`aggregate` reads (the report reads no others; None: every column); ``<text>_length``: the
    #: length in characters of the text column ``<text>``, measured as the table is read, so the text stays on disk.
    report_columns: ClassVar[tuple[str, ...] | None] = None

    def plan(self, answers: Generations, done: Mapping[Key, RowT], request: PlanRequest) -> Sequence[ItemT]:
        """The items of ``answers`` (finished or not, every dataset the mode covers) not yet judged ok in ``done``."""
        ...

    async def judge(self, item: ItemT, ctx: JudgeContext) -> RowT:
        """The row of one item; a malformed judgment is an error row, a failed call an exception."""
        ...

    def failed(self, item: ItemT, error: str, ctx: JudgeContext) -> RowT:
        """The error row of an item whose judging raised (retried on the next run)."""
        ...

    def aggregate(self, rows: pa.Table, scope: ReportScope) -> Aggregate:
        """The report's numbers from finished (status ok) rows of this kind: an Arrow table of (at least) its
        :attr:`report_columns`, one row per key in the order they were written, so a report of any size holds
        numbers per row, not Python objects (compute with ``pyarrow.compute`` and numpy)."""
        ...

    def table(self, out: str) -> RowTable[Any]:
        return RowTable(join(out, self.table_dir), self.row_type)

    def write_files(self, out: str, judge: str) -> dict[str, int]:
        """Files a benchmark's own tools read, written after a run from the table in ``out`` (rows per file)."""
        return {}


def next_attempt(prev: _Row | None) -> int:
    """The attempt number of a key planned again after ``prev`` (none: the first)."""
    return prev.attempt + 1 if prev is not None else 1


def is_done(prev: _Row | None) -> bool:
    return prev is not None and prev.status == "ok"


def output_of(answer: GenerationRow) -> str:
    """A finished answer's text: generation writes every ok row with one, so a missing one is a broken table (an
    error here, as the item's validation raised when rows were dicts), never an empty answer to judge."""
    if answer.output is None:
        raise ValueError(f"answer {answer.row_key()} is finished but has no output")
    return answer.output


#: Finished answers by (prompt id, pipeline), then by turn.
Conversations = dict[tuple[str, str], dict[int, GenerationRow]]


def conversations(answers: Generations, request: PlanRequest, *, with_baseline: bool = False) -> Conversations:
    """Finished answers by (prompt id, pipeline), then turn; of the wanted pipelines (and the baseline's)."""
    convo: Conversations = defaultdict(dict)
    for (prompt_id, pipeline, turn), row in answers.items():
        if row.status == "ok" and (request.wants(pipeline) or (with_baseline and pipeline == request.baseline)):
            convo[(prompt_id, pipeline)][turn] = row
    return convo


def limited(convo: Mapping[tuple[str, str], Any], limit: int | None, skip: str | None = None) -> list[tuple[str, str]]:
    """(prompt id, pipeline) pairs in order, at most ``limit`` prompts per pipeline (``skip``: the baseline, unlimited)."""
    per_pipeline: dict[str, int] = defaultdict(int)
    kept = []
    for prompt_id, pipeline in sorted(convo):
        if pipeline == skip:
            continue
        if limit is not None and per_pipeline[pipeline] >= limit:
            continue
        per_pipeline[pipeline] += 1
        kept.append((prompt_id, pipeline))
    return kept
