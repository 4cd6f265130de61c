"""Parquet tables that survive interruption: small atomic part files, resume by key, compaction.

A table is a directory (local path or any pyarrow filesystem URI: ``s3://``, ``gs://``,
``hdfs://``, ``file://``) of ``part-*.parquet`` files that share one explicit schema.
Writers add rows in small part files as results arrive, each written under a hidden
temporary name and then moved into place, so a killed run loses only the work in
flight and never leaves a torn file that readers would see (pyarrow, Ray Data
and pandas skip names starting with ``.`` or ``_``).

A key (e.g. prompt, pipeline, turn) has at most one ``ok`` row: runs skip keys that
are done. Failed keys keep an ``error`` row that the next run retries; when a run ends
:meth:`RowTable.compact` merges the part files into one row per key (ok rows win over
errors), so a finished directory holds exactly one row per key. Readers resolve keys
the same way, so a crash in the middle of a compaction never double counts.

One writer per directory at a time: two concurrent runs on one directory may both
answer a key.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import ValidationError

from moa_ray.errors import MoARayError
from moa_ray.eval.schema import _Row

R = TypeVar("R", bound=_Row)

PART_PREFIX = "part-"
TMP_PREFIX = ".tmp-"
COMPACTED_ROWS_PER_FILE = 100_000
#: Rows a compaction holds at once while it copies.
COMPACT_BATCH_ROWS = 4096
STALE_TMP_S = 600.0


class StoreError(MoARayError):
    """An output location cannot be read or written, or holds files of another schema."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and a path inside it for a local path or a pyarrow filesystem URI."""
    if "://" in uri:
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
            return fs, str(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
            raise StoreError(f"cannot open {uri}: {err}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join paths or URIs with '/', the separator of every pyarrow filesystem."""
    return "/".join([base.rstrip("/"), *parts])


def resolve_latest(
    rows: Iterable[dict[str, Any]], key: tuple[str, ...], policy: Literal["first_ok", "latest"] = "first_ok"
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """One row per key: the first ``ok`` row written, else the most recent failed attempt (``first_ok``); or the
    row written last (``latest``, for records such as the call table)."""
    better = _better if policy == "first_ok" else _later
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        k = tuple(row[c] for c in key)
        best = out.get(k)
        if best is None or better(row, best):
            out[k] = row
    return out


def typed_row(row_type: type[R], record: Mapping[str, Any], table: str) -> R:
    """A stored record as its row model. Nulls are dropped first: a null is a column an older version did not write
    (the dataset reader fills it), so the field's default applies and old tables still read; a field with no default
    then fails, as a StoreError naming ``table``."""
    try:
        return row_type.model_validate({name: value for name, value in record.items() if value is not None})
    except ValidationError as err:
        raise StoreError(f"{table} holds a row that is not a {row_type.__name__} (another version?): {err}") from None


def typed_rows(row_type: type[R], records: Mapping[tuple[Any, ...], Mapping[str, Any]], table: str) -> dict[tuple[Any, ...], R]:
    """:func:`typed_row` of each resolved record, by key (resolve first: no model is made for a row that lost)."""
    return {key: typed_row(row_type, record, table) for key, record in records.items()}


def _later(row: dict[str, Any], best: dict[str, Any]) -> bool:
    return bool(row["created_at"] >= best["created_at"])


def _better(row: dict[str, Any], best: dict[str, Any]) -> bool:
    ok = bool(row["status"] == "ok")
    if ok != (best["status"] == "ok"):
        return ok
    if ok:  # never replace a finished answer by a later one
        return bool(row["created_at"] < best["created_at"])
    return bool((row["attempt"], row["created_at"]) > (best["attempt"], best["created_at"]))


@dataclass
class CompactionResult:
    files_before: int
    files_after: int
    rows_before: int
    rows_after: int


class RowTable(Generic[R]):
    """A directory of Parquet part files holding rows of one :mod:`~moa_ray.eval.schema` model."""

    def __init__(self, uri: str, row_type: type[R]) -> None:
        self.uri = uri
        self.row_type = row_type
        self.schema: pa.Schema = row_type.SCHEMA
        self.key: tuple[str, ...] = row_type.KEY
        self.fs, self.path = resolve(uri)

    # ------------------------------------------------------------------ reading

    def part_files(self) -> list[str]:
        """Visible part files, oldest name first."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"cannot list {self.uri}: {err}") from None
        return sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))
        )

    def read(self, files: list[str] | None = None, *, columns: list[str] | None = None) -> pa.Table:
        """Every row of every part file (unresolved: a key may appear in several attempts); ``columns``: only
        those (Parquet reads nothing else, so a planner can skip the large trace column)."""
        files = self.part_files() if files is None else files
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        if not files:
            return schema.empty_table()
        mismatch = f"{self.uri} holds files that do not match the {self.row_type.__name__} schema (another table, or another version?)"
        try:
            table = pads.dataset(files, schema=self.schema, format="parquet", filesystem=self.fs).to_table(columns=columns)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError) as err:
            raise StoreError(f"{mismatch}: {err}") from None
        missing = [f.name for f in schema if not f.nullable and table.column(f.name).null_count]
        if missing:  # the dataset reader fills absent columns with nulls
            raise StoreError(f"{mismatch}: no values for {', '.join(missing)}")
        return table

    def batches(self, columns: list[str], batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        """Every row (unresolved), a few columns at a time: what a reader of a table of any size streams."""
        for path in self.part_files():
            yield from self.file_batches(path, columns, batch_rows)

    def file_batches(self, path: str, columns: list[str] | None = None, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        """One part file's rows in batches of ``columns`` (default: all, in the table's order).

        File by file, each footer read and dropped in turn: a dataset over thousands of small part files would hold
        every footer at once (tens of kB each), which is what made memory grow with a run's length."""
        wanted = list(self.schema.names) if columns is None else columns
        try:
            parquet = pq.ParquetFile(self.fs.open_input_file(path))
            if parquet.schema_arrow.names == self.schema.names:  # written by this version: read directly
                yield from parquet.iter_batches(columns=wanted, batch_size=batch_rows, use_threads=False)
                return
            # another version's columns: the dataset reader fills what is absent with nulls
            dataset = pads.dataset([path], schema=self.schema, format="parquet", filesystem=self.fs)
            yield from dataset.to_batches(columns=wanted, batch_size=batch_rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError) as err:
            raise StoreError(f"{self.uri} holds files that do not match the {self.row_type.__name__} schema: {err}") from None

    def read_where(self, condition: Any, columns: list[str]) -> pa.Table:
        """The rows matching a pyarrow ``condition`` (unresolved), with the key and resolution columns and ``columns``."""
        files = self.part_files()
        wanted = list(dict.fromkeys([*self.key, "status", "attempt", "created_at", *columns]))
        if not files:
            return pa.schema([self.schema.field(c) for c in wanted]).empty_table()
        dataset = pads.dataset(files, schema=self.schema, format="parquet", filesystem=self.fs)
        return dataset.to_table(columns=wanted, filter=condition)

    def latest(self, *, without: tuple[str, ...] = ()) -> dict[tuple[Any, ...], R]:
        """One resolved row per key (see :func:`resolve_latest`) as the table's row model; ``without``: columns not
        read (Parquet skips them; the fields take their defaults: ``("trace",)`` for judging, which reads none)."""
        columns = [c for c in self.schema.names if c not in without] if without else None
        return typed_rows(self.row_type, self.latest_records(columns), self.uri)

    def latest_records(self, columns: list[str] | None = None) -> dict[tuple[Any, ...], dict[str, Any]]:
        """One resolved row per key as a dict of ``columns`` (the key and resolution columns are always read): a
        projection, for a reader of a few columns of many rows, which a row model (every field) cannot hold."""
        if columns is not None:
            needed = [*self.key, "status", "attempt", "created_at"]
            columns = list(dict.fromkeys([*needed, *columns]))
        return resolve_latest(self.read(columns=columns).to_pylist(), self.key, self.row_type.RESOLVE)

    def done_keys(self) -> set[tuple[Any, ...]]:
        return {k for k, row in self.latest_records([]).items() if row["status"] == "ok"}

    # ------------------------------------------------------------------ writing

    def _ensure_dir(self) -> None:
        try:
            self.fs.create_dir(self.path, recursive=True)
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"cannot create {self.uri}: {err}") from None

    def write_part(self, rows: list[R], name: str) -> str:
        """Write ``rows`` as one part file, atomically where the filesystem can rename."""
        self._ensure_dir()
        table = pa.Table.from_pylist([r.model_dump() for r in rows], schema=self.schema)
        final = join(self.path, f"{PART_PREFIX}{name}.parquet")
        tmp = join(self.path, f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}.parquet")
        try:
            pq.write_table(table, tmp, filesystem=self.fs, compression="zstd")
            self.fs.move(tmp, final)
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"cannot write {final}: {err}") from None
        return final

    def writer(
        self, run_id: str, *, flush_rows: int = 256, flush_s: float = 0.0, before_flush: Callable[[], None] | None = None
    ) -> PartWriter[R]:
        return PartWriter(self, run_id, flush_rows=flush_rows, flush_s=flush_s, before_flush=before_flush)

    def compact(self, run_id: str) -> CompactionResult:
        """Merge the part files into few large ones holding one row per key; old files go after the new ones exist.

        Streamed, so a table of any size compacts in bounded memory: the key columns are read once (a hash per
        row) to find the keys written more than once; only those rows' resolution columns are read again to pick
        the row that stands (:func:`resolve_latest`); then every small part file, and every large one holding
        a row that lost, is copied batch by batch without the losers. Large files with nothing to drop stay.
        Rows keep the order they were written in.
        """
        files = self.part_files()
        hashes, counts = self._key_hashes(files)
        rows_before = int(sum(counts))
        losers = self._losers(files, hashes, counts)
        rewrite = [f for i, f in enumerate(files) if losers.get(i) or not _is_compacted(f)]
        if len(rewrite) <= 1 and not any(losers.values()):
            self._remove_stale_tmp()
            return CompactionResult(len(files), len(files), rows_before, rows_before)
        written = self._copy_without(rewrite, {files.index(f): losers.get(files.index(f), set()) for f in rewrite}, run_id)
        for path in rewrite:
            if path not in written:
                self.fs.delete_file(path)
        self._remove_stale_tmp()
        dropped = sum(len(v) for v in losers.values())
        return CompactionResult(len(files), len(files) - len(rewrite) + len(written), rows_before, rows_before - dropped)

    def _key_hashes(self, files: list[str]) -> tuple[list[np.ndarray], list[int]]:
        """Per file: a 64-bit hash of each row's key (in this process: Python's own string hash), and its row count."""
        out = []
        for path in files:
            hashes = [
                np.fromiter(
                    (hash(k) for k in zip(*(b.column(c).to_pylist() for c in self.key), strict=True)), dtype=np.int64, count=b.num_rows
                )
                for b in self.file_batches(path, list(self.key))
            ]
            out.append(np.concatenate(hashes) if hashes else np.empty(0, dtype=np.int64))
        return out, [len(h) for h in out]

    def _losers(self, files: list[str], hashes: list[np.ndarray], counts: list[int]) -> dict[int, set[int]]:
        """Per file index: the rows that another row of their key outranks."""
        if not files:
            return {}
        every = np.concatenate(hashes) if hashes else np.empty(0, dtype=np.int64)
        values, seen = np.unique(every, return_counts=True)
        repeated = values[seen > 1]
        if not len(repeated):
            return {}
        candidates: list[dict[str, Any]] = []
        columns = list(dict.fromkeys([*self.key, "status", "attempt", "created_at"]))
        for i, path in enumerate(files):
            rows = np.nonzero(np.isin(hashes[i], repeated))[0]
            if not len(rows):
                continue
            table = self.read([path], columns=columns).take(pa.array(rows))
            for j, row in zip(rows.tolist(), table.to_pylist(), strict=True):
                candidates.append({**row, "_at": (i, j)})
        winners = {r["_at"] for r in resolve_latest(candidates, self.key, self.row_type.RESOLVE).values()}
        losers: dict[int, set[int]] = {}
        for row in candidates:
            if row["_at"] not in winners:
                losers.setdefault(row["_at"][0], set()).add(row["_at"][1])
        return losers

    def _copy_without(self, files: list[str], drop: dict[int, set[int]], run_id: str) -> list[str]:
        """Copy ``files`` batch by batch into new compacted part files, leaving out the rows in ``drop``.

        Rows are gathered into row groups of :data:`COMPACT_BATCH_ROWS` before they are written: a row group per
        small part file would make a footer so large that every later read of the table pays for it."""
        self._ensure_dir()
        written: list[str] = []
        writer: pq.ParquetWriter | None = None
        tmp = final = ""
        rows_in_file = 0
        pending: list[pa.RecordBatch] = []

        def write_group() -> None:
            nonlocal writer, tmp, final, rows_in_file
            if not pending:
                return
            if writer is None:
                name = f"{_stamp()}-{run_id}-compacted-{len(written):04d}"
                final = join(self.path, f"{PART_PREFIX}{name}.parquet")
                tmp = join(self.path, f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}.parquet")
                writer = pq.ParquetWriter(tmp, self.schema, filesystem=self.fs, compression="zstd")
                rows_in_file = 0
            group = pa.Table.from_batches(pending, schema=self.schema)
            writer.write_table(group, row_group_size=group.num_rows)
            rows_in_file += group.num_rows
            pending.clear()
            del group
            pa.default_memory_pool().release_unused()  # the allocator would keep each group's pages as its high water
            if rows_in_file >= COMPACTED_ROWS_PER_FILE:
                close()

        def close() -> None:
            nonlocal writer
            if writer is not None:
                writer.close()
                self.fs.move(tmp, final)
                written.append(final)
                writer = None

        try:
            for i, path in enumerate(files):
                offset = 0
                for batch in self.file_batches(path, batch_rows=COMPACT_BATCH_ROWS):
                    keep = [j for j in range(batch.num_rows) if offset + j not in drop.get(i, ())] if drop.get(i) else None
                    offset += batch.num_rows
                    if keep is not None:
                        batch = batch.take(pa.array(keep, type=pa.int64()))
                    if batch.num_rows:
                        pending.append(batch)
                    if sum(b.num_rows for b in pending) >= COMPACT_BATCH_ROWS:
                        write_group()
            write_group()
            close()
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"cannot compact {self.uri}: {err}") from None
        return written

    def _remove_stale_tmp(self) -> None:
        """Delete temporary files left by killed runs (old enough not to belong to a live writer)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except (OSError, pa.ArrowException):
            return
        now = time.time()
        for info in infos:
            if info.base_name.startswith(TMP_PREFIX) and info.mtime is not None and now - info.mtime.timestamp() > STALE_TMP_S:
                self.fs.delete_file(info.path)


def _is_compacted(path: str) -> bool:
    return "-compacted-" in path.rsplit("/", 1)[-1]


def _stamp() -> str:
    """A sortable timestamp, so part names list in write order."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:].replace(".", "")


@dataclass
class PartWriter(Generic[R]):
    """Buffers rows and writes them as part files.

    The runner calls :meth:`maybe_flush` after each batch of results that arrived
    together, so with the default ``flush_s=0`` rows reach storage as soon as they
    exist (a kill loses only the work in flight) while a burst of results still lands
    in one file. ``flush_s > 0`` batches more (for object stores with slow writes);
    ``flush_rows`` caps a file's rows.
    """

    table: RowTable[R]
    run_id: str
    flush_rows: int = 256
    flush_s: float = 0.0
    written: int = 0
    files: list[str] = field(default_factory=list)
    #: Runs before each part file is written: another table whose rows must land first (the calls before their answers).
    before_flush: Callable[[], None] | None = None
    _buffer: list[R] = field(default_factory=list)
    _since: float = field(default_factory=time.monotonic)

    def add(self, rows: Iterable[R]) -> None:
        self._buffer.extend(rows)
        if len(self._buffer) >= self.flush_rows:
            self.flush()

    def maybe_flush(self) -> None:
        if self._buffer and time.monotonic() - self._since >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            if self.before_flush is not None:
                self.before_flush()
            name = f"{_stamp()}-{self.run_id}-{len(self.files):05d}"
            self.files.append(self.table.write_part(self._buffer, name))
            self.written += len(self._buffer)
            self._buffer = []
        self._since = time.monotonic()

    def __enter__(self) -> PartWriter[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
