"""The vLLM backend's request building, against a stand-in ``vllm`` module (vLLM needs a GPU; CI has none)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from moa_ray.backends.vllm_engine import structured_output
from moa_ray.chat import ChatParams

SCHEMA = {"type": "object", "properties": {"end_debate": {"type": "boolean"}}, "required": ["end_debate"]}


class Params:
    """Records the fields it was built with, like vLLM's msgspec structs."""

    def __init__(self, **fields: Any) -> None:
        self.fields = fields


def fake_vllm(monkeypatch: pytest.MonkeyPatch, *, new_api: bool) -> None:
    sampling = types.ModuleType("vllm.sampling_params")
    setattr(sampling, "StructuredOutputsParams" if new_api else "GuidedDecodingParams", Params)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)


@pytest.mark.parametrize(("new_api", "key"), [(True, "structured_outputs"), (False, "guided_decoding")])
def test_json_schema_becomes_constrained_decoding(monkeypatch: pytest.MonkeyPatch, new_api: bool, key: str) -> None:
    fake_vllm(monkeypatch, new_api=new_api)
    out = structured_output(ChatParams(json_mode=True, json_schema=SCHEMA))
    assert list(out) == [key]
    assert out[key].fields == {"json": SCHEMA}


def test_json_mode_without_schema_asks_for_any_json_object(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_vllm(monkeypatch, new_api=True)
    assert structured_output(ChatParams(json_mode=True))["structured_outputs"].fields == {"json_object": True}


def test_plain_text_calls_are_unconstrained() -> None:
    assert structured_output(ChatParams(json_schema=SCHEMA)) == {}
    assert structured_output(ChatParams()) == {}
