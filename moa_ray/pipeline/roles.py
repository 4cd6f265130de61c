"""Role-playing proposers (SMoA): one LLM call turns a dataset and task description into ``n`` roles.

Roles depend only on (dataset description, task description, n, model), not on
the request, so they are generated once, cached on disk and reused: a second run
(or a second process) makes no role call. The cache lives under
``$MOA_RAY_CACHE_DIR/roles`` (default ``~/.cache/moa-ray/roles``), one JSON file
per key; delete a file to regenerate its roles. A generation that fails or
yields fewer than ``n`` distinct roles is retried once (every try uses the next
seed: a seeded model would repeat itself); if it still falls short, the request
runs with the roles it got, the trace says so, and nothing is cached, so the
next request tries again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from moa_ray.chat import ChatMessage, ChatParams, Completion
from moa_ray.config import LayerSpec, MoARayConfig, ProposerSpec, RolesSpec, SMoAPipelineSpec
from moa_ray.errors import ConfigError
from moa_ray.json_text import json_values
from moa_ray.packaged_models import cache_root
from moa_ray.pipeline.trace import Trace
from moa_ray.prompts import role_system, roles_prompt

log = logging.getLogger(__name__)

#: Role calls per request before running with what was parsed (each try uses the next seed).
ROLE_ATTEMPTS = 2
#: Completion tokens budgeted per generated role (a JSON object of three short strings).
ROLE_TOKENS = 96
_ROLE_FIELDS = (("occupation", "occupation"), ("personality", "personality"), ("social_group", "social group"))

#: ``Pipeline.call`` with the trace bound: (spec, messages, layer, index, role, params) -> Completion | None.
CallFn = Callable[..., Awaitable[Completion | None]]


class RoleSet(BaseModel):
    """One cache entry."""

    dataset: str
    task: str
    n: int = Field(ge=1)
    model: str
    roles: list[str]
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


class RoleCache:
    """Roles on disk, keyed by (dataset, task, n, model)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = (Path(directory).expanduser() if directory is not None else cache_root()) / "roles"

    @staticmethod
    def key(dataset: str, task: str, n: int, model: str) -> str:
        return hashlib.sha256(json.dumps([dataset, task, n, model]).encode()).hexdigest()[:32]

    def path(self, dataset: str, task: str, n: int, model: str) -> Path:
        return self.directory / f"{self.key(dataset, task, n, model)}.json"

    def get(self, dataset: str, task: str, n: int, model: str) -> list[str] | None:
        """The cached roles, or None (a missing, unreadable or mismatching file is a miss)."""
        path = self.path(dataset, task, n, model)
        if not path.is_file():
            return None
        try:
            entry = RoleSet.model_validate_json(path.read_text())
        except (OSError, ValidationError) as err:
            log.warning("ignoring unreadable role cache %s: %s", path, err)
            return None
        if (entry.dataset, entry.task, entry.n, entry.model) != (dataset, task, n, model) or len(entry.roles) != n:
            return None
        return entry.roles

    def put(self, entry: RoleSet) -> Path:
        """Write atomically (a crash never leaves half a file)."""
        path = self.path(entry.dataset, entry.task, entry.n, entry.model)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
            tmp.write(entry.model_dump_json(indent=2))
        os.replace(tmp.name, path)
        return path


# --------------------------------------------------------------------------- parsing


def roles_schema(n: int) -> dict[str, Any]:
    """JSON schema of the role call's answer: exactly ``n`` roles.

    No ``maxLength`` on the strings: llama.cpp expands it into a grammar that makes
    generation many times slower.
    """
    role = {
        "type": "object",
        "properties": {key: {"type": "string"} for key, _ in _ROLE_FIELDS},
        "required": [key for key, _ in _ROLE_FIELDS],
    }
    roles = {"type": "array", "items": role, "minItems": n, "maxItems": n}
    return {"type": "object", "properties": {"roles": roles}, "required": ["roles"]}


def describe_role(role: Any) -> str | None:
    """One role as text: ``occupation: ...; personality: ...; social group: ...`` (or the string given)."""
    if isinstance(role, str):
        return role.strip() or None
    if isinstance(role, dict):
        norm = {re.sub(r"[^a-z]", "", str(k).lower()): v for k, v in role.items()}
        parts = []
        for key, label in _ROLE_FIELDS:
            value = norm.get(key.replace("_", ""))
            if isinstance(value, str) and value.strip():
                parts.append(f"{label}: {value.strip()}")
        if not parts:  # other keys: keep whatever the model wrote
            parts = [f"{k}: {v}" for k, v in role.items() if isinstance(v, str) and v.strip()]
        return "; ".join(parts) or None
    return None


def _json_roles(text: str) -> list[Any] | None:
    """The first JSON list of roles: a bare list, or a list under a key naming roles."""
    for value in json_values(text):
        if isinstance(value, list):
            return value
        if isinstance(value, dict):
            for key, item in value.items():
                if "role" in str(key).lower() and isinstance(item, list):
                    return item
    return None


def _complete_objects(text: str) -> list[dict[str, Any]]:
    """The complete flat ``{...}`` objects in text whose JSON was cut off (``max_tokens``)."""
    out = []
    for match in re.finditer(r"\{[^{}]*\}", text):
        try:
            obj = json.loads(match.group(0))
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def parse_roles(text: str) -> list[str]:
    """Distinct roles from the model's answer: JSON (``{"roles": [...]}`` or a list), the complete role
    objects of truncated JSON, else numbered or bulleted lines."""
    items: list[Any] | None = _json_roles(text)
    if items is None:
        items = _complete_objects(text) or None
    if items is not None:
        roles = [describe_role(item) for item in items]
    else:
        roles = [m.group(1).strip() for m in re.finditer(r"^\s*(?:\d+[.)]|[-*])\s+(.+)$", text, re.MULTILINE)]
    out: list[str] = []
    for role in roles:
        if role and role not in out:
            out.append(role)
    return out


def assign_roles(layer: LayerSpec, roles: list[str]) -> LayerSpec:
    """Proposer ``j`` gets ``roles[j]`` as a system message (before any system text of its own)."""
    proposers = []
    for j, spec in enumerate(layer.proposers):
        if j < len(roles):
            system = role_system(roles[j]) + (f"\n\n{spec.system}" if spec.system else "")
            spec = spec.model_copy(update={"system": system})
        proposers.append(spec)
    return layer.model_copy(update={"proposers": proposers})


# --------------------------------------------------------------------------- the role call


class RoleAssigner:
    """Roles for one pipeline: memory, then disk cache, then a traced LLM call (layer 0, role ``roles``).

    A call that fails or yields fewer than n distinct roles is tried once more with the
    next seed; a request that still has too few runs with what it has, uncached.
    """

    def __init__(self, spec: RolesSpec, model: ProposerSpec, model_id: str, n: int, cache: RoleCache, seed: int) -> None:
        self.spec = spec
        self.model = model
        self.model_id = model_id
        self.n = n
        self.cache = cache
        self.seed = seed
        self._roles: list[str] | None = None
        self._attempts = 0  # failed or partial generations so far; each retry uses the next seed
        self._lock = asyncio.Lock()  # concurrent first requests make one role call, not many

    async def roles(self, call: CallFn, trace: Trace) -> list[str]:
        """The roles for this request; records them and their source in ``trace``."""
        async with self._lock:
            roles, source = await self._resolve(call)
        trace.roles, trace.roles_source = roles, source
        return roles

    async def _resolve(self, call: CallFn) -> tuple[list[str], str]:
        if self._roles is not None:
            return self._roles, "cache"
        key = (self.spec.dataset, self.spec.task, self.n, self.model_id)
        cached = self.cache.get(*key)
        if cached is not None:
            self._roles = cached
            return cached, "cache"
        messages = [ChatMessage(role="user", content=roles_prompt(self.spec.dataset, self.spec.task, self.n))]
        # n roles need room: unless the roles model sets max_tokens itself, ask for ROLE_TOKENS per role
        max_tokens = None if self.model.max_tokens is not None else max(256, ROLE_TOKENS * self.n)
        best: list[str] = []
        for index in range(ROLE_ATTEMPTS):
            seed = self.seed + self._attempts
            params = ChatParams(json_mode=True, json_schema=roles_schema(self.n), seed=seed, max_tokens=max_tokens)
            completion = await call(self.model, messages, layer=0, index=index, role="roles", params=params)
            roles = parse_roles(completion.text)[: self.n] if completion is not None else []
            if len(roles) == self.n:
                self.cache.put(RoleSet(dataset=key[0], task=key[1], n=key[2], model=key[3], roles=roles))
                self._roles = roles
                return roles, "generated"
            self._attempts += 1
            best = roles if len(roles) > len(best) else best
        if not best:
            return [], f"role generation failed {ROLE_ATTEMPTS} times; proposers ran without roles (not cached)"
        return best, f"generated, but only {len(best)} of {self.n} distinct roles parsed in {ROLE_ATTEMPTS} tries (not cached)"


def override_roles(config: MoARayConfig, pipeline: str, dataset: str | None, task: str | None) -> MoARayConfig:
    """``config`` with pipeline ``pipeline``'s role-playing descriptions replaced (``moa-ray run --roles-*``)."""
    spec = config.pipeline(pipeline)
    if not isinstance(spec, SMoAPipelineSpec):
        raise ConfigError(f"--roles-dataset/--roles-task need an smoa pipeline; {pipeline!r} is {spec.kind!r}")
    current = spec.roles
    dataset = dataset or (current.dataset if current else None)
    task = task or (current.task if current else None)
    if not dataset or not task:
        raise ConfigError(f"pipeline {pipeline!r} has no roles configured: give both --roles-dataset and --roles-task")
    roles = RolesSpec(dataset=dataset, task=task, model=current.model if current else None)
    pipelines = {**config.pipelines, pipeline: spec.model_copy(update={"roles": roles})}
    return config.model_copy(update={"pipelines": pipelines})
