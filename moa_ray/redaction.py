"""Redaction of secrets (provider keys, client keys) from text and JSON before it leaves a process.

Below the pipeline and serve layers, because both need it: an in-process agent redacts a provider's
errors, the pipeline redacts every call's text as it records it, the endpoint redacts what it sends.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from moa_ray.backends.registry import secret_envs
from moa_ray.config import MoARayConfig, ModelSpecBase

REDACTED = "[REDACTED]"


class Redactor:
    """Replaces secret values (provider keys, client keys) in text and JSON before it leaves the server."""

    MIN_LENGTH = 6  # shorter "secrets" would redact ordinary words

    def __init__(self, secrets: Iterable[str]) -> None:
        forms = {form for s in secrets for form in self.printed_forms(s)}
        self._secrets = sorted({s for s in forms if len(s) >= self.MIN_LENGTH}, key=len, reverse=True)

    @staticmethod
    def printed_forms(secret: str) -> set[str]:
        """Every way a library may print the secret: raw, stripped, and escaped as in ``repr`` of a str or bytes
        (httpx quotes a header it refuses as ``b'Bearer secret\\n'``)."""
        forms = {secret, secret.strip()}
        for value in (secret, secret.strip()):
            forms.add(repr(value)[1:-1])
            forms.add(repr(value.encode("utf-8", "backslashreplace"))[2:-1])
        return {f for f in forms if f}

    @classmethod
    def for_config(cls, config: MoARayConfig, environ: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> Redactor:
        """Every provider key the config's models read from the environment, plus ``extra``."""
        return cls.for_models(config.models.values(), environ, extra)

    @classmethod
    def for_models(cls, models: Iterable[ModelSpecBase], environ: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> Redactor:
        """The provider keys these models read from the environment, plus ``extra`` (one replica: its own model)."""
        env = os.environ if environ is None else environ
        return cls([env[n] for n in secret_envs(models) if env.get(n)] + list(extra))

    def text(self, value: str) -> str:
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value

    def json(self, value: object) -> object:
        """A copy of a JSON-like value with every string redacted."""
        if not self._secrets:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.json(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.json(v) for v in value]
        return value
