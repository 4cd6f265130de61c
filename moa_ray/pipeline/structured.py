"""Structured outputs: the answer checked against what the request asked for.

The aggregator's backend constrains its output (a provider's ``json_schema`` mode, vLLM's guided decoding,
llama.cpp's grammar), but not every backend or model honours it, and a ``max_tokens`` cut leaves JSON unclosed.
A caller that asked for a schema gets an answer that follows it, or a clear error: never a success with broken
JSON in it.
"""

from __future__ import annotations

import json
from typing import Any

from moa_ray.chat import ChatParams
from moa_ray.errors import PipelineError


class InvalidStructuredOutput(PipelineError):
    """The answering model's output does not follow the requested ``response_format``."""


def structure_error(answer: str, params: ChatParams | None) -> str | None:
    """Why ``answer`` does not follow the format ``params`` asked for (None when it does, or none was asked)."""
    if params is None or (params.response_schema is None and not params.json_mode):
        return None
    try:
        value = json.loads(answer)
    except json.JSONDecodeError as err:
        return f"the answer is not valid JSON ({err.msg} at character {err.pos})"
    if params.response_schema is None:
        return None if isinstance(value, dict) else "the answer is JSON but not an object"
    return _schema_error(value, params.response_schema.json_schema)


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why ``schema`` is not a JSON schema (None when it is): a request's mistake, found before any model runs."""
    import jsonschema  # a dependency of Ray's, so of every install

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        return f"not a valid JSON schema: {err.message}"
    return None


def _schema_error(value: Any, schema: dict[str, Any]) -> str | None:
    """The first place ``value`` breaks ``schema``, by the schema's rule (never the answer's text, which may reach a log)."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return None
    first = errors[0]
    where = "/".join(str(p) for p in first.absolute_path) or "the top level"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    rule = json.dumps(first.validator_value) if not isinstance(first.validator_value, dict) else "{...}"
    return f"the answer does not follow the response_format schema: at {where}, the rule {first.validator}: {rule[:200]}{more}"
