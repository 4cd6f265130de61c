"""JSON values inside a model's free text: bare, in a Markdown code fence, or after some prose.

Small models asked for JSON wrap it in fences, precede it with a sentence, or stop mid-way; the
SMoA judge, the moderator and role generation all read their answers with :func:`json_values`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_OPENERS = {"{": re.compile(r"\{"), "[": re.compile(r"\["), "{[": re.compile(r"[\[{]")}


def json_values(text: str, openers: str = "{[") -> Iterator[Any]:
    """Each JSON value that starts at one of ``openers`` in ``text``, fenced blocks first, in order."""
    decoder = json.JSONDecoder()
    pattern = _OPENERS[openers]
    for candidate in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
        for match in pattern.finditer(candidate):
            try:
                value, _ = decoder.raw_decode(candidate, match.start())
            except ValueError:
                continue
            yield value
