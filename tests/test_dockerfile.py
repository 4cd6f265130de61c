"""The Dockerfile (it cannot be built here: no Docker engine): what it copies exists, its Ray is the manifests',
and it installs with the README's command."""

from __future__ import annotations

import re
from pathlib import Path

from moa_ray.serve.manifests import RAY_VERSION

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    """The arguments of every ``name`` instruction (continuation lines joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith(name + " ")]


def test_everything_it_copies_exists():
    for args in instructions("COPY"):
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_it_builds_on_the_ray_version_of_the_manifests():
    (default,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE, re.M)
    assert default == RAY_VERSION
    assert all(base.startswith("rayproject/ray:${RAY_VERSION}-") for base in instructions("FROM")[:2])


def test_it_installs_with_the_readmes_command_and_vllm_on_gpu_images():
    readme = (ROOT / "README.md").read_text()
    (run,) = instructions("RUN")
    assert "pip install -r requirements.txt" in readme and "pip install --no-cache-dir -r requirements.txt" in run
    assert "-e '.[vllm]'" in run and '"$VARIANT" = "gpu"' in run
    assert "ray[llm]" not in run  # its pins replace the vLLM that fits this Ray
