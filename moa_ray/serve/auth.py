"""Client API keys of the endpoint, and redaction of provider keys.

Keys come only from the environment of the process serving requests, never from
the committed config: ``MOA_RAY_API_KEYS`` (comma-separated) and/or a file named
by ``MOA_RAY_API_KEYS_FILE`` (one key per line, ``#`` comments). With no key
configured the endpoint is open (fine on 127.0.0.1, the default bind address).
Keys are compared as SHA-256 digests with :func:`hmac.compare_digest` against
every configured key, so timing reveals neither a key nor which one matched.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from moa_ray.config import MoARayConfig, ModelSpecBase, OpenAIModelSpec
from moa_ray.errors import ConfigError

KEYS_ENV = "MOA_RAY_API_KEYS"
KEYS_FILE_ENV = "MOA_RAY_API_KEYS_FILE"
REDACTED = "[REDACTED]"


def load_api_keys(environ: Mapping[str, str] | None = None) -> list[str]:
    """The configured client keys; raises :class:`ConfigError` when the key file is missing or empty."""
    env = os.environ if environ is None else environ
    keys = [k.strip() for k in env.get(KEYS_ENV, "").split(",") if k.strip()]
    path = env.get(KEYS_FILE_ENV, "").strip()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{KEYS_FILE_ENV} names {p}, which is not a readable file")
        file_keys = [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not file_keys:
            raise ConfigError(f"{KEYS_FILE_ENV} names {p}, which holds no key")
        keys.extend(file_keys)
    return list(dict.fromkeys(keys))


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class KeyVerifier:
    """Checks ``Authorization: Bearer <key>`` headers against the configured keys."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> bool:
        """True when auth is off, or the header carries one of the keys (constant time in the key)."""
        if not self._digests:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        candidate = _digest(token.strip())
        match = False
        for digest in self._digests:  # no early exit: every key is compared
            match |= hmac.compare_digest(candidate, digest)
        return match


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
        names = {m.api_key_env for m in models if isinstance(m, OpenAIModelSpec) and m.api_key_env}
        return cls([env[n] for n in names if env.get(n)] + list(extra))

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
