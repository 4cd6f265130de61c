"""Test support: run ``moa-ray serve`` as a real subprocess with its own Ray (the pytest process may already
hold the session's Ray with Serve's HTTP off), and attach short helper processes to that Ray; a fake provider
that answers each model with a text of its own, and the endpoint's app served on loopback without Ray."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from bench.simulator import free_port

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """``moa-ray serve --config CONFIG --port <free>`` with ``env`` added; logs and Ray temp files in one dir."""

    def __init__(self, config_path: Path, env: dict[str, str], *, extra_args: tuple[str, ...] = (), startup_timeout_s: float = 240) -> None:
        self.config_path = config_path
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mr-serve-"))  # short: Ray's unix socket paths live under it
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "RAY_TMPDIR": str(self.dir),
            "RAY_USAGE_STATS_ENABLED": "0",
            **env,
        }
        self.env.pop("RAY_ADDRESS", None)
        self.extra_args = extra_args
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "moa_ray.cli", "serve", "--config", str(self.config_path), "--port", str(self.port), *self.extra_args]
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moa-ray serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200 and "serving" in self.log():
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"moa-ray serve did not become healthy in {self.startup_timeout_s} s:\n{self.log()[-4000:]}")

    @property
    def ray_address(self) -> str:
        match = re.search(r"^ray: (\S+);", self.log(), re.M)
        assert match, self.log()
        return match.group(1)

    def attach(self, code: str, timeout_s: float = 120) -> str:
        """Run ``code`` in a fresh Python connected to this server's Ray; returns its stdout."""
        # The server's Ray listens on loopback only: keep Ray from swapping 127.0.0.1 for this machine's routable IP.
        env = {**self.env, "RAY_ADDRESS": self.ray_address, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"attached helper failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return done.stdout

    def stop(self, timeout_s: float = 90) -> int | None:
        """Ctrl+C (the documented way to stop it), then make sure nothing of its process group survives."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # Ray daemons it started, if any outlived it
        except ProcessLookupError:
            pass
        return self.proc.returncode

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def occurrences(self, needle: bytes) -> int:
        """How often ``needle`` appears in the server's dir (its log and every Ray session log)."""
        total = 0
        for path in self.dir.rglob("*"):
            if path.is_file() and not path.is_symlink() and "sockets" not in path.parts:
                try:
                    total += path.read_bytes().count(needle)
                except OSError:
                    continue
        return total

    def files_containing(self, needle: str) -> list[str]:
        """Every file under the server's dir (its log and all Ray session logs) that contains ``needle``."""
        hits = []
        data = needle.encode()
        for path in self.dir.rglob("*"):
            if path.is_file() and not path.is_symlink() and "sockets" not in path.parts:
                try:
                    if data in path.read_bytes():
                        hits.append(str(path))
                except OSError:
                    continue
        return hits


# --------------------------------------------------------------------------- a fake provider, the app on loopback

#: Every text the fake provider writes starts with this, so a prompt's references can be counted.
ANSWER_MARK = "answer-of"


def fake_text(model: str, references: int) -> str:
    """What :class:`FakeProvider` answers ``model`` when its prompt shows ``references`` earlier answers."""
    return f"{ANSWER_MARK} {model} after {references} references"


class FakeProvider:
    """An OpenAI-compatible provider (an ``httpx.MockTransport`` handler) answering each model with a distinct
    text that says how many earlier answers its prompt held, so a layer-2 answer differs from a layer-1 one.

    ``delay_s``: seconds before each answer (a slow provider); ``echo_key``: the answer repeats the
    Authorization header it got (a provider that badly echoes its caller's key).
    """

    def __init__(self, delay_s: float = 0.0, *, echo_key: bool = False) -> None:
        self.delay_s = delay_s
        self.echo_key = echo_key
        self.calls: list[str] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        model = body["model"]
        self.calls.append(model)
        references = sum(str(m.get("content", "")).count(ANSWER_MARK) for m in body["messages"])
        text = fake_text(model, references)
        if self.echo_key:
            text += f" (called with {request.headers.get('authorization')})"
        await asyncio.sleep(self.delay_s)
        words = text.split(" ")
        usage = {
            "prompt_tokens": 10 * len(body["messages"]),
            "completion_tokens": len(words),
            "total_tokens": 10 * len(body["messages"]) + len(words),
        }
        if not body.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            return httpx.Response(200, json={"id": "x", "object": "chat.completion", "model": model, "choices": [choice], "usage": usage})

        async def events() -> AsyncIterator[bytes]:
            for i, word in enumerate(words):
                delta = {"content": word if i == 0 else " " + word}
                yield f"data: {json.dumps({'id': 'x', 'model': model, 'choices': [{'index': 0, 'delta': delta}]})}\n\n".encode()
                await asyncio.sleep(0.005)
            last = {"id": "x", "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}
            yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode()

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())


def fake_model(name: str, **extra: Any) -> dict[str, Any]:
    """A model served by :class:`FakeProvider` (its base URL is never dialled: the transport answers)."""
    return {"backend": "openai", "model": name, "base_url": "http://fake.test/v1", "max_retries": 0, "http_transport": "httpx", **extra}


@contextlib.contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Serve an ASGI app on a free loopback port from a background thread; yields its base URL. Unlike httpx's
    ASGI transport, a real server sends each event as it comes, so a test can time them."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the app's server failed to start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = True
        thread.join(timeout=5)


def fake_layers_config(layers: int = 2, width: int = 3, *, server: dict | None = None, **model_extra: Any) -> Any:
    """``moa``: ``layers`` x ``width`` proposers (models ``m1``..``m<width>``) and the aggregator ``agg``, over
    :class:`FakeProvider`; the models get ``model_extra`` (an ``api_key_env``...)."""
    from moa_ray.config import parse_config

    names = [f"m{i}" for i in range(1, width + 1)]
    return parse_config(
        {
            "models": {name: fake_model(name, **model_extra) for name in [*names, "agg"]},
            "pipelines": {"moa": {"kind": "moa", "layers": [names] * layers, "aggregator": "agg"}},
            "server": server or {},
        }
    )


def fake_api(config: Any, provider: FakeProvider, keys: tuple[str, ...] = ()) -> Any:
    """The endpoint's app (no Ray) over agents that call ``provider``."""
    from moa_ray.backends.openai_http import OpenAIBackend
    from moa_ray.pipeline import build_pipeline
    from moa_ray.pipeline.agents import LocalAgent
    from moa_ray.serve.auth import KeyVerifier, Redactor
    from moa_ray.serve.ingress import create_api
    from moa_ray.serve.service import ChatService

    agents = {name: LocalAgent(OpenAIBackend(spec, transport=provider.transport())) for name, spec in config.models.items()}
    pipelines = {name: build_pipeline(config, name, agents) for name in config.pipelines}
    return create_api(ChatService(config, pipelines, Redactor.for_config(config, extra=keys)), KeyVerifier(keys))


def sse_events(text: str) -> list[Any]:
    """The JSON of each ``data:`` event of a server-sent event stream, ``[DONE]`` as the string."""
    out: list[Any] = []
    for event in text.split("\n\n"):
        if event.startswith("data: "):
            data = event[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# --------------------------------------------------------------------------- the CLI over the simulator, no Ray

#: What the simulator answers each model of :func:`cli_sim_config` (by provider id).
CLI_REPLIES = {
    "sim/p1": "Rayleigh scattering of sunlight",
    "sim/p2": "shorter wavelengths scatter more",
    "sim/p3": "the atmosphere favours blue light",
    "sim/agg": "Sunlight scatters off air molecules, blue most.",
    "sim/judge": '{"chosen_responses": [1, 3]}',
}


def cli_sim_config(simulator: Any, tmp_path: Path, monkeypatch: Any) -> Path:
    """A config file of simulator-backed models called from the CLI's own process (hosting: in_process, the
    default), so ``moa-ray run`` starts no Ray (asserted): ``tiny`` (MoA, 3 proposers) and ``sparse`` (SMoA with
    a judge keeping 2 of 3). ``simulator``, ``monkeypatch``: the fixtures."""
    import yaml

    from bench.simulator import Behaviour, SimulatorConfig

    def no_ray(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("in-process models need no Ray")

    monkeypatch.setattr("moa_ray.runtime.init_ray", no_ray)
    monkeypatch.setattr("moa_ray.serve.deploy.deploy_models", no_ray)
    sim = simulator(SimulatorConfig(latency_ms=20, models={m: Behaviour(latency_ms=20, reply=r) for m, r in CLI_REPLIES.items()}))

    def model(name: str) -> dict:
        return {"backend": "openai", "model": f"sim/{name}", "base_url": sim.base_url, "max_retries": 0}

    data = {
        "models": {name: model(name) for name in ("p1", "p2", "p3", "agg", "judge")},
        "pipelines": {
            "tiny": {"kind": "moa", "layers": [["p1", "p2", "p3"]], "aggregator": "agg"},
            "sparse": {"kind": "smoa", "layers": [["p1", "p2", "p3"]], "aggregator": "agg", "judge": "judge", "k": 2, "moderator": False},
        },
    }
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
