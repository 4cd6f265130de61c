"""The report: per-pipeline quality, cost and latency as a terminal table, Markdown, CSV, JSON and plots.

Quality comes from the judge tables, each aggregated by its judgment kind (AlpacaEval win rates, MT-Bench
grades, GSM8K exact match as columns; FLASK, Just-Eval and CEB as tables of their own), cost and
latency from the generation table (traces). The plots put quality against cost and
against latency and draw the Pareto frontier, like Figure 5 of the MoA paper.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field
from rich.table import Table

from moa_ray.eval.benchmarks import registry
from moa_ray.eval.benchmarks.alpaca_eval import PAIRWISE_MODE
from moa_ray.eval.benchmarks.base import BenchmarkTable, Cell, Record, Records, ReportScope
from moa_ray.eval.benchmarks.gsm8k import EXACT_MODE
from moa_ray.eval.benchmarks.mt_bench import BASELINE_MODE, SINGLE_MODE
from moa_ray.eval.benchmarks.rubric import RUBRIC
from moa_ray.eval.metrics import GLMData
from moa_ray.eval.report_data import finished, judging, keep, numbers, of_pipelines, rows_table, unique
from moa_ray.eval.schema import GenerationRow
from moa_ray.eval.store import StoreError, join, resolve

if TYPE_CHECKING:  # only read: judging.py is the judging machinery, which a report never runs
    from moa_ray.eval.judging import Judgments

QUALITY_METRICS = {
    "lc_win_rate": "AlpacaEval LC win rate (%)",
    "win_rate": "AlpacaEval win rate (%)",
    "mt_bench": "MT-Bench score (1-10)",
    "gsm8k_accuracy": "GSM8K accuracy",
}


class ReportRow(BaseModel):
    """One pipeline's line of the report."""

    pipeline: str
    answers: int = Field(description="Finished generation rows (all turns).")
    failed: int = 0
    win_rate: float | None = None
    standard_error: float | None = None
    discrete_win_rate: float | None = None
    lc_win_rate: float | None = None
    avg_length: int | None = None
    n_judged: int | None = None
    mt_bench: float | None = None
    mt_bench_turn_1: float | None = None
    mt_bench_turn_2: float | None = None
    mt_bench_categories: dict[str, float] = Field(default_factory=dict)
    gsm8k_accuracy: float | None = Field(default=None, description="Exact-match accuracy (0-1).")
    gsm8k_standard_error: float | None = None
    gsm8k_n: int | None = None
    baseline: str | None = Field(default=None, description="MT-Bench pairwise-baseline: the pipeline compared against.")
    baseline_win: int | None = None
    baseline_loss: int | None = None
    baseline_tie: int | None = None
    baseline_win_rate: float | None = Field(default=None, description="(win + 0.5 tie) / n, FastChat's win_rate_adjusted, in %.")
    mean_prompt_tokens: float | None = None
    mean_completion_tokens: float | None = None
    mean_tokens: float | None = None
    mean_cost_usd: float | None = None
    total_cost_usd: float | None = None
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    mean_tflops: float | None = None


TABLE_COLUMNS: list[tuple[str, str, str]] = [
    # (field, header, format)
    ("pipeline", "pipeline", "{}"),
    ("answers", "answers", "{}"),
    ("failed", "failed", "{}"),
    ("lc_win_rate", "LC win %", "{:.2f}"),
    ("win_rate", "win %", "{:.2f}"),
    ("standard_error", "± se", "{:.2f}"),
    ("discrete_win_rate", "discrete %", "{:.2f}"),
    ("avg_length", "avg len", "{}"),
    ("mt_bench", "MT-Bench", "{:.2f}"),
    ("mt_bench_turn_1", "turn 1", "{:.2f}"),
    ("mt_bench_turn_2", "turn 2", "{:.2f}"),
    ("gsm8k_accuracy", "GSM8K acc", "{:.2%}"),
    ("gsm8k_standard_error", "GSM8K ± se", "{:.2%}"),
    ("baseline_win_rate", "vs baseline %", "{:.2f}"),
    ("mean_tokens", "tokens/answer", "{:.0f}"),
    ("mean_cost_usd", "$/answer", "{:.5f}"),
    ("total_cost_usd", "$ total", "{:.4f}"),
    ("latency_p50_s", "p50 s", "{:.2f}"),
    ("latency_p95_s", "p95 s", "{:.2f}"),
    ("mean_tflops", "TFLOPs/answer", "{:.2f}"),
]


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


#: The answers a report reads: an Arrow table of their key, status and numbers (:func:`~moa_ray.eval.judging.read_report_answers`),
#: or rows already read as dicts by key (a test's, a small run's), made into one.
Answers: TypeAlias = pa.Table | Records
#: A kind's finished judgments: an Arrow table of its report columns, or rows already read as dicts.
Judged: TypeAlias = pa.Table | Sequence[Record]

#: The columns of an answer the main report reads.
ANSWER_COLUMNS = [
    "prompt_id",
    "pipeline",
    "turn",
    "status",
    "dataset",
    "prompt_tokens",
    "completion_tokens",
    "latency_s",
    "cost_usd",
    "tflops",
]


def answers_table(generations: Answers) -> pa.Table:
    """The answers as Arrow, whichever way they were handed over."""
    if isinstance(generations, pa.Table):
        return generations
    return rows_table(generations.values(), GenerationRow, ANSWER_COLUMNS)


def judged_table(mode: str, rows: Judged) -> pa.Table:
    """A kind's judgments as Arrow (its report columns, where they were handed over as dicts)."""
    if isinstance(rows, pa.Table):
        return rows
    kind = registry.REGISTRY.kind(mode)
    return rows_table(rows, kind.row_type, kind.report_columns)


def answer_columns(answers: pa.Table, pipeline: str) -> ReportRow:
    """One pipeline's answers, failures, tokens, cost, latency and TFLOPs, from numpy arrays of its finished
    answers in the table's order: the means sum in the order the report always did, so their bits do not move;
    cost and TFLOPs only where every finished answer has them."""
    rows = answers.filter(pc.equal(answers.column("pipeline"), pipeline))
    ok = finished(rows)
    report = ReportRow(pipeline=pipeline, answers=ok.num_rows, failed=rows.num_rows - ok.num_rows)
    if not ok.num_rows:
        return report
    prompt, completion = numbers(ok.column("prompt_tokens")), numbers(ok.column("completion_tokens"))
    latency = numbers(ok.column("latency_s").drop_null())
    costs = ok.column("cost_usd")
    cost = None if costs.null_count else numbers(costs)
    tflops = ok.column("tflops")
    return report.model_copy(
        update={
            "mean_prompt_tokens": float(np.mean(prompt)),
            "mean_completion_tokens": float(np.mean(completion)),
            "mean_tokens": float(np.mean(prompt + completion)),
            "mean_cost_usd": None if cost is None else float(np.mean(cost)),
            "total_cost_usd": None if cost is None else float(np.cumsum(cost)[-1]),  # summed one by one, as sum() did
            "latency_p50_s": float(np.percentile(latency, 50)) if len(latency) else None,
            "latency_p95_s": float(np.percentile(latency, 95)) if len(latency) else None,
            "mean_tflops": None if tflops.null_count else float(np.mean(numbers(tflops))),
        }
    )


def build_report(
    generations: Answers,
    pairwise: Judged = (),
    grades: Judged = (),
    *,
    pipelines: list[str] | None = None,
    glm_data: GLMData | None = None,
    exact: Judged = (),
    baseline_pairs: Judged = (),
    others: Mapping[str, Judged] | None = None,
) -> list[ReportRow]:
    """One row per pipeline; cost and TFLOPs only where every finished answer has them.

    ``pairwise`` are AlpacaEval-format annotations (pair-v2 or the official annotator's),
    ``baseline_pairs`` MT-Bench pairwise-baseline matches, ``exact`` GSM8K exact-match scores; ``others``
    the rows of any other kind by mode. Each kind's :meth:`~moa_ray.eval.benchmarks.base.JudgmentKind.aggregate`
    fills the columns it knows, from an Arrow table of its rows.
    """
    answers = answers_table(generations)
    judged = {PAIRWISE_MODE: pairwise, SINGLE_MODE: grades, EXACT_MODE: exact, BASELINE_MODE: baseline_pairs, **(others or {})}
    scope = ReportScope(answers=answers, pipelines=pipelines, glm_data=glm_data, catalog=registry.REGISTRY)
    quality: dict[str, dict[str, Any]] = defaultdict(dict)
    for mode, rows in judged.items():
        table = judged_table(mode, rows)
        if table.num_rows:
            for pipeline, columns in registry.REGISTRY.kind(mode).aggregate(table, scope).columns.items():
                quality[pipeline].update(columns)
    answered = unique(of_pipelines(answers, pipelines).column("pipeline"))
    return [answer_columns(answers, p).model_copy(update=quality.get(p, {})) for p in sorted(set(answered) | set(quality))]


def benchmark_tables(generations: Answers, judged: Mapping[str, Judged], *, pipelines: list[str] | None = None) -> list[BenchmarkTable]:
    """The tables of the kinds that report tables of their own (FLASK, Just-Eval, CEB...), with each benchmark's
    answers, tokens, cost and latency beside, as the main report computes them."""
    answers = answers_table(generations)

    def costs(benchmark: str) -> dict[str, dict[str, Cell]]:
        of_benchmark = answers.filter(pc.equal(answers.column("dataset"), benchmark))
        return {
            r.pipeline: {"answers": r.answers, "tokens/answer": r.mean_tokens, "$/answer": r.mean_cost_usd, "p50 s": r.latency_p50_s}
            for r in build_report(of_benchmark)
        }

    scope = ReportScope(answers=answers, pipelines=pipelines, catalog=registry.REGISTRY, costs=costs)
    tables: list[BenchmarkTable] = []
    for mode, rows in judged.items():
        table = judged_table(mode, rows)
        if table.num_rows:
            tables += registry.REGISTRY.kind(mode).aggregate(table, scope).tables
    return tables


def build_rubric_tables(
    generations: Answers, rubric_rows: Judged | Iterable[Record], *, pipelines: list[str] | None = None
) -> list[BenchmarkTable]:
    """Every table the judged rubric rows (status ok) support, benchmark by benchmark."""
    rows = rubric_rows if isinstance(rubric_rows, pa.Table) else list(rubric_rows)
    return benchmark_tables(generations, {RUBRIC.mode: rows}, pipelines=pipelines)


def report_groups(generations: Answers) -> dict[str, pa.Table]:
    """The generations of each benchmark the main report scores (every dataset but the rubric ones, which get
    their own tables), keyed by a directory name for it: the dataset's name, a file dataset's file name."""
    answers = answers_table(generations)
    datasets: dict[str, list[str]] = defaultdict(list)
    names: dict[str, str] = {}
    for dataset in unique(answers.column("dataset")):  # in the order they first appear
        found = registry.REGISTRY.find(dataset)
        if found is not None and found.rubric is not None:
            continue
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", PurePosixPath(dataset).name) or "dataset"
        if names.setdefault(name, dataset) != dataset:
            raise StoreError(f"datasets {names[name]!r} and {dataset!r} would share the report folder {name!r}")
        datasets[name].append(dataset)
    column = answers.column("dataset")
    return {name: keep(answers, pc.is_in(column, value_set=pa.array(of, pa.string()))) for name, of in sorted(datasets.items())}


class BenchmarkReport(BaseModel):
    """One benchmark's main report: its rows, and the directory they are written to."""

    name: str | None = Field(description="The benchmark's folder name; None when the generations hold one benchmark.")
    rows: list[ReportRow]
    out: str


def benchmark_reports(
    generations: Answers,
    judged: Judgments,
    out: str,
    *,
    pipelines: list[str] | None = None,
    glm_data: GLMData | None = None,
) -> Iterator[BenchmarkReport]:
    """The main report of each benchmark in ``generations``, built as it is asked for: one benchmark's in ``out`` as
    always; several: one each in ``out/<name>`` (:func:`report_groups`), from its own answers and their judgments."""
    answers = answers_table(generations)
    groups = report_groups(answers)
    targets: list[tuple[str | None, pa.Table, str]]
    if len(groups) <= 1:
        targets = [(None, next(iter(groups.values()), answers), out)]
    else:
        targets = [(name, group, join(out, name)) for name, group in groups.items()]
    for name, of_benchmark, target in targets:

        def mine(mode: str, rows: Judged, of_benchmark: pa.Table = of_benchmark) -> pa.Table:
            return judging(judged_table(mode, rows), of_benchmark)

        rows = build_report(
            of_benchmark,
            mine(PAIRWISE_MODE, judged.pairwise),
            mine(SINGLE_MODE, judged.grades),
            pipelines=pipelines,
            glm_data=glm_data,
            exact=mine(EXACT_MODE, judged.exact),
            baseline_pairs=mine(BASELINE_MODE, judged.baseline_pairs),
            others={mode: mine(mode, rows) for mode, rows in judged.others.items()},
        )
        yield BenchmarkReport(name=name, rows=rows, out=target)


def mt_bench_markdown(rows: Sequence[ReportRow]) -> list[str]:
    """FastChat's ``show_result.py`` tables: first turn, second turn and average (single grading), best first;
    then the pairwise-baseline win / loss / tie with win rate = (win + 0.5 tie) / n."""
    lines: list[str] = []
    graded = [r for r in rows if r.mt_bench is not None]
    for title, field in (("First turn", "mt_bench_turn_1"), ("Second turn", "mt_bench_turn_2"), ("Average", "mt_bench")):
        scored = sorted((r for r in graded if getattr(r, field) is not None), key=lambda r: -getattr(r, field))
        if scored:
            lines += ["", f"MT-Bench, {title.lower()}:", "", "| pipeline | score |", "|---|---:|"]
            lines += [f"| {r.pipeline} | {getattr(r, field):.6f} |" for r in scored]
    versus = sorted((r for r in rows if r.baseline_win_rate is not None), key=lambda r: -(r.baseline_win_rate or 0.0))
    if versus:
        lines += [
            "",
            f"MT-Bench pairwise against {versus[0].baseline}:",
            "",
            "| pipeline | win | loss | tie | win rate % | loss rate % | win rate (ties half) % |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in versus:
            n = (r.baseline_win or 0) + (r.baseline_loss or 0) + (r.baseline_tie or 0)
            lines.append(
                f"| {r.pipeline} | {r.baseline_win} | {r.baseline_loss} | {r.baseline_tie} | "
                f"{100 * (r.baseline_win or 0) / n:.2f} | {100 * (r.baseline_loss or 0) / n:.2f} | {r.baseline_win_rate:.2f} |"
            )
    return lines


# --------------------------------------------------------------------------- tables


def _visible_columns(rows: Sequence[ReportRow]) -> list[tuple[str, str, str]]:
    """Columns with at least one value (a run without a judge shows no quality columns)."""
    return [c for c in TABLE_COLUMNS if c[0] == "pipeline" or any(getattr(r, c[0]) is not None for r in rows)]


def rich_table(rows: Sequence[ReportRow], title: str = "moa-ray evaluation") -> Table:
    table = Table(title=title)
    cols = _visible_columns(rows)
    for _, header, _ in cols:
        table.add_column(header, justify="left" if header == "pipeline" else "right")
    for r in rows:
        table.add_row(*[_fmt(getattr(r, f), fmt) for f, _, fmt in cols])
    return table


def markdown(rows: Sequence[ReportRow]) -> str:
    cols = _visible_columns(rows)
    lines = [
        "| " + " | ".join(h for _, h, _ in cols) + " |",
        "|" + "|".join("---" if h == "pipeline" else "---:" for _, h, _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(getattr(r, f), fmt) for f, _, fmt in cols) + " |" for r in rows]
    categories = sorted({c for r in rows for c in r.mt_bench_categories})
    if categories:
        lines += [
            "",
            "MT-Bench by category:",
            "",
            "| pipeline | " + " | ".join(categories) + " |",
            "|---|" + "---:|" * len(categories),
        ]
        for r in rows:
            if r.mt_bench_categories:
                lines.append(f"| {r.pipeline} | " + " | ".join(_fmt(r.mt_bench_categories.get(c), "{:.2f}") for c in categories) + " |")
    lines += mt_bench_markdown(rows)
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[ReportRow]) -> str:
    fields = [f for f in ReportRow.model_fields if f != "mt_bench_categories"]
    categories = sorted({c for r in rows for c in r.mt_bench_categories})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(fields + [f"mt_bench_{c}" for c in categories])
    for r in rows:
        writer.writerow(
            [getattr(r, f) if getattr(r, f) is not None else "" for f in fields] + [r.mt_bench_categories.get(c, "") for c in categories]
        )
    return buf.getvalue()


# --------------------------------------------------------------------------- plots


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (lower or equal x and higher or equal y, one strictly), by x."""
    frontier = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            frontier.append(i)
    return sorted(frontier, key=lambda i: (points[i][0], -points[i][1]))


def quality_metric(rows: Sequence[ReportRow]) -> str | None:
    """The headline quality metric the rows have: LC win rate, else win rate, else MT-Bench."""
    for metric in QUALITY_METRICS:
        if any(getattr(r, metric) is not None for r in rows):
            return metric
    return None


def plot_tradeoff(rows: Sequence[ReportRow], x_field: str, x_label: str, title: str) -> bytes | None:
    """A PNG of quality against ``x_field`` with the Pareto frontier, or None when nothing can be plotted."""
    metric = quality_metric(rows)
    if metric is None:
        return None
    pts = [(r.pipeline, getattr(r, x_field), getattr(r, metric)) for r in rows]
    pts = [(n, float(x), float(y)) for n, x, y in pts if x is not None and y is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    front = pareto_frontier(list(zip(xs, ys, strict=True)))
    ax.scatter(xs, ys, s=40, color="#4c72b0", zorder=3, label="pipelines")
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="#c44e52", zorder=2, label="Pareto frontier")
    ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=70, facecolors="none", edgecolors="#c44e52", zorder=4)
    for name, x, y in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(QUALITY_METRICS[metric])
    ax.set_title(title)
    ax.margins(x=0.12, y=0.1)  # room for the labels of the extreme points
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if len(set(xs)) > 1 and max(xs) / max(min(xs), 1e-12) > 50:
        ax.set_xscale("log")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def grouped_bars(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    ylabel: str,
    title: str,
    errors: Mapping[str, Sequence[float]] | None = None,
    ylim: tuple[float, float] | None = None,
    value_labels: bool = False,
) -> bytes:
    """A PNG of grouped bars: one group per ``groups`` entry, one bar per series (a legend when there are several).

    Every benchmark plot of the report is one of these (GSM8K accuracy, FLASK skills, Just-Eval aspects, CEB axes).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(groups) * max(1, len(series)) ** 0.5 + 2), 4.6), dpi=120)
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        heights = [np.nan if v is None else float(v) for v in values]
        at = x + (i - (len(series) - 1) / 2) * width
        yerr = None if errors is None or name not in errors else list(errors[name])
        ax.bar(at, heights, width, yerr=yerr, capsize=4 if yerr else 0, label=name)
        if value_labels:
            for xi, h in zip(at, heights, strict=True):
                if not np.isnan(h):
                    ax.annotate(f"{h:.1f}", (xi, h), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30 if len(series) > 1 else 20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_gsm8k(rows: Sequence[ReportRow]) -> bytes | None:
    """A PNG of GSM8K accuracy per pipeline with standard-error bars, or None without GSM8K scores."""
    scored = [r for r in rows if r.gsm8k_accuracy is not None]
    if not scored:
        return None
    return grouped_bars(
        [r.pipeline for r in scored],
        {"accuracy": [100 * (r.gsm8k_accuracy or 0.0) for r in scored]},
        errors={"accuracy": [100 * (r.gsm8k_standard_error or 0.0) for r in scored]},
        ylabel="GSM8K accuracy (%)",
        title=f"GSM8K exact match (n = {max(r.gsm8k_n or 0 for r in scored)})",
        ylim=(0, 100),
        value_labels=True,
    )


def cost_axis(rows: Sequence[ReportRow]) -> tuple[str, str]:
    """Cost in USD per answer where accounting priced every pipeline, tokens per answer otherwise."""
    if any(r.mean_cost_usd is not None for r in rows):
        return "mean_cost_usd", "cost per answer (USD)"
    return "mean_tokens", "tokens per answer (no prices configured)"


# --------------------------------------------------------------------------- writing


def write_files(files: Mapping[str, bytes], out: str) -> list[str]:
    """Write each named file into the directory (or URI) ``out``, creating it; returns the written paths."""
    fs, path = resolve(out)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as err:
        raise StoreError(f"cannot create {out}: {err}") from None
    written = []
    for name, data in files.items():
        target = join(out, name)
        try:
            with fs.open_output_stream(join(path, name)) as stream:
                stream.write(data)
        except OSError as err:
            raise StoreError(f"cannot write {target}: {err}") from None
        written.append(target)
    return written


def write_report(rows: Sequence[ReportRow], out: str) -> list[str]:
    """report.md, report.csv, report.json and the plots (quality vs cost / latency, GSM8K) into ``out``; returns what was written."""
    files = {
        "report.md": markdown(rows).encode(),
        "report.csv": to_csv(rows).encode(),
        "report.json": json.dumps([r.model_dump() for r in rows], indent=2).encode(),
    }
    x_field, x_label = cost_axis(rows)
    cost_png = plot_tradeoff(rows, x_field, x_label, "Quality vs cost")
    latency_png = plot_tradeoff(rows, "latency_p50_s", "p50 latency per answer (s)", "Quality vs latency")
    if cost_png:
        files["quality_vs_cost.png"] = cost_png
    if latency_png:
        files["quality_vs_latency.png"] = latency_png
    gsm8k_png = plot_gsm8k(rows)
    if gsm8k_png:
        files["gsm8k_accuracy.png"] = gsm8k_png
    return write_files(files, out)


__all__ = [
    "ReportRow",
    "benchmark_tables",
    "build_report",
    "build_rubric_tables",
    "grouped_bars",
    "markdown",
    "mt_bench_markdown",
    "pareto_frontier",
    "plot_gsm8k",
    "plot_tradeoff",
    "report_groups",
    "rich_table",
    "to_csv",
    "write_files",
    "write_report",
]
