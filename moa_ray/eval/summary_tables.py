"""Terminal tables of eval results that are not a report: a generation run's summary, and the metrics that
``moa-ray eval metrics`` computes from files made elsewhere (AlpacaEval annotations, Just-Eval judged outputs,
GSM8K outputs). The commands print them; the reports' own tables are report.py's and tables.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:  # only read: the commands that print these tables import no more than they need
    from moa_ray.eval.benchmarks.gsm8k import OutputsScore
    from moa_ray.eval.generate import GenerateSummary
    from moa_ray.eval.metrics import WinRate


def generate_summary_table(summary: GenerateSummary) -> Table:
    """One row per pipeline: rows done, failed and missing, latency, tokens per answer, cost ("-" where unknown)."""
    table = Table(title=f"{summary.dataset} -> {summary.out}")
    for header in ("pipeline", "done", "failed", "missing", "mean latency s", "p95 latency s", "tokens/answer", "cost USD"):
        table.add_column(header, justify="left" if header == "pipeline" else "right")
    for p in summary.pipelines:
        table.add_row(
            p.pipeline,
            str(p.done),
            str(p.failed),
            str(p.missing),
            *("-" if v is None else f"{v:.2f}" for v in (p.mean_latency_s, p.p95_latency_s, p.mean_tokens)),
            "-" if p.total_cost_usd is None else f"{p.total_cost_usd:.4f}",
        )
    return table


def win_rates_table(results: Mapping[str, WinRate], source: str) -> Table:
    """AlpacaEval's leaderboard columns, one row per generator of the annotations in ``source``."""
    table = Table(title=f"AlpacaEval metrics of {source}")
    for header in (
        "generator",
        "win rate",
        "± se",
        "discrete",
        "LC win rate",
        "LC model",
        "avg length",
        "wins",
        "losses",
        "draws",
        "n",
    ):
        table.add_column(header, justify="left" if header in ("generator", "LC model") else "right")
    for r in results.values():
        table.add_row(
            r.generator,
            f"{r.win_rate:.2f}",
            f"{r.standard_error:.2f}",
            f"{r.discrete_win_rate:.2f}",
            "-" if r.lc_win_rate is None else f"{r.lc_win_rate:.2f}",
            r.lc_model or "-",
            str(r.avg_length),
            str(r.n_wins),
            str(r.n_wins_base),
            str(r.n_draws),
            str(r.n_total),
        )
    return table


def just_eval_table(metrics: Mapping[str, float | int], source: str) -> Table:
    """Just-Eval's ``--report_only`` numbers of the judged-output file ``source``, one metric a row."""
    table = Table(title=f"Just-Eval metrics of {source}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, str(value) if isinstance(value, int) else f"{value:.4f}")
    return table


def gsm8k_table(score: OutputsScore, source: str) -> Table:
    """GSM8K's exact-match accuracy of the outputs file ``source``, with its standard error."""
    table = Table(title=f"GSM8K exact match of {source}")
    for header in ("accuracy", "± se", "correct", "n"):
        table.add_column(header, justify="right")
    table.add_row(f"{score.accuracy:.2%}", f"{score.standard_error:.2%}", str(sum(score.correct)), str(score.n))
    return table
