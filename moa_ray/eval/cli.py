"""``moa-ray eval generate | judge | report | metrics`` (also ``python -m jobs.<name>`` for Ray Jobs).

Every input is validated (config, pipeline names, dataset, existing output) before
Ray starts, so a typo costs seconds, not a cluster start.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Literal

import click
from rich.table import Table

from moa_ray.errors import ConfigError, MoARayError
from moa_ray.render import err_console, make_console, run_reporting_errors

EXIT_PARTIAL = 3

DATASET_HELP = "alpaca_eval, mt_bench, or a .jsonl / .json / .parquet file (path or URI) with an id and a prompt column."


class _EvalCommand(click.Command):
    """Reports moa-ray errors as one clear line also when run as ``python -m jobs.X`` (outside the main group)."""

    def invoke(self, ctx: click.Context) -> Any:
        return run_reporting_errors(lambda: super(_EvalCommand, self).invoke(ctx))


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise click.BadParameter("give at least one name")
    if len(set(names)) != len(names):
        raise click.BadParameter(f"a name is repeated in {value!r}")
    return names


config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None, help="YAML config (default: shipped presets)."
)
address_option = click.option("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray).")
concurrency_option = click.option(
    "--concurrency", type=click.IntRange(min=1), default=16, show_default=True, help="Items in flight across all workers."
)
workers_option = click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Ray actors sharing the work [default: 1 per 32 in flight, at most 8].",
)
worker_cpus_option = click.option(
    "--worker-cpus", type=click.FloatRange(min=0), default=0.25, show_default=True, help="CPUs reserved per worker actor."
)
keep_option = click.option("--keep-deployed", is_flag=True, help="Leave the Serve application running at the end.")
progress_option = click.option("--no-progress", is_flag=True, help="No progress bar or progress lines.")
flush_rows_option = click.option(
    "--flush-rows", type=click.IntRange(min=1), default=256, show_default=True, help="Most rows per part file."
)
flush_s_option = click.option(
    "--flush-seconds",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Batch results for S seconds per part file (0: write as they arrive; a kill loses only work in flight).",
)


@click.group("eval")
def eval_group() -> None:
    """Evaluation jobs: generate answers, judge them, report metrics (Parquet, resumable)."""


# --------------------------------------------------------------------------- generate


@click.command("generate", cls=_EvalCommand)
@config_option
@click.option("--pipeline", "pipeline_names", required=True, help="Pipeline name(s), comma separated; they share the deployed models.")
@click.option("--dataset", required=True, help=DATASET_HELP)
@click.option("--out", required=True, help="Output directory or pyarrow filesystem URI (s3://, gs://...).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N prompts.")
@concurrency_option
@workers_option
@worker_cpus_option
@address_option
@click.option("--id-column", default=None, help="Id column of a dataset file [default: id, prompt_id, question_id or uid].")
@click.option(
    "--prompt-column",
    default=None,
    help="Prompt column of a dataset file [default: prompt, instruction, question, turns or input].",
)
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Cap the final answer's tokens.")
@click.option(
    "--export-alpaca-eval",
    "export_path",
    default=None,
    help="Also write AlpacaEval model_outputs.json here ({pipeline} is replaced).",
)
@click.option("--run-id", default=None, help="Id recorded in the rows of this run [default: random].")
@click.option("--app-name", default="moa-eval", show_default=True, help="Ray Serve application of the agents.")
@click.option("--allow-config-change", is_flag=True, help="Resume even if the pipeline's settings changed since the stored answers.")
@keep_option
@flush_rows_option
@flush_s_option
@progress_option
def generate_command(
    config_path: str | None,
    pipeline_names: str,
    dataset: str,
    out: str,
    limit: int | None,
    concurrency: int,
    workers: int | None,
    worker_cpus: float,
    address: str | None,
    id_column: str | None,
    prompt_column: str | None,
    max_tokens: int | None,
    export_path: str | None,
    run_id: str | None,
    app_name: str,
    allow_config_change: bool,
    keep_deployed: bool,
    flush_rows: int,
    flush_seconds: float,
    no_progress: bool,
) -> None:
    """Answer every prompt of DATASET with each pipeline, into Parquet; rerun to resume."""
    from moa_ray.config import load_config
    from moa_ray.eval.datasets import load_dataset
    from moa_ray.eval.generate import (
        GenerateOptions,
        answer_settings,
        export_alpaca_eval,
        load_settings,
        new_run_id,
        plan_generation,
        run_generation,
        settings_fingerprint,
    )
    from moa_ray.eval.schema import GenerationRow
    from moa_ray.eval.store import RowTable

    pipelines = _names(pipeline_names) or []
    config = load_config(config_path)
    for name in pipelines:
        config.pipeline(name)
    data = load_dataset(dataset, limit=limit, id_column=id_column, prompt_column=prompt_column)
    options = GenerateOptions(
        pipelines=pipelines,
        out=out,
        concurrency=concurrency,
        workers=workers,
        worker_cpus=worker_cpus,
        run_id=run_id or new_run_id(),
        flush_rows=flush_rows,
        flush_s=flush_seconds,
        max_tokens=max_tokens,
        allow_config_change=allow_config_change,
        progress=not no_progress,
    )
    settings = {p: answer_settings(config, p) for p in pipelines}
    fingerprints = {p: settings_fingerprint(s) for p, s in settings.items()}
    plan = plan_generation(
        data,
        pipelines,
        RowTable(out, GenerationRow).latest(),
        fingerprints,
        allow_config_change=allow_config_change,
        settings=settings,
        stored_settings=lambda fp: load_settings(out, fp),
    )
    err_console.print(
        f"{data.name}: {len(data.prompts)} prompts x {len(pipelines)} pipeline(s) = {plan.total_rows} rows, "
        f"{plan.done_rows} already done, {plan.pending_rows} to generate -> {out}",
        highlight=False,
    )
    summary = None
    if plan.pending_rows:
        from moa_ray.eval.lease import WriterLease
        from moa_ray.runtime import deploy_agents, init_ray

        WriterLease(out, options.run_id).check_free()  # refused before Ray starts and models deploy

        init_ray(address, models=config.models_for(pipelines).values())
        try:  # a deploy that fails half-way leaves no Serve app behind either
            with err_console.status(f"starting Ray and deploying the models of {', '.join(pipelines)}..."):
                agents = deploy_agents(config, pipelines, app_name=app_name)
            summary = run_generation(config, data, agents, options)
        finally:
            if not keep_deployed:
                _delete_app(app_name)
    else:
        summary = run_generation(config, data, {}, options)  # nothing to run: compacts and summarises
    _print_generate_summary(summary)
    if export_path:
        for target, n in export_alpaca_eval(out, data, pipelines, export_path).items():
            err_console.print(f"wrote {n} AlpacaEval outputs to {target}", highlight=False)
    if not summary.complete:
        err_console.print("[yellow]some rows failed or are missing; rerun the same command to retry them[/yellow]")
        sys.exit(EXIT_PARTIAL)


def _delete_app(app_name: str) -> None:
    from ray import serve

    try:
        serve.delete(app_name)
    except Exception as err:  # noqa: BLE001 - cleanup must not hide the run's outcome
        err_console.print(f"[yellow]could not delete Serve app {app_name!r}: {err}[/yellow]")


def _print_generate_summary(summary: Any) -> None:
    from moa_ray.eval.generate import group_failures
    from moa_ray.eval.schema import GenerationRow
    from moa_ray.eval.store import RowTable

    err_console.print(
        f"run {summary.run_id}: {summary.ok_rows} rows ok, {summary.failed_rows} failed, {summary.skipped_rows} skipped (done before) "
        f"in {summary.elapsed_s:.1f}s ({summary.items_per_s:.2f} prompts/s, {summary.rows_per_s:.2f} rows/s, {summary.workers} workers)",
        highlight=False,
    )
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
    err_console.print(table)
    if summary.failed_rows or any(p.failed for p in summary.pipelines):
        for message, n in group_failures(RowTable(summary.out, GenerationRow).latest()):
            err_console.print(f"  {n} x {message}", highlight=False)


# --------------------------------------------------------------------------- judge


@click.command("judge", cls=_EvalCommand)
@config_option
@click.option("--judge", "judge_model", required=True, help="Config name of the judge model (any backend).")
@click.option("--generations", required=True, help="Output directory of `eval generate`.")
@click.option("--out", required=True, help="Judgment directory (pairwise/ and single/ tables).")
@click.option(
    "--mode",
    type=click.Choice(["auto", "pairwise", "single", "rubric"]),
    default="auto",
    show_default=True,
    help="auto: MT-Bench is graded 1-10, FLASK / Just-Eval / CEB get their rubric judge, other prompts with a reference get pairwise preferences.",
)
@click.option("--pipeline", "pipeline_names", default=None, help="Only these pipelines (comma separated).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N prompts per pipeline.")
@concurrency_option
@workers_option
@worker_cpus_option
@address_option
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True, help="Judge output cap.")
@click.option("--run-id", default=None)
@click.option("--app-name", default="moa-eval-judge", show_default=True)
@keep_option
@flush_rows_option
@flush_s_option
@progress_option
def judge_command(
    config_path: str | None,
    judge_model: str,
    generations: str,
    out: str,
    mode: Literal["auto", "pairwise", "single", "rubric"],
    pipeline_names: str | None,
    limit: int | None,
    concurrency: int,
    workers: int | None,
    worker_cpus: float,
    address: str | None,
    max_tokens: int,
    run_id: str | None,
    app_name: str,
    keep_deployed: bool,
    flush_rows: int,
    flush_seconds: float,
    no_progress: bool,
) -> None:
    """Judge the answers in GENERATIONS with a model: pairwise vs the reference, or MT-Bench grades."""
    from moa_ray.config import load_config
    from moa_ray.eval.generate import new_run_id
    from moa_ray.eval.judge import JudgeOptions, pairwise_table, plan_judging, read_generations, run_judging, single_table
    from moa_ray.eval.rubric.plan import rubric_table

    config = load_config(config_path)
    if judge_model not in config.models:
        raise ConfigError(f"unknown judge model {judge_model!r} (known models: {', '.join(sorted(config.models))})")
    gens = read_generations(generations)
    if not gens:
        raise MoARayError(f"no generations in {generations}")
    options = JudgeOptions(
        judge=judge_model,
        generations=generations,
        out=out,
        mode=mode,
        pipelines=_names(pipeline_names),
        limit=limit,
        concurrency=concurrency,
        workers=workers,
        worker_cpus=worker_cpus,
        max_tokens=max_tokens,
        run_id=run_id or new_run_id(),
        flush_rows=flush_rows,
        flush_s=flush_seconds,
        progress=not no_progress,
    )
    items = plan_judging(
        gens,
        judge_model,
        pairwise_table(out).latest(),
        single_table(out).latest(),
        mode=options.mode,
        pipelines=options.pipelines,
        limit=limit,
        rubric_done=rubric_table(out).latest(),
    )
    err_console.print(f"{len(items)} judgments to make with {judge_model!r} -> {out}", highlight=False)
    agent = None
    if items:
        from moa_ray.eval.lease import WriterLease
        from moa_ray.runtime import deploy_models, init_ray

        WriterLease(out, options.run_id).check_free()  # refused before Ray starts and the judge deploys

        init_ray(address, models=[config.models[judge_model]])
    try:  # a deploy that fails half-way leaves no Serve app behind either
        if items:
            with err_console.status(f"starting Ray and deploying the judge {judge_model!r}..."):
                agent = deploy_models(config, [judge_model], app_name=app_name)[judge_model]
        summary = run_judging(gens, agent, options)  # type: ignore[arg-type]
    finally:
        if items and not keep_deployed:
            _delete_app(app_name)
    err_console.print(
        f"run {summary.run_id}: {summary.ok_rows} judgments ok, {summary.failed_rows} failed "
        f"({summary.pairwise_items} pairwise, {summary.single_items} single, {summary.rubric_items} rubric) in {summary.elapsed_s:.1f}s",
        highlight=False,
    )
    if summary.failed_rows:
        err_console.print("[yellow]some judgments failed; rerun the same command to retry them[/yellow]")
        sys.exit(EXIT_PARTIAL)


# --------------------------------------------------------------------------- report


@click.command("report", cls=_EvalCommand)
@click.option("--generations", required=True, help="Output directory of `eval generate`.")
@click.option("--judgments", default=None, help="Output directory of `eval judge`.")
@click.option("--out", required=True, help="Where to write report.md, report.csv, report.json and the PNG plots.")
@click.option("--judge", "judge_model", default=None, help="Judge whose judgments to use (needed when several judged).")
@click.option("--pipeline", "pipeline_names", default=None, help="Only these pipelines (comma separated).")
@click.option(
    "--glm-data",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Directory with AlpacaEval's instruction_difficulty.csv (and df_gamed.csv) for the official LC model.",
)
def report_command(
    generations: str, judgments: str | None, out: str, judge_model: str | None, pipeline_names: str | None, glm_data: str | None
) -> None:
    """Per pipeline: win rates, LC win rate, MT-Bench, FLASK, Just-Eval, CEB, tokens, cost, latency, TFLOPs; tables and plots."""
    from moa_ray.eval.judge import pairwise_table, read_generations, single_table
    from moa_ray.eval.metrics import GLMData
    from moa_ray.eval.report import build_report, rich_table, write_report
    from moa_ray.eval.rubric.plan import rubric_table
    from moa_ray.eval.rubric.report import build_rubric_tables, rich_rubric_table, write_rubric_report

    gens = read_generations(generations)
    if not gens:
        raise MoARayError(f"no generations in {generations}")
    pairwise: list[dict[str, Any]] = []
    grades: list[dict[str, Any]] = []
    rubric: list[dict[str, Any]] = []
    if judgments:
        pairwise = [r for r in pairwise_table(judgments).latest().values() if r["status"] == "ok"]
        grades = [r for r in single_table(judgments).latest().values() if r["status"] == "ok"]
        rubric = [r for r in rubric_table(judgments).latest().values() if r["status"] == "ok"]
        judges = sorted({r["judge"] for r in pairwise + grades + rubric})
        if judge_model is not None:
            if judge_model not in judges:
                raise MoARayError(f"no judgments by {judge_model!r} in {judgments} (judges: {', '.join(judges) or 'none'})")
            pairwise = [r for r in pairwise if r["judge"] == judge_model]
            grades = [r for r in grades if r["judge"] == judge_model]
            rubric = [r for r in rubric if r["judge"] == judge_model]
        for kind, rows_of_kind in (("pairwise", pairwise), ("single", grades), ("rubric", rubric)):
            kind_judges = sorted({r["judge"] for r in rows_of_kind})
            if len(kind_judges) > 1:
                raise MoARayError(
                    f"{judgments} holds {kind} judgments of several judges ({', '.join(kind_judges)}); choose one with --judge"
                )
    rows = build_report(gens, pairwise, grades, pipelines=_names(pipeline_names), glm_data=GLMData.from_dir(glm_data) if glm_data else None)
    make_console(stderr=False).print(rich_table(rows))
    for path in write_report(rows, out):
        err_console.print(f"wrote {path}", highlight=False)
    rubric_tables = build_rubric_tables(gens, rubric, pipelines=_names(pipeline_names))
    for table in rubric_tables:
        make_console(stderr=False).print(rich_rubric_table(table))
    for path in write_rubric_report(rubric_tables, out):
        err_console.print(f"wrote {path}", highlight=False)


# --------------------------------------------------------------------------- metrics


@click.command("metrics", cls=_EvalCommand)
@click.option("--annotations", required=True, help="AlpacaEval annotations (.json, .jsonl[.gz]) or a moa-ray pairwise table/Parquet file.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON: win_rate, standard_error, discrete_win_rate, lc_win_rate, avg_length, n_total.",
)
@click.option(
    "--glm-data",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Directory with AlpacaEval's instruction_difficulty.csv (and df_gamed.csv) for the official LC model.",
)
@click.option("--no-lc", is_flag=True, help="Skip the length-controlled win rate.")
def metrics_command(annotations: str, as_json: bool, glm_data: str | None, no_lc: bool) -> None:
    """AlpacaEval win rate, standard error, discrete and length-controlled win rate of annotations."""
    from moa_ray.eval.metrics import GLMData, read_records, win_rates

    results = win_rates(read_records(annotations), glm_data=GLMData.from_dir(glm_data) if glm_data else None, lc=not no_lc)
    if as_json:
        payload: Any = next(iter(results.values())).public() if len(results) == 1 else {g: r.public() for g, r in results.items()}
        click.echo(json.dumps(payload))
        return
    table = Table(title=f"AlpacaEval metrics of {annotations}")
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
    make_console(stderr=False).print(table)


for _command in (generate_command, judge_command, report_command, metrics_command):
    eval_group.add_command(_command)
