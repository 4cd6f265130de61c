"""The served application: one ingress whose children are the models' agent deployments (remote models
hosted ``in_process`` are called from the ingress replicas themselves).

``build_app`` is used by ``moa-ray serve``; ``app_builder`` is the import path a Serve
config names (``moa-ray serve build`` writes one for ``serve deploy`` and KubeRay's
``serveConfigV2``), rebuilding the same application from the config carried in
its ``args``. Both take every option from the config, so autoscaling, placement
and concurrency are the same whichever way the app is deployed.
"""

from typing import Any, cast

from pydantic import BaseModel, ConfigDict, model_validator
from ray.serve import Application

from moa_ray.config import MoARayConfig, load_config, parse_config
from moa_ray.errors import ConfigError
from moa_ray.serve.builder import agent_deployment_name, agent_deployment_options, build_agent, ingress_deployment_options
from moa_ray.serve.ingress import INGRESS_DEPLOYMENT, MoAIngress

DEFAULT_APP_NAME = "moa"
APP_BUILDER_IMPORT_PATH = "moa_ray.serve.app:app_builder"


def served_pipelines(config: MoARayConfig, pipelines: list[str] | None = None) -> list[str]:
    """The named pipelines (checked), or every pipeline of the config."""
    names = list(pipelines) if pipelines else list(config.pipelines)
    if not names:
        raise ConfigError("the config defines no pipeline to serve")
    from moa_ray.pipeline.factory import PIPELINE_KINDS

    for name in names:
        kind = config.pipeline(name).kind
        if kind not in PIPELINE_KINDS:
            raise ConfigError(f"pipeline {name!r} is of kind {kind!r}, which this moa-ray cannot run (kinds: {', '.join(PIPELINE_KINDS)})")
    return list(dict.fromkeys(names))


def build_app(config: MoARayConfig, pipelines: list[str] | None = None) -> Application:
    """The ingress bound to one agent deployment per model the served pipelines call."""
    names = served_pipelines(config, pipelines)
    agents = {model: build_agent(model, spec) for model, spec in config.models_for(names).items() if spec.deployed}
    ingress = MoAIngress.options(**ingress_deployment_options(config))  # type: ignore[attr-defined]  # a serve.deployment
    return cast(Application, ingress.bind(config.model_dump(mode="json", exclude_none=True), names, **agents))


class AppArgs(BaseModel):
    """``args`` of the Serve config: the moa-ray config inline (or a path on the cluster), and the pipelines."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] | None = None
    config_path: str | None = None
    pipelines: list[str] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "AppArgs":
        if self.config is not None and self.config_path is not None:
            raise ValueError("give either config or config_path, not both")
        return self

    def load(self) -> MoARayConfig:
        if self.config is not None:
            return parse_config(self.config, "<serve config args.config>")
        return load_config(self.config_path)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve application builder (``import_path: moa_ray.serve.app:app_builder``)."""
    parsed = AppArgs.model_validate(args)
    return build_app(parsed.load(), parsed.pipelines)


def deployment_options(config: MoARayConfig, pipelines: list[str]) -> list[dict[str, Any]]:
    """Per-deployment options of the app, as Serve config ``deployments`` entries."""
    out = [{"name": INGRESS_DEPLOYMENT, **ingress_deployment_options(config)}]
    for model, spec in config.models_for(pipelines).items():
        if spec.deployed:
            out.append({"name": agent_deployment_name(model), **agent_deployment_options(model, spec)})
    return out


def serve_config(
    config: MoARayConfig,
    pipelines: list[str] | None = None,
    *,
    app_name: str = DEFAULT_APP_NAME,
    route_prefix: str = "/",
    host: str = "127.0.0.1",
    port: int = 8000,
) -> dict[str, Any]:
    """A Serve config file (``serve deploy``, KubeRay ``serveConfigV2``) that rebuilds this app from ``config``."""
    names = served_pipelines(config, pipelines)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": app_name,
                "route_prefix": route_prefix,
                "import_path": APP_BUILDER_IMPORT_PATH,
                "args": {"config": config.model_dump(mode="json", exclude_none=True), "pipelines": names},
                "deployments": deployment_options(config, names),
            }
        ],
    }
