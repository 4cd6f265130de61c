"""``eval judge``: the stages that score a generation table, generic over the registered judgment kinds.

Each benchmark's kind (:mod:`moa_ray.eval.benchmarks`) plans its items, judges one, and says what a failed one
writes; here the items of every kind the mode asks for are planned together, judged by one worker pool (Ray actors,
or one loop in this process), and written to each kind's table (``OUT/<kind's table>``) as the output's only
writer. ``--mode auto`` gives each dataset's answers to its benchmark's kind (a dataset file's: pairwise against its
references, else single grades); another mode gives every answer to that kind. A kind that needs no judge model
(GSM8K's exact match) is scored in this process by :func:`run_exact`, before Ray starts.

The judge is any model of the config, deployed on Ray Serve like the agents; work is
sharded across the same kind of actor pool as generation and is resumable the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from moa_ray.chat import ChatMessage, ChatParams, Completion
from moa_ray.errors import ConfigError, MoARayError
from moa_ray.eval.benchmarks import registry
from moa_ray.eval.benchmarks.alpaca_eval import OFFICIAL_MODE, PAIRWISE_MODE
from moa_ray.eval.benchmarks.base import Generations, JudgeContext, JudgmentKind, Key, PlanRequest, PromptLookup
from moa_ray.eval.benchmarks.gsm8k import EXACT
from moa_ray.eval.benchmarks.mt_bench import BASELINE_MODE, SINGLE_MODE
from moa_ray.eval.benchmarks.rubric import RUBRIC, RUBRIC_MODE, RubricItem
from moa_ray.eval.calls import calls_table, proposer_entries
from moa_ray.eval.lease import WriterLease
from moa_ray.eval.progress import EvalProgress
from moa_ray.eval.report_data import finished, keep, read_resolved, unique
from moa_ray.eval.runner import PoolKind, count_rows, make_pool
from moa_ray.eval.schema import BaselinePairRow, GenerationRow, GradeRow, OfficialAnnotationRow, PairwiseRow, RubricRow, _Row
from moa_ray.eval.store import R, RowTable, resolve_latest, typed_rows
from moa_ray.pipeline.agents import Agent, prepare_agents

AUTO = "auto"


def judge_modes() -> tuple[str, ...]:
    """``auto`` and the mode of every registered kind that needs a judge model."""
    return (AUTO, *(k.mode for k in registry.REGISTRY.kinds() if k.needs_judge))


class JudgeOptions(BaseModel):
    judge: str = Field(min_length=1, description="Config name of the judge model.")
    generations: str = Field(min_length=1)
    out: str = Field(min_length=1)
    mode: str = Field(default="auto", description="auto, or the mode of a registered judgment kind.")
    pipelines: list[str] | None = None
    limit: int | None = Field(default=None, ge=1, description="Judge at most this many prompts per pipeline.")
    concurrency: int = Field(default=16, ge=1)
    workers: int | None = Field(default=None, ge=1)
    worker_cpus: float = Field(default=0.25, ge=0)
    pool: PoolKind = Field(default="ray", description="Where the workers run: Ray actors, or one asyncio loop in this process.")
    max_tokens: int = Field(default=1024, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    run_id: str
    flush_rows: int = Field(default=256, ge=1, description="Most rows per part file.")
    flush_s: float = Field(default=1.0, ge=0, description="Seconds of results per part file (0: each batch as it arrives).")
    progress: bool = True
    baseline: str | None = Field(default=None, description="pairwise-baseline: the pipeline every other is compared with.")
    repeats: int = Field(default=1, ge=1, le=15, description="single: grade each turn this many times, keep the median.")

    @model_validator(mode="after")
    def _mode_options(self) -> JudgeOptions:
        try:
            check_mode_options(self.mode, self.baseline, self.repeats, self.pipelines)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return self


def check_mode_options(mode: str, baseline: str | None, repeats: int, pipelines: list[str] | None) -> None:
    """The options each mode needs or allows; a ConfigError names the flag."""
    if mode not in judge_modes():
        raise ConfigError(f"unknown judge mode {mode!r} (modes: {', '.join(judge_modes())})")
    if mode == BASELINE_MODE:
        if not baseline:
            raise ConfigError("mode pairwise-baseline needs --baseline PIPELINE")
        if pipelines is not None and set(pipelines) <= {baseline}:
            raise ConfigError(f"--pipeline names only the baseline {baseline!r}: nothing to compare with it")
    elif baseline is not None:
        raise ConfigError(f"--baseline is for mode pairwise-baseline, not {mode}")
    if repeats > 1 and mode not in (SINGLE_MODE, AUTO):
        raise ConfigError(f"--judge-repeats takes the median of 1-10 grades: use it with mode single (or auto for MT-Bench), not {mode}")


# --------------------------------------------------------------------------- planning


def auto_kind(answer: GenerationRow) -> str:
    """The kind ``--mode auto`` gives an answer: its benchmark's; a file's, pairwise with a reference, else single."""
    found = registry.REGISTRY.find(answer.dataset)
    if found is not None:
        return found.auto_kind
    return PAIRWISE_MODE if answer.reference is not None else SINGLE_MODE


#: Each kind's stored rows by mode (a kind's :attr:`~moa_ray.eval.benchmarks.base.JudgmentKind.row_type` each).
DoneRows = Mapping[str, Mapping[Key, _Row]]


def answers_by_kind(generations: Generations, mode: str) -> Mapping[str, Generations]:
    """The answers each kind plans from: under ``auto`` by dataset (a conversation goes by its first turn's), else all
    of them to the mode's kind."""
    if mode != AUTO:
        return {mode: generations}
    first = {(k[0], k[1]): auto_kind(r) for k, r in generations.items()}
    for (prompt_id, pipeline, turn), row in generations.items():
        if turn == 1:
            first[(prompt_id, pipeline)] = auto_kind(row)
    split: dict[str, dict[Key, GenerationRow]] = {}
    for key, row in generations.items():
        split.setdefault(first[(key[0], key[1])], {})[key] = row
    return split


def plan_items(generations: Generations, request: PlanRequest, done: DoneRows) -> list[Any]:
    """The items still to judge by a model, kind by kind in registry order; ``done``: each kind's stored rows by mode."""
    check_mode_options(request.mode, request.baseline, request.repeats, request.pipelines)
    split = answers_by_kind(generations, request.mode)
    items: list[Any] = []
    for kind in registry.REGISTRY.kinds():
        if kind.needs_judge and kind.mode in split:
            items += kind.plan(split[kind.mode], done.get(kind.mode, {}), request)
    return items


def plan_request(options: JudgeOptions | None = None, /, **fields: Any) -> PlanRequest:
    """A plan request over the registry; the rubric prompts from :func:`registry.dataset_prompts` (looked up at call time)."""
    if options is not None:
        fields = {
            "judge": options.judge,
            "mode": options.mode,
            "pipelines": options.pipelines,
            "limit": options.limit,
            "baseline": options.baseline,
            "repeats": options.repeats,
            **fields,
        }
    if "prompts" not in fields:
        loaded: dict[str, Mapping[str, Mapping[str, Any]]] = {}

        def prompts(name: str) -> Mapping[str, Mapping[str, Any]]:
            if name not in loaded:
                loaded[name] = registry.dataset_prompts(name)  # looked up at call time: a test may replace it
            return loaded[name]

        fields["prompts"] = prompts
    return PlanRequest(catalog=registry.REGISTRY, **fields)


def plan_judging(
    generations: Generations,
    judge: str,
    pairwise_done: Mapping[Key, PairwiseRow],
    single_done: Mapping[Key, GradeRow],
    *,
    mode: str = AUTO,
    pipelines: list[str] | None = None,
    limit: int | None = None,
    baseline: str | None = None,
    repeats: int = 1,
    baseline_done: Mapping[Key, BaselinePairRow] | None = None,
    official_done: Mapping[Key, OfficialAnnotationRow] | None = None,
    rubric_done: Mapping[Key, RubricRow] | None = None,
) -> list[Any]:
    """Judge items for the finished generations that this judge has not judged yet (failed ones again), with the
    built-in kinds' stored rows named one by one (:func:`plan_items` takes them by mode).

    A grade made with another number of repeats than asked is made again.
    """
    done: dict[str, Mapping[Key, _Row]] = {
        PAIRWISE_MODE: pairwise_done,
        SINGLE_MODE: single_done,
        BASELINE_MODE: baseline_done or {},
        OFFICIAL_MODE: official_done or {},
        RUBRIC_MODE: rubric_done or {},
    }
    request = plan_request(judge=judge, mode=mode, pipelines=pipelines, limit=limit, baseline=baseline, repeats=repeats)
    return plan_items(generations, request, done)


def plan_rubric(
    generations: Generations,
    judge: str,
    done: Mapping[Key, RubricRow],
    *,
    mode: str = AUTO,
    pipelines: list[str] | None = None,
    limit: int | None = None,
    prompts: PromptLookup | None = None,
) -> list[RubricItem]:
    """The rubric kind's items alone (``prompts``: a dataset's prompts by name, default the registry's)."""
    if mode not in (AUTO, RUBRIC_MODE):
        return []
    request = plan_request(judge=judge, mode=mode, pipelines=pipelines, limit=limit, **({"prompts": prompts} if prompts else {}))
    return RUBRIC.plan(generations, done, request)


#: About how many answers ``eval judge`` reads, plans and judges at a time (whole prompts: all their turns and pipelines).
CHUNK_ROWS = 4096
#: Rows a stored table is read in while it is set aside by range (its texts: a few MB a batch).
SPLIT_BATCH_ROWS = 2048


class StoredAnswers:
    """A generations directory read a range of prompts at a time (prompt ids in order), each range with every turn
    and pipeline of its prompts: ``eval judge`` holds one range's answers and stored judgments, not the whole table.

    The tables are read once, batch by batch, and each row is set aside in its range's file in a temporary
    directory (every judgment table has a ``prompt_id`` column); the ranges are then read back one by one, as often
    as the stage plans. Use it in a ``with`` block (or :meth:`close` it) to remove those files.
    ``proposers``: each stored layer-1 answer as an entry of its own too (read whole, from the call table).
    """

    def __init__(self, uri: str, *, proposers: bool = False, chunk_rows: int = CHUNK_ROWS) -> None:
        self.uri = uri
        self.proposers = proposers
        self.chunk_rows = chunk_rows
        self._tmp: str | None = None
        self._bounds: list[str] | None = None
        self._parts: dict[str, list[str | None]] = {}

    def __enter__(self) -> StoredAnswers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self._parts.clear()

    def _table(self) -> RowTable[GenerationRow]:
        return RowTable(self.uri, GenerationRow)

    def datasets(self) -> list[str]:
        """Every dataset the answers come from."""
        found: set[str] = set()
        for batch in self._table().batches(["dataset"]):
            found.update(pc.unique(batch.column(0)).to_pylist())
        return sorted(found)

    def bounds(self) -> list[str]:
        """The first prompt id of each range, in order: a range holds whole prompts, about ``chunk_rows`` rows."""
        if self._bounds is None:
            rows: Counter[str] = Counter()
            for batch in self._table().batches(["prompt_id"]):
                counts = pc.value_counts(batch.column(0))
                rows.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)))
            self._bounds = []
            size = 0
            for prompt_id in sorted(rows):
                if not self._bounds or size >= self.chunk_rows:
                    self._bounds.append(prompt_id)
                    size = 0
                size += rows[prompt_id]
        return self._bounds

    def of_datasets(self, names: list[str]) -> dict[Key, GenerationRow]:
        """The answers (proposer entries too) of these datasets only, read whole."""
        table = self._table()
        found = table.read_where(pc.field("dataset").isin(names), ANSWER_COLUMNS).to_pylist()
        rows = typed_rows(GenerationRow, resolve_latest(found, table.key, table.row_type.RESOLVE), table.uri)
        if self.proposers:
            rows.update({e.row_key(): e for e in proposer_entries(self.uri, run_id="proposers") if e.dataset in names})
        return rows

    def _split(self, table: RowTable[Any], columns: list[str]) -> list[str | None]:
        """``table``'s rows set aside by range, one Parquet file each (None: no row in that range), once per table."""
        if table.uri in self._parts:
            return self._parts[table.uri]
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="moa-ray-judge-")
        bounds = np.array(self.bounds(), dtype=object)
        paths: list[str | None] = [None] * len(bounds)
        writers: dict[int, pq.ParquetWriter] = {}
        try:
            for batch in table.batches(columns, batch_rows=SPLIT_BATCH_ROWS):
                ranges = np.searchsorted(bounds, np.array(batch.column("prompt_id").to_pylist(), dtype=object), side="right") - 1
                for index in np.unique(ranges[ranges >= 0]).tolist():
                    if index not in writers:
                        paths[index] = f"{self._tmp}/{len(self._parts)}-{index}.parquet"
                        writers[index] = pq.ParquetWriter(paths[index], batch.schema)
                    writers[index].write_batch(batch.filter(pa.array(ranges == index)))
        finally:
            for writer in writers.values():
                writer.close()
            pa.default_memory_pool().release_unused()  # the allocator would keep the largest batch's pages
        self._parts[table.uri] = paths
        return paths

    def chunks(self, tables: Mapping[str, RowTable[Any]]) -> Iterator[tuple[dict[Key, GenerationRow], dict[str, dict[Key, _Row]]]]:
        """Each range's answers (resolved, no traces), with each of ``tables``' resolved rows of the same prompts: row
        models, made only for the rows of one range at a time."""
        entries: dict[str, list[GenerationRow]] = defaultdict(list)
        if self.proposers:
            for entry in proposer_entries(self.uri, run_id="proposers"):
                entries[entry.prompt_id].append(entry)
        answers = self._table()
        key_columns = [*answers.key, "status", "attempt", "created_at"]
        answer_parts = self._split(answers, list(dict.fromkeys([*key_columns, *ANSWER_COLUMNS])))
        done_parts = {mode: self._split(table, list(table.schema.names)) for mode, table in tables.items()}
        bounds = self.bounds()
        for index, first in enumerate(bounds):
            last = bounds[index + 1] if index + 1 < len(bounds) else None
            rows = _read_part(answer_parts[index], answers)
            for prompt_id in [p for p in entries if first <= p and (last is None or p < last)]:
                rows.update({e.row_key(): e for e in entries.pop(prompt_id)})
            yield rows, {mode: _read_part(parts[index], tables[mode]) for mode, parts in done_parts.items()}


def _read_part(path: str | None, table: RowTable[R]) -> dict[Key, R]:
    """One range's resolved rows of ``table`` (set aside by :meth:`StoredAnswers._split`) as its row model."""
    if path is None:
        return {}
    return typed_rows(table.row_type, resolve_latest(pq.read_table(path).to_pylist(), table.key, table.row_type.RESOLVE), table.uri)


#: What ``eval judge`` judges: answers already read (one chunk), or a generations directory read a range at a time.
Answers = Generations | StoredAnswers


def _planned_chunks(answers: Answers, options: JudgeOptions) -> Iterator[tuple[Generations, DoneRows]]:
    """The answers to plan from, chunk by chunk, each with the stored rows of the kinds that plan from them.

    A stored table is read a range of prompts at a time, unless the plan needs every prompt at once: a ``--limit``
    (the first N prompts per pipeline) or a kind that plans from the whole table (pairwise-baseline)."""
    kinds = [k for k in registry.REGISTRY.kinds() if k.needs_judge]
    whole = options.limit is not None or any(k.plans_whole_table for k in kinds if k.mode == options.mode)
    if isinstance(answers, StoredAnswers) and whole:
        answers = read_generations(answers.uri, proposers=answers.proposers)
    if not isinstance(answers, StoredAnswers):
        split = answers_by_kind(answers, options.mode)
        yield answers, {k.mode: k.table(options.out).latest() for k in kinds if k.mode in split}
        return
    if options.mode != AUTO:
        modes = {options.mode}
    else:  # the kinds of the datasets present: a dataset file's answers are pairwise or single
        found = [registry.REGISTRY.find(name) for name in answers.datasets()]
        modes = {b.auto_kind for b in found if b is not None} | ({PAIRWISE_MODE, SINGLE_MODE} if None in found else set())
    for rows, done in answers.chunks({k.mode: k.table(options.out) for k in kinds if k.mode in modes}):
        split = answers_by_kind(rows, options.mode)
        yield rows, {mode: found for mode, found in done.items() if mode in split}


def iter_planned(answers: Answers, options: JudgeOptions) -> Iterator[Any]:
    """:func:`plan_items` chunk by chunk against the judgment tables already in ``options.out``."""
    request = plan_request(options)
    for rows, done in _planned_chunks(answers, options):
        yield from plan_items(rows, request, done)


def plan_for_options(answers: Answers, options: JudgeOptions) -> list[Any]:
    """Every item :func:`iter_planned` plans (a run of any size: count them with :func:`count_planned`)."""
    return list(iter_planned(answers, options))


def count_planned(answers: Answers, options: JudgeOptions) -> int:
    return sum(1 for _ in iter_planned(answers, options))


# --------------------------------------------------------------------------- judging


class JudgeHandler:
    """Judges one item with the judge agent, by its kind (``item.kind``); one row per item."""

    def __init__(self, agent: Agent, judge: str, run_id: str, params: ChatParams) -> None:
        self.agent = agent
        self.judge = judge
        self.run_id = run_id
        self.params = params
        self.kinds: dict[str, JudgmentKind[Any, Any]] = {k.mode: k for k in registry.REGISTRY.kinds()}
        self.context = JudgeContext(agent=agent, judge=judge, run_id=run_id, params=params, catalog=registry.REGISTRY)

    async def setup(self) -> None:
        prepare_agents([self.agent])

    async def _ask(self, messages: list[ChatMessage], params: ChatParams | None = None) -> tuple[Completion, float]:
        return await self.context.ask(messages, params)

    async def handle(self, item: Any) -> list[Any]:
        """One row per item; an exception becomes a failed row (retried on the next run)."""
        try:
            return [await self.kinds[item.kind].judge(item, self.context)]
        except Exception as err:  # noqa: BLE001 - a failed judgment is a row, retried next run
            return self.failed(item, f"{type(err).__name__}: {err}")

    def failed(self, item: Any, error: str) -> list[Any]:
        return [self.kinds[item.kind].failed(item, error, self.context)]


class JudgeSummary(BaseModel):
    run_id: str
    judge: str
    out: str
    pairwise_items: int
    single_items: int
    baseline_items: int = 0
    official_items: int = 0
    rubric_items: int = 0
    ok_rows: int
    failed_rows: int
    elapsed_s: float
    annotation_files: dict[str, int] = Field(default_factory=dict, description="AlpacaEval annotations.json written, rows per file.")
    items: dict[str, int] = Field(default_factory=dict, description="Items judged per kind (mode).")


def run_judging(answers: Answers, agent: Agent, options: JudgeOptions) -> JudgeSummary:
    """Judge what is still unjudged (Ray must be up and the judge deployed), as the output's only writer."""
    with WriterLease(options.out, options.run_id):
        return _judge(answers, agent, options)


def _judge(answers: Answers, agent: Agent, options: JudgeOptions) -> JudgeSummary:
    kinds = {k.mode: k for k in registry.REGISTRY.kinds() if k.needs_judge}
    total = count_planned(answers, options)
    params = ChatParams(temperature=options.temperature, max_tokens=options.max_tokens)
    handler = JudgeHandler(agent, options.judge, options.run_id, params)
    per_kind: dict[str, int] = dict.fromkeys(kinds, 0)
    ok = failed = 0
    elapsed = 0.0
    if total:
        writers = {
            mode: kind.table(options.out).writer(options.run_id, flush_rows=options.flush_rows, flush_s=options.flush_s)
            for mode, kind in kinds.items()
        }
        progress = EvalProgress(total, f"judge ({options.judge})", unit="judgments", enabled=options.progress)

        def items() -> Iterator[Any]:
            for item in iter_planned(answers, options):
                per_kind[item.kind] += 1
                yield item

        def on_rows(item: Any, rows: list[Any]) -> None:
            nonlocal ok, failed
            writers[item.kind].add(rows)
            n_ok, n_failed = count_rows(rows)
            ok += n_ok
            failed += n_failed
            progress.advance(n_ok, n_failed)

        def tick() -> None:
            for writer in writers.values():
                writer.maybe_flush()

        with make_pool(
            handler, kind=options.pool, concurrency=options.concurrency, workers=options.workers, worker_cpus=options.worker_cpus
        ) as pool:
            with contextlib.ExitStack() as stack:
                for writer in writers.values():
                    stack.enter_context(writer)
                stack.enter_context(progress)
                elapsed = pool.run(items(), on_rows, tick=tick).elapsed_s
    for kind in kinds.values():
        table = kind.table(options.out)
        if table.part_files():
            table.compact(options.run_id)
    files = kinds[options.mode].write_files(options.out, options.judge) if options.mode in kinds else {}
    return JudgeSummary(
        run_id=options.run_id,
        judge=options.judge,
        out=options.out,
        pairwise_items=per_kind.get(PAIRWISE_MODE, 0),
        single_items=per_kind.get(SINGLE_MODE, 0),
        baseline_items=per_kind.get(BASELINE_MODE, 0),
        official_items=per_kind.get(OFFICIAL_MODE, 0),
        rubric_items=per_kind.get(RUBRIC_MODE, 0),
        ok_rows=ok,
        failed_rows=failed,
        elapsed_s=elapsed,
        annotation_files=files,
        items={m: n for m, n in per_kind.items() if n},
    )


# --------------------------------------------------------------------------- judging without a model


class ExactSummary(BaseModel):
    run_id: str
    out: str
    scored: int
    correct: int
    failed: int
    done_before: int


def run_exact(answers: Answers, out: str, run_id: str, *, pipelines: list[str] | None = None, limit: int | None = None) -> ExactSummary:
    """Score the unscored exact-match answers into ``OUT/exact`` in this process, as the output's only writer."""
    generations = answers.of_datasets(exact_datasets()) if isinstance(answers, StoredAnswers) else answers
    table = EXACT.table(out)
    done = table.latest()
    request = plan_request(judge="", mode=EXACT.mode, pipelines=pipelines, limit=limit)
    items = EXACT.plan(generations, done, request)
    context = JudgeContext(agent=None, judge="", run_id=run_id, params=ChatParams(), catalog=registry.REGISTRY)

    async def score() -> list[Any]:
        return [await EXACT.judge(item, context) for item in items]

    rows = asyncio.run(score())
    if rows:
        with WriterLease(out, run_id):
            with table.writer(run_id, flush_rows=len(rows)) as writer:
                writer.add(rows)
            table.compact(run_id)
    wanted = [k for k, r in generations.items() if is_exact_answer(r) and (pipelines is None or r.pipeline in pipelines)]
    already = sum(1 for k in wanted if (prev := done.get(k)) is not None and prev.status == "ok")
    return ExactSummary(
        run_id=run_id,
        out=out,
        scored=sum(r.status == "ok" for r in rows),
        correct=sum(bool(r.correct) for r in rows),
        failed=sum(r.status == "error" for r in rows),
        done_before=already,
    )


def is_exact_answer(answer: GenerationRow) -> bool:
    """Whether ``--mode auto`` scores an answer without a judge model."""
    return is_exact_dataset(answer.dataset)


def is_exact_dataset(name: str) -> bool:
    found = registry.REGISTRY.find(name)
    return found is not None and not registry.REGISTRY.kind(found.auto_kind).needs_judge


def exact_datasets() -> list[str]:
    """The datasets ``--mode auto`` scores without a judge model."""
    return [b.name for b in registry.REGISTRY.benchmarks() if is_exact_dataset(b.name)]


class ExactMatchSplit(BaseModel):
    """A judge run's datasets: whether exact match scores some answers without a model, and what is left for one."""

    scores: bool = Field(description="Exact match scores the answers of the exact-match datasets (gsm8k) in this run.")
    for_judge: list[str] = Field(description="The datasets left for a judge model (empty: no judge model is needed).")


def split_exact_match(mode: str, datasets: Sequence[str]) -> ExactMatchSplit:
    """``exact`` scores by exact match alone; ``auto`` scores the exact-match datasets so and leaves the others to a
    judge model; any other mode judges every dataset with a model (gsm8k's answers too)."""
    if mode == EXACT.mode:
        return ExactMatchSplit(scores=True, for_judge=[])
    if mode == AUTO and any(is_exact_dataset(d) for d in datasets):
        return ExactMatchSplit(scores=True, for_judge=[d for d in datasets if not is_exact_dataset(d)])
    return ExactMatchSplit(scores=False, for_judge=list(datasets))


# --------------------------------------------------------------------------- reading back


#: Every generation column but the trace (the largest by far, and read by no judge or report).
ANSWER_COLUMNS = [f.name for f in GenerationRow.SCHEMA if f.name != "trace"]
#: What the report reads of an answer: its numbers, none of its texts.
REPORT_COLUMNS = ["dataset", "prompt_tokens", "completion_tokens", "latency_s", "cost_usd", "tflops"]


def read_generations(uri: str, *, proposers: bool = False) -> dict[Key, GenerationRow]:
    """The answers of a generations directory, every column but the trace (:data:`ANSWER_COLUMNS`: judging reads
    none, and it is the largest by far; the field stays None); with ``proposers``, each stored layer-1 answer too, as
    an entry of its own (``proposer:<label>``, from the call table: no new generation call; see
    :func:`~moa_ray.eval.calls.proposer_entries`)."""
    rows = RowTable(uri, GenerationRow).latest(without=("trace",))
    if proposers:
        rows.update({entry.row_key(): entry for entry in proposer_entries(uri, run_id="proposers")})
    return rows


def report_rows(kind: JudgmentKind[Any, Any], out: str) -> pa.Table:
    """A kind's resolved rows with only its :attr:`~moa_ray.eval.benchmarks.base.JudgmentKind.report_columns`, read
    a batch at a time: a ``<text>_length`` column is measured in each batch, so no text is ever held whole; an Arrow
    table, so an answer costs its numbers, not a Python dict (see :mod:`moa_ray.eval.report_data`)."""
    return read_resolved(kind.table(out), kind.report_columns or kind.row_type.SCHEMA.names)


def read_report_answers(uri: str, *, proposers: bool = False) -> pa.Table:
    """What the report reads of a generations directory (the key, the status and :data:`REPORT_COLUMNS`), one row
    per key as :func:`read_generations` gives them, as an Arrow table; with ``proposers``, each stored layer-1
    answer's entry after them (none where no call was stored: the call table is then not read)."""
    answers = read_resolved(RowTable(uri, GenerationRow), REPORT_COLUMNS)
    if not proposers or not calls_table(uri).part_files():
        return answers
    entries = [e.model_dump(include=set(answers.column_names)) for e in proposer_entries(uri, run_id="proposers")]
    if not entries:
        return answers
    return pa.concat_tables([answers, pa.Table.from_pylist(entries, schema=answers.schema)])


def _empty() -> pa.Table:
    return pa.table({})


class Judgments(BaseModel):
    """The finished (status ok) judgments of one judge in a judgment directory, as ``eval report`` uses them: an
    Arrow table per kind (its report columns, or every column), one row per key, in the order they were written."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pairwise: pa.Table = Field(default_factory=_empty, description="AlpacaEval annotations: pair-v2 or the official annotator's.")
    grades: pa.Table = Field(default_factory=_empty, description="MT-Bench single grades.")
    baseline_pairs: pa.Table = Field(default_factory=_empty, description="MT-Bench pairwise-baseline matches.")
    rubric: pa.Table = Field(default_factory=_empty, description="FLASK / Just-Eval / CEB rubric rows.")
    exact: pa.Table = Field(default_factory=_empty, description="GSM8K exact-match scores (no judge).")
    others: dict[str, pa.Table] = Field(default_factory=dict, description="Rows of every other registered kind, by mode.")

    def by_kind(self) -> dict[str, pa.Table]:
        """Every kind's rows by mode (the AlpacaEval annotations under pairwise, whichever annotator made them)."""
        named = {PAIRWISE_MODE: self.pairwise, SINGLE_MODE: self.grades, BASELINE_MODE: self.baseline_pairs}
        return {**named, RUBRIC_MODE: self.rubric, EXACT.mode: self.exact, **self.others}


def read_judgments(out: str, judge: str | None = None, annotator: str | None = None, *, for_report: bool = False) -> Judgments:
    """Every judgment table of ``out``, one judge's rows (``judge``, else the only one of each kind); ``for_report``:
    only the columns each kind's report reads (:attr:`~moa_ray.eval.benchmarks.base.JudgmentKind.report_columns`).

    ``annotator`` picks the AlpacaEval win rates' source when both ``pairwise`` and
    ``alpaca-eval-official`` annotations are there; a choice that is needed and missing is a MoARayError.
    """

    def ok(kind: JudgmentKind[Any, Any]) -> pa.Table:
        columns = kind.report_columns if for_report and kind.report_columns is not None else kind.row_type.SCHEMA.names
        return finished(read_resolved(kind.table(out), columns))

    if annotator not in (None, PAIRWISE_MODE, OFFICIAL_MODE):
        raise MoARayError(f"unknown annotator {annotator!r} (pairwise or alpaca-eval-official)")
    every = registry.REGISTRY.kinds()
    kinds = {k.mode: ok(k) for k in every if "judge" in k.row_type.model_fields}
    unjudged = {k.mode: ok(k) for k in every if "judge" not in k.row_type.model_fields}  # scored without a model
    judges = sorted({j for rows in kinds.values() for j in unique(rows.column("judge"))})
    if judge is not None:
        if judge not in judges:
            raise MoARayError(f"no judgments by {judge!r} in {out} (judges: {', '.join(judges) or 'none'})")
        kinds = {k: keep(v, pc.equal(v.column("judge"), judge)) for k, v in kinds.items()}
    for kind, rows in kinds.items():
        kind_judges = sorted(unique(rows.column("judge")))
        if len(kind_judges) > 1:
            raise MoARayError(f"{out} holds {kind} judgments of several judges ({', '.join(kind_judges)}); choose one with --judge")
    annotated = [k for k in (PAIRWISE_MODE, OFFICIAL_MODE) if kinds[k].num_rows]
    if annotator is None and len(annotated) > 1:
        raise MoARayError(f"{out} holds both pairwise and alpaca-eval-official annotations; choose one with --annotator")
    named = (PAIRWISE_MODE, OFFICIAL_MODE, SINGLE_MODE, BASELINE_MODE, RUBRIC_MODE, EXACT.mode)
    return Judgments(
        pairwise=kinds[annotator or (annotated[0] if annotated else PAIRWISE_MODE)],
        grades=kinds[SINGLE_MODE],
        baseline_pairs=kinds[BASELINE_MODE],
        rubric=kinds[RUBRIC_MODE],
        exact=unjudged[EXACT.mode],
        others={m: rows for m, rows in {**kinds, **unjudged}.items() if m not in named},
    )
