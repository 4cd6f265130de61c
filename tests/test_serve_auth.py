"""Client API keys: where they come from, how they are compared; provider-key redaction."""

from __future__ import annotations

import hmac

import pytest

from moa_ray.config import parse_config
from moa_ray.errors import ConfigError
from moa_ray.serve import auth
from moa_ray.serve.auth import REDACTED, KeyVerifier, Redactor, load_api_keys


def test_keys_from_env_and_file_are_merged_and_deduplicated(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nfile-key-1\n\n  file-key-2  \nenv-key-1\n")
    env = {"MOA_RAY_API_KEYS": " env-key-1, ,env-key-2,", "MOA_RAY_API_KEYS_FILE": str(keys_file)}
    assert load_api_keys(env) == ["env-key-1", "env-key-2", "file-key-1", "file-key-2"]
    assert load_api_keys({}) == []


@pytest.mark.parametrize("content", [None, "", "# only a comment\n\n"])
def test_missing_or_empty_key_file_fails_closed(tmp_path, content):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match="MOA_RAY_API_KEYS_FILE"):
        load_api_keys({"MOA_RAY_API_KEYS_FILE": str(path)})


def test_keys_are_never_read_from_the_config():
    with pytest.raises(ConfigError, match="api_keys"):
        parse_config({"models": {"m": {"backend": "openai", "model": "m"}}, "server": {"api_keys": ["k"]}})


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer key-one", True),
        ("bearer key-two", True),
        ("Bearer   key-one  ", True),
        ("Bearer key-on", False),
        ("Bearer key-one-and-more", False),
        ("Basic key-one", False),
        ("key-one", False),
        ("Bearer ", False),
        ("", False),
        (None, False),
    ],
)
def test_verifier_accepts_only_configured_bearer_keys(header, ok):
    assert KeyVerifier(["key-one", "key-two"]).check(header) is ok


def test_verifier_without_keys_is_open():
    verifier = KeyVerifier([])
    assert not verifier.enabled and verifier.check(None) and verifier.check("Bearer anything")


def test_every_key_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    verifier = KeyVerifier(["first", "second-longer-key", "third"])
    for header in ("Bearer first", "Bearer third", "Bearer nope", "Bearer x" * 50):
        calls.clear()
        verifier.check(header)
        assert len(calls) == 3  # no early exit on a match or a mismatch
        assert all(a == b == 32 for a, b in calls)  # digests: the key's length does not matter


def test_redactor_collects_provider_keys_from_the_environment():
    config = parse_config(
        {
            "models": {
                "x": {"backend": "openai", "model": "x", "api_key_env": "X_KEY"},
                "y": {"backend": "openai", "model": "y", "api_key_env": "UNSET_KEY"},
                "z": {"backend": "openai", "model": "z"},
            }
        }
    )
    redactor = Redactor.for_config(config, {"X_KEY": "sk-x-secret-value", "OTHER": "not-a-provider-key"}, extra=["client-key-9"])
    assert redactor.text("x=sk-x-secret-value c=client-key-9 o=not-a-provider-key") == f"x={REDACTED} c={REDACTED} o=not-a-provider-key"


@pytest.mark.parametrize("tail", ["\n", "\r", " ", "\r\n"])
def test_a_key_ending_in_whitespace_is_stripped_and_every_printed_form_redacted(monkeypatch, tail):
    import asyncio

    import httpx

    from moa_ray.backends.openai_http import OpenAIBackend
    from moa_ray.chat import ChatParams, as_messages
    from moa_ray.config import parse_config

    secret = "sk-from-a-secret-file-0042"
    monkeypatch.setenv("FILE_KEY", secret + tail)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(200, json={"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}], "usage": {}})

    config = parse_config(
        {"models": {"m": {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "FILE_KEY"}}}
    )
    backend = OpenAIBackend(config.models["m"], transport=httpx.MockTransport(handler))
    asyncio.run(backend.chat(as_messages("hi"), ChatParams()))
    assert seen == [f"Bearer {secret}"]  # sent stripped, so httpx never refuses (and quotes) the header
    redactor = Redactor.for_config(config)
    for printed in (secret + tail, repr(secret + tail), repr(f"Bearer {secret}{tail}".encode()), secret):
        assert secret not in redactor.text(f"error: {printed}") and "\\n" not in redactor.text(printed).replace(REDACTED, "")


def test_a_key_with_control_characters_inside_is_refused_without_echoing_it(monkeypatch):
    from moa_ray.backends.openai_http import OpenAIBackend
    from moa_ray.config import parse_config
    from moa_ray.errors import ConfigError

    monkeypatch.setenv("BAD_KEY", "sk-abc\ndef-0123456789")
    config = parse_config(
        {"models": {"m": {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "BAD_KEY"}}}
    )
    with pytest.raises(ConfigError) as info:
        OpenAIBackend(config.models["m"])
    assert "BAD_KEY" in str(info.value) and "sk-abc" not in str(info.value)
