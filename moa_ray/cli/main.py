"""The ``moa-ray`` group: run a pipeline, inspect configs and packaged models (``eval`` and ``serve`` register here)."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import click

from moa_ray.cli.errors import ReportingGroup
from moa_ray.cli.eval import eval_group
from moa_ray.cli.options import address_option, config_option, json_option, max_tokens_option, timeout_option
from moa_ray.cli.render import call_view, calls_view, err_console, trace_view
from moa_ray.cli.serve import serve_group
from moa_ray.config import DEFAULT_PIPELINE, dump_config, load_config
from moa_ray.errors import MoARayError, PipelineError
from moa_ray.pipeline.base import CallEvent, PipelineResult

if TYPE_CHECKING:
    from moa_ray.chat import ChatParams
    from moa_ray.pipeline.base import Pipeline
    from moa_ray.pipeline.trace import TraceDetail


@click.group(cls=ReportingGroup)
@click.version_option(package_name="moa-ray")
def main() -> None:
    """Mixture-of-Agents and Sparse Mixture-of-Agents on Ray Serve."""


@main.command()
@click.argument("prompt")
@config_option
@click.option("--pipeline", "pipeline_name", default=DEFAULT_PIPELINE, show_default=True, help="Pipeline name.")
@address_option(help="Ray cluster address to join (default: start a local Ray).")
@json_option(help="Print one JSON object: answer, pipeline and trace.")
@click.option(
    "--trace",
    "trace_detail",
    type=click.Choice(["summary", "full"]),
    default="summary",
    show_default=True,
    help="How much of the trace to show: summary (calls, tokens, seconds) or full (each call's text too: with --json, "
    "in the JSON's trace; without, a panel per call before the final one, after the answer).",
)
@click.option(
    "--show-layers",
    is_flag=True,
    help="Show each call's answer live, as it ends (proposers, judge and moderator verdicts), on stderr; the answer still goes to stdout.",
)
@max_tokens_option
@timeout_option(help="Seconds the answer may take, every call and retry included.")
@click.option("--roles-dataset", default=None, help="SMoA role-playing: describe the dataset the prompts come from.")
@click.option("--roles-task", default=None, help="SMoA role-playing: describe the task (roles are generated once, then cached).")
def run(
    prompt: str,
    config_path: str | None,
    pipeline_name: str,
    address: str | None,
    as_json: bool,
    trace_detail: TraceDetail,
    show_layers: bool,
    max_tokens: int | None,
    timeout_s: float,
    roles_dataset: str | None,
    roles_task: str | None,
) -> None:
    """Answer PROMPT with a pipeline (its models deployed on Ray Serve, or called from this process).

    \b
    moa-ray run PROMPT --show-layers        each layer's answers live, then the answer
    moa-ray run PROMPT --trace full --json  one JSON object whose trace holds every call's text
    moa-ray run PROMPT --trace full         the answer, then each call's text, then the tables
    """
    from moa_ray.chat import ChatParams
    from moa_ray.session import Session

    if not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="PROMPT")
    config = load_config(config_path)
    config.pipeline(pipeline_name)  # fail on an unknown name before Ray starts
    if roles_dataset or roles_task:
        from moa_ray.pipeline.roles import override_roles

        config = override_roles(config, pipeline_name, roles_dataset, roles_task)
    params = ChatParams(max_tokens=max_tokens) if max_tokens else None
    # Ray only for models that need a deployment (remote models are called from here); a local Ray ends with the run,
    # a joined cluster keeps the agents application for the next run.
    with Session(config, address=address) as session:
        if config.deployed_models(config.models_for([pipeline_name])):
            with err_console.status(f"starting Ray and deploying the models of {pipeline_name!r}..."):
                session.prepare([pipeline_name])
        with err_console.status(f"running {pipeline_name!r}..."):
            try:
                if show_layers:
                    result = asyncio.run(_run_live(session.pipeline(pipeline_name), prompt, params, timeout_s))
                else:
                    result = session.run(pipeline_name, prompt, params, timeout_s=timeout_s)
            except PipelineError as err:
                if as_json and err.trace is not None:
                    click.echo(json.dumps({"error": str(err), "pipeline": pipeline_name, "trace": err.trace.to_json_dict(trace_detail)}))
                raise
        if as_json:  # shown before the session releases its Ray
            click.echo(json.dumps({"answer": result.answer, "pipeline": pipeline_name, "trace": result.trace.to_json_dict(trace_detail)}))
            return
        click.echo(result.answer)
        if trace_detail == "full" and not show_layers:  # the live view showed them already
            err_console.print(calls_view(result.trace))
        err_console.print(trace_view(result.trace))


async def _run_live(pipeline: Pipeline, prompt: str, params: ChatParams | None, timeout_s: float) -> PipelineResult:
    """Run ``pipeline``, printing each call before the final one to stderr the moment it ends (the stream bounded by
    the request's deadline: :func:`moa_ray.session.stream_within`)."""
    from moa_ray.session import stream_within

    async for item in stream_within(pipeline, prompt, params, timeout_s=timeout_s, call_events=True):
        if isinstance(item, CallEvent):
            err_console.print(call_view(item.record))
        elif isinstance(item, PipelineResult):
            return item
    raise MoARayError(f"pipeline {pipeline.name!r} ended without a result")  # pragma: no cover - the stream ends with one


@main.group()
def config() -> None:
    """Validate and show configs (no Ray needed)."""


@config.command("validate")
@click.argument("path", type=click.Path(dir_okay=False))
def config_validate(path: str) -> None:
    """Check PATH: schema, references between models and pipelines, value ranges."""
    cfg = load_config(path)
    click.echo(f"ok: {len(cfg.models)} models, {len(cfg.pipelines)} pipelines ({', '.join(cfg.pipelines)})")


@config.command("show")
@click.argument("path", type=click.Path(dir_okay=False), required=False)
def config_show(path: str | None) -> None:
    """Print the config at PATH (default: the shipped presets) with defaults filled in."""
    click.echo(dump_config(load_config(path)), nl=False)


@main.group()
def models() -> None:
    """Models shipped inside PyPI packages (no download at run time)."""


@models.command("list")
def models_list() -> None:
    """The packaged model aliases, their GGUF files, and whether each has its vLLM folder yet."""
    from moa_ray.packaged_models import PACKAGED_MODELS, hf_folder, is_prepared, resolve_model_path

    for alias in PACKAGED_MODELS:
        folder = hf_folder(alias)
        state = f"vLLM folder: {folder}" if is_prepared(folder) else "vLLM folder: not prepared (moa-ray models prepare)"
        click.echo(f"{alias}\tGGUF: {resolve_model_path(alias)}\t{state}")


@models.command("prepare")
@click.argument("alias", default="smollm2-135m-instruct")
def models_prepare(alias: str) -> None:
    """Make the Hugging Face folder vLLM loads from ALIAS's packaged GGUF (once; cached in $MOA_RAY_CACHE_DIR)."""
    from moa_ray.packaged_models import hf_folder, is_prepared, prepare_hf_folder

    if is_prepared(hf_folder(alias)):
        click.echo(f"{alias}: already prepared at {hf_folder(alias)}")
        return
    with err_console.status(f"converting {alias} to a Hugging Face folder (about 30 s)..."):
        folder = prepare_hf_folder(alias)
    click.echo(f"{alias}: prepared at {folder}")


main.add_command(eval_group)
main.add_command(serve_group)
