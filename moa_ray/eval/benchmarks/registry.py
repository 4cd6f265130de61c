"""The benchmarks and judgment kinds eval knows, and what a ``--dataset`` name means.

The built-ins are listed below, one line per benchmark module (like simonw/llm's default plugins); each module
exposes ``BENCHMARKS`` (its :class:`~moa_ray.eval.benchmarks.base.Benchmark` descriptors) and its judgment kinds.
Adding a benchmark is one new module and one line here; a benchmark defined elsewhere (another package, a test)
joins with :func:`register`. The stages (judging, report) hand :data:`REGISTRY` to the kinds as their
:class:`~moa_ray.eval.benchmarks.base.Catalog`, so no benchmark module imports this one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from moa_ray.eval.benchmarks import alpaca_eval, ceb, flask, gsm8k, just_eval, mt_bench, rubric
from moa_ray.eval.benchmarks.base import AnswerTemperature, Benchmark, JudgmentKind
from moa_ray.eval.datasets import FILE_SUFFIXES, DatasetError, EvalDataset, FileSource, PromptSource, load_file


class Registry:
    """Benchmarks by dataset name and judgment kinds by mode, in the order they were registered."""

    def __init__(self, benchmarks: Iterable[Benchmark], kinds: Iterable[JudgmentKind[Any, Any]]) -> None:
        self._benchmarks: dict[str, Benchmark] = {}
        self._kinds: dict[str, JudgmentKind[Any, Any]] = {}
        for kind in kinds:
            self.add_kind(kind)
        for benchmark in benchmarks:
            self.add(benchmark)

    def add(self, benchmark: Benchmark) -> Benchmark:
        if benchmark.name in self._benchmarks:
            raise ValueError(f"a benchmark named {benchmark.name!r} is registered already")
        if benchmark.auto_kind not in self._kinds:
            raise ValueError(
                f"benchmark {benchmark.name!r}: unknown judgment kind {benchmark.auto_kind!r} (kinds: {', '.join(self._kinds)})"
            )
        self._benchmarks[benchmark.name] = benchmark
        return benchmark

    def add_kind(self, kind: JudgmentKind[Any, Any]) -> JudgmentKind[Any, Any]:
        if kind.mode in self._kinds or kind.mode == "auto":
            raise ValueError(f"a judgment kind {kind.mode!r} is registered already")
        self._kinds[kind.mode] = kind
        return kind

    def remove(self, name: str) -> None:
        """Forget a benchmark (a test's, once it is done)."""
        self._benchmarks.pop(name, None)

    def remove_kind(self, mode: str) -> None:
        self._kinds.pop(mode, None)

    def find(self, name: str) -> Benchmark | None:
        return self._benchmarks.get(name)

    def benchmarks(self) -> list[Benchmark]:
        return list(self._benchmarks.values())

    def kinds(self) -> list[JudgmentKind[Any, Any]]:
        return list(self._kinds.values())

    def kind(self, mode: str) -> JudgmentKind[Any, Any]:
        try:
            return self._kinds[mode]
        except KeyError:
            raise DatasetError(f"unknown judgment kind {mode!r} (kinds: {', '.join(self._kinds)})") from None


REGISTRY = Registry(
    benchmarks=[
        *alpaca_eval.BENCHMARKS,
        *mt_bench.BENCHMARKS,
        *flask.BENCHMARKS,
        *just_eval.BENCHMARKS,
        *ceb.BENCHMARKS,
        *gsm8k.BENCHMARKS,
    ],
    kinds=[alpaca_eval.PAIRWISE, alpaca_eval.OFFICIAL, mt_bench.SINGLE, mt_bench.BASELINE, rubric.RUBRIC, gsm8k.EXACT],
)

#: The names ``eval generate --dataset`` accepts besides a file, as shipped (``benchmark_names()``: with registered ones).
BUILTIN = tuple(b.name for b in REGISTRY.benchmarks())


def register(benchmark: Benchmark, *kinds: JudgmentKind[Any, Any]) -> Benchmark:
    """Make a benchmark (and the judgment kinds it brings) known to every stage: a name for ``--dataset``, its
    answers judged by its kind under ``--mode auto``, its rows in the report."""
    for kind in kinds:
        REGISTRY.add_kind(kind)
    return REGISTRY.add(benchmark)


def unregister(benchmark: Benchmark, *kinds: JudgmentKind[Any, Any]) -> None:
    REGISTRY.remove(benchmark.name)
    for kind in kinds:
        REGISTRY.remove_kind(kind.mode)


def benchmark_names() -> tuple[str, ...]:
    return tuple(b.name for b in REGISTRY.benchmarks())


# --------------------------------------------------------------------------- datasets by name


def load_builtin(name: str) -> EvalDataset:
    """One of the registered datasets by name."""
    found = REGISTRY.find(name)
    if found is None:
        raise DatasetError(f"unknown dataset {name!r} (builtin: {', '.join(benchmark_names())})")
    return found.load()


def answer_temperature(dataset_kind: str, forced: float | None = None) -> AnswerTemperature:
    """The benchmark's answer temperatures (FastChat's per category for MT-Bench), ``forced`` for everything when given."""
    if forced is not None:
        return AnswerTemperature(forced=forced)
    found = REGISTRY.find(dataset_kind)
    return found.answer_temperature if found is not None and found.answer_temperature is not None else AnswerTemperature()


def _check_subset(spec: str, limit: int | None, sample: int | None) -> None:
    if limit is not None and limit < 1:
        raise DatasetError("limit must be at least 1")
    if limit is not None and sample is not None:
        raise DatasetError("use either limit (the first N prompts) or sample (a seeded random N), not both")
    if REGISTRY.find(spec) is None and not spec.lower().endswith(FILE_SUFFIXES):
        raise DatasetError(
            f"unknown dataset {spec!r} (builtin: {', '.join(benchmark_names())}; or a file ending in {', '.join(FILE_SUFFIXES)})"
        )


def load_dataset(
    spec: str,
    *,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    id_column: str | None = None,
    prompt_column: str | None = None,
) -> EvalDataset:
    """A registered dataset by name or the path/URI of a jsonl / json / Parquet file.

    ``limit`` keeps the first N prompts, ``sample`` a seeded random N (:meth:`EvalDataset.sample`);
    they exclude each other, so a subset is always described one way.
    """
    _check_subset(spec, limit, sample)
    dataset = load_builtin(spec) if REGISTRY.find(spec) is not None else load_file(spec, id_column=id_column, prompt_column=prompt_column)
    return dataset.sample(sample, seed) if sample is not None else dataset.head(limit)


def open_dataset(
    spec: str,
    *,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    id_column: str | None = None,
    prompt_column: str | None = None,
) -> PromptSource:
    """Like :func:`load_dataset`, but a file is streamed (:class:`FileSource`, checked now) instead of loaded:
    what ``eval generate`` reads, so its memory does not grow with the dataset."""
    _check_subset(spec, limit, sample)
    if REGISTRY.find(spec) is not None:
        return load_dataset(spec, limit=limit, sample=sample, seed=seed)
    if sample is not None and sample < 1:
        raise DatasetError("the sample size must be at least 1")
    source = FileSource(path=spec, name=spec, id_column=id_column, prompt_column=prompt_column, limit=limit, sample=sample, seed=seed)
    return source.check()


def dataset_prompts(name: str) -> dict[str, dict[str, Any]]:
    """A registered dataset's prompts by id, as plain dicts (its ``metadata`` included): what rubric items carry."""
    return {pid: p.model_dump() for pid, p in load_builtin(name).by_id().items()}
