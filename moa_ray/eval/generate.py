"""Generation: answer every prompt of a dataset with one or more pipelines, into a resumable Parquet table.

Work items are (prompt, pipeline) pairs sharded across a :class:`~moa_ray.eval.runner.WorkerPool`;
every pipeline is built in every worker on top of the same Serve-deployed agents,
so several pipelines in one run share the models. A multi-turn prompt (MT-Bench) is
one item: turn 2 is asked with the pipeline's own turn-1 answer in the history.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from moa_ray.chat import ChatMessage, ChatParams
from moa_ray.config import MoARayConfig
from moa_ray.errors import ConfigError, PipelineError
from moa_ray.eval.benchmarks.base import AnswerTemperature
from moa_ray.eval.benchmarks.registry import answer_temperature
from moa_ray.eval.calls import CALLS_DIR, call_rows, calls_table, reference_calls, stored_calls
from moa_ray.eval.datasets import EvalPrompt, PromptSource
from moa_ray.eval.lease import WriterLease
from moa_ray.eval.planning import Plan, StreamPlan, TableState, WorkItem
from moa_ray.eval.progress import EvalProgress
from moa_ray.eval.runner import PoolKind, count_rows, make_pool
from moa_ray.eval.schema import CallRow, GenerationRow, RoleTokens
from moa_ray.eval.store import RowTable, StoreError, join, resolve, resolve_latest
from moa_ray.pipeline.accounting import Accounting
from moa_ray.pipeline.agents import Agent
from moa_ray.pipeline.reuse import CallReuse, StoredCall
from moa_ray.pipeline.trace import Trace


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


#: The answer-settings key of the answering call's temperature (per dataset: MT-Bench's by category).
TEMPERATURE_KEY = "answer_temperature"


def answer_settings(
    config: MoARayConfig, pipeline: str, temperature: AnswerTemperature | None = None, *, explicit: bool = False
) -> dict[str, Any]:
    """What shapes a pipeline's answers: the pipeline's spec, every answer setting of the models it calls,
    and the answering call's temperature when the run sets one (MT-Bench's per category, or forced).
    ``explicit``: only the settings that differ from their defaults (what tells a setting added to moa-ray since a
    run began, at its default, from one the user changed)."""
    spec = config.pipeline(pipeline)
    models = config.models_for([pipeline])
    settings: dict[str, Any] = {
        "pipeline": spec.model_dump(mode="json", exclude={"description"}, exclude_defaults=explicit),
        "models": {
            name: m.model_dump(mode="json", exclude=set(m.operational_fields), exclude_defaults=True) if explicit else m.answer_settings()
            for name, m in models.items()
        },
    }
    chosen = temperature.settings() if temperature is not None else None
    if chosen is not None:
        settings[TEMPERATURE_KEY] = chosen
    return settings


def base_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings without the per-dataset answer temperature: what must agree across the datasets of one table."""
    return {k: v for k, v in settings.items() if k != TEMPERATURE_KEY}


class RunSettings(BaseModel):
    """Per pipeline: this run's answer settings, their fingerprint, and the fingerprint of their dataset-independent part."""

    settings: dict[str, dict[str, Any]]
    fingerprints: dict[str, str]
    base_fingerprints: dict[str, str]
    explicit: dict[str, dict[str, Any]] = Field(default_factory=dict, description="The settings not at their defaults.")


def run_settings(config: MoARayConfig, pipelines: list[str], temperature: AnswerTemperature | None = None) -> RunSettings:
    settings = {p: answer_settings(config, p, temperature) for p in pipelines}
    return RunSettings(
        settings=settings,
        fingerprints={p: settings_fingerprint(s) for p, s in settings.items()},
        base_fingerprints={p: settings_fingerprint(base_settings(s)) for p, s in settings.items()},
        explicit={p: answer_settings(config, p, temperature, explicit=True) for p in pipelines},
    )


def settings_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def pipeline_fingerprint(config: MoARayConfig, pipeline: str) -> str:
    """A hash of :func:`answer_settings`, stored on every row, to refuse resuming a directory made with other settings."""
    return settings_fingerprint(answer_settings(config, pipeline))


def first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """The first setting that differs, as ``path: old -> new`` (None when equal)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            found = first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if old == new else f"{path}: {json.dumps(old)} -> {json.dumps(new)}"


def without_added_defaults(new: Any, old: Any, explicit: Any) -> Any:
    """``new`` without the settings that ``old`` (stored by an earlier run) lacks and that are at their defaults
    (absent from ``explicit``, the same settings without defaults): a setting moa-ray gained since, left as it was,
    does not stop a resume; one the user set does."""
    if isinstance(new, dict) and isinstance(old, dict):
        given = explicit if isinstance(explicit, dict) else {}
        return {k: without_added_defaults(v, old[k], given.get(k)) if k in old else v for k, v in new.items() if k in old or k in given}
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        given_list = explicit if isinstance(explicit, list) and len(explicit) == len(new) else [None] * len(new)
        return [without_added_defaults(n, o, e) for n, o, e in zip(new, old, given_list, strict=True)]
    return new


SETTINGS_DIR = "_settings"  # "_": Parquet readers skip it


def save_settings(out: str, settings: Mapping[str, dict[str, Any]]) -> None:
    """Keep each pipeline's answer settings beside its rows (``_settings/<fingerprint>.json``), so a refused resume
    can say which setting changed."""
    fs, root = resolve(out)
    fs.create_dir(join(root, SETTINGS_DIR), recursive=True)
    for value in settings.values():
        with fs.open_output_stream(join(root, SETTINGS_DIR, f"{settings_fingerprint(value)}.json")) as f:
            f.write(json.dumps(value, sort_keys=True, indent=1).encode())


def load_settings(out: str, fingerprint: str) -> dict[str, Any] | None:
    """The answer settings stored for a fingerprint, or None (a directory written before they were kept)."""
    fs, root = resolve(out)
    try:
        with fs.open_input_stream(join(root, SETTINGS_DIR, f"{fingerprint}.json")) as f:
            data: dict[str, Any] = json.loads(f.read())
            return data
    except (FileNotFoundError, OSError, ValueError):
        return None


class GenerateOptions(BaseModel):
    """Everything ``moa-ray eval generate`` needs besides the config and the dataset."""

    pipelines: list[str] = Field(min_length=1)
    out: str = Field(min_length=1)
    concurrency: int = Field(default=16, ge=1, description="Prompts in flight across all workers.")
    workers: int | None = Field(default=None, ge=1, description="Ray actors sharing the prompts.")
    worker_cpus: float = Field(default=0.25, ge=0)
    pool: PoolKind = Field(default="ray", description="Where the workers run: Ray actors, or one asyncio loop in this process.")
    run_id: str = Field(default_factory=new_run_id)
    flush_rows: int = Field(default=256, ge=1, description="Most rows per part file.")
    flush_s: float = Field(default=1.0, ge=0, description="Seconds of results per part file (0: each batch as it arrives).")
    max_tokens: int | None = Field(default=None, ge=1, description="Cap of the final answer's tokens.")
    timeout_s: float = Field(default=600.0, gt=0, description="Each answer's one deadline: all its calls and retries.")
    temperature: float | None = Field(
        default=None,
        ge=0.0,
        le=2.0,
        description="Force this temperature on the answering call of every prompt (default: MT-Bench's per-category "
        "temperatures for mt_bench, the models' own otherwise).",
    )
    allow_config_change: bool = False
    progress: bool = True
    store_calls: bool = Field(default=True, description=f"Keep every call's text in <out>/{CALLS_DIR}/ and reuse identical calls.")
    reuse_sampled: bool = Field(
        default=False, description="Reuse sampled calls too (temperature > 0, no seed): one stored sample per call key."
    )
    calls_from: list[str] = Field(default_factory=list, description="Generations directories whose stored calls this run may reuse.")
    references_from: list[str] = Field(
        default_factory=list, description="The original MoA code's round files (AlpacaEval model_outputs) to reuse as layer-1 answers."
    )


def plan_generation(
    dataset: PromptSource,
    pipelines: list[str],
    latest: Mapping[tuple[Any, ...], dict[str, Any]],
    fingerprints: Mapping[str, str],
    *,
    allow_config_change: bool = False,
    settings: Mapping[str, dict[str, Any]] | None = None,
    stored_settings: Callable[[str], dict[str, Any] | None] | None = None,
    base_fingerprints: Mapping[str, str] | None = None,
    explicit: Mapping[str, dict[str, Any]] | None = None,
) -> Plan:
    """Which (prompt, pipeline, turn) rows of ``latest`` (resolved rows in memory) are still to do, as a list;
    refuses rows made with another config (:func:`check_run_settings`). A run plans with :class:`StreamPlan`."""
    state = TableState.of_rows(latest)
    if not allow_config_change:
        check_run_settings(state, dataset.name, fingerprints, settings, stored_settings, base_fingerprints, explicit)
    return StreamPlan.count(dataset, pipelines, state).materialize()


def check_run_settings(
    state: TableState,
    dataset: str,
    fingerprints: Mapping[str, str],
    settings: Mapping[str, dict[str, Any]] | None = None,
    stored_settings: Callable[[str], dict[str, Any] | None] | None = None,
    base_fingerprints: Mapping[str, str] | None = None,
    explicit: Mapping[str, dict[str, Any]] | None = None,
) -> None:
    """Refuse a directory whose answers of these pipelines were made with other settings.

    With ``settings`` (this run's, per pipeline) and ``stored_settings`` (fingerprint -> the settings kept
    in the directory), the refusal names the setting that changed. With ``base_fingerprints``, rows of
    *other* datasets in the table need only the same dataset-independent settings (:func:`base_settings`):
    MT-Bench's answer temperatures do not stop an AlpacaEval run into the same directory. With ``explicit`` (this
    run's settings without defaults), settings added to moa-ray since the stored ones, at their defaults, are no change.
    """
    for pipeline, config_hash, row_dataset in sorted(state.answered_with):
        if pipeline not in fingerprints:
            continue
        other_dataset = base_fingerprints is not None and row_dataset != dataset
        old = stored_settings(config_hash) if stored_settings else None
        if other_dataset:
            assert base_fingerprints is not None
            stored_base = settings_fingerprint(base_settings(old)) if old is not None else config_hash
            if stored_base == base_fingerprints[pipeline]:
                continue
            new_settings = base_settings(settings[pipeline]) if settings else None
            old = base_settings(old) if old is not None else None
        elif config_hash == fingerprints[pipeline]:
            continue
        else:
            new_settings = settings[pipeline] if settings else None
        if old is not None and new_settings is not None and explicit is not None and pipeline in explicit:
            given = explicit[pipeline] if not other_dataset else base_settings(explicit[pipeline])
            new_settings = without_added_defaults(new_settings, old, given)
            if first_difference(old, new_settings) is None:
                continue
        changed = first_difference(old, new_settings) if old is not None and new_settings is not None else None
        what = f": {changed}" if changed else f" (config hash {config_hash} != {fingerprints[pipeline]})"
        raise ConfigError(
            f"the output already holds answers of pipeline {pipeline!r} made with different settings{what}; "
            "use another --out, or --allow-config-change to mix them"
        )


def accounting_total(accounting: Accounting | None, key: Literal["cost_usd", "tflops"]) -> float | None:
    """``totals.cost_usd`` / ``totals.tflops`` of a trace's accounting; None if unknown or not accounted."""
    if accounting is None:
        return None
    return accounting.totals.cost_usd if key == "cost_usd" else accounting.totals.tflops


def trace_columns(trace: Trace | None) -> dict[str, Any]:
    """The row's token, latency, cost and trace columns; cost and TFLOPs only where accounting filled them."""
    if trace is None:
        return {}
    totals = trace.totals()
    return {
        "tokens_by_role": [
            RoleTokens(role=role, prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens, calls=t.calls)
            for role, t in trace.tokens_by_role().items()
        ],
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "calls": totals.calls,
        "latency_s": trace.wall_s,
        "critical_path_s": trace.critical_path_s,
        "layers_run": trace.layers_run,
        "cost_usd": accounting_total(trace.accounting, "cost_usd"),
        "tflops": accounting_total(trace.accounting, "tflops"),
        "trace": json.dumps(trace.to_json_dict()),
    }


class GenerateHandler:
    """Runs one work item in a worker: each remaining turn through the pipeline, one row per turn."""

    def __init__(
        self,
        config: MoARayConfig,
        agents: Mapping[str, Agent],
        pipelines: list[str],
        run_id: str,
        fingerprints: Mapping[str, str],
        params: ChatParams | None = None,
        temperature: AnswerTemperature | None = None,
        *,
        timeout_s: float | None = None,
        store_calls: bool = False,
        reuse_sampled: bool = False,
    ) -> None:
        self.config = config
        self.store_calls = store_calls
        self.reuse_sampled = reuse_sampled
        self.reuse: CallReuse | None = None
        self.timeout_s = timeout_s
        self.agents = dict(agents)
        self.pipeline_names = list(pipelines)
        self.run_id = run_id
        self.fingerprints = dict(fingerprints)
        self.params = params
        self.temperature = temperature or AnswerTemperature()
        self.pipelines: dict[str, Any] = {}

    def params_for(self, prompt: EvalPrompt) -> ChatParams | None:
        """The answering call's parameters: ``params`` plus the prompt's category temperature, if any.

        Like ``max_tokens``, they reach the call that writes the answer (aggregator or single model);
        proposers keep their own temperatures, the diversity MoA relies on.
        """
        temperature = self.temperature.for_category(prompt.category)
        if temperature is None:
            return self.params
        base = self.params or ChatParams()
        return base.model_copy(update={"temperature": temperature})

    async def setup(self) -> None:
        from moa_ray.pipeline import build_pipeline
        from moa_ray.pipeline.agents import prepare_agents

        if self.store_calls:  # one memory per worker: the pipelines of a prompt (routed here together) share its calls
            self.reuse = CallReuse(self.config.models, reuse_sampled=self.reuse_sampled)
        self.pipelines = {name: build_pipeline(self.config, name, self.agents, reuse=self.reuse) for name in self.pipeline_names}
        for pipeline in self.pipelines.values():  # an answer's deadline bounds its work, not its wait for rpm/tpm room
            pipeline.patient_limits = True
        prepare_agents(self.agents.values())

    def _row(self, item: WorkItem, turn: int, trace: Trace | None = None, **fields: Any) -> GenerationRow:
        prompt = item.prompt
        calls = []
        if trace is not None and self.store_calls:
            base = {"run_id": self.run_id, "prompt_id": prompt.prompt_id, "pipeline": item.pipeline, "turn": turn}
            calls = call_rows(trace, {**base, "attempt": item.attempts.get(turn, 1)})
        return GenerationRow(
            run_id=self.run_id,
            prompt_id=prompt.prompt_id,
            pipeline=item.pipeline,
            turn=turn,
            dataset=item.dataset,
            category=prompt.category,
            instruction=prompt.turns[turn - 1],
            reference=prompt.references[turn - 1],
            reference_generator=prompt.reference_generator,
            config_hash=self.fingerprints[item.pipeline],
            attempt=item.attempts.get(turn, 1),
            call_rows=calls,
            **fields,
            **trace_columns(trace),
        )

    async def handle(self, item: WorkItem) -> list[GenerationRow]:
        pipeline = self.pipelines[item.pipeline]
        messages: list[ChatMessage] = []
        for turn, question in enumerate(item.prompt.turns, start=1):
            if turn < item.start_turn:
                messages += [
                    ChatMessage(role="user", content=question),
                    ChatMessage(role="assistant", content=item.history[turn - 1]),
                ]
        rows = []
        if self.reuse is not None:
            self.reuse.add(item.stored_calls)
        params = self.params_for(item.prompt)
        for turn in range(item.start_turn, len(item.prompt.turns) + 1):
            messages.append(ChatMessage(role="user", content=item.prompt.turns[turn - 1]))
            try:
                result = await pipeline.run(list(messages), params, timeout_s=self.timeout_s)
            except PipelineError as err:
                rows.append(self._row(item, turn, err.trace, status="error", error=str(err)))
                break  # later turns need this answer; the next run retries from here
            except Exception as err:  # noqa: BLE001 - recorded and retried next run, never lost
                rows.append(self._row(item, turn, status="error", error=f"{type(err).__name__}: {err}"))
                break
            rows.append(self._row(item, turn, result.trace, output=result.answer, finish_reason=result.finish_reason))
            messages.append(ChatMessage(role="assistant", content=result.answer))
        return rows

    def failed(self, item: WorkItem, error: str) -> list[GenerationRow]:
        return [self._row(item, item.start_turn, status="error", error=error)]


class CallCounts(BaseModel):
    """What the call store did in a run: calls made, calls answered from it, and what those would have cost."""

    made: int = 0
    reused: int = 0
    failed: int = 0
    saved_cost_usd: float | None = 0.0

    def add(self, rows: list[CallRow]) -> None:
        for row in rows:
            if row.reused:
                self.reused += 1
                self.saved_cost_usd = None if self.saved_cost_usd is None or row.cost_usd is None else self.saved_cost_usd + row.cost_usd
            else:
                self.made += 1
                self.failed += row.status != "ok"


class PipelineSummary(BaseModel):
    pipeline: str
    done: int
    failed: int
    missing: int
    mean_latency_s: float | None = None
    p95_latency_s: float | None = None
    mean_tokens: float | None = None
    total_cost_usd: float | None = None


class GenerateSummary(BaseModel):
    """What a run did, and where the table stands after it."""

    run_id: str
    out: str
    dataset: str
    total_rows: int
    skipped_rows: int = Field(description="Already done before this run.")
    attempted_rows: int
    ok_rows: int
    failed_rows: int
    elapsed_s: float
    items: int
    workers: int
    nodes: int = Field(default=1, description="Ray nodes the workers ran on (SPREAD puts them on different nodes).")
    pipelines: list[PipelineSummary]
    failures: list[tuple[str, int]] = Field(default_factory=list, description="The most common errors of the failed rows.")
    calls: CallCounts | None = Field(default=None, description="The call store's counts (None when calls were not stored).")

    @property
    def rows_per_s(self) -> float:
        return (self.ok_rows + self.failed_rows) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def items_per_s(self) -> float:
        return self.items / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def complete(self) -> bool:
        return all(p.failed == 0 and p.missing == 0 for p in self.pipelines)


#: The columns a run's summary reads back (never the texts).
SUMMARY_COLUMNS = ["prompt_id", "pipeline", "turn", "status", "error", "latency_s", "prompt_tokens", "completion_tokens", "cost_usd"]
#: Rows a summary reads at a time.
SUMMARY_BATCH_ROWS = 8192
#: Distinct error messages a summary counts before it keeps only the most frequent.
MAX_ERROR_KINDS = 1000


@dataclass
class _PipelineTally:
    """A pipeline's running sums while a summary streams the table."""

    done: int = 0
    failed: int = 0
    tokens: int = 0
    cost: float | None = 0.0
    latencies: list[np.ndarray] = field(default_factory=list)


def summarize_run(
    table: RowTable[GenerationRow], prompt_ids: np.ndarray, rows_per_pipeline: int, pipelines: list[str]
) -> tuple[list[PipelineSummary], list[tuple[str, int]]]:
    """Per pipeline: finished, failed and missing rows of the dataset (``prompt_ids``: the hashes of its ids, sorted),
    latency, tokens and cost of the finished ones; and the most common errors. Streams the (compacted) table a few
    columns and :data:`SUMMARY_BATCH_ROWS` rows at a time, with Arrow's kernels (only the ids and the failed rows'
    errors become Python objects); latency quantiles are exact (8 bytes a row: 8 MB for a million rows)."""
    tallies = {p: _PipelineTally() for p in pipelines}
    errors: Counter[str] = Counter()
    for batch in table.batches(SUMMARY_COLUMNS, batch_rows=SUMMARY_BATCH_ROWS):
        ids = batch.column("prompt_id").to_pylist()
        mine = pa.array(np.isin(np.fromiter((hash(p) for p in ids), dtype=np.int64, count=len(ids)), prompt_ids))
        ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False)
        for pipeline, tally in tallies.items():
            of_pipeline = pc.and_(mine, pc.fill_null(pc.equal(batch.column("pipeline"), pipeline), False))
            done = batch.filter(pc.and_(of_pipeline, ok))
            failed = batch.filter(pc.and_(of_pipeline, pc.invert(ok)))
            tally.done += done.num_rows
            tally.failed += failed.num_rows
            for error in failed.column("error").to_pylist():
                errors[(error or "unknown error")[:160]] += 1
            if not done.num_rows:
                continue
            tally.tokens += sum(pc.sum(done.column(c)).as_py() or 0 for c in ("prompt_tokens", "completion_tokens"))
            cost = done.column("cost_usd")
            tally.cost = None if tally.cost is None or cost.null_count else tally.cost + (pc.sum(cost).as_py() or 0.0)
            tally.latencies.append(done.column("latency_s").drop_null().to_numpy(zero_copy_only=False))
        if len(errors) > MAX_ERROR_KINDS:
            errors = Counter(dict(errors.most_common(MAX_ERROR_KINDS // 2)))
    out = []
    for pipeline, t in tallies.items():
        lat = np.concatenate(t.latencies) if t.latencies else np.empty(0)
        out.append(
            PipelineSummary(
                pipeline=pipeline,
                done=t.done,
                failed=t.failed,
                missing=rows_per_pipeline - t.done - t.failed,
                mean_latency_s=float(lat.mean()) if len(lat) else None,
                p95_latency_s=float(np.percentile(lat, 95)) if len(lat) else None,
                mean_tokens=t.tokens / t.done if t.done else None,
                total_cost_usd=t.cost if t.done else None,
            )
        )
    return out, errors.most_common(5)


@dataclass
class PreparedRun:
    """What a run decided before answering anything: its settings, and the plan counted against the table."""

    temperature: AnswerTemperature
    chosen: RunSettings
    plan: StreamPlan
    imported: dict[str, list[StoredCall]] = field(default_factory=dict)


def prepare_generation(config: MoARayConfig, dataset: PromptSource, options: GenerateOptions) -> PreparedRun:
    """Read what planning needs of the table (keys and settings, never texts), refuse a resume with changed
    settings, and count the rows to do in one pass over the dataset."""
    for name in options.pipelines:
        config.pipeline(name)
    temperature = answer_temperature(dataset.kind, options.temperature)
    chosen = run_settings(config, options.pipelines, temperature)
    state = TableState.read(RowTable(options.out, GenerationRow))
    if not options.allow_config_change:
        stored = partial(load_settings, options.out)
        check_run_settings(state, dataset.name, chosen.fingerprints, chosen.settings, stored, chosen.base_fingerprints, chosen.explicit)
    reuse = options.store_calls and (bool(calls_table(options.out).part_files()) or bool(options.calls_from))
    plan = StreamPlan.count(dataset, options.pipelines, state, keep_pending_ids=reuse)
    imported = reference_calls(config, options.pipelines, options.references_from) if options.references_from else {}
    return PreparedRun(temperature=temperature, chosen=chosen, plan=plan, imported=imported)


def with_stored_calls(prepared: PreparedRun, options: GenerateOptions) -> Iterator[WorkItem]:
    """The plan's items, each handed the calls stored for its prompt (this output's, ``calls_from``'s, and the
    imported references), so a rerun or a new pipeline pays only for calls never made.

    Stored calls are read only for the prompts with work left, and only when a store has any."""
    plan, imported = prepared.plan, prepared.imported
    found = stored_calls([options.out, *options.calls_from], plan.pending_prompts) if plan.pending_prompts else {}
    for item in plan.items():
        if found or imported:
            item.stored_calls = [*imported.get(item.prompt.turns[0], []), *found.get(item.prompt.prompt_id, [])]
        yield item


def run_generation(
    config: MoARayConfig,
    dataset: PromptSource,
    agents: Mapping[str, Agent],
    options: GenerateOptions,
    prepared: PreparedRun | None = None,
) -> GenerateSummary:
    """Answer the dataset's missing rows with the pipelines (Ray must be up and the agents deployed), as the output's
    only writer: a second run on the same ``out`` is refused (:class:`~moa_ray.eval.lease.WriterLease`).

    ``prepared``: the plan the caller already made (and showed) with :func:`prepare_generation`, so the table is
    not read again; it must have been made for the same ``options``.
    """
    with WriterLease(options.out, options.run_id):
        return _generate(config, dataset, agents, options, prepared or prepare_generation(config, dataset, options))


def _generate(
    config: MoARayConfig, dataset: PromptSource, agents: Mapping[str, Agent], options: GenerateOptions, prepared: PreparedRun
) -> GenerateSummary:
    table: RowTable[GenerationRow] = RowTable(options.out, GenerationRow)
    plan, chosen = prepared.plan, prepared.chosen
    save_settings(options.out, chosen.settings)
    params = ChatParams(max_tokens=options.max_tokens) if options.max_tokens else None
    handler = GenerateHandler(
        config,
        agents,
        options.pipelines,
        options.run_id,
        chosen.fingerprints,
        params,
        prepared.temperature,
        timeout_s=options.timeout_s,
        store_calls=options.store_calls,
        reuse_sampled=options.reuse_sampled,
    )
    calls_store = calls_table(options.out)
    counts = CallCounts() if options.store_calls else None
    ok = failed = items = 0
    elapsed, workers, nodes = 0.0, 0, 0
    if plan.pending_rows:
        calls_writer = calls_store.writer(options.run_id, flush_rows=max(options.flush_rows * 8, 1024), flush_s=options.flush_s)
        # the calls of an answer land before the answer: a kill between the two only repeats a reused call
        writer = table.writer(options.run_id, flush_rows=options.flush_rows, flush_s=options.flush_s, before_flush=calls_writer.flush)
        progress = EvalProgress(plan.pending_rows, "generate", enabled=options.progress)

        def on_rows(item: WorkItem, rows: list[GenerationRow]) -> None:
            nonlocal ok, failed, items
            for row in rows:
                calls_writer.add(row.call_rows)
                if counts is not None:
                    counts.add(row.call_rows)
            writer.add(rows)
            n_ok, n_failed = count_rows(rows)
            not_reached = (len(item.prompt.turns) - item.start_turn + 1) - len(rows)  # turns after a failed one
            ok += n_ok
            failed += n_failed
            items += 1
            progress.advance(n_ok, n_failed + not_reached)

        with make_pool(
            handler, kind=options.pool, concurrency=options.concurrency, workers=options.workers, worker_cpus=options.worker_cpus
        ) as pool:
            with calls_writer, writer, progress:
                work = with_stored_calls(prepared, options)
                stats = pool.run(work, on_rows, tick=writer.maybe_flush, route=lambda item: item.prompt.prompt_id)
        elapsed, workers, nodes = stats.elapsed_s, stats.workers, stats.nodes
    table.compact(options.run_id)
    if options.store_calls:
        calls_store.compact(options.run_id)
    per_pipeline = plan.total_rows // max(len(options.pipelines), 1)
    pipelines, failures = summarize_run(table, plan.prompt_ids, per_pipeline, options.pipelines)
    return GenerateSummary(
        run_id=options.run_id,
        out=options.out,
        dataset=dataset.name,
        total_rows=plan.total_rows,
        skipped_rows=plan.done_rows,
        attempted_rows=plan.pending_rows,
        ok_rows=ok,
        failed_rows=failed,
        elapsed_s=elapsed,
        items=items,
        workers=workers,
        nodes=nodes,
        pipelines=pipelines,
        failures=failures,
        calls=counts,
    )


# --------------------------------------------------------------------------- AlpacaEval export


#: Prompts of the dataset whose outputs the AlpacaEval export looks up in the table at a time.
EXPORT_BATCH = 8192


def export_alpaca_eval(out: str, dataset: PromptSource, pipelines: list[str], path: str) -> dict[str, int]:
    """Write AlpacaEval ``model_outputs.json`` (instruction, output, generator, dataset) per pipeline.

    With several pipelines, each gets its own file: ``{pipeline}`` in ``path`` is replaced by
    its name, or ``-<pipeline>`` is added before the extension. Returns rows written per file.
    Streamed in the dataset's order: a batch of its prompts at a time, their answers looked up in the table.
    """
    table = RowTable(out, GenerationRow)
    written: dict[str, int] = {}
    for pipeline in pipelines:
        target = _export_path(path, pipeline, len(pipelines) > 1)
        fs, p = resolve(target)
        parent = p.rsplit("/", 1)[0]
        n = 0
        try:
            if parent:
                fs.create_dir(parent, recursive=True)
            with fs.open_output_stream(p) as stream:
                stream.write(b"[")
                for prompts in _batched(dataset.iter_prompts(), EXPORT_BATCH):
                    answers = _first_turn_answers(table, pipeline, [q.prompt_id for q in prompts])
                    for prompt in prompts:
                        output = answers.get(prompt.prompt_id)
                        if output is None:
                            continue
                        record = {
                            "instruction": prompt.turns[0],
                            "output": output,
                            "generator": pipeline,
                            "dataset": prompt.category or dataset.name,
                        }
                        text = textwrap.indent(json.dumps(record, ensure_ascii=False, indent=2), "  ")
                        stream.write((("," if n else "") + "\n" + text).encode("utf-8"))
                        n += 1
                stream.write(b"\n]" if n else b"]")
        except OSError as err:
            raise StoreError(f"cannot write {target}: {err}") from None
        written[target] = n
    return written


def _batched(items: Iterator[EvalPrompt], n: int) -> Iterator[list[EvalPrompt]]:
    batch: list[EvalPrompt] = []
    for item in items:
        batch.append(item)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def _first_turn_answers(table: RowTable[GenerationRow], pipeline: str, prompt_ids: list[str]) -> dict[str, str]:
    """The finished first-turn answers of ``pipeline`` to these prompts (one resolved row per key)."""
    condition = (pc.field("pipeline") == pipeline) & (pc.field("turn") == 1) & pc.field("prompt_id").isin(prompt_ids)
    rows = resolve_latest(table.read_where(condition, ["output"]).to_pylist(), table.key)
    return {k[0]: r["output"] for k, r in rows.items() if r["status"] == "ok" and r["output"] is not None}


def _export_path(path: str, pipeline: str, several: bool) -> str:
    if "{pipeline}" in path:
        return path.replace("{pipeline}", pipeline)
    if not several:
        return path
    head, dot, ext = path.rpartition(".")
    return f"{head}-{pipeline}.{ext}" if dot and "/" not in ext else f"{path}-{pipeline}"
