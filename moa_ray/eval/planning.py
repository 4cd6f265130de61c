"""Planning a generation run: which (prompt, pipeline, turn) rows are still to do, in memory that does not grow
with the table or the dataset.

:class:`TableState` is what planning needs of the stored rows, read once in batches of a few columns: the
keys answered (as 64-bit hashes in one sorted array), the attempts of failed keys, and the distinct settings
the answers were made with. :class:`StreamPlan` counts the rows to do in one pass over the dataset and yields
the work items in another, as the worker pool takes them, so a million-prompt run never holds its items. The
earlier turns' answers a multi-turn item needs (its history) are read for those items only.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from moa_ray.eval.datasets import EvalPrompt, PromptSource
from moa_ray.eval.schema import GenerationRow
from moa_ray.eval.store import RowTable, resolve_latest
from moa_ray.pipeline.reuse import StoredCall

#: Rows of the table read at a time while planning.
PLAN_BATCH_ROWS = 65_536
#: Items whose history is fetched from the table together.
HISTORY_BATCH = 512


class WorkItem(BaseModel):
    """One prompt for one pipeline, from the first turn that is not done yet."""

    prompt: EvalPrompt
    pipeline: str
    dataset: str
    start_turn: int = 1
    history: list[str] = Field(default_factory=list, description="The pipeline's stored answers to the turns before start_turn.")
    attempts: dict[int, int] = Field(default_factory=dict, description="Attempt number of each turn in this run.")
    stored_calls: list[StoredCall] = Field(default_factory=list, description="Calls stored for this prompt that its calls may reuse.")


class Plan(BaseModel):
    """A plan with its items in a list (small datasets, tests): :meth:`StreamPlan.materialize`."""

    items: list[WorkItem]
    total_rows: int
    done_rows: int
    pending_rows: int


def row_hash(prompt_id: str, pipeline: str, turn: int) -> int:
    """A row key's hash, for this process only (Python's string hash): what :class:`TableState` keeps."""
    return hash((prompt_id, pipeline, int(turn)))


@dataclass
class TableState:
    """The stored rows as planning sees them: answered keys, failed keys' attempts, the settings answers used."""

    ok: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    failed_attempts: dict[int, int] = field(default_factory=dict)
    #: Distinct (pipeline, config_hash, dataset) of the answered rows: what a resume with other settings is checked against.
    answered_with: set[tuple[str, str, str]] = field(default_factory=set)
    history: Callable[[list[tuple[str, str, int]]], dict[tuple[str, str, int], str]] | None = None

    def is_ok(self, key: int) -> bool:
        return _contains(self.ok, key)

    @classmethod
    def of_rows(cls, latest: Mapping[tuple[Any, ...], dict[str, Any]]) -> TableState:
        """From resolved rows already in memory (one per key)."""
        ok = [row_hash(*k) for k, r in latest.items() if r["status"] == "ok"]
        failed = {row_hash(*k): r["attempt"] for k, r in latest.items() if r["status"] != "ok"}
        answered = {(k[1], r["config_hash"], r.get("dataset", "")) for k, r in latest.items() if r["status"] == "ok"}

        def history(keys: list[tuple[str, str, int]]) -> dict[tuple[str, str, int], str]:
            return {k: latest[k]["output"] for k in keys if k in latest}

        return cls(np.unique(np.array(ok, dtype=np.int64)), failed, answered, history)

    @classmethod
    def read(cls, table: RowTable[GenerationRow]) -> TableState:
        """From the table, in batches of its key, status and settings columns (never its texts)."""
        columns = ["prompt_id", "pipeline", "turn", "status", "attempt", "config_hash", "dataset"]
        ok: list[np.ndarray] = []
        failed: dict[int, int] = {}
        answered: set[tuple[str, str, str]] = set()
        for batch in table.batches(columns, PLAN_BATCH_ROWS):
            pids, pipes, turns = (batch.column(c).to_pylist() for c in ("prompt_id", "pipeline", "turn"))
            statuses, attempts = batch.column("status").to_pylist(), batch.column("attempt").to_pylist()
            hashes = [row_hash(p, q, t) for p, q, t in zip(pids, pipes, turns, strict=True)]
            is_ok = np.array([s == "ok" for s in statuses], dtype=bool)
            ok.append(np.array(hashes, dtype=np.int64)[is_ok])
            for h, s, a in zip(hashes, statuses, attempts, strict=True):
                if s != "ok" and a > failed.get(h, 0):
                    failed[h] = a
            configs, datasets = batch.column("config_hash").to_pylist(), batch.column("dataset").to_pylist()
            answered.update((q, c, d) for q, c, d, s in zip(pipes, configs, datasets, statuses, strict=True) if s == "ok")
        done = np.unique(np.concatenate(ok)) if ok else np.empty(0, dtype=np.int64)
        for h in [h for h in failed if _contains(done, h)]:
            del failed[h]

        def history(keys: list[tuple[str, str, int]]) -> dict[tuple[str, str, int], str]:
            wanted = set(keys)
            found = table.read_where(pc.field("prompt_id").isin(sorted({k[0] for k in keys})), ["output"])
            rows = resolve_latest(found.to_pylist(), table.key)
            return {k: r["output"] for k, r in rows.items() if k in wanted and r["status"] == "ok"}

        return cls(done, failed, answered, history)


def _contains(sorted_keys: np.ndarray, key: int) -> bool:
    i = int(np.searchsorted(sorted_keys, key))
    return i < len(sorted_keys) and int(sorted_keys[i]) == key


@dataclass
class StreamPlan:
    """The rows still to do of a dataset, counted; :meth:`items` yields their work items lazily."""

    source: PromptSource
    pipelines: list[str]
    state: TableState
    total_rows: int = 0
    done_rows: int = 0
    pending_prompts: set[str] | None = None
    #: The dataset's prompt ids as hashes (sorted): what the run's summary counts rows of.
    prompt_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def pending_rows(self) -> int:
        return self.total_rows - self.done_rows

    @classmethod
    def count(cls, source: PromptSource, pipelines: list[str], state: TableState, *, keep_pending_ids: bool = False) -> StreamPlan:
        """One pass over the dataset: the rows there are and the rows done (and, if asked, the prompts with work left)."""
        plan = cls(source, list(pipelines), state, pending_prompts=set() if keep_pending_ids else None)
        ids = array("q")
        for prompt in source.iter_prompts():
            ids.append(hash(prompt.prompt_id))
            for pipeline in plan.pipelines:
                turns = len(prompt.turns)
                done = sum(state.is_ok(row_hash(prompt.prompt_id, pipeline, t)) for t in range(1, turns + 1))
                plan.total_rows += turns
                plan.done_rows += done
                if done < turns and plan.pending_prompts is not None:
                    plan.pending_prompts.add(prompt.prompt_id)
        plan.prompt_ids = np.sort(np.frombuffer(ids, dtype=np.int64))
        return plan

    def items(self) -> Iterator[WorkItem]:
        """The work items, in dataset order (an item that needs its earlier turns' answers comes a little later)."""
        waiting: list[WorkItem] = []
        for prompt in self.source.iter_prompts():
            for pipeline in self.pipelines:
                item = self._item(prompt, pipeline)
                if item is None:
                    continue
                if item.start_turn == 1:
                    yield item
                    continue
                waiting.append(item)
                if len(waiting) >= HISTORY_BATCH:
                    yield from self._with_history(waiting)
                    waiting = []
        yield from self._with_history(waiting)

    def _item(self, prompt: EvalPrompt, pipeline: str) -> WorkItem | None:
        turns = range(1, len(prompt.turns) + 1)
        keys = [row_hash(prompt.prompt_id, pipeline, t) for t in turns]
        finished = [self.state.is_ok(k) for k in keys]
        if all(finished):
            return None
        start = finished.index(False) + 1
        return WorkItem(
            prompt=prompt,
            pipeline=pipeline,
            dataset=self.source.name,
            start_turn=start,
            attempts={t: self.state.failed_attempts.get(keys[t - 1], 0) + 1 for t in turns if t >= start},
        )

    def _with_history(self, items: list[WorkItem]) -> Iterable[WorkItem]:
        if not items:
            return []
        assert self.state.history is not None
        keys = [(i.prompt.prompt_id, i.pipeline, t) for i in items for t in range(1, i.start_turn)]
        found = self.state.history(keys)
        for item in items:
            item.history = [found[(item.prompt.prompt_id, item.pipeline, t)] for t in range(1, item.start_turn)]
        return items

    def materialize(self) -> Plan:
        return Plan(items=list(self.items()), total_rows=self.total_rows, done_rows=self.done_rows, pending_rows=self.pending_rows)
