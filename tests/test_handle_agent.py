"""HandleAgent's transport behaviour, with a test double of a Serve deployment handle."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayActorError

from moa_ray.chat import ChatParams, as_messages
from moa_ray.errors import RateLimited
from moa_ray.pipeline.agents import HandleAgent


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
