"""The front door, ``moa_ray.session``: a config's pipelines answer through ``run``, ``arun``, ``stream`` and
``astream``; Ray starts only for models that need a deployment and is released on exit; sessions follow each other
in one process; ``import moa_ray`` stays light and its ``__all__`` resolves.

The fast-lane tests call remote models (the LLM simulator) hosted in process, so they need no Ray: the ``ray.init``
that tests/conftest.py refuses outside the ``ray`` lane would fail them if a session started one. The Ray test runs
its sessions in a subprocess, so the session's shared cluster of the other Ray tests is never shut down.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from eval_support import model

import moa_ray
from bench.simulator import Behaviour, SimulatorConfig
from moa_ray.chat import ChatParams, StreamChunk
from moa_ray.cli import main
from moa_ray.errors import ConfigError, MoARayError, PipelineError
from moa_ray.pipeline.base import CallEvent, PipelineResult
from moa_ray.session import Session

ROOT = Path(__file__).resolve().parent.parent
ANSWER = "Rayleigh scattering makes the sky blue."


def sim_config(base_url: str, **aggregator: object) -> dict:
    return {
        "models": {
            "p1": model(base_url, "sim/p1"),
            "p2": model(base_url, "sim/p2"),
            "agg": model(base_url, "sim/agg", **aggregator),
            "down": model(base_url, "sim/down"),
            "free": model(base_url, "sim/free"),
        },
        "pipelines": {
            "tiny": {"kind": "moa", "layers": [["p1", "p2"]], "aggregator": "agg"},
            "short": {"kind": "moa", "layers": [["p1"]], "aggregator": "free"},
            "broken": {"kind": "moa", "layers": [["down"]], "aggregator": "agg"},
        },
    }


@pytest.fixture
def sim(simulator):
    return simulator(
        SimulatorConfig(
            latency_ms=5,
            output_tokens=8,
            models={"sim/agg": Behaviour(latency_ms=5, reply=ANSWER), "sim/down": Behaviour(latency_ms=5, failure_rate=1.0)},
        )
    )


@pytest.fixture
def config_file(sim, tmp_path: Path) -> Path:
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(sim_config(sim.base_url)))
    return path


def _ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


# --------------------------------------------------------------------------- run, arun, stream, astream (no Ray)


def test_run_answers_through_a_pipeline_of_remote_models_without_starting_ray(config_file: Path, sim, monkeypatch) -> None:
    from moa_ray import runtime

    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: pytest.fail("the session asked for Ray"))
    ray_before = _ray_initialized()  # the Ray lane's shared cluster may be up in this process: it stays as it was
    with moa_ray.session(config_file) as s:
        result = s.run("tiny", "Why is the sky blue?")
        assert not s.started_ray
    assert isinstance(result, moa_ray.PipelineResult) and result.answer == ANSWER
    assert [(c.layer, c.role, c.model, c.status) for c in result.trace.calls] == [
        (1, "proposer", "p1", "ok"),
        (1, "proposer", "p2", "ok"),
        (2, "aggregator", "agg", "ok"),
    ]
    assert sim.stats.requests == 3
    full = result.trace.to_json_dict("full")  # the record `moa-ray run --json --trace full` prints
    assert full["calls"][2]["text"] == ANSWER and result.trace.to_json_dict()["calls"][2].get("text") is None
    assert s.closed and _ray_initialized() == ray_before


def test_run_takes_messages_params_and_max_tokens(config_file: Path, sim) -> None:
    with moa_ray.session(str(config_file)) as s:
        result = s.run(
            "short",
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
            ChatParams(temperature=0.0),
            max_tokens=3,
            timeout_s=30,
        )
    assert len(result.answer.split()) == 3  # the simulator cuts its generated reply at max_tokens
    assert result.trace.calls[-1].completion_tokens == 3


def test_arun_and_astream_answer_in_the_callers_event_loop(config_file: Path) -> None:
    async def main() -> tuple[PipelineResult, list[object]]:
        async with moa_ray.session(config_file) as s:
            answered = await s.arun("tiny", "Why?")
            streamed = [item async for item in s.astream("tiny", "Why?", call_events=True)]
            return answered, streamed

    answered, streamed = asyncio.run(main())
    assert answered.answer == ANSWER
    events = [i for i in streamed if isinstance(i, CallEvent)]
    chunks = [i for i in streamed if isinstance(i, StreamChunk)]
    assert [e.record.model for e in sorted(events, key=lambda e: e.record.index)] == ["p1", "p2"]
    assert streamed.index(events[-1]) < streamed.index(chunks[0])  # the layer's calls before the answer's deltas
    assert isinstance(streamed[-1], PipelineResult) and "".join(c.delta for c in chunks) == streamed[-1].answer == ANSWER


def test_stream_yields_the_deltas_then_the_result(config_file: Path) -> None:
    with moa_ray.session(config_file) as s:
        items = list(s.stream("tiny", "Why?"))
        assert not any(isinstance(i, CallEvent) for i in items)  # not asked for
        first = next(iter(s.stream("tiny", "Why?")))  # a stream left early is closed, and the session goes on
        again = s.run("tiny", "Why?")
    assert isinstance(items[-1], PipelineResult) and items[-1].answer == ANSWER
    assert "".join(i.delta for i in items[:-1] if isinstance(i, StreamChunk)) == ANSWER
    assert isinstance(first, StreamChunk) and again.answer == ANSWER


def test_a_failed_pipeline_raises_with_its_trace(config_file: Path) -> None:
    with moa_ray.session(config_file) as s, pytest.raises(PipelineError) as failed:
        s.run("broken", "Why?")
    assert failed.value.trace is not None and [c.status for c in failed.value.trace.calls] == ["error"]


def test_a_second_session_in_the_same_process_works(config_file: Path, sim) -> None:
    config = moa_ray.load_config(config_file)
    ray_before = _ray_initialized()
    for _ in range(2):
        with moa_ray.session(config) as s:  # a loaded config, each session with its own agents and loop
            assert s.run("tiny", "Why?").answer == ANSWER
            assert next(i for i in s.stream("tiny", "Why?") if isinstance(i, PipelineResult)).answer == ANSWER
            assert not s.started_ray
    assert sim.stats.requests == 12 and _ray_initialized() == ray_before


def test_a_mapping_or_no_config_and_bad_input_fail_before_any_ray(sim) -> None:
    with moa_ray.session(sim_config(sim.base_url)) as s:
        assert set(s.config.pipelines) == {"tiny", "short", "broken"}
        with pytest.raises(ConfigError, match="unknown pipeline 'nope'"):
            s.run("nope", "hi")
        with pytest.raises(ConfigError, match="unknown model 'nope'"):
            s.agents(models=["nope"])
    assert "embedded" in Session().config.pipelines  # None: the shipped presets (nothing started until used)
    with pytest.raises(ConfigError, match="config file not found"):
        moa_ray.session("absent.yaml")


def test_sync_methods_refuse_a_running_loop_and_a_closed_session(config_file: Path) -> None:
    s = moa_ray.session(config_file)

    async def inside() -> None:
        with pytest.raises(MoARayError, match=r"use `await session.arun"):
            s.run("tiny", "hi")

    asyncio.run(inside())
    assert s.run("tiny", "hi").answer == ANSWER  # outside a loop it runs
    s.close()
    s.close()  # idempotent
    with pytest.raises(MoARayError, match="closed"):
        s.run("tiny", "hi")


def test_the_stream_is_bounded_by_the_requests_deadline() -> None:
    """A final call's stream that never ends stops at the deadline (the driver leaves that bound to its caller)."""
    from moa_ray.session import stream_within

    class Stalled:
        name = "stalled"

        async def stream(self, *args, **kwargs):
            yield StreamChunk(delta="a")
            await asyncio.sleep(60)

    async def consume() -> list[object]:
        got: list[object] = []
        with pytest.raises(MoARayError, match=r"'stalled' did not finish within 0\.2 s"):
            async for item in stream_within(Stalled(), "hi", timeout_s=0.2):  # type: ignore[arg-type]
                got.append(item)
        return got

    assert asyncio.run(consume()) == [StreamChunk(delta="a")]


def test_the_cli_runs_through_the_session_without_ray_for_remote_models(config_file: Path) -> None:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["run", "Why?", "--config", str(config_file), "--pipeline", "tiny", "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["answer"] == ANSWER and out["pipeline"] == "tiny" and len(out["trace"]["calls"]) == 3


# --------------------------------------------------------------------------- the public API


def test_import_moa_ray_is_light_and_its_all_resolves() -> None:
    code = (
        "import sys, moa_ray\n"
        "heavy = sorted(m for m in ('ray', 'pydantic', 'moa_ray.config', 'moa_ray.pipeline') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "missing = [n for n in moa_ray.__all__ if getattr(moa_ray, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert 'ray' not in sys.modules and callable(moa_ray.session)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    assert moa_ray.session is moa_ray.__dict__["session"] and moa_ray.Session is Session
    assert moa_ray.Trace.__name__ == "Trace" and issubclass(moa_ray.PipelineError, moa_ray.MoARayError)
    assert set(moa_ray.__all__) <= set(dir(moa_ray))


# --------------------------------------------------------------------------- Ray: started when needed, released on exit

SESSIONS_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, time
    import ray
    import moa_ray
    from moa_ray import runtime

    config, out = sys.argv[1], {}
    with moa_ray.session(config) as s:
        out["first"] = s.run("tiny", "Why?").answer
        out["first_started_ray"], out["first_inside"] = s.started_ray, ray.is_initialized()
        t0 = time.monotonic()
    out["release_s"] = time.monotonic() - t0
    out["first_after"], out["reaper_after"] = ray.is_initialized(), runtime._reaper is not None

    async def second():
        async with moa_ray.session(config) as s:
            result = await s.arun("tiny", "Why?")  # deployed from the event loop (in a worker thread)
            streamed = [i async for i in s.astream("tiny", "Why?")]
            return result.answer, streamed[-1].answer, s.started_ray

    out["second"], out["second_streamed"], out["second_started_ray"] = asyncio.run(second())
    out["second_after"] = ray.is_initialized()
    print(json.dumps(out))
    """
)


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_a_session_that_starts_ray_releases_it_and_a_second_one_starts_it_again(sim, tmp_path: Path) -> None:
    """A `hosting: deployment` model needs a Serve deployment, so the session starts a local Ray; on exit it is shut
    down. A second session in the same process (async this time) starts and releases its own. In a subprocess: the
    other Ray tests share this process's cluster."""
    path = tmp_path / "deployed.yaml"
    path.write_text(yaml.safe_dump(sim_config(sim.base_url, hosting="deployment")))
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", SESSIONS_SCRIPT, str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["first"] == out["second"] == out["second_streamed"] == ANSWER
    assert out["first_started_ray"] and out["first_inside"] and out["second_started_ray"]
    assert not out["first_after"] and not out["reaper_after"] and not out["second_after"]
    print(f"release took {out['release_s']:.1f} s")
