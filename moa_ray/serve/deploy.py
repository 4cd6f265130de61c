"""Deploying the models a run needs as one Serve application, and their agents over the deployments' handles.

Ray must be up (:mod:`moa_ray.runtime` starts or joins it); a session (:mod:`moa_ray.session`) and the benchmarks
call this, the endpoint's ingress builds its own application (:mod:`moa_ray.serve.app`).
"""

from __future__ import annotations

import logging

from ray import serve

from moa_ray.config import MoARayConfig
from moa_ray.pipeline.agents import Agent, assemble_agents
from moa_ray.serve.builder import agent_deployment_name, agents_fingerprint, build_agents_app
from moa_ray.serve.handle import handle_agents

log = logging.getLogger(__name__)


def deploy_models(config: MoARayConfig, models: list[str], *, app_name: str = "moa-agents", http: bool = False) -> dict[str, Agent]:
    """Deploy ``models`` as one Serve application (one deployment each) and return their agents.

    Remote models with ``hosting: in_process`` get no deployment: their agents call the provider from
    this process (and from each Ray worker they are shipped to). Without any model to deploy, Serve is
    not even started. An application of that name that is running the same models with the same specs
    (left by an earlier run: ``moa-ray run --address``, ``eval generate --keep-deployed``) is reused as
    it is, so no replica restarts and no weights reload; any difference redeploys.
    """
    deployed = config.deployed_models(models)
    if not deployed:
        return assemble_agents(config, models, {})
    if not http:
        serve.start(proxy_location="Disabled")
    fingerprint = agents_fingerprint(config, deployed)
    if running_fingerprint(app_name) == fingerprint:
        log.info("reusing the running Serve application %r (same models and specs)", app_name)
    else:
        serve.run(build_agents_app(config, deployed, fingerprint), name=app_name, route_prefix=None)
    return assemble_agents(
        config, models, handle_agents({m: serve.get_deployment_handle(agent_deployment_name(m), app_name) for m in deployed})
    )


def running_fingerprint(app_name: str) -> str | None:
    """The fingerprint of a healthy agents application of that name, or None (absent, unhealthy, not ours)."""
    try:
        app = serve.status().applications.get(app_name)
        if app is None or app.status != "RUNNING":
            return None
        fingerprint: str = serve.get_app_handle(app_name).fingerprint.remote().result(timeout_s=30)
        return fingerprint
    except Exception:  # another kind of app, or one going away: deploy ours (and say why)
        log.info("cannot read the fingerprint of the running app %r; deploying anew", app_name, exc_info=True)
        return None


def deploy_agents(
    config: MoARayConfig,
    pipelines: list[str],
    *,
    app_name: str = "moa-agents",
    http: bool = False,
) -> dict[str, Agent]:
    """Deploy every model the named pipelines call (one Serve deployment each) and return their agents."""
    return deploy_models(config, list(config.models_for(pipelines)), app_name=app_name, http=http)
