"""Per-request pipeline settings (issue 20, step 4): the ``moa`` options ``proposers``, ``layers``, ``k`` and
``aggregator`` shape a configured pipeline for one request, only within the config; anything else is a 400 that
names the option, before any model is called; the trace records what the request set."""

from __future__ import annotations

import pytest
from agent_support import USER, AgentProvider, agent_api, agent_config, asgi_client

from moa_ray.pipeline.overrides import OverrideError, PipelineOverrides, apply_overrides

pytestmark = pytest.mark.anyio


async def ask(moa: dict, model: str = "deep", provider: AgentProvider | None = None, **extra) -> tuple[dict, AgentProvider]:
    provider = provider or AgentProvider()
    async with asgi_client(agent_api(agent_config(), provider)) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": model, "messages": USER, "moa": {"trace": True, **moa}, **extra}
        )
    return response.json(), provider


async def test_one_proposer_makes_exactly_that_models_calls():
    body, provider = await ask({"proposers": ["m2"]})
    assert [b["model"] for b in provider.requests] == ["m2", "m2", "agg"]  # two layers of m2, then the aggregator
    trace = body["moa"]["trace"]
    assert [(c["layer"], c["model"]) for c in trace["calls"]] == [(1, "m2"), (2, "m2"), (3, "agg")]
    assert trace["settings"] == {"proposers": ["m2"]}


async def test_fewer_layers_and_the_aggregators_sampling():
    body, provider = await ask({"layers": 1, "aggregator": {"temperature": 0.1, "max_tokens": 7, "seed": 3}})
    assert [b["model"] for b in provider.requests] == ["m1", "m2", "m3", "agg"]
    final = provider.sent_to("agg")[0]
    assert (final["temperature"], final["max_tokens"], final["seed"]) == (0.1, 7, 3)
    assert all(b.get("temperature") != 0.1 for b in provider.requests[:3])  # proposers keep their own sampling
    assert body["moa"]["trace"]["settings"]["layers"] == 1


async def test_the_requests_own_sampling_fields_win_over_the_moa_aggregator_ones():
    _, provider = await ask({"aggregator": {"temperature": 0.1}}, model="moa", temperature=0.9)
    assert provider.sent_to("agg")[0]["temperature"] == 0.9


async def test_k_shapes_the_judges_choice():
    body, provider = await ask({"k": 1}, model="smoa")
    judge_prompt = provider.sent_to("agg")[0]["messages"][0]["content"]
    assert "a list of 1 response numbers" in judge_prompt
    assert body["moa"]["trace"]["layers"][0]["selected"] == [0]  # the judge chose 1 and 2: k=1 keeps the first


async def test_each_setting_is_used_in_the_plain_and_the_streamed_path_alike():
    provider = AgentProvider()
    async with asgi_client(agent_api(agent_config(), provider)) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": "deep", "messages": USER, "stream": True, "moa": {"proposers": ["m3"], "layers": 1}}
        )
    assert response.status_code == 200
    assert [b["model"] for b in provider.requests] == ["m3", "agg"]


@pytest.mark.parametrize(
    ("model", "moa", "param", "says"),
    [
        ("deep", {"proposers": ["nope", "m1"]}, "moa.proposers", "'nope'"),
        ("moa", {"proposers": ["m3"]}, "moa.proposers", "'m3' is not among the proposers"),
        ("deep", {"layers": 3}, "moa.layers", "2 proposer layer(s)"),
        ("deep", {"k": 1}, "moa.k", "smoa pipelines only"),
        ("smoa", {"k": 3}, "moa.k", "k (3) must be smaller"),
        ("smoa", {"proposers": ["m1", "m2"]}, "moa.k", "k (2) must be smaller"),
        ("single", {"proposers": ["agg"]}, "moa.proposers", "no proposer layers"),
        ("deep", {"layers": 0}, "moa.layers", None),
        ("deep", {"aggregator": {"temperature": 9}}, "moa.aggregator.temperature", None),
        ("deep", {"aggregator": {"model": "m1"}}, "moa.aggregator.model", None),
    ],
)
async def test_settings_outside_the_config_are_a_400_naming_them(model, moa, param, says):
    body, provider = await ask(moa, model=model)
    error = body["error"]
    assert error["param"] == param and error["code"] == "invalid_request", error
    if says:
        assert says in error["message"], error["message"]
    assert provider.requests == []


def test_overrides_keep_every_config_rule():
    config = agent_config()
    spec = config.pipelines["deep"]
    shaped = apply_overrides(spec, PipelineOverrides(proposers=["m1", "m3"], layers=1), config.models)
    assert [[p.model for p in layer.proposers] for layer in shaped.layers] == [["m1", "m3"]]
    assert spec.layers[0].proposers[1].model == "m2"  # the configured pipeline is left as it was
    assert apply_overrides(spec, PipelineOverrides(), config.models) is spec
    with pytest.raises(OverrideError) as info:
        apply_overrides(config.pipelines["smoa"], PipelineOverrides(k=5), config.models)
    assert info.value.param == "moa.k"
