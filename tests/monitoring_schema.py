"""Validate the PodMonitor against prometheus-operator's own CRD (tests/data/prometheus-operator), as the API server
would, and strictly as :mod:`kuberay_schema` checks the KubeRay manifests: a misspelt field is an error, not pruned."""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from kuberay_schema import DNS_LABEL, _closed

CRD = Path(__file__).resolve().parent / "data" / "prometheus-operator" / "monitoring.coreos.com_podmonitors.yaml.gz"


@cache
def _validator(version: str) -> jsonschema.Draft4Validator:
    crd = yaml.safe_load(gzip.decompress(CRD.read_bytes()))
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft4Validator(_closed(entry["schema"]["openAPIV3Schema"]))


def podmonitor_errors(document: dict[str, Any]) -> list[str]:
    """Every way ``document`` breaks the PodMonitor CRD; empty when it is valid."""
    group, _, version = str(document.get("apiVersion", "")).partition("/")
    if group != "monitoring.coreos.com" or document.get("kind") != "PodMonitor":
        return [f"not a PodMonitor: apiVersion={document.get('apiVersion')!r} kind={document.get('kind')!r}"]
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in _validator(version).iter_errors(document)]
    name = str(document.get("metadata", {}).get("name", ""))
    if not DNS_LABEL.match(name) or len(name) > 63:
        errors.append(f"metadata.name: {name!r} is not a DNS-1123 label")
    return errors
