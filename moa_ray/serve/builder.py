"""Builders: a config and the models a run needs -> Ray Serve applications."""

from __future__ import annotations

import hashlib
import json
from typing import Any, cast

from ray import serve
from ray.serve import Application

from moa_ray.backends.registry import descriptor_for
from moa_ray.config import MoARayConfig, ModelSpecBase
from moa_ray.serve.agent import AgentDeployment

AGENTS_APP = "moa-agents"


def agent_deployment_name(model: str) -> str:
    return f"agent-{model}"


#: Ray starts worker processes at niceness 15, below everything else on the machine. The ingress and the agents
#: serve latency-sensitive calls (the embedded model generates in an agent), so on a shared machine they would be
#: starved by any busy process; they run at the normal priority of the driver instead.
PRIORITY_ENV_VARS = {"RAY_worker_niceness": "0"}

#: moa-ray's own replicas (the ingress, the agents) run their async code on the replica's main event loop, and route
#: their handles' calls there too, instead of one thread for each: Ray Serve's knobs behind its
#: ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` mode. Their code never blocks that loop (a llama.cpp model generates in a
#: thread), and one Python thread per replica saves the GIL hand-offs and cross-loop hops of every request: at 20
#: requests in flight the ingress's p50 fell ~35 ms (bench/serve_load.py). Ray Serve LLM's vLLM replicas keep Ray's defaults.
SINGLE_LOOP_ENV_VARS = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def with_env_vars(options: dict[str, Any], env_vars: dict[str, str]) -> dict[str, Any]:
    """Deployment ``options`` whose replicas get ``env_vars`` in their runtime environment."""
    actor = dict(options.get("ray_actor_options") or {})
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env_vars}
    return {**options, "ray_actor_options": {**actor, "runtime_env": runtime_env}}


def ingress_deployment_options(config: MoARayConfig) -> dict[str, Any]:
    """The ingress's Serve deployment options: its config's scaling, at normal priority, on one event loop per replica."""
    return with_env_vars(config.server.ingress.deployment_options(), {**PRIORITY_ENV_VARS, **SINGLE_LOOP_ENV_VARS})


def agent_deployment_options(name: str, spec: ModelSpecBase) -> dict[str, Any]:
    """A model's Serve deployment options: its spec's placement and scaling, plus the agents' runtime environment.

    The one source for the app builder and the Serve config / KubeRay manifests, so they deploy alike.
    """
    own_options = descriptor_for(spec).deployment_options
    if own_options is not None:  # a deployment of the backend's own making (vLLM's LLMServer)
        return own_options(name, spec, PRIORITY_ENV_VARS)
    return with_env_vars(spec.deployment_options(), {**PRIORITY_ENV_VARS, **SINGLE_LOOP_ENV_VARS})


def build_agent(name: str, spec: ModelSpecBase) -> Application:
    """One model's deployment with the placement, replicas and concurrency of its spec.

    A backend that builds its own deployment does (vLLM models are Ray Serve LLM ``LLMServer`` deployments); every
    other backend runs in an :class:`AgentDeployment`. Both answer the same agent protocol under ``agent-<name>``.
    """
    build = descriptor_for(spec).build
    if build is not None:
        return cast(Application, build(name, spec, agent_deployment_name(name), PRIORITY_ENV_VARS))
    # serve.deployment makes the class a Deployment; Ray's typing keeps the class type, hence the ignores
    deployment = AgentDeployment.options(name=agent_deployment_name(name), **agent_deployment_options(name, spec))  # type: ignore[attr-defined]
    return cast(Application, deployment.bind(name, spec.model_dump(mode="json")))


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class AgentDirectory:
    """Root of the agents application: holds the agent deployments, lists them, and says what was deployed."""

    def __init__(self, fingerprint: str, **agents: Any) -> None:
        self._fingerprint = fingerprint
        self.agents = agents

    async def list_models(self) -> list[str]:
        return sorted(self.agents)

    async def fingerprint(self) -> str:
        return self._fingerprint


def agents_fingerprint(config: MoARayConfig, models: list[str]) -> str:
    """What an agents app deploys (each model's spec and deployment options), as a digest to compare runs by."""
    deployed = {
        name: [config.models[name].model_dump(mode="json"), agent_deployment_options(name, config.models[name])] for name in sorted(models)
    }
    return hashlib.sha256(json.dumps(deployed, sort_keys=True, default=str).encode()).hexdigest()


def build_agents_app(config: MoARayConfig, models: list[str], fingerprint: str) -> Application:
    """An application deploying ``models`` (one deployment each) under one :class:`AgentDirectory`.

    ``fingerprint`` is :func:`agents_fingerprint` of the same models, which the caller compares first.
    """
    agents = {name: build_agent(name, config.models[name]) for name in models}
    return cast(Application, AgentDirectory.bind(fingerprint, **agents))  # type: ignore[attr-defined]
