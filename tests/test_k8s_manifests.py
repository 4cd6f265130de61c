"""KubeRay manifests in k8s/: they parse, carry the required fields, every deployment's pool has a worker
group with enough GPUs, the RayService's serveConfigV2 is the builder's, and they match their generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from kuberay_schema import kuberay_errors
from ray.serve.schema import ServeDeploySchema

from moa_ray.cli import main
from moa_ray.config import load_config, parse_config
from moa_ray.errors import ConfigError
from moa_ray.serve.app import serve_config
from moa_ray.serve.manifests import (
    POOL_CAPACITY,
    SECRET_NAME,
    config_map,
    launcher_config,
    pools_for,
    raycluster,
    rayjob,
    rayservice,
)
from moa_ray.serve.proxy import HAPROXY_ENV

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
EXAMPLE = ROOT / "cluster" / "gpu-pools.yaml"
IMAGE = "registry.example.com/moa-ray:0.1.0"


def load(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def pool_resources(group: dict) -> dict[str, float]:
    """Decode KubeRay's ``'"{\\"pool\\": 1000}"'`` rayStartParams.resources string."""
    raw = group["rayStartParams"]["resources"]
    assert raw.startswith('"') and raw.endswith('"'), raw
    return json.loads(raw[1:-1].replace('\\"', '"'))


def cluster_specs() -> list[tuple[str, dict]]:
    return [
        ("raycluster.yaml", load("raycluster.yaml")["RayCluster"]["spec"]),
        ("rayservice.yaml", load("rayservice.yaml")["RayService"]["spec"]["rayClusterConfig"]),
        ("rayjob.yaml", load("rayjob.yaml")["RayJob"]["spec"]["rayClusterSpec"]),
    ]


@pytest.mark.parametrize("name", ["rayservice.yaml", "raycluster.yaml", "rayjob.yaml"])
def test_manifests_parse_with_required_fields(name):
    docs = load(name)
    assert set(docs) == {"ConfigMap", {"rayservice.yaml": "RayService", "raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[name]}
    for doc in docs.values():
        assert doc["apiVersion"] and doc["metadata"]["name"]
    assert parse_config(yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])) == load_config(EXAMPLE)


@pytest.mark.parametrize(("name", "spec"), cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_cluster_specs_have_a_head_and_one_worker_group_per_pool(name, spec):
    assert spec["rayVersion"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # nothing GPU-bound lands on the head
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"] == IMAGE and {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265, 8000}
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == IMAGE
        gpus = int(group["rayStartParams"]["num-gpus"])
        assert container["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus
        resources = pool_resources(group)
        assert len(resources) == 1 and list(resources.values()) == [POOL_CAPACITY]
        for c in [head_container, container]:  # keys only ever come from the Secret
            secret_refs = {e["name"] for e in c["env"] if "valueFrom" in e}
            assert "MOA_RAY_API_KEYS" in secret_refs
            assert all(e["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME for e in c["env"] if "valueFrom" in e)
            plain = {e["name"]: e["value"] for e in c["env"] if "value" in e}
            assert plain == {"RAY_USAGE_STATS_ENABLED": "0", **HAPROXY_ENV}  # HAProxy on every node


@pytest.mark.parametrize("proxy", ["haproxy", "python"])
def test_the_endpoints_proxy_is_set_on_every_node_a_manifest_starts(proxy):
    config = parse_config({**yaml.safe_load(EXAMPLE.read_text()), "server": {"proxy": proxy}})
    spec = raycluster(config, None, IMAGE)["spec"]
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    wanted = [{"name": name, "value": value} for name, value in HAPROXY_ENV.items()] if proxy == "haproxy" else []
    for pod in pods:
        env = pod["template"]["spec"]["containers"][0]["env"]
        assert [e for e in env if e["name"].startswith("RAY_SERVE_")] == wanted
    starts = launcher_config(config)
    for command in [starts["head_start_ray_commands"][-1], starts["worker_start_ray_commands"][-1]]:
        assert ("export RAY_SERVE_ENABLE_HA_PROXY=1; " in command) == (proxy == "haproxy"), command


@pytest.mark.parametrize("name", ["rayservice.yaml", "raycluster.yaml", "rayjob.yaml"])
def test_committed_manifests_validate_against_the_kuberay_crds(name):
    (doc,) = [d for kind, d in load(name).items() if kind != "ConfigMap"]
    assert kuberay_errors(doc) == []


@pytest.mark.parametrize("config", ["presets", "gpu-pools", "mixed"])
def test_generated_manifests_validate_against_the_kuberay_crds(config):
    cfg = {
        "presets": lambda: load_config(None),  # llama.cpp, vLLM on CPU and remote HTTP models, every pipeline
        "gpu-pools": lambda: load_config(EXAMPLE),
        "mixed": lambda: _cfg({"big": {"pool": "pool_big", "num_gpus": 2}, "remote": {"pool": "pool_cpu", "num_cpus": 2}, "any": {}}),
    }[config]()
    for build in (raycluster, rayservice, rayjob):
        assert kuberay_errors(build(cfg, None, IMAGE)) == [], build.__name__
    assert config_map(cfg)["data"]["config.yaml"]


def test_the_crd_validator_reports_misspelt_fields_and_wrong_types():
    """The check above can fail: a misspelt field is reported (the API server would prune it), as is a wrong type."""
    doc = load("raycluster.yaml")["RayCluster"]
    group = doc["spec"]["workerGroupSpecs"][0]
    group["replica"] = group.pop("replicas")
    group["maxReplicas"] = "four"
    doc["metadata"]["name"] = "MoA_Ray"
    errors = kuberay_errors(doc)
    assert any("'replica' was unexpected" in e for e in errors), errors
    assert any(e.startswith("spec.workerGroupSpecs.0.maxReplicas: 'four'") for e in errors), errors
    assert any(e.startswith("metadata.name") for e in errors), errors
    assert kuberay_errors({"apiVersion": "ray.io/v1", "kind": "RayCron"}) != []


def test_every_deployment_pool_exists_in_a_worker_group_with_its_gpus():
    service = load("rayservice.yaml")["RayService"]["spec"]
    serve = ServeDeploySchema.model_validate(yaml.safe_load(service["serveConfigV2"]))
    groups = {next(iter(pool_resources(g))): g for g in service["rayClusterConfig"]["workerGroupSpecs"]}
    pooled = 0
    for app in serve.applications:
        for deployment in app.deployments:
            options = deployment.ray_actor_options
            bundles = deployment.placement_group_bundles if isinstance(deployment.placement_group_bundles, list) else []
            # vLLM deployments (Ray Serve LLM) hold their GPUs in placement-group bundles, one per rank
            gpus = sum(b.get("GPU", 0) for b in bundles) or (options.num_gpus or 0)
            pools = [r for r in (options.resources or {}) if r.startswith("pool_")]
            if not pools:
                assert not gpus, f"{deployment.name} needs GPUs but names no pool"
                continue
            (pool,) = pools
            assert all(pool in b for b in bundles), f"{deployment.name}: a rank's bundle is outside {pool}"
            assert pool in groups, f"{deployment.name}: no worker group provides {pool}"
            assert int(groups[pool]["rayStartParams"]["num-gpus"]) >= gpus
            auto = deployment.autoscaling_config or {}
            needed = (auto.get("max_replicas") or deployment.num_replicas) * gpus
            assert int(groups[pool]["rayStartParams"]["num-gpus"]) * groups[pool]["maxReplicas"] >= needed
            pooled += 1
    assert pooled == 4


def test_serve_config_v2_is_the_builders():
    service = load("rayservice.yaml")["RayService"]["spec"]
    assert yaml.safe_load(service["serveConfigV2"]) == serve_config(load_config(EXAMPLE), host="0.0.0.0", port=8000)


def test_rayjob_runs_an_evaluation_on_the_mounted_config():
    job = load("rayjob.yaml")["RayJob"]["spec"]
    # the installed console script: the image has the wheel, not a checkout with jobs/
    assert job["entrypoint"].startswith("moa-ray eval generate --config /etc/moa-ray/config.yaml --pipeline moa-open,moa-open-lite")
    assert "--dataset alpaca_eval" in job["entrypoint"] and "--out /results/" in job["entrypoint"]
    assert job["shutdownAfterJobFinishes"] is True
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts == {"/etc/moa-ray", "/results"}
    assert {v["name"] for v in head["volumes"]} == {"moa-ray-config", "results"}


def test_rayjob_entrypoint_quotes_what_it_interpolates():
    from moa_ray.serve.manifests import rayjob

    job = rayjob(load_config(EXAMPLE), None, IMAGE, name="x", dataset="my prompts.jsonl; rm -rf /")
    entry = job["spec"]["entrypoint"]
    assert "'my prompts.jsonl; rm -rf /'" in entry and entry.startswith("moa-ray eval generate ")


def test_committed_manifests_match_the_generator(tmp_path):
    result = CliRunner().invoke(
        main, ["serve", "k8s", "--config", "cluster/gpu-pools.yaml", "--image", IMAGE, "-o", str(tmp_path)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    for name in ("rayservice.yaml", "raycluster.yaml", "rayjob.yaml"):
        assert (tmp_path / name).read_text() == (K8S / name).read_text(), f"k8s/{name} is stale: regenerate it (see cluster/gpu-pools.yaml)"


# --------------------------------------------------------------------------- pool sizing


def _cfg(models: dict) -> object:
    base = {"backend": "openai", "base_url": "http://x.internal/v1", "hosting": "deployment"}
    return parse_config(
        {
            "models": {name: {**base, "model": name, **spec} for name, spec in models.items()},
            "pipelines": {"p": {"kind": "moa", "layers": [list(models)], "aggregator": next(iter(models))}},
        }
    )


def test_pool_sizing_from_gpus_and_replicas():
    pools = {
        p.name: p
        for p in pools_for(
            _cfg(
                {
                    "big": {"pool": "pool_big", "num_gpus": 2, "autoscaling": {"min_replicas": 1, "max_replicas": 4}},
                    "half1": {"pool": "pool_half", "num_gpus": 0.5, "num_replicas": 2},
                    "half2": {"pool": "pool_half", "num_gpus": 0.5, "num_replicas": 1},
                    "remote": {"pool": "pool_cpu", "num_cpus": 2, "num_replicas": 6},
                    "anywhere": {},
                }
            )
        )
    }
    assert set(pools) == {"pool_big", "pool_half", "pool_cpu"}
    assert (pools["pool_big"].node_gpus, pools["pool_big"].min_nodes, pools["pool_big"].max_nodes) == (2, 1, 4)
    assert (pools["pool_half"].node_gpus, pools["pool_half"].max_nodes) == (1, 2) and pools["pool_half"].models == ["half1", "half2"]
    assert (pools["pool_cpu"].node_gpus, pools["pool_cpu"].max_nodes) == (0, 2)  # 12 CPUs on 8-CPU nodes
    assert pools["pool_big"].group_name == "pool-big"


def test_gpu_model_without_pool_or_too_big_is_refused():
    with pytest.raises(ConfigError, match=r"models\.g: it needs GPUs but names no pool"):
        pools_for(_cfg({"g": {"num_gpus": 1}}))
    with pytest.raises(ConfigError, match="needs 16 GPUs"):
        pools_for(_cfg({"g": {"num_gpus": 16, "pool": "pool_g"}}))
