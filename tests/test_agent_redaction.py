"""An agent replica redacts its provider key from the errors it returns and logs (no Ray needed: the plain class)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator

import pytest

from moa_ray.chat import ChatMessage, ChatParams, ChatRequest
from moa_ray.errors import AuthenticationFailed
from moa_ray.serve import agent as agent_module
from moa_ray.serve.auth import REDACTED

KEY = "sk-test-0123456789abcdef"


class LeakyBackend:
    """A provider whose error message echoes the key it was sent (some gateways do)."""

    async def chat(self, messages: list[ChatMessage], params: ChatParams):
        raise AuthenticationFailed(f"invalid key {KEY}", model="m", status_code=401)

    async def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator:
        raise AuthenticationFailed(f"invalid key {KEY}", model="m", status_code=401)
        yield  # pragma: no cover

    closed = False

    async def check_health(self) -> None:
        if self.closed:
            raise RuntimeError("closed")

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture
def replica(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LEAKY_KEY", KEY)
    monkeypatch.setattr(agent_module, "create_backend", lambda spec: LeakyBackend())
    cls = agent_module.AgentDeployment.func_or_class
    spec = {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "LEAKY_KEY"}
    replica = cls("leaky", spec)
    yield replica
    asyncio.run(replica.aclose())  # outside Serve, whoever built the replica closes it


async def serve_stops(replica) -> None:
    """What Ray Serve does as it stops a replica (UserCallableWrapper.call_destructor): call ``__del__`` and await
    the coroutine it returns."""
    result = replica.__del__()
    if inspect.iscoroutine(result):
        await result


def test_the_replica_closes_its_backend_when_serve_stops_it(replica) -> None:
    asyncio.run(replica.check_health())
    asyncio.run(serve_stops(replica))
    assert replica.backend.closed
    with pytest.raises(RuntimeError):
        asyncio.run(replica.check_health())
    # the interpreter calls __del__ again when it frees the replica: nothing is left to close, nothing to await
    assert replica.__del__() is None


REQUEST = ChatRequest(messages=[ChatMessage(role="user", content="hi")], params=ChatParams()).model_dump()


def test_chat_errors_leave_the_replica_without_the_key(replica, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="moa_ray.agent"):
        reply = asyncio.run(replica.agent_chat(REQUEST))
    assert reply["error"]["type"] == "AuthenticationFailed" and reply["error"]["status_code"] == 401
    assert KEY not in str(reply) and REDACTED in reply["error"]["message"]
    assert caplog.records and KEY not in caplog.text and REDACTED in caplog.text


def test_stream_errors_leave_the_replica_without_the_key(replica) -> None:
    async def consume() -> list[dict]:
        return [item async for item in replica.agent_stream(REQUEST)]

    (reply,) = asyncio.run(consume())
    assert KEY not in str(reply) and REDACTED in reply["error"]["message"]
