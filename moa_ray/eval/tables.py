"""A benchmark's own report tables (FLASK skills, Just-Eval aspects, CEB axes...) as files and terminal tables.

Each table has one row per pipeline, and is written as CSV and Parquet, gathered in ``rubric.md``, and drawn as
grouped bars. What goes in them is each benchmark's business (its kind's ``aggregate``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from rich.table import Table

from moa_ray.eval.benchmarks.base import BenchmarkTable, Cell
from moa_ray.eval.report import grouped_bars, write_files

# --------------------------------------------------------------------------- output


def _fmt(value: Cell) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5f}" if abs(value) < 0.01 and value else f"{value:.2f}"
    return str(value)


def rich_benchmark_table(table: BenchmarkTable) -> Table:
    out = Table(title=table.title)
    out.add_column("pipeline")
    for col in table.columns:
        out.add_column(col, justify="right")
    for row in table.rows:
        out.add_row(str(row["pipeline"]), *(_fmt(row.get(c)) for c in table.columns))
    return out


def tables_markdown(tables: Sequence[BenchmarkTable]) -> str:
    parts = []
    for t in tables:
        lines = [f"### {t.title}", "", "| pipeline | " + " | ".join(t.columns) + " |", "|---|" + "---:|" * len(t.columns)]
        lines += [f"| {r['pipeline']} | " + " | ".join(_fmt(r.get(c)) for c in t.columns) + " |" for r in t.rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def table_csv(table: BenchmarkTable) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["pipeline", *table.columns])
    for row in table.rows:
        writer.writerow([row["pipeline"], *("" if row.get(c) is None else row.get(c) for c in table.columns)])
    return buf.getvalue()


def table_parquet(table: BenchmarkTable) -> bytes:
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


def bar_chart(table: BenchmarkTable) -> bytes | None:
    """Grouped bars (one group per plotted column, one bar per pipeline), or None when nothing has a value."""
    cols = [c for c in table.plot_columns if any(r.get(c) is not None for r in table.rows)]
    if not cols:
        return None
    series = {str(r["pipeline"]): [None if r.get(c) is None else float(r[c]) for c in cols] for r in table.rows}  # type: ignore[arg-type]
    return grouped_bars(cols, series, ylabel=table.ylabel, title=table.title)


def write_benchmark_tables(tables: Sequence[BenchmarkTable], out: str) -> list[str]:
    """rubric.md (every table, in Markdown; the name it has always had, from the rubric benchmarks' tables), and per
    table <name>.csv, <name>.parquet and <name>.png (when it has bars); returns what was written."""
    if not tables:
        return []
    files: dict[str, bytes] = {"rubric.md": tables_markdown(tables).encode()}
    for table in tables:
        files[f"{table.name}.csv"] = table_csv(table).encode()
        files[f"{table.name}.parquet"] = table_parquet(table)
        png = bar_chart(table)
        if png:
            files[f"{table.name}.png"] = png
    return write_files(files, out)
