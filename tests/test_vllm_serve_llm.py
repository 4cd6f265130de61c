"""vLLM for real: SmolLM2-135M on vLLM's CPU build, as a Ray Serve LLM deployment, reached through Serve handles.

One deployment (the shipped ``embedded-vllm`` model, ~90 s to start) serves every test of this module; the
test that kills its engine runs last. No fakes: every answer here comes from the engine.
Deselect locally with ``-m "not vllm"``; CI installs the vLLM route and runs them all.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import jsonschema
import pytest
from vllm_support import require_vllm

from moa_ray.chat import ChatMessage, ChatParams, as_messages
from moa_ray.config import load_config, parse_config
from moa_ray.errors import ContextLengthExceeded
from moa_ray.pipeline import build_pipeline
from moa_ray.pipeline.selection import judge_schema, parse_verdict
from moa_ray.prompts import judge_prompt
from moa_ray.serve.auth import KeyVerifier, Redactor
from moa_ray.serve.ingress import create_api
from moa_ray.serve.service import ChatService

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(900)]

MODEL = "smollm2-vllm"
APP = "vllm-tests"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def config():
    require_vllm()
    presets = load_config().model_dump(mode="json", exclude_none=True)
    model = presets["models"][MODEL]
    return parse_config(
        {
            "models": {MODEL: model},
            "pipelines": {
                "embedded-vllm": presets["pipelines"]["embedded-vllm"],
                "single-vllm": {"kind": "single", "model": MODEL},
                "smoa-vllm": {
                    "kind": "smoa",
                    "layers": [[MODEL, {"model": MODEL, "temperature": 1.0}, {"model": MODEL, "temperature": 0.4}]],
                    "aggregator": MODEL,
                    "k": 2,
                    # room for the whole schema: 200 characters of reasoning can be ~200 of SmolLM2's tokens, and a
                    # verdict cut off before its picks would be repaired (the proposers' 192 tokens once were not enough)
                    "judge": {"model": MODEL, "max_tokens": 512},
                    "moderator": False,
                },
            },
        }
    )


@pytest.fixture(scope="module")
def agents(ray_session, config):
    from ray import serve

    from moa_ray.serve.deploy import deploy_models

    deployed = deploy_models(config, [MODEL], app_name=APP)
    yield deployed
    serve.delete(APP)


def run(coro):
    return asyncio.run(coro)


def test_an_moa_of_vllm_agents_answers_with_parallel_proposers(config, agents):
    result = run(build_pipeline(config, "embedded-vllm", agents).run(QUESTION))
    assert "paris" in result.answer.lower(), result.answer
    trace = result.trace
    proposers = [c for c in trace.calls if c.role == "proposer"]
    aggregators = [c for c in trace.calls if c.role == "aggregator"]
    assert len(proposers) == 3 and len(aggregators) == 1
    assert all(c.status == "ok" and c.model == MODEL and c.completion_tokens > 0 for c in proposers + aggregators)
    layer1 = trace.layers[0]
    # parallel: the layer took about as long as its slowest call, not the sum of the three
    assert layer1.wall_s < sum(c.latency_s for c in proposers) * 0.9
    # the aggregator read the proposers' answers (the aggregate-and-synthesize system prompt)
    assert aggregators[0].prompt_tokens > max(c.prompt_tokens for c in proposers) + sum(c.completion_tokens for c in proposers) // 2


def test_a_plain_answer_carries_usage_and_finish_reason(agents):
    completion = run(agents[MODEL].chat(as_messages(QUESTION), ChatParams(temperature=0.0, max_tokens=48)))
    assert "paris" in completion.text.lower()
    assert completion.usage.prompt_tokens > 5 and 0 < completion.usage.completion_tokens <= 48
    assert completion.finish_reason in ("stop", "length")

    capped = run(agents[MODEL].chat(as_messages("Tell me a long story about a dragon."), ChatParams(max_tokens=5)))
    assert capped.finish_reason == "length" and capped.usage.completion_tokens == 5


def test_a_stream_arrives_in_pieces_and_ends_with_usage(agents):
    async def collect():
        chunks = []
        prompt = as_messages("Write a long story about a dragon who learns to cook.")
        async for chunk in agents[MODEL].stream(prompt, ChatParams(temperature=0.0, max_tokens=64)):
            chunks.append(chunk)
        return chunks

    chunks = run(collect())
    deltas = [c.delta for c in chunks if c.completion is None]
    final = chunks[-1].completion
    assert final is not None and all(c.completion is None for c in chunks[:-1])
    assert len(deltas) >= 3, deltas  # token by token (in Ray Serve LLM's 50 ms batches), not one blob
    assert "".join(deltas) == final.text and final.text.strip()
    assert final.usage.completion_tokens == 64 and final.usage.prompt_tokens > 5
    assert final.finish_reason == "length"


def test_the_smoa_judge_gets_schema_valid_json_from_structured_outputs(agents):
    responses = ["Paris is the capital of France.", "It is Lyon.", "The capital of France is Paris, on the Seine."]
    schema = judge_schema(3, 2, moderate=True)
    messages = [ChatMessage(role="user", content=judge_prompt(QUESTION, responses, 2, moderate=True))]
    completion = run(agents[MODEL].chat(messages, ChatParams(temperature=1.0, max_tokens=400, json_mode=True, json_schema=schema)))
    assert completion.finish_reason == "stop", completion.text  # closed by the grammar, not cut by max_tokens
    verdict = json.loads(completion.text)  # a 135M model at temperature 1 writes valid JSON only because vLLM enforces the schema
    jsonschema.validate(verdict, schema)
    assert parse_verdict(completion.text).form == "json"


def test_an_smoa_pipeline_runs_its_judge_on_vllm(config, agents):
    result = run(build_pipeline(config, "smoa-vllm", agents).run(QUESTION))
    layer = result.trace.layers[0]
    assert layer.selected is not None and len(layer.selected) == 2
    assert layer.judge_fallback is None  # the verdict parsed as JSON, nothing repaired
    assert any(c.role == "judge" and c.status == "ok" for c in result.trace.calls)


LONG = "Paris is lovely in the spring. " * 1200  # ~8k tokens > max_model_len 4096


def test_an_over_long_prompt_is_context_length_exceeded(agents):
    with pytest.raises(ContextLengthExceeded) as info:
        run(agents[MODEL].chat(as_messages(LONG), ChatParams(max_tokens=16)))
    assert info.value.status_code == 400 and "4096" in str(info.value)


def test_an_over_long_prompt_is_a_400_at_the_endpoint(config, agents):
    pipelines = {name: build_pipeline(config, name, agents) for name in ("single-vllm", "embedded-vllm")}
    api = create_api(ChatService(config, pipelines, Redactor.for_config(config)), KeyVerifier([]))

    async def post(body):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://moa.test", timeout=300) as client:
            return await client.post("/v1/chat/completions", json=body)

    long = run(post({"model": "single-vllm", "messages": [{"role": "user", "content": LONG}], "max_tokens": 16}))
    assert long.status_code == 400, long.text
    assert long.json()["error"]["code"] == "context_length_exceeded"

    ok = run(post({"model": "single-vllm", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 32}))
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] > 0


def test_many_seeded_calls_at_once_leave_the_engine_alive(agents):
    """24 seeded calls whose prompts together overflow one prefill batch: with vLLM's chunked prefill on, its CPU
    engine dies on them (a CPU generator cannot rewind); the CPU device turns chunked prefill off."""

    async def burst():
        prompt = "Tell me about the history of Paris. " * 30
        calls = [agents[MODEL].chat(as_messages(f"{prompt}{i}"), ChatParams(max_tokens=8, temperature=1.0, seed=i)) for i in range(24)]
        return await asyncio.gather(*calls)

    completions = run(burst())
    assert len(completions) == 24 and all(c.usage.completion_tokens > 0 for c in completions)


def test_a_replica_whose_engine_died_is_restarted_by_serve(agents):
    """Last: kill the vLLM engine process under the replica; LLMServer's health check fails and Serve replaces it."""
    import psutil
    from ray import serve

    handle = serve.get_deployment_handle(f"agent-{MODEL}", APP)
    before = handle.info.remote().result(timeout_s=60)
    engines = [
        p for p in psutil.Process(before["pid"]).children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) or "VLLM" in p.name()
    ]
    assert engines, [p.cmdline() for p in psutil.Process(before["pid"]).children(recursive=True)]
    for proc in engines:
        proc.kill()

    deadline = time.monotonic() + 400
    after = None
    while time.monotonic() < deadline:
        try:
            after = handle.info.remote().result(timeout_s=10)
            if after["pid"] != before["pid"]:
                break
        except Exception:  # noqa: BLE001 - the replica is going or starting
            pass
        time.sleep(2)
    assert after is not None and after["pid"] != before["pid"], "Serve did not replace the replica whose engine died"
    completion = run(agents[MODEL].chat(as_messages(QUESTION), ChatParams(temperature=0.0, max_tokens=24)))
    assert "paris" in completion.text.lower()
    assert not os.path.exists(f"/proc/{engines[0].pid}")
