"""Reasoning models in a pipeline (issue 20, step 3): a proposer's ``reasoning_content`` and ``<think>`` text never
reach the next layer, the trace keeps both; the aggregator's thinking comes back as ``reasoning_content``, on the
message and in stream deltas, and out of the answer. No Ray: the endpoint's app over a fake provider."""

from __future__ import annotations

import pytest
from agent_support import USER, AgentProvider, advice, agent_api, agent_config, asgi_client, client_for

from moa_ray.chat import Completion
from moa_ray.pipeline.reasoning import ThinkSplitter, split_thinking, without_thinking

pytestmark = pytest.mark.anyio

THINKING = "The user wants weather; maybe I should hedge about the forecast."
INLINE = "Paris is in France, so Celsius it is."


@pytest.mark.parametrize(
    ("text", "answer", "thinking"),
    [
        ("plain answer", "plain answer", ""),
        ("<think>a</think>\n\nb", "b", "a"),
        ("<think>a</think>b<think>c</think> d", "b d", "a\n\nc"),
        ("opened by the template</think>\nanswer", "answer", "opened by the template"),
        ("<think>cut off by max_tokens", "", "cut off by max_tokens"),
        ("x < y and <thin> stays", "x < y and <thin> stays", ""),
    ],
)
def test_split_thinking(text, answer, thinking):
    assert split_thinking(text) == (answer, thinking)


def test_without_thinking_keeps_the_providers_reasoning_first():
    completion = without_thinking(Completion(text="<think>inline</think> answer", reasoning="apart"))
    assert (completion.text, completion.reasoning) == ("answer", "apart\n\ninline")
    same = Completion(text="no tags")
    assert without_thinking(same) is same


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 100])
def test_the_stream_splitter_finds_tags_split_across_deltas(size):
    text = "<think>step one, step two</think>\n\nThe answer is 4 < 5."
    splitter = ThinkSplitter()
    answer, thinking = "", ""
    for i in range(0, len(text), size):
        a, t = splitter.feed(text[i : i + size])
        answer, thinking = answer + a, thinking + t
    a, t = splitter.flush()
    assert (answer + a, thinking + t) == ("The answer is 4 < 5.", "step one, step two")


async def test_proposer_thinking_stays_out_of_the_aggregators_prompt_and_in_the_trace():
    provider = AgentProvider(reasoning={"m1": THINKING}, think={"m2": INLINE})
    async with client_for(agent_api(agent_config(), provider)) as client:
        reply = await client.chat.completions.create(model="moa", messages=USER, extra_body={"moa": {"trace": "full"}})
        summary = await client.chat.completions.create(model="moa", messages=USER, extra_body={"moa": {"trace": True}})
    prompt = "".join(m["content"] or "" for m in provider.sent_to("agg")[0]["messages"])
    assert advice("m1") in prompt and advice("m2") in prompt
    assert THINKING not in prompt and INLINE not in prompt and "<think>" not in prompt
    calls = {c["model"]: c for c in reply.model_extra["moa"]["trace"]["calls"]}
    assert calls["m1"]["reasoning"] == THINKING and calls["m1"]["text"] == advice("m1")
    assert calls["m2"]["reasoning"] == INLINE and calls["m2"]["text"] == advice("m2")
    assert all("reasoning" not in c for c in summary.model_extra["moa"]["trace"]["calls"])  # texts only when asked


async def test_a_deeper_layer_reads_answers_only():
    provider = AgentProvider(think={"m1": INLINE, "m2": INLINE, "m3": INLINE})
    async with client_for(agent_api(agent_config(), provider)) as client:
        await client.chat.completions.create(model="deep", messages=USER)
    layer_two = provider.sent_to("m1")[1]["messages"][0]["content"]
    assert advice("m3") in layer_two and INLINE not in layer_two


async def test_the_aggregators_reasoning_comes_back_as_reasoning_content():
    provider = AgentProvider(reasoning={"agg": THINKING}, think={"agg": INLINE})
    async with client_for(agent_api(agent_config(server={"stream_coalesce_ms": 0}), provider)) as client:
        plain = await client.chat.completions.create(model="moa", messages=USER)
        stream = await client.chat.completions.create(model="moa", messages=USER, stream=True)
        chunks = [c async for c in stream]
    message = plain.choices[0].message
    assert message.content == advice("agg")
    assert message.model_extra["reasoning_content"] == f"{THINKING}\n\n{INLINE}"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_thinking = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    streamed_answer = "".join(d.content or "" for d in deltas)
    assert streamed_thinking == THINKING + INLINE  # the provider's field first, then the <think> text, as they came
    assert streamed_answer == advice("agg")


async def test_a_plain_answer_has_no_reasoning_field():
    async with asgi_client(agent_api(agent_config(), AgentProvider())) as client:
        body = (await client.post("/v1/chat/completions", json={"model": "moa", "messages": USER})).json()
    assert "reasoning_content" not in body["choices"][0]["message"] and "tool_calls" not in body["choices"][0]["message"]
    assert body["choices"][0]["message"]["content"] == advice("agg")
