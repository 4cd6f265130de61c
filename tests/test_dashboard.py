"""The Grafana dashboard and the PodMonitor beside the KubeRay manifests (issue 21 step 2): the dashboard parses and
queries only metric names that a real scrape showed (tests/data/scraped_metric_names.txt, kept true by the scrape
tests); the PodMonitor passes prometheus-operator's CRD and selects every Ray pod the manifests start; both are what
``moa-ray serve k8s`` writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from click.testing import CliRunner
from metrics_support import recorded_names
from monitoring_schema import podmonitor_errors

from moa_ray.cli import main
from moa_ray.serve.dashboard import grafana_dashboard, queries
from moa_ray.serve.manifests import podmonitor

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
METRIC_NAME = re.compile(r"\b(ray_[a-z0-9_]+)\b")


def committed_dashboard() -> dict:
    return json.loads((K8S / "grafana-dashboard.json").read_text())


def test_the_dashboard_parses_and_queries_only_names_a_scrape_showed():
    dashboard = committed_dashboard()
    exprs = queries(dashboard)
    assert len(exprs) >= 20
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert used, exprs
    assert used <= recorded_names(), sorted(used - recorded_names())
    assert {n for n in used if n.startswith("ray_vllm_")}  # the engine panels
    for expr in exprs:  # balanced, and every rate over Grafana's own window
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        assert "rate(" not in expr or "[$__rate_interval]" in expr, expr


def test_the_dashboard_has_the_panels_an_operator_needs():
    panels = [p for p in committed_dashboard()["panels"] if p["type"] != "row"]
    titles = " | ".join(p["title"] for p in panels).lower()
    for wanted in (
        "requests per second",
        "errors by status",
        "latency p50 / p95",
        "time to first token",
        "by model and role",
        "tokens per second",
        "cost per hour",
        "vllm time to first token",
        "time per output token",
        "kv-cache",
    ):
        assert wanted in titles, wanted
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.95," in exprs
    assert "* 3600" in exprs  # cost per hour from a per-second rate
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_the_panels_do_not_overlap_on_the_grid():
    taken: set[tuple[int, int]] = set()
    ids = []
    for panel in committed_dashboard()["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, panel["title"]
        taken |= cells
        ids.append(panel["id"])
    assert len(ids) == len(set(ids))


def test_the_podmonitor_validates_against_the_prometheus_operator_crd():
    (doc,) = [d for d in yaml.safe_load_all((K8S / "podmonitor.yaml").read_text()) if d]
    assert podmonitor_errors(doc) == []
    assert doc["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"  # KubeRay's metrics-export port on Ray containers


def test_the_podmonitor_validator_reports_misspelt_fields_and_wrong_types():
    """The check above can fail: a misspelt field (which the API server would prune) and a wrong type are reported."""
    doc = podmonitor()
    endpoint = doc["spec"]["podMetricsEndpoints"][0]
    endpoint["intervall"] = endpoint.pop("interval")
    doc["spec"]["selector"]["matchLabels"] = ["not", "a", "map"]
    errors = podmonitor_errors(doc)
    assert any("'intervall' was unexpected" in e for e in errors), errors
    assert any(e.startswith("spec.selector.matchLabels") for e in errors), errors
    assert podmonitor_errors({"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor"}) != []


def test_the_podmonitor_selects_every_ray_pod_the_manifests_start():
    selector = podmonitor()["spec"]["selector"]["matchLabels"]
    pods = 0
    for name in ("rayservice.yaml", "raycluster.yaml", "rayjob.yaml"):
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if not doc or doc["kind"] == "ConfigMap":
                continue
            spec = doc["spec"]
            cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
                labels = group["template"]["metadata"]["labels"]
                assert selector.items() <= labels.items(), (name, labels)
                pods += 1
    assert pods == 15  # a head and four pools, in each of the three manifests


def test_serve_k8s_writes_the_committed_dashboard_and_podmonitor(tmp_path):
    result = CliRunner().invoke(
        main,
        ["serve", "k8s", "--config", "cluster/gpu-pools.yaml", "--image", "registry.example.com/moa-ray:0.1.0", "-o", str(tmp_path)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    for name in ("podmonitor.yaml", "grafana-dashboard.json"):
        assert (tmp_path / name).read_text() == (K8S / name).read_text(), f"k8s/{name} is stale: regenerate it (see cluster/gpu-pools.yaml)"
    assert json.loads((tmp_path / "grafana-dashboard.json").read_text()) == grafana_dashboard()
