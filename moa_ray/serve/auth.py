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

from moa_ray.errors import ConfigError
from moa_ray.redaction import REDACTED, Redactor

__all__ = ["KEYS_ENV", "KEYS_FILE_ENV", "REDACTED", "KeyVerifier", "Redactor", "load_api_keys"]

KEYS_ENV = "MOA_RAY_API_KEYS"
KEYS_FILE_ENV = "MOA_RAY_API_KEYS_FILE"


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
