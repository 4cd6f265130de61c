"""Evaluation datasets: prompts, dataset files (jsonl / json / Parquet, loaded or streamed), the shipped data.

The benchmarks' own datasets are loaded by their modules (:mod:`moa_ray.eval.benchmarks`) from the files shipped in
``moa_ray/data``, with the readers here; :mod:`moa_ray.eval.benchmarks.registry` resolves a ``--dataset`` name.
Every prompt gets a deterministic id (the dataset's own id, else a hash of the prompt), which is what makes
generation resumable: the same file always yields the same keys, and a seeded sample always the same subset.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import io
import json
from array import array
from collections.abc import Iterable, Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, model_validator

from moa_ray.errors import MoARayError

#: What a dataset file's name may end with (``.gz``: gzipped JSON Lines or JSON).
FILE_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".pq")

ID_COLUMNS = ("id", "prompt_id", "question_id", "uid")
PROMPT_COLUMNS = ("prompt", "instruction", "question", "turns", "input")
REFERENCE_COLUMNS = ("reference_output", "reference", "reference_answer")
CATEGORY_COLUMNS = ("category", "dataset", "subset")


class DatasetError(MoARayError):
    """A dataset cannot be found or read, or its rows are unusable."""


class EvalPrompt(BaseModel):
    """One prompt of an evaluation: one user turn, or several asked one after another."""

    prompt_id: str = Field(min_length=1)
    turns: list[str] = Field(min_length=1)
    category: str | None = None
    references: list[str | None] = Field(default_factory=list, description="Reference answer per turn, if any.")
    reference_generator: str | None = None
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="The benchmark's annotations of the prompt (FLASK skills, Just-Eval aspects, CEB axis...)."
    )

    @model_validator(mode="after")
    def _shape(self) -> EvalPrompt:
        if any(not t.strip() for t in self.turns):
            raise ValueError(f"prompt {self.prompt_id!r} has an empty turn")
        if len(self.references) > len(self.turns):
            raise ValueError(f"prompt {self.prompt_id!r} has more references than turns")
        self.references = self.references + [None] * (len(self.turns) - len(self.references))
        return self


class EvalDataset(BaseModel):
    """A named list of prompts with unique ids."""

    name: str
    kind: str = Field(description="A registered benchmark's name (moa_ray.eval.benchmarks.registry) or 'file'.")
    prompts: list[EvalPrompt]

    @model_validator(mode="after")
    def _unique(self) -> EvalDataset:
        seen: set[str] = set()
        dupes = [p.prompt_id for p in self.prompts if p.prompt_id in seen or seen.add(p.prompt_id)]  # type: ignore[func-returns-value]
        if dupes:
            raise ValueError(f"dataset {self.name!r} has duplicate prompt ids: {sorted(set(dupes))[:5]}")
        return self

    def head(self, limit: int | None) -> EvalDataset:
        return self if limit is None else self.model_copy(update={"prompts": self.prompts[:limit]})

    def sample(self, n: int, seed: int = 0) -> EvalDataset:
        """A seeded random subset of ``n`` prompts, in the dataset's order (the whole dataset when ``n`` >= its size).

        Prompts are ranked by a hash of (seed, prompt id) rather than drawn with a library RNG, so the subset
        is the same on every Python / NumPy version, and ``sample(n)`` is contained in ``sample(n + k)``
        with the same seed: a larger sample resumes a smaller one.
        """
        if n < 1:
            raise DatasetError("the sample size must be at least 1")
        if n >= len(self.prompts):
            return self
        ranked = sorted(self.prompts, key=lambda p: hashlib.sha256(f"{seed}\0{p.prompt_id}".encode()).digest())
        chosen = {p.prompt_id for p in ranked[:n]}
        return self.model_copy(update={"prompts": [p for p in self.prompts if p.prompt_id in chosen]})

    def by_id(self) -> dict[str, EvalPrompt]:
        return {p.prompt_id: p for p in self.prompts}

    def iter_prompts(self) -> Iterator[EvalPrompt]:
        return iter(self.prompts)

    def count(self) -> int:
        return len(self.prompts)


class PromptSource(Protocol):
    """What generation reads a dataset through: its name and kind, and its prompts one at a time (again on
    every call), so a file of a million prompts is never held in memory. :class:`EvalDataset` is one (a list),
    :class:`FileSource` streams a file."""

    name: str
    kind: str

    def iter_prompts(self) -> Iterator[EvalPrompt]: ...

    def count(self) -> int: ...


def prompt_hash(text: str) -> str:
    """A stable id for a prompt that has none."""
    return "h-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- shipped data


def data_file(*parts: str) -> Any:
    """A file shipped in ``moa_ray/data`` (works from a wheel or a checkout)."""
    return resources.files("moa_ray").joinpath("data", *parts)


def _jsonl_rows(lines: Iterable[str], source: str) -> Iterator[dict[str, Any]]:
    """The objects of JSON Lines, one per non-blank line; a line that is not a JSON object is a DatasetError naming it."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{source}: line {n} is not JSON: {err}") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{source}: line {n} is not a JSON object")
        yield row


def _read_jsonl_text(text: str, source: str) -> list[dict[str, Any]]:
    return list(_jsonl_rows(text.splitlines(), source))


def parse_json_list(text: str, source: str, error: type[MoARayError] = DatasetError) -> list[dict[str, Any]]:
    """A JSON list of objects (a dataset, an outputs file, judged outputs); ``error`` names ``source`` and the fault."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{source} is not JSON: {err}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise error(f"{source}: expected a JSON list of objects")
    return data


def read_json_list(path: str | Path, error: type[MoARayError] = DatasetError) -> list[dict[str, Any]]:
    """:func:`parse_json_list` of a local file; a missing or unreadable file is an ``error`` too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"cannot read {path}: {err}") from None
    return parse_json_list(text, str(path), error)


@cache
def shipped_jsonl(*parts: str) -> tuple[dict[str, Any], ...]:
    """The rows of a JSON Lines file shipped in ``moa_ray/data`` (read once per process)."""
    return tuple(_read_jsonl_text(data_file(*parts).read_text(encoding="utf-8"), "/".join(parts)))


@cache
def shipped_json_list(*parts: str) -> tuple[dict[str, Any], ...]:
    """The objects of a JSON list shipped in ``moa_ray/data`` (read once per process)."""
    return tuple(parse_json_list(data_file(*parts).read_text(encoding="utf-8"), "shipped " + "/".join(parts)))


def require_keys(row: dict[str, Any], keys: tuple[str, ...], source: str, n: int) -> None:
    """A shipped dataset's item ``n`` has every key its loader reads, or a DatasetError names the missing ones."""
    missing = [k for k in keys if k not in row]
    if missing:
        raise DatasetError(f"{source}: item {n} lacks {', '.join(missing)}")


def build_dataset(name: str, prompts: list[EvalPrompt]) -> EvalDataset:
    """A benchmark's dataset (its ``kind`` is its name); duplicate ids are a DatasetError."""
    try:
        return EvalDataset(name=name, kind=name, prompts=prompts)
    except ValueError as err:
        raise DatasetError(str(err)) from None


# --------------------------------------------------------------------------- user files


def read_rows(path: str) -> list[dict[str, Any]]:
    """Every row of a JSON list, JSON Lines or Parquet file (local or a pyarrow filesystem URI; ``.gz`` too)."""
    from moa_ray.eval.store import StoreError, resolve

    try:
        fs, p = resolve(path)
        lower = p.lower()
        if lower.endswith(".parquet") or lower.endswith(".pq"):
            rows: list[dict[str, Any]] = pq.read_table(p, filesystem=fs).to_pylist()
            return rows
        with fs.open_input_stream(p) as stream:
            raw = stream.read()
    except FileNotFoundError:
        raise DatasetError(f"dataset file not found: {path}") from None
    except (OSError, pa.ArrowException, StoreError) as err:
        raise DatasetError(f"cannot read dataset {path}: {err}") from None
    if lower.endswith(".gz"):
        raw = gzip.decompress(raw)
        lower = lower[:-3]
    text = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8").read()
    if lower.endswith(".json"):
        return parse_json_list(text, path)
    if lower.endswith(".jsonl"):
        return _read_jsonl_text(text, path)
    raise DatasetError(f"{path}: unsupported dataset format (use .jsonl, .json, .parquet, optionally .gz)")


def _pick(columns: Iterable[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: str) -> str | None:
    columns = list(columns)
    if wanted is not None:
        if wanted not in columns:
            raise DatasetError(f"{path}: no {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    return next((c for c in candidates if c in columns), None)


class _Columns(BaseModel):
    """The columns a dataset file's prompts are read from."""

    id: str | None
    prompt: str
    reference: str | None
    category: str | None

    @classmethod
    def pick(cls, columns: Iterable[str], path: str, id_column: str | None, prompt_column: str | None) -> _Columns:
        columns = list(columns)
        prompt = _pick(columns, prompt_column, PROMPT_COLUMNS, "prompt", path)
        if prompt is None:
            raise DatasetError(f"{path}: no prompt column (looked for {', '.join(PROMPT_COLUMNS)}; columns: {', '.join(columns)})")
        return cls(
            id=_pick(columns, id_column, ID_COLUMNS, "id", path),
            prompt=prompt,
            reference=_pick(columns, None, REFERENCE_COLUMNS, "reference", path),
            category=_pick(columns, None, CATEGORY_COLUMNS, "category", path),
        )

    def prompt_of(self, row: dict[str, Any], n: int, path: str) -> EvalPrompt:
        """Row ``n`` (1-based) as a prompt; its id is the id column's value, else a hash of its turns."""
        value = row.get(self.prompt)
        turns = [value] if isinstance(value, str) else value
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise DatasetError(f"{path}: row {n}: {self.prompt!r} must be a non-empty string or list of strings")
        raw_id = row.get(self.id) if self.id else None
        pid = str(raw_id) if raw_id not in (None, "") else prompt_hash("\n\n".join(turns))
        ref = row.get(self.reference) if self.reference else None
        refs = ref if isinstance(ref, list) else [ref]
        cat = row.get(self.category) if self.category else None
        try:
            return EvalPrompt(prompt_id=pid, turns=turns, category=None if cat is None else str(cat), references=refs)
        except ValueError as err:
            raise DatasetError(f"{path}: row {n}: {err}") from None


def load_file(path: str, *, id_column: str | None = None, prompt_column: str | None = None, name: str | None = None) -> EvalDataset:
    """Prompts from a jsonl / json / Parquet file with a prompt column and, ideally, an id column.

    The prompt column may hold a string or a list of strings (turns). Without an id
    column, ids are hashes of the prompt text, so reruns still find the same keys.
    """
    rows = read_rows(path)
    if not rows:
        raise DatasetError(f"{path}: the dataset is empty")
    columns = _Columns.pick(dict.fromkeys(k for row in rows for k in row), path, id_column, prompt_column)  # rows of a jsonl may differ
    prompts = [columns.prompt_of(row, n, path) for n, row in enumerate(rows, start=1)]
    try:
        return EvalDataset(name=name or path, kind="file", prompts=prompts)
    except ValueError as err:
        raise DatasetError(str(err)) from None


#: Rows of a JSON Lines file whose keys decide its columns (a file's rows may differ in their keys).
SNIFF_ROWS = 1000
#: Rows a streamed Parquet file is read in.
STREAM_BATCH_ROWS = 4096


class FileSource(BaseModel):
    """A dataset file read as a stream (JSON Lines, optionally gzipped, or Parquet), for runs of any size.

    :meth:`check` reads it once before any work: it validates every row, refuses duplicate ids (kept as 64-bit
    hashes, not strings), counts the prompts, and draws ``sample``'s subset (the same subset as
    :meth:`EvalDataset.sample`, ranked by a hash of seed and id, keeping only the ``n`` best ranks). A JSON
    list (``.json``) cannot be streamed and is read whole.
    """

    path: str
    name: str
    kind: str = "file"
    id_column: str | None = None
    prompt_column: str | None = None
    limit: int | None = None
    sample: int | None = None
    seed: int = 0
    _count: int | None = None
    _chosen: set[str] | None = None

    def _rows(self) -> Iterator[dict[str, Any]]:
        from moa_ray.eval.store import StoreError, resolve

        try:
            fs, p = resolve(self.path)
            lower = p.lower()
            if lower.endswith((".parquet", ".pq")):
                for batch in pq.ParquetFile(fs.open_input_file(p)).iter_batches(batch_size=STREAM_BATCH_ROWS):
                    yield from batch.to_pylist()
                return
            if lower.removesuffix(".gz").endswith(".json"):
                yield from read_rows(self.path)
                return
            with fs.open_input_stream(p) as stream:  # pyarrow decompresses a .gz as it reads
                yield from _jsonl_rows(io.TextIOWrapper(stream, encoding="utf-8"), self.path)
        except FileNotFoundError:
            raise DatasetError(f"dataset file not found: {self.path}") from None
        except (OSError, pa.ArrowException, StoreError, UnicodeDecodeError) as err:
            raise DatasetError(f"cannot read dataset {self.path}: {err}") from None

    def _columns(self) -> _Columns:
        head: dict[str, None] = {}
        for i, row in enumerate(self._rows()):
            head.update(dict.fromkeys(row))
            if i + 1 >= SNIFF_ROWS:
                break
        if not head:
            raise DatasetError(f"{self.path}: the dataset is empty")
        return _Columns.pick(head, self.path, self.id_column, self.prompt_column)

    def _all_prompts(self) -> Iterator[EvalPrompt]:
        columns = self._columns()
        for n, row in enumerate(self._rows(), start=1):
            yield columns.prompt_of(row, n, self.path)

    def check(self) -> FileSource:
        """Read the file once: every row valid, ids unique, the count known, the sample drawn."""
        ids: array[int] = array("q")
        ranked: list[tuple[bytes, str]] = []
        for prompt in self._all_prompts():
            ids.append(hash(prompt.prompt_id))
            if self.sample is not None:
                rank = hashlib.sha256(f"{self.seed}\0{prompt.prompt_id}".encode()).digest()
                item = (_invert(rank), prompt.prompt_id)  # a bounded heap of the n smallest ranks: its root is the largest
                if len(ranked) < self.sample:
                    heapq.heappush(ranked, item)
                elif item > ranked[0]:
                    heapq.heapreplace(ranked, item)
        hashes = np.frombuffer(ids, dtype=np.int64)
        if len(np.unique(hashes)) != len(hashes):
            seen: set[str] = set()
            dupes = sorted({p.prompt_id for p in self._all_prompts() if p.prompt_id in seen or seen.add(p.prompt_id)})  # type: ignore[func-returns-value]
            raise DatasetError(f"dataset {self.name!r} has duplicate prompt ids: {dupes[:5]}")
        total = len(hashes)
        if self.sample is not None and self.sample < total:
            self._chosen = {pid for _, pid in ranked}
            self._count = self.sample
        else:
            self._count = total if self.limit is None else min(self.limit, total)
        return self

    def iter_prompts(self) -> Iterator[EvalPrompt]:
        if self._count is None:
            self.check()
        n = 0
        for prompt in self._all_prompts():
            if self._chosen is not None and prompt.prompt_id not in self._chosen:
                continue
            if self.limit is not None and n >= self.limit:
                return
            n += 1
            yield prompt

    def count(self) -> int:
        if self._count is None:
            self.check()
        assert self._count is not None
        return self._count


def _invert(digest: bytes) -> bytes:
    """A key that orders the other way round (heapq keeps the smallest at its root; the sample keeps the smallest ranks)."""
    return bytes(255 - b for b in digest)
