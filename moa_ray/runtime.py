"""Starting or joining Ray, deploying the agents a run needs, and building its pipelines."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

from moa_ray.config import MoARayConfig, ModelSpecBase
from moa_ray.errors import ConfigError, missing_module_message
from moa_ray.pipeline.agents import Agent, HandleAgent, in_process_agents

log = logging.getLogger(__name__)


#: What a backend needs installed where its replicas run (the extra is :data:`moa_ray.errors.EXTRA_FOR_MODULE`'s).
BACKEND_MODULES = {"llamacpp": "llama_cpp", "vllm": "vllm"}


def check_local_extras(models: Iterable[ModelSpecBase]) -> None:
    """Before a local Ray starts: every backend the run deploys is installed here (one line naming the extra)."""
    for spec in models:
        backend = getattr(spec, "backend", "")
        module = BACKEND_MODULES.get(backend)
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"backend {backend!r}: {missing_module_message(module)}")


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True, models: Iterable[ModelSpecBase] = ()) -> None:
    """Join ``address`` (or RAY_ADDRESS), or start a local Ray, after checking that ``models`` can run here; idempotent."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "logging_level": logging.ERROR if quiet else logging.INFO}
    if quiet:
        kwargs["log_to_driver"] = False
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        check_local_extras(models)
        # Logical CPUs above the core count avoid actor-pool deadlocks on small machines;
        # the embedded model's threads are set by its config, not by this number.
        cpus = num_cpus or max(8, os.cpu_count() or 1)
        # "local": never attach to the latest `ray start` cluster of this machine by surprise.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, **kwargs)


def is_shared_cluster(address: str | None = None) -> bool:
    """Whether this process joins an existing cluster (``address`` or RAY_ADDRESS) rather than starting its own."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def release_ray(app_names: Iterable[str], *, shared: bool) -> None:
    """Leave Ray as found: delete our Serve apps from a shared cluster, or shut down Serve on our own; then disconnect."""
    import ray
    from ray import serve

    try:
        if shared:
            for name in app_names:
                serve.delete(name)
        else:
            serve.shutdown()
    finally:
        ray.shutdown()


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, apps: Iterable[str] = ()) -> Iterator[None]:
    """Ray for one command (a benchmark, a script): joined or started on entry, released on exit (:func:`release_ray`)."""
    init_ray(address, num_cpus=num_cpus)
    try:
        yield
    finally:
        release_ray(apps, shared=is_shared_cluster(address))


def deploy_models(config: MoARayConfig, models: list[str], *, app_name: str = "moa-agents", http: bool = False) -> dict[str, Agent]:
    """Deploy ``models`` as one Serve application (one deployment each) and return their agents.

    Remote models with ``hosting: in_process`` get no deployment: their agents call the provider from
    this process (and from each Ray worker they are shipped to). Without any model to deploy, Serve is
    not even started. An application of that name that is running the same models with the same specs
    (left by an earlier run: ``moa-ray run --address``, ``eval generate --keep-deployed``) is reused as
    it is, so no replica restarts and no weights reload; any difference redeploys.
    """
    agents: dict[str, Agent] = dict(in_process_agents(config, models))
    deployed = config.deployed_models(models)
    if not deployed:
        return agents
    from ray import serve

    from moa_ray.serve.builder import agent_deployment_name, agents_fingerprint, build_agents_app

    if not http:
        serve.start(proxy_location="Disabled")
    fingerprint = agents_fingerprint(config, deployed)
    if running_fingerprint(app_name) == fingerprint:
        log.info("reusing the running Serve application %r (same models and specs)", app_name)
    else:
        serve.run(build_agents_app(config, deployed, fingerprint), name=app_name, route_prefix=None)
    agents.update({m: HandleAgent(serve.get_deployment_handle(agent_deployment_name(m), app_name), m) for m in deployed})
    return {m: agents[m] for m in models}


def running_fingerprint(app_name: str) -> str | None:
    """The fingerprint of a healthy agents application of that name, or None (absent, unhealthy, not ours)."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
        if app is None or app.status != "RUNNING":
            return None
        return serve.get_app_handle(app_name).fingerprint.remote().result(timeout_s=30)
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
