"""Cluster manifests from a config: Ray cluster launcher YAML and KubeRay RayCluster / RayService / RayJob.

Every model that names a ``pool`` asks Ray for one unit of that custom resource per
replica; the manifests give each pool its own node type (launcher) or worker group
(KubeRay) that declares the resource and the GPUs its models need, so each model's
replicas land on its own nodes. The RayService's ``serveConfigV2`` is
:func:`moa_ray.serve.app.serve_config` of the same config, so ``moa-ray serve``,
``serve deploy`` and KubeRay deploy the same application with the same options.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from typing import Any

import yaml

from moa_ray.backends.registry import required_secret_envs, secret_envs
from moa_ray.config import MoARayConfig, ModelSpecBase, dump_config
from moa_ray.errors import ConfigError
from moa_ray.serve import proxy
from moa_ray.serve.app import serve_config, served_pipelines
from moa_ray.serve.builder import agent_deployment_options

POOL_CAPACITY = 1000  # a pool resource marks nodes; a replica takes 1 unit; GPUs and CPUs limit the packing
NODE_GPU_SIZES = (1, 2, 4, 8)
CPU_NODE_CPUS = 8
RAY_VERSION = "2.60.0"
SECRET_NAME = "moa-ray-secrets"
CONFIG_MAP_NAME = "moa-ray-config"
CONFIG_MOUNT = "/etc/moa-ray"
#: The label on every Ray pod these manifests start (head and workers, served or evaluating): the PodMonitor selects it.
POD_LABELS = {"app.kubernetes.io/name": "moa-ray"}
#: The container port KubeRay adds to every Ray container for Ray's metrics export (``metrics-export-port`` 8080).
METRICS_PORT_NAME = "metrics"
AWS_INSTANCE_TYPES = {0: "m5.2xlarge", 1: "g5.2xlarge", 2: "g5.12xlarge", 4: "g5.12xlarge", 8: "g5.48xlarge"}


def _replica_bounds(spec: ModelSpecBase) -> tuple[int, int]:
    if spec.autoscaling is not None:
        return spec.autoscaling.min_replicas, spec.autoscaling.max_replicas
    return spec.num_replicas, spec.num_replicas


@dataclass
class Pool:
    """One pool: the nodes its models need (GPUs per node, how many nodes at least and at most)."""

    name: str
    models: list[str] = field(default_factory=list)
    node_gpus: int = 0
    min_nodes: int = 1
    max_nodes: int = 1

    @property
    def group_name(self) -> str:
        """A Kubernetes-safe name (lowercase, dashes)."""
        return self.name.lower().replace("_", "-").replace(".", "-")

    @property
    def ray_resources(self) -> dict[str, int]:
        return {self.name: POOL_CAPACITY}


def replica_footprint(name: str, spec: ModelSpecBase) -> tuple[float, float]:
    """(CPUs, GPUs) one replica of the model reserves: its placement-group bundles (vLLM), else its actor options."""
    options = agent_deployment_options(name, spec)
    bundles = options.get("placement_group_bundles") or [
        {"CPU": options["ray_actor_options"].get("num_cpus", 0), "GPU": options["ray_actor_options"].get("num_gpus", 0)}
    ]
    return sum(b.get("CPU", 0) for b in bundles), sum(b.get("GPU", 0) for b in bundles)


def pools_for(config: MoARayConfig, pipelines: list[str] | None = None) -> list[Pool]:
    """The pools the served models name, sized from their GPUs, CPUs and replica bounds."""
    names = served_pipelines(config, pipelines)
    by_pool: dict[str, list[tuple[str, ModelSpecBase, float, float]]] = {}
    for model, spec in config.models_for(names).items():
        cpus, gpus = replica_footprint(model, spec)
        if spec.pool is None:
            if gpus:
                raise ConfigError(f"models.{model}: it needs GPUs but names no pool; give it a pool so the manifests provide nodes for it")
            continue
        by_pool.setdefault(spec.pool, []).append((model, spec, cpus, gpus))
    out = []
    for name, members in by_pool.items():
        biggest = max(math.ceil(gpus) for *_, gpus in members)
        node_gpus = next((n for n in NODE_GPU_SIZES if n >= biggest), None) if biggest else 0
        if node_gpus is None:
            raise ConfigError(f"pool {name}: a replica needs {biggest} GPUs, more than the largest node ({NODE_GPU_SIZES[-1]})")

        def nodes(replicas_of: int, members: list[tuple[str, ModelSpecBase, float, float]] = members, node_gpus: int = node_gpus) -> int:
            if node_gpus:
                need = sum(gpus * _replica_bounds(spec)[replicas_of] for _, spec, _, gpus in members) / node_gpus
            else:
                need = sum(cpus * _replica_bounds(spec)[replicas_of] for _, spec, cpus, _ in members) / CPU_NODE_CPUS
            return max(1, math.ceil(need - 1e-9))

        out.append(Pool(name=name, models=[m for m, *_ in members], node_gpus=node_gpus, min_nodes=nodes(0), max_nodes=nodes(1)))
    return out


def _provider_key_envs(config: MoARayConfig, pipelines: list[str]) -> list[str]:
    return required_secret_envs(config.models_for(pipelines).values())


# --------------------------------------------------------------------------- Ray cluster launcher


def launcher_config(
    config: MoARayConfig, pipelines: list[str] | None = None, *, cluster_name: str = "moa-ray", region: str = "us-west-2"
) -> dict[str, Any]:
    """A Ray cluster launcher config (AWS): a CPU head, and one node type per pool with its GPUs and pool resource."""
    pools = pools_for(config, pipelines)
    node_types: dict[str, Any] = {
        "head": {"resources": {"GPU": 0}, "node_config": {"InstanceType": AWS_INSTANCE_TYPES[0], "ImageId": "latest_dlami"}},
    }
    for pool in pools:
        node_types[pool.name] = {
            "min_workers": pool.min_nodes,
            "max_workers": pool.max_nodes,
            "resources": {"GPU": pool.node_gpus, **pool.ray_resources},
            "node_config": {"InstanceType": AWS_INSTANCE_TYPES[pool.node_gpus], "ImageId": "latest_dlami"},
        }
    start = "ulimit -n 65536; " + "".join(f"export {name}={value}; " for name, value in proxy.cluster_env(config.server).items())
    return {
        "cluster_name": cluster_name,
        "max_workers": sum(p.max_nodes for p in pools),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": {"type": "aws", "region": region, "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": node_types,
        "head_node_type": "head",
        "setup_commands": ["pip install -U 'moa-ray[vllm]'"],
        "head_start_ray_commands": [
            "ray stop",
            start + "ray start --head --port=6379 --object-manager-port=8076 --autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": ["ray stop", start + "ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076"],
    }


# --------------------------------------------------------------------------- KubeRay


def _kuberay_resources_param(resources: dict[str, int]) -> str:
    """KubeRay's ``rayStartParams.resources`` format: a JSON object in a quoted string, quotes escaped."""
    return '"' + json.dumps(resources).replace('"', '\\"') + '"'


def _env(config: MoARayConfig, pipelines: list[str]) -> list[dict[str, Any]]:
    """Client keys and provider keys from one Secret; the ingress and the agents read them from their environment."""
    env: list[dict[str, Any]] = [
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        *({"name": name, "value": value} for name, value in proxy.cluster_env(config.server).items()),
        {"name": "MOA_RAY_API_KEYS", "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": "MOA_RAY_API_KEYS"}}},
    ]
    names = _provider_key_envs(config, pipelines)
    names += [n for n in secret_envs(config.models_for(pipelines).values()) if n not in names]  # optional ones: HF_TOKEN
    for name in names:
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": name, "optional": True}}})
    return env


def _container(
    name: str, image: str, env: list[dict[str, Any]], limits: dict[str, Any], *, head: bool, mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "env": env,
        "resources": {"limits": limits, "requests": {k: v for k, v in limits.items() if k != "nvidia.com/gpu"}},
        "volumeMounts": mounts,
    }
    if head:
        container["ports"] = [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
            {"containerPort": 8000, "name": "serve"},
        ]
    return container


def raycluster_spec(config: MoARayConfig, pipelines: list[str] | None, image: str, *, results_claim: str | None = None) -> dict[str, Any]:
    """The ``spec`` of a RayCluster: a CPU head (scheduling nothing heavy) and one worker group per pool."""
    names = served_pipelines(config, pipelines)
    env = _env(config, names)
    volumes: list[dict[str, Any]] = [{"name": "moa-ray-config", "configMap": {"name": CONFIG_MAP_NAME}}]
    mounts: list[dict[str, Any]] = [{"name": "moa-ray-config", "mountPath": CONFIG_MOUNT, "readOnly": True}]
    if results_claim:
        volumes.append({"name": "results", "persistentVolumeClaim": {"claimName": results_claim}})
        mounts.append({"name": "results", "mountPath": "/results"})
    head_limits = {"cpu": "4", "memory": "16Gi"}
    groups = []
    for pool in pools_for(config, names):
        limits: dict[str, Any] = {"cpu": str(max(4, 8 * pool.node_gpus)), "memory": f"{max(16, 48 * pool.node_gpus)}Gi"}
        if pool.node_gpus:
            limits["nvidia.com/gpu"] = pool.node_gpus
        pod: dict[str, Any] = {"containers": [_container("ray-worker", image, env, limits, head=False, mounts=mounts)], "volumes": volumes}
        if pool.node_gpus:
            pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        groups.append(
            {
                "groupName": pool.group_name,
                "replicas": pool.min_nodes,
                "minReplicas": pool.min_nodes,
                "maxReplicas": pool.max_nodes,
                "rayStartParams": {"resources": _kuberay_resources_param(pool.ray_resources), "num-gpus": str(pool.node_gpus)},
                "template": {"metadata": {"labels": {**POD_LABELS, "moa-ray/pool": pool.group_name}}, "spec": pod},
            }
        )
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
            "template": {
                "metadata": {"labels": dict(POD_LABELS)},
                "spec": {"containers": [_container("ray-head", image, env, head_limits, head=True, mounts=mounts)], "volumes": volumes},
            },
        },
        "workerGroupSpecs": groups,
    }


def config_map(config: MoARayConfig, name: str = CONFIG_MAP_NAME) -> dict[str, Any]:
    """The moa-ray config as a ConfigMap, mounted at ``/etc/moa-ray/config.yaml`` in every pod (keys are never in it)."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"config.yaml": dump_config(config)}}


def raycluster(config: MoARayConfig, pipelines: list[str] | None, image: str, *, name: str = "moa-ray") -> dict[str, Any]:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name}, "spec": raycluster_spec(config, pipelines, image)}


def rayservice(config: MoARayConfig, pipelines: list[str] | None, image: str, *, name: str = "moa-ray") -> dict[str, Any]:
    """A RayService: ``serveConfigV2`` is the Serve config ``moa-ray serve build`` writes, bound to 0.0.0.0 inside the pod."""
    serve = serve_config(config, pipelines, host="0.0.0.0", port=8000)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {"serveConfigV2": yaml.safe_dump(serve, sort_keys=False), "rayClusterConfig": raycluster_spec(config, pipelines, image)},
    }


def rayjob(
    config: MoARayConfig,
    pipelines: list[str] | None,
    image: str,
    *,
    name: str = "moa-ray-eval",
    dataset: str = "alpaca_eval",
    results_claim: str = "moa-ray-results",
) -> dict[str, Any]:
    """A RayJob running ``moa-ray eval generate`` for the pipelines on its own cluster; results go to a PVC.

    The entrypoint is the installed console script (the image holds the wheel, not a checkout), every
    interpolated value shell-quoted.
    """
    names = served_pipelines(config, pipelines)
    entrypoint = shlex.join(
        [
            "moa-ray",
            "eval",
            "generate",
            "--config",
            f"{CONFIG_MOUNT}/config.yaml",
            "--pipeline",
            ",".join(names),
            "--dataset",
            dataset,
            "--out",
            f"/results/{name}",
        ]
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name},
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": raycluster_spec(config, names, image, results_claim=results_claim),
        },
    }


def podmonitor(name: str = "moa-ray", interval_s: int = 15) -> dict[str, Any]:
    """A prometheus-operator PodMonitor that scrapes every moa-ray Ray pod's metrics export (moa-ray's, Serve's and
    vLLM's metrics: Ray's metrics agent on each node exports its processes'), labelled with the Ray cluster and node type.
    Prometheus picks it up where its ``podMonitorSelector`` matches its labels (add yours, e.g. ``release``)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": name, "labels": dict(POD_LABELS)},
        "spec": {
            "selector": {"matchLabels": dict(POD_LABELS)},
            "podTargetLabels": ["ray.io/cluster", "ray.io/node-type"],
            "podMetricsEndpoints": [{"port": METRICS_PORT_NAME, "path": "/metrics", "interval": f"{interval_s}s"}],
        },
    }


class _BlockStrings(yaml.SafeDumper):
    """Writes multi-line strings (the embedded configs) as readable ``|`` blocks, and no YAML anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockStrings.add_representer(str, _str)


def dump_all(documents: list[dict[str, Any]], header: str = "") -> str:
    """Several manifests as one multi-document YAML file."""
    return header + "---\n".join(yaml.dump(d, Dumper=_BlockStrings, sort_keys=False) for d in documents)
