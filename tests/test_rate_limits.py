"""Rate limits (``rpm``, ``tpm``): the exact sliding window, the endpoint's 429 with Retry-After (never a 5xx), the
``tpm`` rule (estimate before, reported usage after), an evaluation's patient wait, and (marked ``ray``) one limit
held by the cluster's actor across two processes.

Windows are shortened (``window_s``) so that a test takes seconds, not minutes; the semantics are the same."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from bench.simulator import SimulatorConfig, free_port
from moa_ray.backends.openai_http import OpenAIBackend
from moa_ray.chat import ChatMessage, ChatParams, Completion, Usage
from moa_ray.config import parse_config
from moa_ray.errors import AggregatorFailed, OverRateLimit
from moa_ray.pipeline import build_pipeline, limits
from moa_ray.pipeline.agents import Agent, InProcessAgent, LocalAgent, prepare_agents
from moa_ray.pipeline.limits import (
    LATE_START_S,
    LEASE_LIMIT_SHARE,
    LocalWindows,
    RateLimit,
    RateLimitedAgent,
    ReplicaRetries,
    SlidingWindow,
    rate_limited,
    replica_backend,
    reserved_tokens,
)
from moa_ray.serve.auth import KeyVerifier, Redactor
from moa_ray.serve.ingress import create_api
from moa_ray.serve.service import ChatService

USER = [{"role": "user", "content": "What is a mixture of agents?"}]
WINDOW_S = 2.0


@pytest.fixture(autouse=True)
def fresh_windows(request, monkeypatch):
    """Each test without Ray starts with empty windows of its own (even where an earlier test left Ray running)."""
    if request.node.get_closest_marker("ray") is None:
        fresh = limits._InProcess()
        monkeypatch.setattr(limits, "process_windows", lambda: fresh)


def remote(base_url: str, model_id: str, **extra: Any) -> dict[str, Any]:
    return {"backend": "openai", "model": model_id, "base_url": base_url, "max_retries": 0, "max_tokens": 32, **extra}


def limited_config(base_url: str, *, server: dict | None = None, **limit: Any) -> Any:
    models = {"lim": remote(base_url, "sim-lim", **limit), "free": remote(base_url, "sim-free")}
    pipelines = {"one": {"kind": "single", "model": "lim"}, "moa": {"kind": "moa", "layers": [["lim", "free"]], "aggregator": "free"}}
    return parse_config({"models": models, "pipelines": pipelines, "server": server or {}})


def agents_for(config: Any, window_s: float = WINDOW_S) -> dict[str, Agent]:
    """The assembly's agents (in process, limited where the model says so), with a short window."""
    return {m: rate_limited(InProcessAgent(m, spec), m, spec, window_s=window_s) for m, spec in config.models.items()}


def api_for(config: Any, window_s: float = WINDOW_S) -> Any:
    agents = agents_for(config, window_s)
    pipelines = {name: build_pipeline(config, name, agents) for name in config.pipelines}
    return create_api(ChatService(config, pipelines, Redactor.for_config(config)), KeyVerifier(()))


def most_in_any_window(arrivals: list[float], window_s: float) -> int:
    """The largest number of arrivals inside any half-open window of ``window_s`` seconds."""
    times = sorted(arrivals)
    return max((sum(1 for t in times[i:] if t < start + window_s) for i, start in enumerate(times)), default=0)


# --------------------------------------------------------------------------- the window itself (no clock, no I/O)


def reserve_one(window: SlidingWindow, now: float, tokens: int = 0, max_wait: float | None = None) -> tuple[int | None, float]:
    entry, wait, _ = window.reserve(now, [tokens], [max_wait])
    return entry, wait


def test_a_window_lets_rpm_calls_through_then_reserves_the_moment_the_oldest_leaves():
    window = SlidingWindow(RateLimit(rpm=3, window_s=10))
    assert [reserve_one(window, 0.0)[1] for _ in range(3)] == [0.0, 0.0, 0.0]
    entry, wait = reserve_one(window, 1.0)
    assert entry is not None and wait == pytest.approx(10 + LATE_START_S - 1.0)
    # a caller with less time than that is refused, told when room opens, and reserves nothing
    assert reserve_one(window, 1.0, max_wait=5.0) == (None, pytest.approx(10 + LATE_START_S - 1.0))
    assert reserve_one(window, 1.0)[1] == pytest.approx(10 + LATE_START_S - 1.0)  # first come, first served


def test_a_group_of_waiting_calls_gets_as_many_as_fit_beside_the_first():
    window = SlidingWindow(RateLimit(rpm=4, tpm=100, window_s=10))
    assert window.reserve(0.0, [30, 30, 30, 30], [None] * 4)[1:] == (0.0, 3)  # the fourth's 30 tokens do not fit
    _, wait, granted = window.reserve(0.0, [30, 30], [None, None])
    assert (wait, granted) == (pytest.approx(10 + LATE_START_S), 2)
    # a call that may not wait that long is not held with the group, nor is any after it
    assert window.reserve(0.0, [10, 10], [1.0, None]) == (None, pytest.approx(10 + LATE_START_S), 0)
    assert window.reserve(0.0, [10, 10, 10], [None, 1.0, None])[2] == 1


def test_any_window_holds_at_most_rpm_calls_and_tpm_tokens_whatever_the_arrivals():
    rng = random.Random(7)
    limit = RateLimit(rpm=5, tpm=300, window_s=4)
    window = SlidingWindow(limit)
    now, starts = 0.0, []
    for _ in range(400):
        now += rng.expovariate(3.0)
        group = [rng.randint(1, 120) for _ in range(rng.randint(1, 4))]
        _, wait, granted = window.reserve(now, group, [rng.choice([None, 2.0, 30.0])] * len(group))
        starts += [(now + wait, tokens) for tokens in group[:granted]]
    assert len(starts) > 100
    for moment, _ in starts:  # every window [moment, moment + window_s) that starts at a call
        inside = [t for s, t in starts if moment <= s < moment + limit.window_s]
        assert len(inside) <= 5 and sum(inside) <= 300


def test_settling_frees_unused_tokens_and_charges_retried_attempts():
    window = SlidingWindow(RateLimit(rpm=4, tpm=100, window_s=10))
    first, _ = reserve_one(window, 0.0, 80)
    assert reserve_one(window, 0.0, 80, 0.0)[0] is None  # 160 tokens do not fit 100
    assert first is not None
    window.settle(first, calls=1, tokens=20)  # the provider reported 20
    assert reserve_one(window, 0.0, 80, 0.0)[1] == 0.0
    crowded = SlidingWindow(RateLimit(rpm=2, window_s=10))
    retried, _ = reserve_one(crowded, 0.0)
    assert retried is not None
    crowded.settle(retried, calls=2, tokens=0)  # the backend retried once: two provider calls
    assert reserve_one(crowded, 0.0, max_wait=0.0)[0] is None
    crowded.settle(retried, calls=0, tokens=0)  # given back (never started)
    assert reserve_one(crowded, 0.0, max_wait=0.0)[1] == 0.0


def test_a_lease_holds_its_spare_room_a_window_past_its_last_moment_until_it_is_given_back():
    window = SlidingWindow(RateLimit(rpm=2, window_s=10))
    entry, wait, granted, spare, _ = window.lease(0.0, [0], [None], spare=5, lease_s=0.5)
    assert entry is not None and (wait, granted, spare) == (0.0, 1, 1)  # never past the limit
    # a call may start on the spare room until 0.5: the entry counts until 0.5 + 10 + LATE_START_S
    assert reserve_one(window, 0.0)[1] == pytest.approx(0.5 + 10 + LATE_START_S)
    fresh = SlidingWindow(RateLimit(rpm=2, window_s=10))
    lease, *_ = fresh.lease(0.0, [0], [None], spare=1, lease_s=0.5)
    assert lease is not None
    fresh.settle(lease, calls=1, tokens=0)  # the spare call was not spent: its room goes back
    assert reserve_one(fresh, 0.1) == (lease + 1, 0.0)


def test_spare_room_only_beside_a_group_that_starts_now_and_only_what_fits():
    window = SlidingWindow(RateLimit(rpm=4, tpm=100, window_s=10))
    assert window.lease(0.0, [30], [None], spare=5, spare_tokens=50, lease_s=0.5)[1:] == (0.0, 1, 3, 50)
    assert window.lease(0.0, [10], [None], spare=5, spare_tokens=50, lease_s=0.5)[1:] == (pytest.approx(10.5 + LATE_START_S), 1, 0, 0)
    tokens_only = SlidingWindow(RateLimit(tpm=100, window_s=10))
    assert tokens_only.lease(0.0, [30], [None], spare=9, spare_tokens=90, lease_s=0.5)[1:] == (0.0, 1, 9, 70)


def test_leases_spent_by_several_processes_never_let_more_than_rpm_into_any_window():
    """Three processes take leases with random spare room, spend it at random moments until their lease ends, and
    give back what they did not spend: every window of the provider's holds at most rpm calls."""
    rng = random.Random(11)
    rpm, window_s, lease_s = 7, 4.0, 0.5
    window = SlidingWindow(RateLimit(rpm=rpm, window_s=window_s))
    leases: dict[int, dict[str, Any]] = {}  # process -> its lease: entry, until, free, used
    now, starts = 0.0, []
    for _ in range(600):
        now += rng.expovariate(4.0)
        process = rng.randrange(3)
        lease = leases.get(process)
        if lease and now < lease["until"] and lease["free"]:
            lease["free"] -= 1
            lease["used"] += 1
            starts.append(now)
            continue
        if lease:
            window.settle(lease["entry"], lease["used"], 0)
            del leases[process]
        entry, wait, granted, spare, _ = window.lease(now, [0], [None], spare=rng.randint(0, 3), lease_s=lease_s)
        assert entry is not None and granted == 1
        starts.append(now + wait)
        if spare:
            leases[process] = {"entry": entry, "until": now + lease_s, "free": spare, "used": 1}
    assert len(starts) > 400
    assert max(sum(1 for t in starts if s <= t < s + window_s) for s in starts) <= rpm


def test_a_call_reserves_its_estimated_prompt_plus_its_max_tokens():
    messages = [ChatMessage(role="user", content="x" * 400)]
    assert reserved_tokens(messages, ChatParams(max_tokens=50), 512) == 100 + 4 + 3 + 50
    assert reserved_tokens(messages, ChatParams(), 512) == 100 + 4 + 3 + 512  # unset: the model's max_tokens


def test_only_limited_models_get_a_limiter():
    config = limited_config("http://127.0.0.1:1/v1", rpm=6)
    from moa_ray.pipeline.agents import assemble_agents

    agents = assemble_agents(config, ["lim", "free"], {})
    assert isinstance(agents["lim"], RateLimitedAgent) and isinstance(agents["lim"].inner, InProcessAgent)
    assert isinstance(agents["free"], InProcessAgent)
    assert agents["lim"].limit == RateLimit(rpm=6)


# --------------------------------------------------------------------------- the endpoint


async def _post_all(app: Any, n: int, body: dict[str, Any]) -> list[httpx.Response]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://moa.test", timeout=60) as client:
        return list(await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(n))))


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_rpm_6_and_10_concurrent_requests_are_200_or_429_with_retry_after_never_a_5xx(simulator, stream):
    sim = simulator(SimulatorConfig(latency_ms=20, output_tokens=8))
    # the request's deadline (2 s) leaves 1 s to wait for room; the next room opens 2 s + 1 s after the first six
    app = api_for(limited_config(sim.base_url, rpm=6, server={"request_timeout_s": 2.0}))
    responses = await _post_all(app, 10, {"model": "one", "messages": USER, "stream": stream})
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 6 + [429] * 4, [r.text for r in responses]
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["Retry-After"]) <= WINDOW_S + LATE_START_S + 1
        assert refused.headers["x-should-retry"] == "false"
    assert sim.stats.requests == 6


@pytest.mark.anyio
async def test_with_time_to_wait_every_request_is_answered_and_the_provider_never_sees_more_than_rpm_in_a_window(simulator):
    sim = simulator(SimulatorConfig(latency_ms=20, output_tokens=8))
    window_s = 0.5
    app = api_for(limited_config(sim.base_url, rpm=6, server={"request_timeout_s": 60.0}), window_s=window_s)
    started = time.monotonic()
    responses = await _post_all(app, 10, {"model": "one", "messages": USER})
    assert [r.status_code for r in responses] == [200] * 10
    assert sim.stats.requests == 10
    assert most_in_any_window(sim.stats.arrivals, window_s) <= 6
    assert time.monotonic() - started >= window_s + LATE_START_S  # the last four waited for the first six to leave


@pytest.mark.anyio
async def test_a_moa_whose_proposer_is_limited_answers_with_its_other_proposer(simulator):
    """A proposer without room is a failed proposer (traced as OverRateLimit): the layer goes on with the rest."""
    sim = simulator(SimulatorConfig(latency_ms=20, output_tokens=8))
    config = limited_config(sim.base_url, rpm=1, server={"request_timeout_s": 2.0})
    app = api_for(config)
    body = {"model": "moa", "messages": USER, "moa": {"trace": True}}
    responses = await _post_all(app, 2, body)
    assert [r.status_code for r in responses] == [200, 200]
    errors = [c["error_type"] for r in responses for c in r.json()["moa"]["trace"]["calls"] if c["status"] != "ok"]
    assert errors == ["OverRateLimit"]


@pytest.mark.anyio
async def test_a_limited_call_falls_back_to_another_model(simulator):
    sim = simulator(SimulatorConfig(latency_ms=20, output_tokens=8))
    config = limited_config(sim.base_url, rpm=1, fallbacks=["free"], server={"request_timeout_s": 2.0})
    responses = await _post_all(api_for(config), 3, {"model": "one", "messages": USER, "moa": {"trace": True}})
    assert [r.status_code for r in responses] == [200, 200, 200]
    stand_ins = [c for r in responses for c in r.json()["moa"]["trace"]["calls"] if c["fallback_of"]]
    assert [(c["model"], c["fallback_of"]) for c in stand_ins] == [("free", "lim"), ("free", "lim")]
    assert sim.stats.by_model == {"sim-lim": 1, "sim-free": 2}


# --------------------------------------------------------------------------- tpm


@pytest.mark.anyio
async def test_tpm_reserves_the_estimate_and_keeps_only_the_reported_tokens(simulator):
    sim = simulator(SimulatorConfig(latency_ms=20, output_tokens=8))
    config = limited_config(sim.base_url, tpm=150)  # a call reserves 13 (its prompt, estimated) + 32 (max_tokens) = 45
    agent = agents_for(config)["lim"]
    messages, params = [ChatMessage(role="user", content="hello " * 4)], ChatParams(timeout_s=1.0)
    for _ in range(4):  # one after another: each keeps only what it used (12), so none waits (4 x 45 would not fit)
        await agent.chat(messages, params)
    assert sim.stats.requests == 4
    # side by side, the third's 45 do not fit beside 48 used and 2 x 45 in flight: it would wait past its deadline
    results = await asyncio.gather(*(agent.chat(messages, params) for _ in range(3)), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["Completion", "Completion", "OverRateLimit"]


# --------------------------------------------------------------------------- evaluations wait


@pytest.mark.anyio
async def test_an_evaluations_pipelines_wait_for_room_beyond_their_deadline(simulator, monkeypatch):
    from moa_ray.eval.generate import GenerateHandler

    monkeypatch.setattr(limits, "LATE_START_S", 0.1)  # a shorter margin: shorter waits, the same rule

    sim = simulator(SimulatorConfig(latency_ms=20, output_tokens=8))
    config = limited_config(sim.base_url, rpm=2)
    window_s = 0.5  # the last of the five waits 2 x (0.5 + 0.1) = 1.2 s for room, past its 1 s deadline
    handler = GenerateHandler(config, agents_for(config, window_s=window_s), ["one"], "run", {"one": "fp"}, timeout_s=1.0)
    await handler.setup()
    pipeline = handler.pipelines["one"]
    assert pipeline.patient_limits
    results = await asyncio.gather(*(pipeline.run("hello", timeout_s=1.0) for _ in range(5)))
    assert all(r.answer for r in results) and sim.stats.requests == 5
    assert most_in_any_window(sim.stats.arrivals, window_s) <= 2
    impatient = build_pipeline(config, "one", agents_for(config, window_s=30.0))
    await impatient.run("hello", timeout_s=1.0)
    await impatient.run("hello", timeout_s=1.0)
    with pytest.raises(AggregatorFailed) as refused:  # the endpoint's pipelines do not wait past half their deadline
        await impatient.run("hello", timeout_s=1.0)
    assert refused.value.trace.calls[-1].error_type == OverRateLimit.__name__


@pytest.mark.anyio
async def test_a_limited_agent_pickles_with_its_limit_for_ray_workers():
    import pickle

    config = limited_config("http://127.0.0.1:1/v1", rpm=6)
    agent = agents_for(config, window_s=3.0)["lim"]
    assert isinstance(agent, RateLimitedAgent)
    copy = pickle.loads(pickle.dumps(agent))
    assert isinstance(copy, RateLimitedAgent) and copy.limit == RateLimit(rpm=6, window_s=3.0) and copy.key == agent.key
    prepare_agents([copy])  # readies the inner in-process agent (needs a running loop)


# --------------------------------------------------------------------------- across processes (the cluster's actor)


@pytest.mark.ray
def test_two_processes_share_one_limit_through_the_clusters_actor(ray_session, simulator):
    ray = ray_session
    sim = simulator(SimulatorConfig(latency_ms=20, output_tokens=8))
    config = limited_config(sim.base_url, rpm=6)
    name = f"lim-{free_port()}"  # a window of this test's own in the session's actor
    spec = config.models["lim"]
    agent = RateLimitedAgent(InProcessAgent(name, spec), name, spec, window_s=WINDOW_S)

    def answer_five(agent: Any) -> list[str]:
        import asyncio as aio

        from moa_ray.chat import ChatMessage as Message
        from moa_ray.chat import ChatParams as Params

        async def five() -> list[str]:
            calls = [agent.chat([Message(role="user", content="hi")], Params(timeout_s=60.0)) for _ in range(5)]
            return [c.text for c in await aio.gather(*calls)]

        return aio.run(five())

    task = ray.remote(num_cpus=0.5)(answer_five)
    answers = ray.get([task.remote(agent), task.remote(agent)], timeout=120)
    assert [len(a) for a in answers] == [5, 5]
    assert sim.stats.requests == 10
    assert most_in_any_window(sim.stats.arrivals, WINDOW_S) <= 6
    assert ray.get_actor(limits.ACTOR_NAME, namespace=limits.ACTOR_NAMESPACE) is not None


def test_the_unlimited_model_pays_no_limiter():
    config = limited_config("http://127.0.0.1:1/v1")
    assert not isinstance(agents_for(config)["lim"], RateLimitedAgent)


# --------------------------------------------------------------------------- leases (the actor's protocol, in process)


class DirectActor(limits._OnRay):
    """The cluster's windows as :class:`limits._OnRay` reaches them, answered here by a :class:`LocalWindows` (what the
    actor runs), counting the actor calls a process makes."""

    def __init__(self, windows: LocalWindows | None = None) -> None:
        super().__init__()
        self.windows = windows or LocalWindows()
        self.asked: Counter[str] = Counter()

    async def call(self, method: str, *args: Any) -> Any:
        self.asked[method] += 1
        return getattr(self.windows, method)(*args)

    def settle_all(self, settlements: list[tuple[str, int, int, int]]) -> None:
        self.asked["settle_all"] += 1
        self.windows.settle_all(settlements)

    def held(self, key: str) -> int:
        return self.windows._windows[key]._calls


class QuickAgent:
    """Answers after 1 ms with 10 tokens; records when each call started."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        self.starts.append(time.monotonic())
        await asyncio.sleep(0.001)
        return Completion(text="ok", usage=Usage(prompt_tokens=5, completion_tokens=5), model="m")


def limited(rpm: int, window_s: float, tpm: int | None = None) -> tuple[RateLimitedAgent, QuickAgent]:
    config = parse_config({"models": {"m": remote("http://127.0.0.1:1/v1", "m", rpm=rpm, **({"tpm": tpm} if tpm else {}))}})
    inner = QuickAgent()
    return RateLimitedAgent(inner, f"m-{free_port()}", config.models["m"], window_s=window_s), inner


HELLO = [ChatMessage(role="user", content="hello")]


@pytest.mark.anyio
@pytest.mark.parametrize("tpm", [None, 10**9])
async def test_one_call_at_a_time_under_a_high_limit_pays_one_actor_call_per_many_calls(monkeypatch, tpm):
    actor = DirectActor()
    monkeypatch.setattr(limits, "process_windows", lambda: actor)
    agent, inner = limited(10**6, 60.0, tpm)
    for _ in range(300):
        await agent.chat(HELLO, ChatParams(timeout_s=10))
    assert len(inner.starts) == 300
    assert actor.asked["lease"] <= 15, actor.asked  # the leases grow with the process's rate
    await asyncio.sleep(limits.LEASE_S + 2 * limits.SETTLE_AFTER_S)
    assert actor.held(agent.key) == 300  # the spare room not spent went back; what was spent stays


@pytest.mark.anyio
async def test_a_small_limit_leases_no_spare_room_so_processes_share_it_fairly(monkeypatch):
    assert int(6 * LEASE_LIMIT_SHARE) == 0  # rpm 6: a lease holds only the calls that asked for it
    shared = LocalWindows()
    first, second = DirectActor(shared), DirectActor(shared)
    agent, inner = limited(6, 30.0)
    monkeypatch.setattr(limits, "process_windows", lambda: first)
    for _ in range(3):  # one process, fast: it holds its three calls and nothing more
        await agent.chat(HELLO, ChatParams(timeout_s=10))
    assert first.held(agent.key) == 3
    monkeypatch.setattr(limits, "process_windows", lambda: second)
    params = ChatParams(timeout_s=2.0)  # may wait 1 s at most: the other three get the room now, the fourth none
    results = await asyncio.gather(*(agent.chat(HELLO, params) for _ in range(4)), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["Completion"] * 3 + ["OverRateLimit"]
    assert most_in_any_window(inner.starts, 30.0) == 6


@pytest.mark.anyio
async def test_spare_room_a_process_leased_and_did_not_spend_goes_back(monkeypatch):
    actor = DirectActor()
    monkeypatch.setattr(limits, "process_windows", lambda: actor)
    agent, inner = limited(64, 2.0)  # at most 4 spare calls a lease (64 / 16), spendable for 20 ms
    for _ in range(20):
        await agent.chat(HELLO, ChatParams(timeout_s=10))
    await asyncio.sleep(limits.lease_seconds(agent.limit) + 2 * limits.SETTLE_AFTER_S)
    assert actor.held(agent.key) == 20
    assert most_in_any_window(inner.starts, 2.0) <= 64


# --------------------------------------------------------------------------- retries take room too


class FailingProvider:
    """An OpenAI-compatible provider that fails its first ``failures`` requests (503, then 429, alternately) and
    answers the rest; it records when each request arrived."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.arrivals: list[float] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.arrivals.append(time.monotonic())
        body = json.loads(request.content)
        if len(self.arrivals) <= self.failures:
            status = 503 if len(self.arrivals) % 2 else 429
            return httpx.Response(status, json={"error": {"message": "busy"}})
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "fine now"}
            return httpx.Response(
                200, json={"id": "x", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage}
            )
        events = [
            {"id": "x", "choices": [{"index": 0, "delta": {"content": "fine now"}, "finish_reason": "stop"}]},
            {"id": "x", "choices": [], "usage": usage},
        ]
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def retrying_spec(rpm: int, **extra: Any) -> Any:
    """A model with ``rpm`` whose backend retries 4 times, at once (1-10 ms backoff)."""
    model = {
        "backend": "openai",
        "model": "sim-lim",
        "base_url": "http://provider.test/v1",
        "rpm": rpm,
        "max_retries": 4,
        "backoff_s": 0.001,
        "backoff_max_s": 0.01,
        "http_transport": "httpx",
        **extra,
    }
    return parse_config({"models": {"lim": model}}).models["lim"]


def retrying_agent(provider: FailingProvider, rpm: int, window_s: float) -> RateLimitedAgent:
    spec = retrying_spec(rpm)
    backend = OpenAIBackend(spec, transport=httpx.MockTransport(provider.handle))
    return RateLimitedAgent(LocalAgent(backend), "lim", spec, window_s=window_s)


def deployed_retrying(provider: FailingProvider, rpm: int, window_s: float) -> RateLimitedAgent:
    """A deployed model's two ends in this process: the caller's limiter (its first attempts) over the replica's
    backend, whose retries take room in the replica (:class:`ReplicaRetries`), one set of windows between them, as
    the cluster's actor is one for a driver and a replica."""
    spec = retrying_spec(rpm, hosting="deployment")
    backend = OpenAIBackend(spec, transport=httpx.MockTransport(provider.handle))
    replica = ReplicaRetries(backend, "lim", spec, window_s=window_s)
    return RateLimitedAgent(LocalAgent(replica), "lim", spec, window_s=window_s)


async def answer(agent: RateLimitedAgent, stream: bool, timeout_s: float) -> Completion:
    params = ChatParams(timeout_s=timeout_s)
    if not stream:
        return await agent.chat(HELLO, params)
    async for chunk in agent.stream(HELLO, params):
        if chunk.completion is not None:
            return chunk.completion
    raise AssertionError("the stream ended without its completion")


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("build", [retrying_agent, deployed_retrying], ids=["in-process", "deployment"])
async def test_each_retry_takes_room_before_it_is_sent_so_the_provider_never_sees_more_than_rpm(monkeypatch, stream, build):
    """Two calls to a model with rpm 2 whose provider fails the first three requests (503, 429, 503): the retries
    wait for room (each charged in the window it falls in), where they used to go at once, 5 requests in 20 ms.
    For ``hosting: deployment`` the backend retries in the Serve replica, which takes room there for each retry."""
    monkeypatch.setattr(limits, "LATE_START_S", 0.1)  # a shorter margin: the test waits 0.6 s per window, not 1.5 s
    window_s = 0.5
    provider = FailingProvider(failures=3)
    agent = build(provider, rpm=2, window_s=window_s)
    completions = await asyncio.gather(*(answer(agent, stream, 30.0) for _ in range(2)))
    assert [c.text for c in completions] == ["fine now", "fine now"]
    assert sorted(c.attempts for c in completions) == [2, 3]
    assert len(provider.arrivals) == 5
    assert most_in_any_window(provider.arrivals, window_s) <= 2
    assert provider.arrivals[-1] - provider.arrivals[0] >= 2 * window_s  # two waits for room


@pytest.mark.anyio
async def test_a_retry_without_room_before_the_deadline_is_not_made(monkeypatch):
    monkeypatch.setattr(limits, "LATE_START_S", 0.1)
    provider = FailingProvider(failures=1)
    agent = retrying_agent(provider, rpm=1, window_s=5.0)
    with pytest.raises(OverRateLimit) as refused:
        await agent.chat(HELLO, ChatParams(timeout_s=2.0))
    assert len(provider.arrivals) == 1  # the first attempt failed; its retry found no room in time
    assert refused.value.attempts == 1 and refused.value.retries == ["UpstreamError (HTTP 503)"]
    assert "for a retry" in str(refused.value) and refused.value.retry_after_s == pytest.approx(5.1, abs=0.1)


@pytest.mark.anyio
async def test_the_caller_of_a_deployed_model_does_not_charge_the_retries_its_replica_charged(monkeypatch):
    actor = DirectActor()
    monkeypatch.setattr(limits, "process_windows", lambda: actor)
    provider = FailingProvider(failures=3)
    agent = deployed_retrying(provider, rpm=10, window_s=30.0)  # room for all: nothing waits, nothing leaves the window
    await asyncio.gather(*(answer(agent, False, 30.0) for _ in range(2)))
    await asyncio.sleep(limits.lease_seconds(agent.limit) + 4 * limits.SETTLE_AFTER_S)
    assert len(provider.arrivals) == 5
    assert actor.held(agent.key) == 5  # each request the provider saw, once: the caller charged first attempts only


def test_a_replica_holds_retries_to_the_limit_only_for_a_limited_model():
    config = parse_config(
        {"models": {"free": remote("http://127.0.0.1:1/v1", "free"), "lim": remote("http://127.0.0.1:1/v1", "lim", rpm=5)}}
    )
    backend = QuickAgent()
    assert replica_backend(backend, "free", config.models["free"]) is backend
    assert isinstance(replica_backend(backend, "lim", config.models["lim"]), ReplicaRetries)
