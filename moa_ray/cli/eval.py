"""``moa-ray eval generate | judge | report | metrics`` (also ``python -m jobs.<name>`` for Ray Jobs).

Every input is validated (config, pipeline names, dataset, existing output) before
Ray starts, so a typo costs seconds, not a cluster start.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, Literal

import click

from moa_ray.cli.errors import EXIT_PARTIAL, ReportingCommand
from moa_ray.cli.options import address_option, app_name_option, config_option, json_option, max_tokens_option, timeout_option
from moa_ray.cli.render import err_console, make_console
from moa_ray.errors import ConfigError, MoARayError

if TYPE_CHECKING:
    from moa_ray.eval.generate import GenerateSummary
    from moa_ray.eval.judging import StoredAnswers

DATASET_HELP = (
    "alpaca_eval, mt_bench, flask, flask-hard, just-eval, ceb-s, ceb-t, gsm8k, "
    "or a .jsonl / .json / .parquet file (path or URI) with an id and a prompt column."
)


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise click.BadParameter("give at least one name")
    if len(set(names)) != len(names):
        raise click.BadParameter(f"a name is repeated in {value!r}")
    return names


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
generations_option = click.option("--generations", required=True, help="Output directory of `eval generate`.")
only_pipelines_option = click.option("--pipeline", "pipeline_names", default=None, help="Only these pipelines (comma separated).")
glm_data_option = click.option(
    "--glm-data",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Directory with AlpacaEval's instruction_difficulty.csv (and df_gamed.csv) for the official LC model.",
)
flush_s_option = click.option(
    "--flush-seconds",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Batch results for S seconds per part file: a kill loses the work in flight and at most the last S seconds of "
    "results (0: write each batch as it arrives, at the cost of a part file per batch, which a fast run pays for in CPU).",
)


@click.group("eval")
def eval_group() -> None:
    """Evaluation jobs: generate answers, judge them, report metrics (Parquet, resumable)."""


# --------------------------------------------------------------------------- generate


@click.command("generate", cls=ReportingCommand)
@config_option
@click.option("--pipeline", "pipeline_names", required=True, help="Pipeline name(s), comma separated; they share the deployed models.")
@click.option("--dataset", required=True, help=DATASET_HELP)
@click.option("--out", required=True, help="Output directory or pyarrow filesystem URI (s3://, gs://...).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N prompts (not with --sample).")
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    default=None,
    help="A seeded random N prompts, kept in the dataset's order (SMoA's --sample_num); the same N and --seed give "
    "the same prompts, so a rerun resumes. Not with --limit.",
)
@click.option("--seed", type=int, default=None, help="Seed of --sample [default: 0].")
@concurrency_option
@workers_option
@worker_cpus_option
@address_option()
@click.option("--id-column", default=None, help="Id column of a dataset file [default: id, prompt_id, question_id or uid].")
@click.option(
    "--prompt-column",
    default=None,
    help="Prompt column of a dataset file [default: prompt, instruction, question, turns or input].",
)
@max_tokens_option
@timeout_option(help="Seconds each answer may take, all its calls and retries included; a late one is a failed row, retried next run.")
@click.option(
    "--temperature",
    type=click.FloatRange(0.0, 2.0),
    default=None,
    help="Force this temperature on the answering call of every prompt [default: FastChat's per-category "
    "temperatures for mt_bench (0.7 writing/roleplay, 0.1 stem/humanities, 0 otherwise), the models' own elsewhere].",
)
@click.option(
    "--export-alpaca-eval",
    "export_path",
    default=None,
    help="Also write AlpacaEval model_outputs.json here ({pipeline} is replaced).",
)
@click.option("--run-id", default=None, help="Id recorded in the rows of this run [default: random].")
@app_name_option("moa-eval", help="Ray Serve application of the agents.")
@click.option("--allow-config-change", is_flag=True, help="Resume even if the pipeline's settings changed since the stored answers.")
@click.option(
    "--reuse-sampled",
    is_flag=True,
    help="Reuse sampled calls too (temperature > 0 and no seed): one stored sample per identical call, as the MoA paper's "
    "evaluation did. Deterministic calls (temperature 0, or a seed) are always reused.",
)
@click.option(
    "--calls-from",
    "calls_from",
    multiple=True,
    help="Another generations directory whose stored calls (its _calls/) this run may reuse (repeatable).",
)
@click.option(
    "--references-from",
    "references_from",
    multiple=True,
    help="The original MoA code's round file (AlpacaEval model_outputs.json of one reference model; its generator names the "
    "model) to reuse as that proposer's layer-1 answers (repeatable).",
)
@click.option("--no-call-store", is_flag=True, help="Keep no call texts in <out>/_calls/ and reuse no call.")
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
    sample: int | None,
    seed: int | None,
    concurrency: int,
    workers: int | None,
    worker_cpus: float,
    address: str | None,
    id_column: str | None,
    prompt_column: str | None,
    max_tokens: int | None,
    timeout_s: float,
    temperature: float | None,
    export_path: str | None,
    run_id: str | None,
    app_name: str,
    allow_config_change: bool,
    reuse_sampled: bool,
    calls_from: tuple[str, ...],
    references_from: tuple[str, ...],
    no_call_store: bool,
    keep_deployed: bool,
    flush_rows: int,
    flush_seconds: float,
    no_progress: bool,
) -> None:
    """Answer every prompt of DATASET with each pipeline, into Parquet; rerun to resume.

    Every call's text is kept in OUT/_calls/, and a call already made (here, in --calls-from, or imported with
    --references-from) is answered from there instead of again."""
    from moa_ray.config import load_config
    from moa_ray.eval.benchmarks.registry import open_dataset
    from moa_ray.eval.generate import GenerateOptions, export_alpaca_eval, new_run_id, prepare_generation, run_generation

    if limit is not None and sample is not None:
        raise click.UsageError("--limit (the first N prompts) and --sample (a seeded random N) exclude each other; use one")
    if seed is not None and sample is None:
        raise click.UsageError("--seed only applies to --sample")
    pipelines = _names(pipeline_names) or []
    config = load_config(config_path)
    for name in pipelines:
        config.pipeline(name)
    data = open_dataset(dataset, limit=limit, sample=sample, seed=seed or 0, id_column=id_column, prompt_column=prompt_column)
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
        timeout_s=timeout_s,
        temperature=temperature,
        allow_config_change=allow_config_change,
        progress=not no_progress,
        store_calls=not no_call_store,
        reuse_sampled=reuse_sampled,
        calls_from=list(calls_from),
        references_from=list(references_from),
    )
    if no_call_store and (reuse_sampled or calls_from or references_from):
        raise click.UsageError("--reuse-sampled, --calls-from and --references-from need the call store (drop --no-call-store)")
    prepared = prepare_generation(config, data, options)
    plan = prepared.plan
    subset = f" (sample of {sample}, seed {seed or 0})" if sample is not None else ""
    err_console.print(
        f"{data.name}{subset}: {data.count()} prompts x {len(pipelines)} pipeline(s) = {plan.total_rows} rows, "
        f"{plan.done_rows} already done, {plan.pending_rows} to generate -> {out}",
        highlight=False,
    )
    summary = None
    if plan.pending_rows:
        from moa_ray.eval.lease import WriterLease
        from moa_ray.session import Session

        WriterLease(out, options.run_id).check_free()  # refused before Ray starts and models deploy

        # Its agents app leaves a joined cluster on exit (unless kept), even after a deploy that failed half-way.
        with Session(config, address=address, app_name=app_name, keep_deployed=keep_deployed) as session:
            session.start_ray(config.models_for(pipelines))  # the workers are Ray actors, whatever the models
            with err_console.status(f"starting Ray and deploying the models of {', '.join(pipelines)}..."):
                agents = session.agents(pipelines)
            summary = run_generation(config, data, agents, options, prepared)
    else:
        summary = run_generation(config, data, {}, options, prepared)  # nothing to run: compacts and summarises
    _print_generate_summary(summary)
    if export_path:
        for target, n in export_alpaca_eval(out, data, pipelines, export_path).items():
            err_console.print(f"wrote {n} AlpacaEval outputs to {target}", highlight=False)
    if not summary.complete:
        err_console.print("[yellow]some rows failed or are missing; rerun the same command to retry them[/yellow]")
        sys.exit(EXIT_PARTIAL)


def _print_generate_summary(summary: GenerateSummary) -> None:
    from moa_ray.eval.summary_tables import generate_summary_table

    err_console.print(
        f"run {summary.run_id}: {summary.ok_rows} rows ok, {summary.failed_rows} failed, {summary.skipped_rows} skipped (done before) "
        f"in {summary.elapsed_s:.1f}s ({summary.items_per_s:.2f} prompts/s, {summary.rows_per_s:.2f} rows/s, "
        f"{summary.workers} workers on {summary.nodes} node{'' if summary.nodes == 1 else 's'})",
        highlight=False,
    )
    err_console.print(generate_summary_table(summary))
    if summary.calls is not None:
        c = summary.calls
        saved = "unknown (a model has no pricing)" if c.saved_cost_usd is None else f"{c.saved_cost_usd:.4f} USD"
        err_console.print(
            f"calls: {c.made} made ({c.failed} failed), {c.reused} reused from the call store, cost saved {saved}", highlight=False
        )
    if summary.failed_rows or any(p.failed for p in summary.pipelines):
        for message, n in summary.failures:
            err_console.print(f"  {n} x {message}", highlight=False)


# --------------------------------------------------------------------------- judge


@click.command("judge", cls=ReportingCommand)
@config_option
@click.option(
    "--judge",
    "judge_model",
    default=None,
    help="Config name of the judge model (any backend); not needed when every answer is scored by exact match (gsm8k).",
)
@generations_option
@click.option("--out", required=True, help="Judgment directory (pairwise/, single/ and exact/ tables).")
@click.option(
    "--mode",
    type=click.Choice(["auto", "pairwise", "single", "pairwise-baseline", "alpaca-eval-official", "rubric", "exact"]),
    default="auto",
    show_default=True,
    help="auto: each dataset its own way - gsm8k by exact match into OUT/exact (no judge), flask, flask-hard, just-eval, "
    "ceb-s and ceb-t by their rubric judges into OUT/rubric, mt_bench graded 1-10 (single), other prompts with a reference "
    "(alpaca_eval) by pairwise preference; single / pairwise: force that mode; pairwise-baseline: FastChat's pairwise games "
    "against --baseline; alpaca-eval-official: AlpacaEval 2's weighted_alpaca_eval_gpt4_turbo; rubric: only the rubric "
    "judges; exact: only the exact-match scoring.",
)
@click.option("--baseline", default=None, help="pairwise-baseline: the pipeline of the same generations to compare with.")
@click.option(
    "--judge-repeats",
    type=click.IntRange(1, 15),
    default=1,
    show_default=True,
    help="single (and auto's MT-Bench grades): grade each turn K times and keep the median (FastChat #3018).",
)
@only_pipelines_option
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N prompts per pipeline.")
@concurrency_option
@workers_option
@worker_cpus_option
@address_option()
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True, help="Judge output cap.")
@click.option(
    "--proposers",
    is_flag=True,
    help="Also judge each stored layer-1 answer (GENERATIONS/_calls) as an entry of its own, proposer:<label>: every "
    "proposer beside the pipelines it fed, with no new generation call.",
)
@click.option("--run-id", default=None)
@app_name_option("moa-eval-judge")
@keep_option
@flush_rows_option
@flush_s_option
@progress_option
def judge_command(
    config_path: str | None,
    judge_model: str | None,
    generations: str,
    out: str,
    mode: Literal["auto", "pairwise", "single", "pairwise-baseline", "alpaca-eval-official", "rubric", "exact"],
    baseline: str | None,
    judge_repeats: int,
    pipeline_names: str | None,
    limit: int | None,
    concurrency: int,
    workers: int | None,
    worker_cpus: float,
    address: str | None,
    max_tokens: int,
    proposers: bool,
    run_id: str | None,
    app_name: str,
    keep_deployed: bool,
    flush_rows: int,
    flush_seconds: float,
    no_progress: bool,
) -> None:
    """Judge the answers in GENERATIONS with a model: pairwise vs the reference or a baseline pipeline,
    MT-Bench grades, or AlpacaEval's official annotator; GSM8K by exact match, without a model."""
    from moa_ray.config import load_config
    from moa_ray.eval.generate import new_run_id
    from moa_ray.eval.judging import JudgeOptions, StoredAnswers, check_mode_options, count_planned, run_judging, split_exact_match

    config = load_config(config_path)
    if judge_model is not None and judge_model not in config.models:
        raise ConfigError(f"unknown judge model {judge_model!r} (known models: {', '.join(sorted(config.models))})")
    pipelines = _names(pipeline_names)
    if mode != "exact":  # exact match needs no judge model and has no options of its own
        check_mode_options(mode, baseline, judge_repeats, pipelines)
    answers = StoredAnswers(generations, proposers=proposers)  # read a range of prompts at a time
    click.get_current_context().call_on_close(answers.close)  # its files set aside, removed however the command ends
    datasets = answers.datasets()
    if not datasets:
        raise MoARayError(f"no generations in {generations}")
    run_id = run_id or new_run_id()
    split = split_exact_match(mode, datasets)
    if split.for_judge and judge_model is None:
        if not split.scores:
            raise click.UsageError(f"--judge is needed for --mode {mode}")
        raise click.UsageError(f"--judge is needed for the answers to {', '.join(split.for_judge)} (only gsm8k is scored by exact match)")
    if split.scores:
        _score_exact_match(answers, out, run_id, pipelines, limit, last=not split.for_judge)
    if not split.for_judge:
        return
    assert judge_model is not None and mode != "exact"  # both settled by the split: exact leaves nothing to a judge
    options = JudgeOptions(
        judge=judge_model,
        generations=generations,
        out=out,
        mode=mode,
        baseline=baseline,
        repeats=judge_repeats,
        pipelines=pipelines,
        limit=limit,
        concurrency=concurrency,
        workers=workers,
        worker_cpus=worker_cpus,
        max_tokens=max_tokens,
        run_id=run_id,
        flush_rows=flush_rows,
        flush_s=flush_seconds,
        progress=not no_progress,
    )
    items = count_planned(answers, options)
    err_console.print(f"{items} judgments to make with {judge_model!r} -> {out}", highlight=False)
    agent = None
    if items:
        from moa_ray.eval.lease import WriterLease

        WriterLease(out, options.run_id).check_free()  # refused before Ray starts and the judge deploys
    from moa_ray.session import Session

    # Its judge app leaves a joined cluster on exit (unless kept), even after a deploy that failed half-way.
    with Session(config, address=address, app_name=app_name, keep_deployed=keep_deployed) as session:
        if items:
            session.start_ray([judge_model])
            with err_console.status(f"starting Ray and deploying the judge {judge_model!r}..."):
                agent = session.agents(models=[judge_model])[judge_model]
        summary = run_judging(answers, agent, options)  # type: ignore[arg-type]
    err_console.print(
        f"run {summary.run_id}: {summary.ok_rows} judgments ok, {summary.failed_rows} failed "
        f"({summary.pairwise_items} pairwise, {summary.single_items} single, {summary.baseline_items} pairwise-baseline, "
        f"{summary.official_items} alpaca-eval-official, {summary.rubric_items} rubric) in {summary.elapsed_s:.1f}s",
        highlight=False,
    )
    for path, n in summary.annotation_files.items():
        err_console.print(f"wrote {n} AlpacaEval annotations to {path}", highlight=False)
    if summary.failed_rows:
        err_console.print("[yellow]some judgments failed; rerun the same command to retry them[/yellow]")
        sys.exit(EXIT_PARTIAL)


def _score_exact_match(
    answers: StoredAnswers, out: str, run_id: str, pipelines: list[str] | None, limit: int | None, *, last: bool
) -> None:
    """Score the exact-match answers (gsm8k) without a judge; ``last``: nothing is left for a judge model, so
    answers that could not be scored end the command as partial."""
    from moa_ray.eval.judging import run_exact

    summary = run_exact(answers, out, run_id, pipelines=pipelines, limit=limit)
    err_console.print(
        f"exact match: {summary.scored} answers scored ({summary.correct} correct, {summary.failed} failed), "
        f"{summary.done_before} scored before -> {out}/exact",
        highlight=False,
    )
    if summary.failed:
        err_console.print("[yellow]some answers could not be scored (see the error column of OUT/exact)[/yellow]")
        if last:
            sys.exit(EXIT_PARTIAL)


# --------------------------------------------------------------------------- report


@click.command("report", cls=ReportingCommand)
@generations_option
@click.option("--judgments", default=None, help="Output directory of `eval judge`.")
@click.option("--out", required=True, help="Where to write report.md, report.csv, report.json and the PNG plots.")
@click.option("--judge", "judge_model", default=None, help="Judge whose judgments to use (needed when several judged).")
@only_pipelines_option
@glm_data_option
@click.option(
    "--annotator",
    type=click.Choice(["pairwise", "alpaca-eval-official"]),
    default=None,
    help="AlpacaEval win rates from pair-v2 preferences or the official annotator [default: the one judged].",
)
@click.option(
    "--proposers/--no-proposers",
    default=True,
    show_default=True,
    help="A row per stored layer-1 answer's proposer (proposer:<label>, from GENERATIONS/_calls) beside the pipelines; "
    "its quality columns fill where `eval judge --proposers` judged it.",
)
def report_command(
    generations: str,
    judgments: str | None,
    out: str,
    judge_model: str | None,
    pipeline_names: str | None,
    glm_data: str | None,
    annotator: str | None,
    proposers: bool,
) -> None:
    """Per pipeline: win rates, LC win rate, MT-Bench, GSM8K, FLASK, Just-Eval, CEB, tokens, cost, latency, TFLOPs; tables and plots."""
    from moa_ray.eval.benchmarks.rubric import RUBRIC_MODE
    from moa_ray.eval.judging import Judgments, read_judgments, read_report_answers
    from moa_ray.eval.metrics import GLMData
    from moa_ray.eval.report import benchmark_reports, benchmark_tables, rich_table, write_report
    from moa_ray.eval.tables import rich_benchmark_table, write_benchmark_tables

    gens = read_report_answers(generations, proposers=proposers)  # Arrow: a few numbers per answer, no Python row
    if not gens.num_rows:
        raise MoARayError(f"no generations in {generations}")
    judged = read_judgments(judgments, judge_model, annotator, for_report=True) if judgments else Judgments()
    glm = GLMData.from_dir(glm_data) if glm_data else None
    reports = benchmark_reports(gens, judged, out, pipelines=_names(pipeline_names), glm_data=glm)
    for report in reports:  # each printed and written as it is built
        make_console(stderr=False).print(rich_table(report.rows, title="moa-ray evaluation" + (f": {report.name}" if report.name else "")))
        for path in write_report(report.rows, report.out):
            err_console.print(f"wrote {path}", highlight=False)
    own_tables = benchmark_tables(gens, {RUBRIC_MODE: judged.rubric, **judged.others}, pipelines=_names(pipeline_names))
    for table in own_tables:
        make_console(stderr=False).print(rich_benchmark_table(table))
    for path in write_benchmark_tables(own_tables, out):
        err_console.print(f"wrote {path}", highlight=False)


# --------------------------------------------------------------------------- metrics


@click.command("metrics", cls=ReportingCommand)
@click.option("--annotations", default=None, help="AlpacaEval annotations (.json, .jsonl[.gz]) or a moa-ray pairwise table/Parquet file.")
@click.option(
    "--just-eval",
    "just_eval_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="A Just-Eval judged-output file (JSON list with parsed_result): total, <aspect>_mean, avg_lens as just_eval --report_only.",
)
@click.option(
    "--dataset",
    "outputs_dataset",
    type=click.Choice(["gsm8k"]),
    default=None,
    help="Score --outputs against this exact-match benchmark (no judge).",
)
@click.option(
    "--outputs",
    type=click.Path(dir_okay=False),
    default=None,
    help="AlpacaEval-style outputs (JSON list of instruction, output) to score with --dataset; matched by instruction text.",
)
@json_option(
    help="Print JSON: win_rate, standard_error, discrete_win_rate, lc_win_rate, avg_length, n_total "
    "(--just-eval: total, <aspect>_mean...; --dataset gsm8k: accuracy, standard_error, n, correct).",
)
@glm_data_option
@click.option("--no-lc", is_flag=True, help="Skip the length-controlled win rate.")
def metrics_command(
    annotations: str | None,
    just_eval_file: str | None,
    outputs_dataset: str | None,
    outputs: str | None,
    as_json: bool,
    glm_data: str | None,
    no_lc: bool,
) -> None:
    """Metrics of results made elsewhere: AlpacaEval annotations, Just-Eval judged outputs, or GSM8K outputs."""
    if (outputs_dataset is None) != (outputs is None):
        raise click.UsageError("--dataset and --outputs go together")
    modes = [m for m, given in (("--annotations", annotations), ("--just-eval", just_eval_file), ("--outputs", outputs)) if given]
    if len(modes) != 1:
        raise click.UsageError("give one of --annotations, --just-eval FILE, or --dataset gsm8k --outputs FILE")
    if just_eval_file is not None:
        _just_eval_metrics(just_eval_file, as_json)
        return
    if outputs is not None:
        _gsm8k_metrics(outputs, as_json)
        return
    assert annotations is not None
    from moa_ray.eval.metrics import GLMData, read_records, win_rates
    from moa_ray.eval.summary_tables import win_rates_table

    results = win_rates(read_records(annotations), glm_data=GLMData.from_dir(glm_data) if glm_data else None, lc=not no_lc)
    if as_json:
        payload: Any = next(iter(results.values())).public() if len(results) == 1 else {g: r.public() for g, r in results.items()}
        click.echo(json.dumps(payload))
        return
    make_console(stderr=False).print(win_rates_table(results, annotations))


def _just_eval_metrics(path: str, as_json: bool) -> None:
    from moa_ray.eval.benchmarks.just_eval import aggregate_file
    from moa_ray.eval.summary_tables import just_eval_table

    metrics = aggregate_file(path)
    if as_json:
        click.echo(json.dumps({**metrics, "output_file": path}))
        return
    make_console(stderr=False).print(just_eval_table(metrics, path))


def _gsm8k_metrics(path: str, as_json: bool) -> None:
    from moa_ray.eval.benchmarks.gsm8k import score_outputs_file
    from moa_ray.eval.summary_tables import gsm8k_table

    score = score_outputs_file(path)
    if as_json:
        click.echo(json.dumps(score.model_dump()))
        return
    make_console(stderr=False).print(gsm8k_table(score, path))


for _command in (generate_command, judge_command, report_command, metrics_command):
    eval_group.add_command(_command)
