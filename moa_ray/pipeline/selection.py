"""Reading the SMoA judge/moderator and the ranker: structured output, a tolerant parser, a seeded fallback.

Models are asked for JSON (with a JSON schema that llama.cpp enforces as a
grammar), but a remote model may still answer in the paper's markdown-ish form
(``**Chosen responses**: [1, 3]``, ``End debate: true``), wrap its JSON in a
code fence, or be cut off by ``max_tokens``. :func:`parse_verdict` accepts all of
these. Response numbers shown to models are 1-based.

The selection is then made valid by a documented, deterministic fallback
(:func:`select`), as the SMoA reference code does with a random sample:

1. numbers that are not integers, out of range or repeated are dropped (the
   first occurrence of a repeat wins);
2. more than ``k`` numbers are cut to the first ``k`` (the judge's order);
3. fewer than ``k`` are filled from a shuffle of the remaining positions by
   ``random.Random(seed material)``, where the seed material is the pipeline
   seed, the layer and a SHA-256 of the conversation (:func:`seed_material`), so
   a request gets the same selection in every process and on every rerun.

A missing or unreadable ``end_debate`` never stops the debate: only a stop the
moderator stated ends it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from typing import Any, Literal

from pydantic import BaseModel

from moa_ray.chat import ChatMessage
from moa_ray.json_text import json_values
from moa_ray.prompts import REASONING_MAX_CHARS

_CHOSEN_KEYS = {"chosenresponses", "chosenresponse", "chosen", "selectedresponses", "selected", "selection", "bestresponses"}
_END_KEYS = {"enddebate", "endthedebate", "end", "stop", "stopdebate", "debateend", "terminate"}
_REASON_KEYS = {"reasoning", "reason", "rationale", "explanation"}
_BEST_KEYS = {"bestresponse", "best", "choice", "bestresponsenumber"}

_TRUE = {"true", "yes", "y", "1", "end", "stop"}
_FALSE = {"false", "no", "n", "0", "continue"}

_KEY_TAIL = r"[\s*\"'_`]*[:=]\s*"
_RE_CHOSEN = re.compile(r"(?:chosen|selected)[\s_-]*responses?" + _KEY_TAIL + r"(.*)", re.IGNORECASE)
_RE_END = re.compile(r"end[\s_-]*(?:the[\s_-]*)?debate" + _KEY_TAIL + r"[*\"'`]*\s*([A-Za-z01]+)", re.IGNORECASE)
_RE_REASON = re.compile(r"reasoning" + _KEY_TAIL + r"(.*)", re.IGNORECASE)
_RE_BEST = re.compile(r"best[\s_-]*response" + _KEY_TAIL + r"\D{0,20}?(\d+)", re.IGNORECASE)
_RE_BARE_LIST = re.compile(r"^\[?\s*\d+(\s*,\s*\d+)*\s*\]?$")


class SelectionVerdict(BaseModel):
    """What a judge, moderator or ranker said, as far as it could be read."""

    reasoning: str = ""
    chosen: list[int] | None = None
    end_debate: bool | None = None
    best: int | None = None
    form: Literal["json", "text", "none"] = "none"


class Selection(BaseModel):
    """Valid 0-based positions in the list of responses shown, and what the fallback changed (None: nothing)."""

    positions: list[int]
    fallback: str | None = None


# --------------------------------------------------------------------------- schemas


def _closed(props: dict[str, Any]) -> dict[str, Any]:
    """An object of exactly ``props``: a grammar that allowed more keys would let a small model write on past them."""
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


#: Up to this many k-of-n choices, the judge's schema lists them (C(10, 5) = 252); beyond, it bounds each pick only.
MAX_LISTED_PICKS = 252


def distinct_picks(n: int, k: int) -> dict[str, Any]:
    """Schema of ``k`` distinct response numbers of ``1..n``, ascending: every choice listed (``anyOf`` of tuples), as
    grammars cannot say "unique" (llguidance, which vLLM uses here, refuses ``uniqueItems``), and a repeated pick would
    otherwise need repairing. Past :data:`MAX_LISTED_PICKS` choices, each pick is bounded and repeats are repaired."""
    choices = list(itertools.combinations(range(1, n + 1), k))
    if len(choices) > MAX_LISTED_PICKS:
        return {"type": "array", "items": {"type": "integer", "enum": list(range(1, n + 1))}, "minItems": k, "maxItems": k}
    return {"anyOf": [{"type": "array", "prefixItems": [{"const": i} for i in choice], "minItems": k, "maxItems": k} for choice in choices]}


def judge_schema(n: int, k: int, *, moderate: bool) -> dict[str, Any]:
    """JSON schema of the judge's answer (``end_debate`` only when it also moderates)."""
    props: dict[str, Any] = {
        "reasoning": {"type": "string", "maxLength": REASONING_MAX_CHARS},
        "chosen_responses": distinct_picks(n, k),
    }
    if moderate:
        props["end_debate"] = {"type": "boolean"}
    return _closed(props)


def moderator_schema() -> dict[str, Any]:
    """JSON schema of a separate moderator's answer."""
    props = {"reasoning": {"type": "string", "maxLength": REASONING_MAX_CHARS}, "end_debate": {"type": "boolean"}}
    return _closed(props)


def ranker_schema(n: int) -> dict[str, Any]:
    """JSON schema of the ranker's answer."""
    props = {
        "reasoning": {"type": "string", "maxLength": REASONING_MAX_CHARS},
        "best_response": {"type": "integer", "enum": list(range(1, n + 1))},
    }
    return _closed(props)


# --------------------------------------------------------------------------- parsing


def _norm_key(key: str) -> str:
    return re.sub(r"[^a-z]", "", key.lower())


def _ints(value: Any) -> list[int] | None:
    """Integers in a JSON value: ``[1, "3"]``, ``"Response 2 and 4"``, ``2``..."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return [value]
    if isinstance(value, float):
        return [int(value)] if value.is_integer() else None
    if isinstance(value, str):
        return [int(x) for x in re.findall(r"-?\d+", value)]
    if isinstance(value, list):
        out: list[int] = []
        for item in value:
            out.extend(_ints(item) or [])
        return out
    return None


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().strip("*\"'`.").lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    return None


def _json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text`` (bare, fenced, or after some prose)."""
    return next((v for v in json_values(text, "{") if isinstance(v, dict)), None)


def _from_json(obj: dict[str, Any]) -> SelectionVerdict | None:
    verdict = SelectionVerdict(form="json")
    found = False
    for key, value in obj.items():
        k = _norm_key(str(key))
        if k in _CHOSEN_KEYS:
            verdict.chosen, found = _ints(value), True
        elif k in _END_KEYS:
            verdict.end_debate, found = _bool(value), True
        elif k in _REASON_KEYS and isinstance(value, str):
            verdict.reasoning, found = value.strip(), True
        elif k in _BEST_KEYS:
            ints = _ints(value)
            verdict.best, found = (ints[0] if ints else None), True
    return verdict if found else None


def _from_text(text: str) -> SelectionVerdict:
    verdict = SelectionVerdict(form="text")
    if m := _RE_CHOSEN.search(text):
        value = m.group(1)
        if "[" in value:
            value = value[value.index("[") : (value.index("]") + 1) if "]" in value else None]
        verdict.chosen = _ints(value)
    if m := _RE_END.search(text):
        verdict.end_debate = _bool(m.group(1))
    if m := _RE_REASON.search(text):
        verdict.reasoning = m.group(1).strip().strip("*\"'` ,")
    if m := _RE_BEST.search(text):
        verdict.best = int(m.group(1))
    if verdict.chosen is None and verdict.best is None and _RE_BARE_LIST.match(text.strip()):
        verdict.chosen = _ints(text)
    if verdict.chosen is None and verdict.end_debate is None and verdict.best is None and not verdict.reasoning:
        verdict.form = "none"
    return verdict


def parse_verdict(text: str) -> SelectionVerdict:
    """Read a judge/moderator/ranker answer: JSON first, then the markdown-ish ``key: value`` form.

    JSON that is cut off (``max_tokens``) is read by the text patterns, which also
    match ``"chosen_responses": [1, 2`` inside broken JSON.
    """
    obj = _json_object(text)
    if obj is not None and (verdict := _from_json(obj)) is not None:
        return verdict
    return _from_text(text)


# --------------------------------------------------------------------------- selection


def seed_material(seed: int, layer: int, messages: list[ChatMessage]) -> str:
    """Seed of the fallback's shuffle: the pipeline seed, the layer and a digest of the conversation."""
    digest = hashlib.sha256(json.dumps([m.model_dump() for m in messages], sort_keys=True).encode()).hexdigest()
    return f"{seed}:{layer}:{digest}"


def select(chosen: list[int] | None, n: int, k: int, material: str) -> Selection:
    """``k`` valid 0-based positions out of ``n`` from the judge's 1-based numbers (see the module doc)."""
    k = min(k, n)
    notes: list[str] = []
    picks: list[int] = []
    out_of_range: list[int] = []
    repeated: list[int] = []
    for number in chosen or []:
        if not 1 <= number <= n:
            out_of_range.append(number)
        elif number - 1 in picks:
            repeated.append(number)
        else:
            picks.append(number - 1)
    if chosen is None:
        notes.append("no selection in the judge's output")
    if out_of_range:
        notes.append(f"dropped out-of-range {out_of_range}")
    if repeated:
        notes.append(f"dropped repeated {repeated}")
    if len(picks) > k:
        notes.append(f"cut {len(picks)} picks to k={k}")
        picks = picks[:k]
    if len(picks) < k:
        rest = [i for i in range(n) if i not in picks]
        random.Random(material).shuffle(rest)
        missing = k - len(picks)
        picks += rest[:missing]
        notes.append(f"filled {missing} missing pick{'s' if missing > 1 else ''} by seeded shuffle")
    return Selection(positions=picks, fallback="; ".join(notes) or None)


def shown_order(n: int, material: str | None) -> list[int]:
    """The order responses are shown to a judge: as given, or (with seed material) a seeded shuffle.

    Judges favour early positions; shuffling spreads that bias over all proposers
    instead of always favouring the first ones. Entry ``i`` is the position of the
    response shown as number ``i + 1``.
    """
    order = list(range(n))
    if material is not None:
        random.Random(f"order:{material}").shuffle(order)
    return order


def first_k(n: int, k: int, reason: str) -> Selection:
    """The fallback when the judge call itself failed: the first ``k`` successful responses."""
    return Selection(positions=list(range(min(k, n))), fallback=f"{reason}; kept the first {min(k, n)} responses")


def pick_one(verdict: SelectionVerdict, n: int, material: str) -> Selection:
    """The ranker's single choice (its ``best_response``, else its first chosen number), validated like :func:`select`."""
    number = verdict.best
    if number is None and verdict.chosen:
        number = verdict.chosen[0]
    if number is not None and 1 <= number <= n:
        return Selection(positions=[number - 1])
    position = random.Random(material).randrange(n)
    why = "no choice in the ranker's output" if number is None else f"ranker chose out-of-range {number}"
    return Selection(positions=[position], fallback=f"{why}; picked response {position + 1} by seeded draw")
