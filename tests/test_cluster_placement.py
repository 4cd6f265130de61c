"""cluster/: the launcher YAML has one node type per pool, and on a local multi-node Ray cluster (head + two
workers with logical GPUs and pool resources) every model's replicas land on its pool's node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cluster.local_cluster import LocalCluster, WorkerSpec
from moa_ray.cli import main
from moa_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "cluster" / "gpu-pools.yaml"
LAUNCHER = ROOT / "cluster" / "ray-cluster.yaml"


def test_launcher_yaml_has_a_node_type_per_pool():
    launcher = yaml.safe_load(LAUNCHER.read_text())
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] == "head" and types["head"]["resources"]["GPU"] == 0
    config = load_config(EXAMPLE)
    for name, spec in config.models.items():
        node = types[spec.pool]
        assert node["resources"][spec.pool] >= 1 and node["resources"]["GPU"] >= spec.num_gpus, name
        assert 0 < node["min_workers"] <= node["max_workers"]
    assert set(types) == {"head"} | {spec.pool for spec in config.models.values()}
    assert launcher["max_workers"] == sum(t.get("max_workers", 0) for t in types.values())


def test_committed_launcher_yaml_matches_the_generator():
    result = CliRunner().invoke(main, ["serve", "cluster-config", "--config", "cluster/gpu-pools.yaml"], catch_exceptions=False)
    assert result.exit_code == 0
    assert result.output == LAUNCHER.read_text(), "cluster/ray-cluster.yaml is stale: regenerate it"


def test_worker_spec_parsing():
    assert WorkerSpec.parse("pool_a") == WorkerSpec("pool_a", 1, 2)
    assert WorkerSpec.parse("pool_b:2:4") == WorkerSpec("pool_b", 2, 4)
    with pytest.raises(ValueError, match="POOL"):
        WorkerSpec.parse(":1")


PLACEMENT_CONFIG = {
    "models": {
        # 2 replicas x 0.5 GPU: both fit only on the pool_a worker's one logical GPU
        "alpha": {
            "backend": "openai",
            "model": "alpha",
            "base_url": "http://127.0.0.1:9/v1",
            "hosting": "deployment",
            "pool": "pool_a",
            "num_gpus": 0.5,
            "num_replicas": 2,
            "num_cpus": 0.1,
        },
        "beta": {
            "backend": "openai",
            "model": "beta",
            "base_url": "http://127.0.0.1:9/v1",
            "hosting": "deployment",
            "pool": "pool_b",
            "num_gpus": 1,
            "num_cpus": 0.1,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        },
        "gamma": {
            "backend": "openai",
            "model": "gamma",
            "base_url": "http://127.0.0.1:9/v1",
            "hosting": "deployment",
            "pool": "pool_b",
            "num_cpus": 0.1,
        },
    },
    "pipelines": {"p": {"kind": "moa", "layers": [["alpha", "beta", "gamma"]], "aggregator": "beta"}},
}


@pytest.mark.ray  # a head and two workers, on free ports
def test_replicas_land_on_their_pools_node(tmp_path):
    config_path = tmp_path / "placement.yaml"
    config_path.write_text(yaml.safe_dump(PLACEMENT_CONFIG))
    cluster = LocalCluster(workers=[WorkerSpec("pool_a", gpus=1), WorkerSpec("pool_b", gpus=1)])
    try:
        with cluster as state:
            env = {**os.environ, **state.env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            probe = subprocess.run(
                [sys.executable, str(ROOT / "tests" / "placement_probe.py"), str(config_path)],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
        assert not (cluster.dir / "cluster.json").exists()  # stopped
    finally:
        shutil.rmtree(cluster.dir, ignore_errors=True)
    assert probe.returncode == 0, probe.stderr[-4000:]
    (line,) = [x for x in probe.stdout.splitlines() if x.startswith("PLACEMENT ")]
    report = json.loads(line.removeprefix("PLACEMENT "))
    node_of_pool = {pools[0]: node for node, pools in report["nodes"].items() if pools}
    assert set(node_of_pool) == {"pool_a", "pool_b"} and len(report["nodes"]) == 3
    expected = {"alpha": node_of_pool["pool_a"], "beta": node_of_pool["pool_b"], "gamma": node_of_pool["pool_b"]}
    for model, node in expected.items():
        assert report["answered_from"][model] == [node], model
        assert set(report["replica_nodes"][model]) == {node}, model
    assert len(report["replica_nodes"]["alpha"]) == 2


@pytest.mark.ray  # a head and two workers, on free ports
def test_eval_workers_spread_over_the_clusters_nodes(tmp_path, simulator):
    """Issue 22, on a cluster: ``eval generate``'s workers are SPREAD, one per node where there are as many nodes."""
    sim = simulator()
    config_path = tmp_path / "eval.yaml"
    model = {"backend": "openai", "model": "sim", "base_url": sim.base_url, "max_retries": 0, "num_cpus": 0.01}
    config_path.write_text(yaml.safe_dump({"models": {"sim": model}, "pipelines": {"one": {"kind": "single", "model": "sim"}}}))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(30)))
    cluster = LocalCluster(workers=[WorkerSpec("pool_a", gpus=0), WorkerSpec("pool_b", gpus=0)])
    try:
        with cluster as state:
            env = {**os.environ, **state.env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            command = [sys.executable, "-m", "moa_ray.cli", "eval", "generate", "--config", str(config_path), "--pipeline", "one"]
            command += ["--dataset", str(data), "--out", str(tmp_path / "out"), "--workers", "3", "--concurrency", "6", "--no-progress"]
            run = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(cluster.dir, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "30 rows ok" in run.stderr and "3 workers on 3 nodes" in run.stderr, run.stderr[-2000:]
