"""HandleAgent's transport behaviour, with a test double of a Serve deployment handle."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayActorError

from moa_ray.chat import ChatParams, as_messages
from moa_ray.errors import RateLimited
from moa_ray.serve.handle import HandleAgent, direct_payload_limit


class _Response:
    def __init__(self, outcome):
        self.outcome = outcome
        self.cancelled = False

    def __await__(self):
        async def resolve():
            await asyncio.sleep(0)
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        return resolve().__await__()

    def cancel(self):
        self.cancelled = True


class ScriptedHandle:
    """Stands in for a DeploymentHandle: each ``agent_chat.remote`` returns the next scripted outcome."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = 0
        self.agent_chat = self

    def options(self, **_):
        return self

    def remote(self, request):
        self.calls += 1
        return _Response(self.outcomes.pop(0))


OK = {"completion": {"text": "hi", "usage": {"prompt_tokens": 3, "completion_tokens": 1}}}


def test_a_replica_that_died_mid_call_is_retried_once():
    handle = ScriptedHandle(RayActorError(), OK)
    completion = asyncio.run(HandleAgent(handle, "m").chat(as_messages("q"), ChatParams()))
    assert completion.text == "hi" and handle.calls == 2


def test_a_second_replica_death_is_raised():
    handle = ScriptedHandle(RayActorError(), RayActorError(), OK)
    with pytest.raises(RayActorError):
        asyncio.run(HandleAgent(handle, "m").chat(as_messages("q"), ChatParams()))
    assert handle.calls == 2


def test_backend_errors_cross_the_handle_as_their_own_class_and_are_not_retried_here():
    error = {"error": {"type": "RateLimited", "message": "m: HTTP 429", "model": "m", "status_code": 429}}
    handle = ScriptedHandle(error, OK)
    with pytest.raises(RateLimited) as info:
        asyncio.run(HandleAgent(handle, "m").chat(as_messages("q"), ChatParams()))
    assert info.value.status_code == 429 and handle.calls == 1


class TransportHandle:
    """Stands in for a DeploymentHandle whose ``options`` pick a transport: records which one each call took."""

    def __init__(self, log: list[str] | None = None, transport: str = "default", stream: bool = False) -> None:
        self.log = [] if log is None else log
        self.transport = transport
        self.stream = stream
        self.agent_chat = self.agent_stream = self

    def options(self, **options):
        transport = self.transport
        if "_by_reference" in options:
            transport = "reference" if options["_by_reference"] else "direct"
        return TransportHandle(self.log, transport, options.get("stream", self.stream))

    def remote(self, request):
        self.log.append(self.transport)
        return _Chunks() if self.stream else _Response(OK)


class _Chunks:
    async def __aiter__(self):
        yield {"chunk": {"delta": "hi"}}

    def cancel(self):
        pass


def _request_of(chars: int):
    return as_messages("x" * chars)


def test_requests_too_large_for_the_direct_transport_go_by_reference():
    handle = TransportHandle()
    agent = HandleAgent(handle, "m")
    limit = direct_payload_limit()
    assert 0 < limit < 4 * 1024 * 1024  # under gRPC's cap on a received message, which Serve keeps
    for chars in (10, limit // 2, limit + 1, 3 * limit):
        assert asyncio.run(agent.chat(_request_of(chars), ChatParams())).text == "hi"
    assert handle.log == ["direct", "direct", "reference", "reference"]


def test_a_streamed_request_too_large_for_the_direct_transport_goes_by_reference():
    handle = TransportHandle()
    agent = HandleAgent(handle, "m")

    async def deltas(chars: int) -> list[str]:
        return [chunk.delta async for chunk in agent.stream(_request_of(chars), ChatParams())]

    assert asyncio.run(deltas(10)) == asyncio.run(deltas(direct_payload_limit() + 1)) == ["hi"]
    assert handle.log == ["direct", "reference"]


def test_the_transport_is_chosen_by_the_pickled_size_in_bytes_not_characters():
    agent = HandleAgent(TransportHandle(), "m")
    chars = direct_payload_limit() // 3  # fits as ASCII; as 4-byte UTF-8 it is 4/3 of the limit
    ascii_request = {"messages": [{"role": "user", "content": "x" * chars}]}
    emoji_request = {"messages": [{"role": "user", "content": "\U0001f600" * chars}]}
    assert agent.handle_for(ascii_request).transport == "direct"
    assert agent.handle_for(emoji_request).transport == "reference"
