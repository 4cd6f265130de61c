"""What ``eval report`` reads, as Arrow tables: a few columns per answer and per judgment, one row per key.

The report's numbers are counts, means, sums and quantiles per pipeline. Kept as Python dicts, a row costs about a
kilobyte; as Arrow columns (numbers, and short strings such as the ids), a few dozen bytes. So the stored tables are
read :data:`REPORT_BATCH_ROWS` rows at a time (a ``<text>_length`` column measured in each
batch, so no text is held), and each key's standing row is picked with Arrow's sort, the way
:func:`~moa_ray.eval.store.resolve_latest` picks it, in the same order: a key's first appearance in the table. The
order matters: means summed in another order could differ in their last bits, and the report's numbers must not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moa_ray.eval.schema import _Row
from moa_ray.eval.store import RowTable

#: The columns every resolution reads besides a table's key.
RESOLUTION_COLUMNS = ("status", "attempt", "created_at")
LENGTH_SUFFIX = "_length"
#: Rows read at a time: the run summary's batch (generate.SUMMARY_BATCH_ROWS, which this module cannot import: generate
#: imports the benchmarks, which import this), a few MB of texts while their lengths are measured.
REPORT_BATCH_ROWS = 8192


def measure_lengths(batch: pa.RecordBatch, wanted: Sequence[str]) -> pa.RecordBatch:
    """``wanted`` of ``batch``: a ``<text>_length`` column the batch lacks is the length in characters of its ``<text>``
    (null where the text is), so a reader can drop the text with the batch."""
    columns = {}
    for name in wanted:
        if name in batch.schema.names:
            columns[name] = batch.column(name)
        else:
            columns[name] = pc.cast(pc.utf8_length(batch.column(name.removesuffix(LENGTH_SUFFIX))), pa.int64())
    return pa.RecordBatch.from_pydict(columns)


def read_resolved(table: RowTable[Any], columns: Sequence[str]) -> pa.Table:
    """``table``'s standing row per key with ``columns`` (``<text>_length``: measured, see :func:`measure_lengths`),
    read a batch at a time, in the order :meth:`RowTable.latest` gives."""
    wanted = list(dict.fromkeys([*table.key, *RESOLUTION_COLUMNS, *columns]))
    stored = set(table.schema.names)
    source = list(dict.fromkeys(c if c in stored else c.removesuffix(LENGTH_SUFFIX) for c in wanted))
    batches = [measure_lengths(batch, wanted) for batch in table.batches(source, batch_rows=REPORT_BATCH_ROWS)]
    if not batches:
        return empty_table(table.row_type, wanted)
    resolved = resolve_table(pa.Table.from_batches(batches), table.key, table.row_type.RESOLVE)
    del batches
    pa.default_memory_pool().release_unused()  # the allocator would keep the unresolved table's pages
    return resolved


def empty_table(row_type: type[_Row], columns: Sequence[str]) -> pa.Table:
    """No rows, with ``columns`` typed as the table stores them (a measured length as int64)."""
    return pa.schema([_field(row_type, c) for c in columns]).empty_table()


def _field(row_type: type[_Row], name: str) -> pa.Field:
    if name in row_type.SCHEMA.names:
        return row_type.SCHEMA.field(name)
    return pa.field(name, pa.int64())


def resolve_table(table: pa.Table, key: Sequence[str], policy: Literal["first_ok", "latest"] = "first_ok") -> pa.Table:
    """One row per key, as :func:`~moa_ray.eval.store.resolve_latest` picks it (``first_ok``: the first ``ok`` row
    written, else the failed row of the highest attempt, latest; ``latest``: the row written last), ordered by each
    key's first row in ``table``: a stable sort by key and rank, whose first row of each key stands."""
    n = table.num_rows
    if n == 0 or distinct_keys(table, key) == n:
        return table  # a compacted table, or rows already resolved: nothing to pick, and no copy of the table
    order = np.arange(n, dtype=np.int64)
    created = pc.cast(table.column("created_at"), pa.int64()).to_numpy()
    if policy == "first_ok":
        ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(zero_copy_only=False)
        attempt = table.column("attempt").to_numpy().astype(np.int64)
        ranks = [np.where(ok, 0, 1), np.where(ok, 0, -attempt), np.where(ok, created, -created), order]
    else:  # the last written stands; of rows written at the same time, the last read (resolve_latest's >=)
        ranks = [-created, -order]
    names = [f"_key{i}" for i in range(len(key))]
    sortable = pa.table({**{n: table.column(c) for n, c in zip(names, key, strict=True)}, **{f"_rank{i}": r for i, r in enumerate(ranks)}})
    sorted_at = pc.sort_indices(sortable, sort_keys=[(c, "ascending") for c in sortable.column_names]).to_numpy()
    starts = _key_starts(sortable.select(names).take(pa.array(sorted_at)))
    winners = sorted_at[starts]
    first_seen = np.minimum.reduceat(sorted_at, starts)
    return table.take(pa.array(winners[np.argsort(first_seen, kind="stable")]))


def distinct_keys(table: pa.Table, key: Sequence[str]) -> int:
    """How many distinct keys the rows have (each key's columns joined into one string, counted by Arrow's hash)."""
    parts = [pc.cast(table.column(c), pa.string()) for c in key]
    joined = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, "\x1f")
    return int(pc.count_distinct(joined, mode="all").as_py())


def keep(table: pa.Table, mask: pa.ChunkedArray | pa.Array) -> pa.Table:
    """``table.filter(mask)``, without the copy where every row is kept (the usual case of a report's filters)."""
    if table.num_rows == 0 or pc.all(pc.fill_null(mask, False)).as_py():
        return table
    return table.filter(mask)


def _key_starts(keys: pa.Table) -> np.ndarray:
    """The positions where a new key begins in a table sorted by its key columns."""
    n = keys.num_rows
    changed = np.zeros(max(n - 1, 0), dtype=bool)
    for column in keys.columns:
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        differs = pc.not_equal(column.slice(1), column.slice(0, n - 1))
        both_null = pc.and_(pc.is_null(column.slice(1)), pc.is_null(column.slice(0, n - 1)))
        changed |= pc.fill_null(differs, True).to_numpy(zero_copy_only=False) & ~both_null.to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.flatnonzero(changed) + 1]).astype(np.int64)


def rows_table(rows: Iterable[Mapping[str, Any]], row_type: type[_Row], columns: Sequence[str] | None = None) -> pa.Table:
    """Rows already read as dicts (a test's, a small run's) as the table a reader would give: ``columns`` (default:
    every column of the first row), typed as ``row_type`` stores them; a ``<text>_length`` measured when the rows
    hold the text instead."""
    rows = list(rows)
    if not rows:
        return empty_table(row_type, columns or [])
    present = rows[0].keys()
    stored = set(row_type.SCHEMA.names)
    wanted = [
        c
        for c in (columns or present)
        if (c in present and (c in stored or c.endswith(LENGTH_SUFFIX)))
        or (c.endswith(LENGTH_SUFFIX) and c.removesuffix(LENGTH_SUFFIX) in present)
    ]
    source = list(dict.fromkeys(c if c in present else c.removesuffix(LENGTH_SUFFIX) for c in wanted))
    table = pa.Table.from_pylist(rows, schema=pa.schema([_field(row_type, c) for c in source]))
    batches = [measure_lengths(b, wanted) for b in table.to_batches()]
    return pa.Table.from_batches(batches) if batches else _measured_schema(table.schema, wanted).empty_table()


def _measured_schema(schema: pa.Schema, wanted: Sequence[str]) -> pa.Schema:
    return pa.schema([schema.field(c) if c in schema.names else pa.field(c, pa.int64()) for c in wanted])


def pairs(table: pa.Table) -> pa.Array:
    """Each row's (prompt id, pipeline) as one string: what says which answer a judgment judged."""
    joined = pc.binary_join_element_wise(table.column("prompt_id"), table.column("pipeline"), "\x1f")
    return joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined


def judging(judged: pa.Table, answers: pa.Table) -> pa.Table:
    """The judgments of answers in ``answers`` (by prompt id and pipeline), in their order."""
    if judged.num_rows == 0:
        return judged
    return keep(judged, pc.is_in(pairs(judged), value_set=pc.unique(pairs(answers))))


def is_ok(table: pa.Table) -> pa.ChunkedArray | pa.Array:
    """Whether each row finished (status ok)."""
    return pc.fill_null(pc.equal(table.column("status"), "ok"), False)


def finished(table: pa.Table) -> pa.Table:
    """The rows with status ok."""
    return keep(table, is_ok(table))


def of_pipelines(table: pa.Table, pipelines: Sequence[str] | None) -> pa.Table:
    """The rows of these pipelines (None: every row)."""
    if pipelines is None:
        return table
    return keep(table, pc.is_in(table.column("pipeline"), value_set=pa.array(list(pipelines), pa.string())))


def unique(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    """The distinct values, in the order they first appear (Arrow's hash ``unique`` keeps it)."""
    return list(pc.unique(column).to_pylist())


def numbers(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column without nulls as a numpy array of its own type (int64 stays int64, double float64)."""
    return np.asarray(column.to_numpy() if isinstance(column, pa.ChunkedArray) else column.to_numpy(zero_copy_only=False))


__all__ = [
    "distinct_keys",
    "empty_table",
    "finished",
    "is_ok",
    "judging",
    "keep",
    "measure_lengths",
    "numbers",
    "of_pipelines",
    "pairs",
    "read_resolved",
    "resolve_table",
    "rows_table",
    "unique",
]
