"""vLLM's engine metrics in the same scrape (issue 21 step 1): ``moa-ray serve --metrics-port`` with the shipped
vLLM agent (SmolLM2-135M on vLLM's CPU build, through Ray Serve LLM with ``log_engine_metrics``) exports vLLM's
time to first token, time per output token, KV-cache use and token counters beside moa-ray's own, and vLLM's token
counters agree with the traces'. Every vLLM name the dashboard queries is one this scrape shows."""

from __future__ import annotations

import time

import httpx
import pytest
import yaml
from metrics_support import Scrape, recorded_names
from serve_support import ServerProcess, sse_events
from vllm_support import require_vllm

from bench.simulator import free_port
from moa_ray.config import VLLMModelSpec, load_config
from moa_ray.serve.llm import llm_config

pytestmark = [pytest.mark.vllm]

MODEL = "smollm2-vllm"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_the_llm_config_turns_the_engine_metrics_on():
    require_vllm()
    spec = load_config().models[MODEL]
    assert isinstance(spec, VLLMModelSpec)
    assert llm_config(MODEL, spec, {}).log_engine_metrics is True


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vllm_engine_metrics_are_in_the_same_scrape(tmp_path):
    require_vllm()
    presets = load_config().model_dump(mode="json", exclude_none=True)
    config = {"models": {MODEL: presets["models"][MODEL]}, "pipelines": {"single-vllm": {"kind": "single", "model": MODEL}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    server = ServerProcess(path, {}, extra_args=("--metrics-port", str(port)), startup_timeout_s=600)
    try:
        server.start()
        traces = []
        for stream in (False, True):
            body = {"model": "single-vllm", "messages": QUESTION, "max_tokens": 32, "stream": stream, "moa": {"trace": True}}
            response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300)
            assert response.status_code == 200, response.text
            if stream:
                (trace,) = [
                    e["moa"]["trace"] for e in sse_events(response.text) if isinstance(e, dict) and (e.get("moa") or {}).get("trace")
                ]
            else:
                trace = response.json()["moa"]["trace"]
            traces.append(trace)
        completion_tokens = sum(c["completion_tokens"] for t in traces for c in t["calls"])
        until = time.monotonic() + 180
        while True:
            scrape = Scrape.of(f"http://127.0.0.1:{port}/metrics")
            if scrape.total("ray_vllm_generation_tokens_total") >= completion_tokens and scrape.total("ray_moa_requests_total") >= 2:
                break
            assert time.monotonic() < until, sorted(n for n in scrape.names if "vllm" in n)
            time.sleep(2)
    finally:
        server.stop()
        server.cleanup()
    assert recorded_names("vllm") <= scrape.names, recorded_names("vllm") - scrape.names
    assert scrape.total("ray_vllm_time_to_first_token_seconds_count") == 2
    assert scrape.total("ray_vllm_generation_tokens_total") == completion_tokens
    assert scrape.sums("ray_moa_tokens_total", "direction")[("completion",)] == completion_tokens
    assert scrape.sums("ray_moa_requests_total", "pipeline", "status") == {("single-vllm", "200"): 2}
