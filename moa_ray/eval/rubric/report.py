"""Rubric benchmark tables, aggregated as each benchmark's own scripts aggregate, with cost and latency beside.

* FLASK / FLASK-Hard (``aggregate_skill.py``, ``aggregate_domain.py``,
  ``aggregate_difficulty_skill.py``): mean score per skill, per domain (an item counts
  once for each of its domains) and per difficulty, N/A left out.
* Just-Eval (``evaluate.py report()``): per-aspect means, "N/A" counted as 5.0, the five
  multi aspects over items 0-799 and safety over 800-999.
* CEB (SMoA's ``eval_ceb.py``): mean bias per axis, overall = the mean of the axis means.

Each table has one row per pipeline, with the answers, tokens, cost and p50 latency of
that benchmark's generations, and is written as CSV and Parquet, gathered in
``rubric.md``, and drawn as grouped bars.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field
from rich.table import Table

from moa_ray.eval.benchmarks import CEB_AXES
from moa_ray.eval.report import build_report, grouped_bars, write_files
from moa_ray.eval.rubric.ceb import CEB_S, CEB_T
from moa_ray.eval.rubric.flask import FLASK, FLASK_HARD, skillset
from moa_ray.eval.rubric.just_eval_judge import ASPECTS, JUST_EVAL, MULTI, SAFETY, aggregate, parsed_result
from moa_ray.eval.schema import AspectScore

#: FLASK's orders (aggregate_domain.py, aggregate_difficulty_skill.py); unknown values follow, sorted.
FLASK_DOMAINS = (
    "Humanities",
    "Language",
    "Social Science",
    "History",
    "Culture",
    "Technology",
    "Coding",
    "Math",
    "Natural Science",
    "Health",
)
FLASK_DIFFICULTIES = (
    "simple lifestyle knowledge",
    "advanced lifestyle knowledge",
    "formal education knowledge",
    "major level knowledge",
    "expert level knowledge",
)
COST_COLUMNS = ("answers", "tokens/answer", "$/answer", "p50 s")

Cell = float | int | str | None


class RubricTable(BaseModel):
    """One report table: a row per pipeline, ``columns`` in order after ``pipeline``."""

    name: str = Field(description="File stem: flask_skills, just-eval_aspects, ceb-s_axes...")
    title: str
    columns: list[str]
    rows: list[dict[str, Cell]]
    plot_columns: list[str] = Field(default_factory=list, description="Columns drawn as bars (none: no plot).")
    ylabel: str = ""


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _ordered(seen: Iterable[str], order: Sequence[str]) -> list[str]:
    seen = set(seen)
    return [v for v in order if v in seen] + sorted(seen - set(order))


def _scores(row: Mapping[str, Any]) -> list[AspectScore]:
    return [AspectScore.model_validate(s) for s in row["scores"]]


def _labels(row: Mapping[str, Any], name: str) -> list[str]:
    return [label["value"] for label in row["labels"] if label["name"] == name]


def _cost_cells(generations: Mapping[tuple[Any, ...], dict[str, Any]], benchmark: str) -> dict[str, dict[str, Cell]]:
    """Answers, tokens, cost and latency per pipeline of one benchmark's generations (as the main report computes them)."""
    of_benchmark = {k: r for k, r in generations.items() if r["dataset"] == benchmark}
    return {
        r.pipeline: {"answers": r.answers, "tokens/answer": r.mean_tokens, "$/answer": r.mean_cost_usd, "p50 s": r.latency_p50_s}
        for r in build_report(of_benchmark)
    }


def _by_pipeline(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        out[row["pipeline"]].append(row)
    return dict(sorted(out.items()))


def _with_cost(cells: dict[str, dict[str, Cell]], costs: dict[str, dict[str, Cell]]) -> list[dict[str, Cell]]:
    return [{"pipeline": p, **c, **costs.get(p, dict.fromkeys(COST_COLUMNS))} for p, c in cells.items()]


# --------------------------------------------------------------------------- FLASK


def flask_tables(benchmark: str, rows: Sequence[Mapping[str, Any]], costs: dict[str, dict[str, Cell]]) -> list[RubricTable]:
    """Per skill (with the overall mean), per domain and per difficulty, for FLASK or FLASK-Hard."""
    skills = _ordered({s.aspect for r in rows for s in _scores(r)}, [s.Skill for s in skillset()])
    domains = _ordered({d for r in rows for d in _labels(r, "domain")}, FLASK_DOMAINS)
    levels = _ordered({d for r in rows for d in _labels(r, "difficulty")}, FLASK_DIFFICULTIES)
    per_skill: dict[str, dict[str, Cell]] = {}
    per_domain: dict[str, dict[str, Cell]] = {}
    per_level: dict[str, dict[str, Cell]] = {}
    for pipeline, prows in _by_pipeline(rows).items():
        by_skill: dict[str, list[float]] = defaultdict(list)
        by_domain: dict[str, list[float]] = defaultdict(list)
        by_level: dict[str, list[float]] = defaultdict(list)
        for row in prows:
            numbers = []
            for s in _scores(row):
                if s.score is not None:  # N/A is left out, as FLASK's aggregation does
                    by_skill[s.aspect].append(s.score)
                    numbers.append(s.score)
            for domain in _labels(row, "domain"):
                by_domain[domain].extend(numbers)
            for level in _labels(row, "difficulty"):
                by_level[level].extend(numbers)
        every = [v for vs in by_skill.values() for v in vs]
        per_skill[pipeline] = {**{k: _mean(by_skill[k]) for k in skills}, "overall": _mean(every), "n": len(prows)}
        per_domain[pipeline] = {d: _mean(by_domain[d]) for d in domains}
        per_level[pipeline] = {d: _mean(by_level[d]) for d in levels}
    title = "FLASK-Hard" if benchmark == FLASK_HARD else "FLASK"
    return [
        RubricTable(
            name=f"{benchmark}_skills",
            title=f"{title}: mean score per skill (1-5)",
            columns=[*skills, "overall", "n", *COST_COLUMNS],
            rows=_with_cost(per_skill, costs),
            plot_columns=skills,
            ylabel="mean score (1-5)",
        ),
        RubricTable(name=f"{benchmark}_domains", title=f"{title}: mean score per domain", columns=domains, rows=_rows(per_domain)),
        RubricTable(name=f"{benchmark}_difficulty", title=f"{title}: mean score per difficulty", columns=levels, rows=_rows(per_level)),
    ]


def _rows(cells: dict[str, dict[str, Cell]]) -> list[dict[str, Cell]]:
    return [{"pipeline": p, **c} for p, c in cells.items()]


# --------------------------------------------------------------------------- Just-Eval


def just_eval_table(rows: Sequence[Mapping[str, Any]], costs: dict[str, dict[str, Cell]]) -> RubricTable:
    """Official per-aspect means over the multi items and over the safety items."""
    aspects = [*ASPECTS[MULTI], *ASPECTS[SAFETY]]
    cells: dict[str, dict[str, Cell]] = {}
    for pipeline, prows in _by_pipeline(rows).items():
        row_cells: dict[str, Cell] = dict.fromkeys(aspects)
        for kind in (MULTI, SAFETY):
            results = [parsed_result(_scores(r)) for r in prows if kind in _labels(r, "aspects")]
            if results:
                means = aggregate(results)
                row_cells.update({a: means[f"{a}_mean"] for a in ASPECTS[kind] if f"{a}_mean" in means})
            row_cells[f"n_{kind}"] = len(results)
        cells[pipeline] = row_cells
    return RubricTable(
        name=f"{JUST_EVAL}_aspects",
        title="Just-Eval: mean score per aspect (1-5, N/A = 5)",
        columns=[*aspects, f"n_{MULTI}", f"n_{SAFETY}", *COST_COLUMNS],
        rows=_with_cost(cells, costs),
        plot_columns=aspects,
        ylabel="mean score (1-5)",
    )


# --------------------------------------------------------------------------- CEB


def ceb_table(benchmark: str, rows: Sequence[Mapping[str, Any]], costs: dict[str, dict[str, Cell]]) -> RubricTable:
    """Mean bias per axis and SMoA's overall (the mean of the axis means); lower is better."""
    axes = _ordered({a for r in rows for a in _labels(r, "axis")}, CEB_AXES)
    cells: dict[str, dict[str, Cell]] = {}
    for pipeline, prows in _by_pipeline(rows).items():
        by_axis: dict[str, list[float]] = defaultdict(list)
        for row in prows:
            for axis in _labels(row, "axis"):
                by_axis[axis].extend(s.score for s in _scores(row) if s.score is not None)
        means = {a: _mean(by_axis[a]) for a in axes}
        present = [m for m in means.values() if m is not None]
        cells[pipeline] = {**means, "overall": _mean(present), "n": len(prows)}
    name = "CEB Conversation-S (stereotyping)" if benchmark == CEB_S else "CEB Conversation-T (toxicity)"
    return RubricTable(
        name=f"{benchmark}_axes",
        title=f"{name}: mean bias score per axis (0-99, lower is better)",
        columns=[*axes, "overall", "n", *COST_COLUMNS],
        rows=_with_cost(cells, costs),
        plot_columns=[*axes, "overall"],
        ylabel="mean bias (0-99, lower is better)",
    )


# --------------------------------------------------------------------------- all


def build_rubric_tables(
    generations: Mapping[tuple[Any, ...], dict[str, Any]],
    rubric_rows: Iterable[Mapping[str, Any]],
    *,
    pipelines: list[str] | None = None,
) -> list[RubricTable]:
    """Every table the judged rubric rows (status ok) support, benchmark by benchmark."""
    by_benchmark: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rubric_rows:
        if row["status"] == "ok" and (pipelines is None or row["pipeline"] in pipelines):
            by_benchmark[row["benchmark"]].append(row)
    tables: list[RubricTable] = []
    for benchmark in (FLASK, FLASK_HARD, JUST_EVAL, CEB_S, CEB_T):
        rows = by_benchmark.pop(benchmark, [])
        if not rows:
            continue
        costs = _cost_cells(generations, benchmark)
        if benchmark in (FLASK, FLASK_HARD):
            tables += flask_tables(benchmark, rows, costs)
        elif benchmark == JUST_EVAL:
            tables.append(just_eval_table(rows, costs))
        else:
            tables.append(ceb_table(benchmark, rows, costs))
    if by_benchmark:
        raise ValueError(f"rubric rows of unknown benchmarks: {', '.join(sorted(by_benchmark))}")
    return tables


# --------------------------------------------------------------------------- output


def _fmt(value: Cell) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5f}" if abs(value) < 0.01 and value else f"{value:.2f}"
    return str(value)


def rich_rubric_table(table: RubricTable) -> Table:
    out = Table(title=table.title)
    out.add_column("pipeline")
    for col in table.columns:
        out.add_column(col, justify="right")
    for row in table.rows:
        out.add_row(str(row["pipeline"]), *(_fmt(row.get(c)) for c in table.columns))
    return out


def rubric_markdown(tables: Sequence[RubricTable]) -> str:
    parts = []
    for t in tables:
        lines = [f"### {t.title}", "", "| pipeline | " + " | ".join(t.columns) + " |", "|---|" + "---:|" * len(t.columns)]
        lines += [f"| {r['pipeline']} | " + " | ".join(_fmt(r.get(c)) for c in t.columns) + " |" for r in t.rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def rubric_csv(table: RubricTable) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["pipeline", *table.columns])
    for row in table.rows:
        writer.writerow([row["pipeline"], *("" if row.get(c) is None else row.get(c) for c in table.columns)])
    return buf.getvalue()


def rubric_parquet(table: RubricTable) -> bytes:
    """The table with an explicit schema: pipeline string, counts int64, everything else float64."""
    counts = {c for c in table.columns if c in ("n", "answers") or c.startswith("n_")}
    schema = pa.schema(
        [pa.field("pipeline", pa.string(), nullable=False)]
        + [pa.field(c, pa.int64() if c in counts else pa.float64()) for c in table.columns]
    )
    data = pa.Table.from_pylist([{"pipeline": r["pipeline"], **{c: r.get(c) for c in table.columns}} for r in table.rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(data, buf)
    return buf.getvalue()


def bar_chart(table: RubricTable) -> bytes | None:
    """Grouped bars (one group per plotted column, one bar per pipeline), or None when nothing has a value."""
    cols = [c for c in table.plot_columns if any(r.get(c) is not None for r in table.rows)]
    if not cols:
        return None
    series = {str(r["pipeline"]): [None if r.get(c) is None else float(r[c]) for c in cols] for r in table.rows}  # type: ignore[arg-type]
    return grouped_bars(cols, series, ylabel=table.ylabel, title=table.title)


def write_rubric_report(tables: Sequence[RubricTable], out: str) -> list[str]:
    """rubric.md, and per table <name>.csv, <name>.parquet and <name>.png (when it has bars); returns what was written."""
    if not tables:
        return []
    files: dict[str, bytes] = {"rubric.md": rubric_markdown(tables).encode()}
    for table in tables:
        files[f"{table.name}.csv"] = rubric_csv(table).encode()
        files[f"{table.name}.parquet"] = rubric_parquet(table)
        png = bar_chart(table)
        if png:
            files[f"{table.name}.png"] = png
    return write_files(files, out)
