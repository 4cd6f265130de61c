"""``moa-ray serve``: run the OpenAI-compatible endpoint, or write deployment files for it.

moa-ray serve [--config FILE] [--host 127.0.0.1] [--port 8000] [--pipeline NAME ...] [--metrics-port PORT]
moa-ray serve build [--config FILE] -o serve.yaml
moa-ray serve k8s [--config FILE] --image IMAGE -o k8s/
moa-ray serve cluster-config [--config FILE] -o cluster.yaml
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import click
import yaml

from moa_ray.backends.registry import required_secret_envs
from moa_ray.cli.options import address_option, app_name_option, config_option
from moa_ray.cli.render import err_console
from moa_ray.config import MoARayConfig, load_config
from moa_ray.errors import MoARayError

pipelines_option = click.option(
    "--pipeline", "pipelines", multiple=True, help="Serve only this pipeline (repeatable; default: every pipeline)."
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warn_missing_provider_keys(config: MoARayConfig, pipelines: list[str]) -> None:
    for name, spec in config.models_for(pipelines).items():
        for env in required_secret_envs([spec]):
            if not os.environ.get(env):
                err_console.print(f"[yellow]warning:[/yellow] {env} is not set; calls to model {name!r} will be refused by its provider")


def _write_yaml(data: dict[str, Any], output: str, header: str) -> None:
    text = header + yaml.safe_dump(data, sort_keys=False)
    if output == "-":
        click.echo(text, nl=False)
        return
    Path(output).write_text(text)
    err_console.print(f"wrote {output}")


@click.group("serve", invoke_without_command=True)
@config_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP proxy binds (0.0.0.0 exposes it).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="HTTP port.")
@pipelines_option
@address_option(help="Ray cluster to deploy on (default: RAY_ADDRESS, else a local Ray).")
@app_name_option("moa", help="Serve application name.")
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port on which the local Ray exports every metric (moa-ray's, Serve's, vLLM's) at http://127.0.0.1:PORT/metrics.",
)
@click.pass_context
def serve_group(
    ctx: click.Context,
    config_path: str | None,
    host: str,
    port: int,
    pipelines: tuple[str, ...],
    address: str | None,
    app_name: str,
    metrics_port: int | None,
) -> None:
    """Serve pipelines behind an OpenAI-compatible API (model = pipeline name) until interrupted."""
    if ctx.invoked_subcommand is not None:
        return
    from moa_ray.serve.app import served_pipelines
    from moa_ray.serve.auth import load_api_keys

    config = load_config(config_path)
    names = served_pipelines(config, list(pipelines))
    keys = load_api_keys()  # a broken key file fails here, before Ray starts
    if not keys and not _is_loopback(host):
        err_console.print(
            f"[yellow]warning:[/yellow] binding {host} without client API keys: anyone who can reach it can spend your "
            "providers' tokens; set MOA_RAY_API_KEYS or MOA_RAY_API_KEYS_FILE"
        )
    _warn_missing_provider_keys(config, names)
    _run_server(config, names, host=host, port=port, address=address, app_name=app_name, auth=bool(keys), metrics_port=metrics_port)


def _run_server(
    config: MoARayConfig,
    names: list[str],
    *,
    host: str,
    port: int,
    address: str | None,
    app_name: str,
    auth: bool,
    metrics_port: int | None = None,
) -> None:
    import ray
    from ray import serve

    from moa_ray.runtime import METRICS_PORT_ENV, is_shared_cluster
    from moa_ray.serve import proxy
    from moa_ray.serve.app import build_app
    from moa_ray.session import Session

    local = not is_shared_cluster(address)
    if local:
        _check_port_free(host, port)  # before Ray starts: a taken port would fail the proxy's start deep in Serve
        if metrics_port is not None:
            _check_port_free("127.0.0.1", metrics_port)  # else Ray's metrics agent would fail to start, quietly
    elif metrics_port is not None:
        err_console.print(
            "[yellow]warning:[/yellow] --metrics-port applies to a local Ray; a joined cluster exports metrics on the "
            "ports its nodes were started with (ray start --metrics-export-port)"
        )

    # The session's Ray ends with the server (a local one is shut down; the app leaves a joined cluster), on errors too.
    env = proxy.local_env(config.server, host) if local else None
    if env is not None and metrics_port is not None:
        env[METRICS_PORT_ENV] = str(metrics_port)
    with Session(config, address=address, env=env, apps=[app_name]) as session:
        with err_console.status(f"starting Ray and deploying {len(config.models_for(names))} models + the ingress..."):
            session.start_ray(config.models_for(names))
            try:
                serve.start(http_options=proxy.http_options(config.server, host, port, local=local))
            except Exception as err:  # noqa: BLE001 - Ray raises its own task errors here; the last line says why
                last = [line for line in str(err).strip().splitlines() if line.strip()][-1:] or [type(err).__name__]
                raise MoARayError(f"Serve's HTTP proxy did not start on {host}:{port}: {last[0].strip()}") from None
            try:
                serve.run(build_app(config, names), name=app_name, route_prefix="/")
            except RuntimeError as err:  # a replica failed to start (backend, model file, key file on the cluster...)
                raise MoARayError(f"deploying {app_name!r} failed: {err}{_deployment_failures(app_name)}") from None
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        url = f"http://{host}:{port}/v1"
        err_console.print(f"serving {', '.join(names)} at {url} (client API keys: {'required' if auth else 'off'})", highlight=False)
        if local and metrics_port is not None:
            err_console.print(f"metrics: http://127.0.0.1:{metrics_port}/metrics", highlight=False)
        err_console.print(f"ray: {ray.get_runtime_context().gcs_address}; press Ctrl+C to stop", highlight=False)
        try:
            while not stop.wait(0.5):  # a timed wait lets the signal handlers run
                pass
        finally:
            err_console.print("stopping...")


def _check_port_free(host: str, port: int) -> None:
    """A clear error, before anything starts, when ``host:port`` cannot be bound (taken, or not this machine's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as err:
            raise MoARayError(f"cannot serve on {host}:{port}: {err.strerror or err} (choose another --port or --host)") from None


def _deployment_failures(app_name: str) -> str:
    """The last line of each unhealthy deployment's status message (usually the exception that stopped it)."""
    from ray import serve

    try:
        deployments = serve.status().applications[app_name].deployments
    except (KeyError, RuntimeError):
        return ""
    lines = []
    for name, status in deployments.items():
        if status.status != "HEALTHY" and status.message:
            last = [line for line in status.message.strip().splitlines() if line.strip()][-1]
            lines.append(f"\n  {name}: {last.strip()}")
    return "".join(lines)


@serve_group.command("build")
@config_option
@pipelines_option
@click.option("-o", "--output", default="-", show_default=True, help="File to write ('-' for stdout).")
@click.option("--host", default="127.0.0.1", show_default=True, help="http_options.host of the Serve config.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="http_options.port.")
@app_name_option("moa", help="Serve application name.")
def serve_build(config_path: str | None, pipelines: tuple[str, ...], output: str, host: str, port: int, app_name: str) -> None:
    """Write a Serve config (for `serve deploy`) that rebuilds the app from the config, with per-deployment options."""
    from moa_ray.serve.app import serve_config

    config = load_config(config_path)
    data = serve_config(config, list(pipelines), app_name=app_name, host=host, port=port)
    header = f"# Generated by `moa-ray serve build` from {config_path or 'the shipped presets'}. Deploy: serve deploy <this file>\n"
    _write_yaml(data, output, header)


@serve_group.command("k8s")
@config_option
@pipelines_option
@click.option("--image", required=True, help="Container image with moa-ray (and vLLM for GPU pools) installed.")
@click.option("--name", default="moa-ray", show_default=True, help="Name of the RayService / RayCluster.")
@click.option("--dataset", default="alpaca_eval", show_default=True, help="Dataset of the RayJob's evaluation run.")
@click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False), help="Directory for the manifests.")
def serve_k8s(config_path: str | None, pipelines: tuple[str, ...], image: str, name: str, dataset: str, output_dir: str) -> None:
    """Write KubeRay manifests: rayservice.yaml, raycluster.yaml and rayjob.yaml (one worker group per pool), and the
    monitoring beside them: podmonitor.yaml (prometheus-operator) and grafana-dashboard.json."""
    from moa_ray.serve import manifests
    from moa_ray.serve.dashboard import grafana_dashboard

    config = load_config(config_path)
    names = list(pipelines) or None
    source = config_path or "the shipped presets"
    header = f"# Generated by `moa-ray serve k8s` from {source}. Keys come from the Secret {manifests.SECRET_NAME}, never from here.\n"
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = {
        "rayservice.yaml": manifests.rayservice(config, names, image, name=name),
        "raycluster.yaml": manifests.raycluster(config, names, image, name=name),
        "rayjob.yaml": manifests.rayjob(config, names, image, name=f"{name}-eval", dataset=dataset),
    }
    for filename, doc in docs.items():
        (out / filename).write_text(manifests.dump_all([manifests.config_map(config), doc], header))
        err_console.print(f"wrote {out / filename}")
    monitoring = {
        "podmonitor.yaml": manifests.dump_all(
            [manifests.podmonitor(name)], "# Generated by `moa-ray serve k8s`: scrapes every moa-ray Ray pod.\n"
        ),
        "grafana-dashboard.json": json.dumps(grafana_dashboard(), indent=2) + "\n",
    }
    for filename, text in monitoring.items():
        (out / filename).write_text(text)
        err_console.print(f"wrote {out / filename}")


@serve_group.command("cluster-config")
@config_option
@pipelines_option
@click.option("--cluster-name", default="moa-ray", show_default=True)
@click.option("--region", default="us-west-2", show_default=True, help="AWS region of the launcher's provider section.")
@click.option("-o", "--output", default="-", show_default=True, help="File to write ('-' for stdout).")
def serve_cluster_config(config_path: str | None, pipelines: tuple[str, ...], cluster_name: str, region: str, output: str) -> None:
    """Write a Ray cluster launcher config (`ray up`): a head and one worker node type per agent pool."""
    from moa_ray.serve.manifests import launcher_config

    config = load_config(config_path)
    data = launcher_config(config, list(pipelines) or None, cluster_name=cluster_name, region=region)
    header = f"# Generated by `moa-ray serve cluster-config` from {config_path or 'the shipped presets'}. Start: ray up <this file>\n"
    _write_yaml(data, output, header)
