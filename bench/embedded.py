"""Embedded pipeline throughput vs raw llama-cpp-python on the same model, threads, prompts and sampling.

The ``embedded`` preset (SmolLM2-135M-Instruct through llama.cpp) runs through Ray
Serve, with every call recorded on the driver: its exact messages and sampling
parameters. Each call carries a fixed seed, so replaying it on a raw
``llama_cpp.Llama`` (same GGUF file, n_ctx and n_threads) samples the same tokens.
Pipeline and raw replay alternate prompt by prompt, so load from other processes
hits both alike.

    pipeline tokens/s = completion tokens of every call / summed request wall time (Serve, driver, queueing included)
    raw tokens/s      = the same calls' completion tokens / summed create_chat_completion time

The last line is ``ratio <pipeline / raw>`` (target >= 0.9).

    python -m bench.embedded --prompts 4 --max-tokens 64

llama.cpp's threads synchronise at every token, so on a machine whose cores are
busy with other work the numbers swing; ``--threads 1`` (both sides) is steadier.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from moa_ray.backends.base import effective_params
from moa_ray.chat import ChatMessage, ChatParams, Completion, StreamChunk
from moa_ray.config import LlamaCppModelSpec, MoARayConfig, load_config
from moa_ray.pipeline.agents import Agent

APP_NAME = "bench-embedded"

WARMUP_PROMPT = "Say hello in one short sentence."
PROMPTS = [
    "Why is the sky blue?",
    "Give three tips for staying healthy.",
    "What is the difference between a list and a tuple in Python?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about the ocean.",
    "What causes the seasons on Earth?",
    "How does a bicycle stay upright?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
]


@dataclass
class RecordedCall:
    model: str
    messages: list[ChatMessage]
    params: ChatParams
    completion: Completion
    start: float = 0.0  # perf_counter() when the call went out, and when it came back
    end: float = 0.0


class RecordingAgent:
    """Wraps an agent: gives each call a fixed seed and records exactly what was sent, received, and when."""

    def __init__(self, inner: Agent, model: str, seeds: Iterator[int], log: list[RecordedCall]) -> None:
        self.inner, self.model, self.seeds, self.log = inner, model, seeds, log

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        if params.seed is None:
            params = params.model_copy(update={"seed": next(self.seeds)})
        start = time.perf_counter()
        completion = await self.inner.chat(messages, params)
        self.log.append(RecordedCall(self.model, list(messages), params, completion, start, time.perf_counter()))
        return completion

    def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]:
        return self.inner.stream(messages, params)


def bench_config(pipeline: str, max_tokens: int | None, config_path: str | None, threads: int | None = None) -> MoARayConfig:
    """The config with ``max_tokens`` as every model's default (so proposers are capped too), and ``threads`` if given."""
    config = load_config(config_path)
    config.pipeline(pipeline)
    update: dict[str, Any] = {}
    if max_tokens is not None:
        update["max_tokens"] = max_tokens
    if threads is not None:
        update["n_threads"] = threads
    for name in config.models_for([pipeline]):
        config.models[name] = config.models[name].model_copy(update=update)
    return config


def raw_kwargs(spec: LlamaCppModelSpec, call: RecordedCall) -> dict[str, Any]:
    """``create_chat_completion`` arguments for one recorded call: same messages, sampling and seed."""
    p = effective_params(spec, call.params)
    kwargs: dict[str, Any] = {
        "messages": [m.model_dump() for m in call.messages],
        "temperature": p.temperature,
        "max_tokens": p.max_tokens,
        "seed": p.seed,
    }
    if p.top_p is not None:
        kwargs["top_p"] = p.top_p
    if p.stop:
        kwargs["stop"] = p.stop
    return kwargs


def load_raw(spec: LlamaCppModelSpec) -> Any:
    """A plain ``llama_cpp.Llama`` built from the same file and settings as the backend's."""
    from llama_cpp import Llama

    from moa_ray.packaged_models import resolve_model_path

    kwargs: dict[str, Any] = {"model_path": str(resolve_model_path(spec.model)), "n_ctx": spec.n_ctx, "verbose": False}
    if spec.n_threads is not None:
        kwargs.update(n_threads=spec.n_threads, n_threads_batch=spec.n_threads)
    if spec.chat_format:
        kwargs["chat_format"] = spec.chat_format
    return Llama(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help=f"Measured prompts (at most {len(PROMPTS)}).")
    parser.add_argument("--max-tokens", type=int, default=64, help="Completion cap of every call.")
    parser.add_argument("--threads", type=int, default=None, help="n_threads for both sides (default: the config's).")
    parser.add_argument("--pipeline", default="embedded")
    parser.add_argument("--config", default=None, help="YAML config (default: the shipped presets).")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: a local Ray).")
    args = parser.parse_args()
    if not 1 <= args.prompts <= len(PROMPTS):
        raise SystemExit(f"--prompts must be between 1 and {len(PROMPTS)}")

    from moa_ray.pipeline import build_pipeline
    from moa_ray.runtime import ray_session
    from moa_ray.serve.deploy import deploy_agents

    config = bench_config(args.pipeline, args.max_tokens, args.config, args.threads)
    models = config.models_for([args.pipeline])
    if len(models) != 1 or not isinstance(next(iter(models.values())), LlamaCppModelSpec):
        raise SystemExit(f"pipeline {args.pipeline!r} must use exactly one llamacpp model to compare with raw llama.cpp")
    model_name, spec = next(iter(models.items()))
    print(f"model {model_name}: {spec.model}, n_threads={spec.n_threads}, n_ctx={spec.n_ctx}, max_tokens={spec.max_tokens}", flush=True)

    raw = load_raw(spec)
    seeds = itertools.count(1234)
    t = time.perf_counter()
    with contextlib.closing(raw), ray_session(args.address, apps=[APP_NAME]):
        agents = deploy_agents(config, [args.pipeline], app_name=APP_NAME)
        print(f"ray up and {args.pipeline!r} deployed in {time.perf_counter() - t:.1f}s", flush=True)
        log: list[RecordedCall] = []
        recorded = {name: RecordingAgent(agent, name, seeds, log) for name, agent in agents.items()}
        pipeline = build_pipeline(config, args.pipeline, recorded)

        totals = {"pipe_tokens": 0, "pipe_s": 0.0, "raw_tokens": 0, "raw_s": 0.0, "calls": 0, "same": 0, "replica_s": 0.0}

        def replay(calls: list[RecordedCall]) -> tuple[int, float, int]:
            tokens, seconds, same = 0, 0.0, 0
            for call in calls:
                start = time.perf_counter()
                out = raw.create_chat_completion(**raw_kwargs(spec, call))
                seconds += time.perf_counter() - start
                tokens += out["usage"]["completion_tokens"]
                same += out["choices"][0]["message"]["content"] == call.completion.text
            return tokens, seconds, same

        # a first prompt warms both sides (model pages, Serve routers) and is not counted
        per_prompt: list[float] = []
        for i, prompt in enumerate([WARMUP_PROMPT, *PROMPTS[: args.prompts]]):
            log.clear()
            start = time.perf_counter()
            result = asyncio.run(pipeline.run(prompt))
            wall = time.perf_counter() - start
            calls = list(log)
            pipe_tokens = sum(c.completion.usage.completion_tokens for c in calls)
            in_replica = sum(c.completion.latency_s for c in calls)
            raw_tokens, raw_s, same = replay(calls)
            label = "warm-up" if i == 0 else f"prompt {i}/{args.prompts}"
            print(
                f"{label}: pipeline {pipe_tokens} tok in {wall:.2f}s ({pipe_tokens / wall:.1f} tok/s, {len(calls)} calls, "
                f"{result.trace.layers_run} layers, {in_replica:.2f}s generating in the replica) | raw {raw_tokens} tok in {raw_s:.2f}s ({raw_tokens / raw_s:.1f} tok/s) "
                f"| identical outputs {same}/{len(calls)}",
                flush=True,
            )
            if i == 0:
                continue
            per_prompt.append((pipe_tokens / wall) / (raw_tokens / raw_s))
            totals["pipe_tokens"] += pipe_tokens
            totals["pipe_s"] += wall
            totals["replica_s"] += in_replica
            totals["raw_tokens"] += raw_tokens
            totals["raw_s"] += raw_s
            totals["calls"] += len(calls)
            totals["same"] += same

    pipe_rate = totals["pipe_tokens"] / totals["pipe_s"]
    raw_rate = totals["raw_tokens"] / totals["raw_s"]
    print(
        f"pipeline: {totals['pipe_tokens']} completion tokens in {totals['pipe_s']:.2f}s = {pipe_rate:.1f} tok/s "
        f"(request wall time, {totals['calls']} calls; {totals['replica_s']:.2f}s of it generating inside the replica)"
    )
    print(f"raw llama-cpp-python: {totals['raw_tokens']} completion tokens in {totals['raw_s']:.2f}s = {raw_rate:.1f} tok/s")
    print(f"identical outputs: {totals['same']}/{totals['calls']} calls")
    print(f"median of per-prompt ratios {statistics.median(per_prompt):.3f} (less sensitive to bursts of load from other processes)")
    print(f"ratio {pipe_rate / raw_rate:.3f}")


if __name__ == "__main__":
    main()
