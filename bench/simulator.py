"""An OpenAI-compatible LLM *simulator*: a test double for a remote model service.

It answers ``POST /v1/chat/completions`` (plain and streaming) and ``GET /v1/models``
after a configurable latency (+ uniform jitter), with a configurable output length
and failure rate, so benchmarks and tests can measure moa-ray's own overhead
against a provider whose timing is known. Per-model overrides let one server play
several providers (a slow one, a failing one...).

    python -m bench.simulator --port 8123 --latency-ms 200 --jitter-ms 50 --failure-rate 0.1

In code::

    with run_simulator(SimulatorConfig(latency_ms=200)) as sim:
        base_url = sim.base_url  # http://127.0.0.1:<free port>/v1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import uvicorn
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moa_ray.loopback import free_ports

WORDS = (
    "the model considers each part of the question and answers with care so that the reply is "
    "accurate complete and useful while staying concise clear and well structured for the reader"
).split()


class Behaviour(BaseModel):
    """How a simulated model behaves."""

    latency_ms: float = Field(default=200.0, ge=0, description="Time to the full answer (non-streaming).")
    jitter_ms: float = Field(default=0.0, ge=0, description="Uniform extra latency in [0, jitter_ms].")
    output_tokens: int = Field(default=64, ge=1, description="Completion length (capped by max_tokens).")
    failure_rate: float = Field(default=0.0, ge=0, le=1, description="Probability of an HTTP error.")
    failure_status: int = Field(default=500, description="Status of injected failures (429, 500, 503...).")
    context_tokens: int = Field(default=1_000_000, ge=1, description="Prompts longer than this get a context-length 400.")
    hang: bool = Field(default=False, description="Never answer (to exercise client timeouts).")
    reply: str | None = Field(default=None, description="Answer with this text instead of filler words (scripts a judge).")
    top_logprobs: list[dict[str, float]] | None = Field(
        default=None,
        description="Candidates (token -> logprob) at each generated position, returned when a request asks for logprobs; "
        "a position without an entry gets its own word at logprob 0.",
    )


class SimulatorConfig(Behaviour):
    """Default behaviour plus per-model overrides (keyed by the request's ``model``)."""

    models: dict[str, Behaviour] = Field(default_factory=dict)
    seed: int | None = None

    def for_model(self, model: str) -> Behaviour:
        return self.models.get(model, self)


@dataclass
class Stats:
    """What the simulator saw; tests assert on it."""

    requests: int = 0
    failures: int = 0
    by_model: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    auth_headers: list[str] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each chat request, in order


def _count_tokens(text: str) -> int:
    return max(1, len(text.split()))


def _logprobs(words: list[str], behaviour: Behaviour, top: int) -> list[dict[str, object]]:
    """OpenAI's ``logprobs.content``: each word with the scripted candidates of its position (the ``top`` likeliest)."""
    scripted = behaviour.top_logprobs or []
    content: list[dict[str, object]] = []
    for i, word in enumerate(words):
        candidates = scripted[i] if i < len(scripted) else {word: 0.0}
        ranked = sorted(candidates.items(), key=lambda kv: -kv[1])
        content.append(
            {
                "token": word,
                "logprob": candidates.get(word, ranked[0][1] if ranked else 0.0),
                "bytes": list(word.encode()),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in ranked[:top]],
            }
        )
    return content


def create_app(config: SimulatorConfig, stats: Stats | None = None) -> Starlette:
    stats = stats if stats is not None else Stats()
    rng = random.Random(config.seed)

    async def chat(request: Request) -> Response:
        try:
            body = await request.json()
            model = str(body["model"])
            messages = body["messages"]
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": {"message": "malformed request", "type": "invalid_request_error"}}, 400)
        behaviour = config.for_model(model)
        stats.requests += 1
        stats.arrivals.append(time.monotonic())
        stats.by_model[model] = stats.by_model.get(model, 0) + 1
        stats.auth_headers.append(request.headers.get("authorization", ""))
        prompt_tokens = sum(_count_tokens(str(m.get("content", ""))) for m in messages)
        if behaviour.hang:
            await asyncio.sleep(3600)
        if prompt_tokens > behaviour.context_tokens:
            return JSONResponse(
                {
                    "error": {
                        "message": f"This model's maximum context length is {behaviour.context_tokens} tokens.",
                        "type": "invalid_request_error",
                        "code": "context_length_exceeded",
                    }
                },
                400,
            )
        if behaviour.failure_rate and rng.random() < behaviour.failure_rate:
            stats.failures += 1
            await asyncio.sleep(behaviour.latency_ms / 4000)
            return JSONResponse({"error": {"message": "simulated failure", "type": "server_error"}}, behaviour.failure_status)
        n_out = min(behaviour.output_tokens, int(body.get("max_tokens") or behaviour.output_tokens))
        words = [WORDS[(i + len(messages)) % len(WORDS)] for i in range(n_out)]
        if behaviour.reply is not None:
            words = behaviour.reply.split(" ")
            n_out = _count_tokens(behaviour.reply)
        delay = (behaviour.latency_ms + rng.uniform(0, behaviour.jitter_ms)) / 1000
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_out, "total_tokens": prompt_tokens + n_out}
        finish = "length" if n_out < behaviour.output_tokens and behaviour.reply is None else "stop"
        rid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        if not body.get("stream"):
            try:
                await asyncio.sleep(delay)
            finally:
                stats.in_flight -= 1
            choice = {"index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": finish}
            if body.get("logprobs"):
                choice["logprobs"] = {"content": _logprobs(words, behaviour, int(body.get("top_logprobs") or 0))}
            return JSONResponse(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                }
            )

        async def events():
            try:
                per_token = delay / n_out
                for i, word in enumerate(words):
                    await asyncio.sleep(per_token)
                    chunk = {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "model": model,
                        "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}, "finish_reason": None}],
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
                last = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
                    "usage": usage,
                }
                yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                stats.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        names = sorted(config.models) or ["simulated"]
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model"} for n in names]})

    async def stats_route(request: Request) -> Response:
        """What the simulator saw, for benchmarks that run it in a process of its own."""
        return JSONResponse({"requests": stats.requests, "failures": stats.failures, "max_in_flight": stats.max_in_flight})

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models), Route("/stats", stats_route)]
    )
    app.state.stats = stats
    return app


def free_port() -> int:
    return free_ports(1)[0]


@dataclass
class RunningSimulator:
    host: str
    port: int
    stats: Stats
    config: SimulatorConfig

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


class _Server(uvicorn.Server):
    """uvicorn's server, checking for exit every ``tick_s`` instead of its fixed 0.1 s."""

    tick_s = 0.1

    async def main_loop(self) -> None:
        counter = 0
        per_tick = max(1, round(0.1 / self.tick_s))  # uvicorn's own counter runs in 0.1 s ticks (the Date header)
        should_exit = await self.on_tick(0)
        while not should_exit:
            await asyncio.sleep(self.tick_s)
            counter += 1
            should_exit = self.should_exit if counter % per_tick else await self.on_tick((counter // per_tick) % 864000)


#: Servers told to stop by a ``run_simulator(wait=False)`` block, still finishing in their threads.
_stopping: list[threading.Thread] = []


def join_stopped(timeout_s: float = 5) -> None:
    """Wait for the servers of ``run_simulator(wait=False)`` blocks to finish stopping."""
    while _stopping:
        _stopping.pop().join(timeout=timeout_s)


@contextlib.contextmanager
def run_simulator(
    config: SimulatorConfig | None = None, *, host: str = "127.0.0.1", port: int | None = None, tick_s: float = 0.1, wait: bool = True
) -> Iterator[RunningSimulator]:
    """Serve the simulator from a background thread for the duration of the ``with`` block.

    ``tick_s``: how often the server checks whether the block has ended. ``wait``: at the block's end, wait until
    the server has stopped (uvicorn takes 0.1-0.2 s); with False the block only tells it to stop, and
    :func:`join_stopped` waits for all such servers at once (the tests, which start one per test, do so at the end).
    """
    config = config or SimulatorConfig()
    stats = Stats()
    port = port or free_port()
    server = _Server(uvicorn.Config(create_app(config, stats), host=host, port=port, log_level="warning", lifespan="off", backlog=4096))
    server.tick_s = tick_s
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("simulator failed to start")
        time.sleep(0.01)
    try:
        yield RunningSimulator(host, port, stats, config)
    finally:
        server.should_exit = True
        server.force_exit = True  # a hanging request must not hold the shutdown for the join timeout
        if wait:
            thread.join(timeout=5)
        else:
            _stopping.append(thread)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--jitter-ms", type=float, default=0)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--failure-status", type=int, default=500)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--reply", default=None, help="Fixed answer text instead of filler words.")
    args = parser.parse_args()
    config = SimulatorConfig(
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        output_tokens=args.output_tokens,
        failure_rate=args.failure_rate,
        failure_status=args.failure_status,
        seed=args.seed,
        reply=args.reply,
    )
    print(f"simulator on http://{args.host}:{args.port}/v1 ({config.model_dump_json(exclude={'models'})})", flush=True)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning", backlog=4096)


if __name__ == "__main__":
    main()
