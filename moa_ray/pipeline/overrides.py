"""Per-request pipeline settings: a subset of the proposers, fewer layers, SMoA's k, the aggregator's sampling.

A caller shapes a configured pipeline for one request (the endpoint's ``moa`` options). The settings can only
narrow what the config holds: a proposer that the pipeline does not have, more layers than it has, or a ``k``
that leaves nothing to choose from is refused, with the option's name, before any model is called. The result
is the pipeline's own spec type, validated again, so every rule of the config holds for it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moa_ray.config import LayerSpec, ProposerSpec


class OverrideError(ValueError):
    """A per-request setting the pipeline cannot take; ``param`` names the option."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class AggregatorSampling(BaseModel):
    """Sampling of the answering call (the aggregator, or a ``single`` pipeline's model)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**31)


class PipelineOverrides(BaseModel):
    """What a request may change of its pipeline, each only within the config."""

    model_config = ConfigDict(extra="forbid")

    proposers: list[str] | None = Field(
        default=None, min_length=1, description="Models to keep among the pipeline's proposers (by config name); the others sit out."
    )
    layers: int | None = Field(default=None, ge=1, description="Run only the first N proposer layers.")
    k: int | None = Field(default=None, ge=1, description="SMoA: the responses the judge keeps per layer.")
    aggregator: AggregatorSampling | None = None

    @property
    def empty(self) -> bool:
        return not self.model_dump(exclude_none=True)


#: The field of each kind's spec that holds the answering call.
_ANSWERER = {"moa": "aggregator", "smoa": "aggregator", "ranker": "aggregator", "self-moa": "aggregator", "single": "model"}


def _answerer(spec: Any) -> ProposerSpec:
    answerer: ProposerSpec = spec.aggregator_spec if spec.kind == "self-moa" else getattr(spec, _ANSWERER[spec.kind])
    return answerer


def answering_call(spec: Any) -> ProposerSpec | None:
    """The call whose generation is the answer (it gets the tools and the response format); None for a ranker,
    whose answer is one proposer's, verbatim."""
    return None if spec.kind == "ranker" else _answerer(spec)


def _keep_proposers(spec: Any, wanted: list[str], models: Mapping[str, Any]) -> list[LayerSpec]:
    unknown = [m for m in wanted if m not in models]
    if unknown:
        raise OverrideError("moa.proposers", f"unknown model(s) {', '.join(map(repr, unknown))} (known models: {', '.join(models)})")
    have = list(dict.fromkeys(p.model for layer in spec.layers for p in layer.proposers))
    foreign = [m for m in wanted if m not in have]
    if foreign:
        raise OverrideError(
            "moa.proposers",
            f"{', '.join(map(repr, foreign))} {'is' if len(foreign) == 1 else 'are'} not among the proposers of this pipeline "
            f"(its proposers: {', '.join(have)})",
        )
    layers = []
    for i, layer in enumerate(spec.layers):
        kept = [p for p in layer.proposers if p.model in wanted]
        if not kept:
            raise OverrideError(
                "moa.proposers", f"layer {i + 1} would have no proposer left (its proposers: {', '.join(p.model for p in layer.proposers)})"
            )
        quorum = None if layer.min_responses is None else min(layer.min_responses, len(kept))
        layers.append(layer.model_copy(update={"proposers": kept, "min_responses": quorum}))
    return layers


def apply_overrides(spec: Any, overrides: PipelineOverrides, models: Mapping[str, Any]) -> Any:
    """``spec`` (a pipeline spec of the config whose models are ``models``) narrowed by ``overrides``."""
    if overrides.empty:
        return spec
    kind = spec.kind
    layered = kind in ("moa", "smoa", "ranker")
    if overrides.proposers is not None and not layered:
        raise OverrideError("moa.proposers", f"a {kind} pipeline has no proposer layers to choose from")
    if overrides.layers is not None and not layered:
        raise OverrideError("moa.layers", f"a {kind} pipeline has no proposer layers to choose from")
    if overrides.k is not None and kind != "smoa":
        raise OverrideError("moa.k", f"k applies to smoa pipelines only, not to a {kind} pipeline")
    data = spec.model_dump()
    if layered:
        layers = list(spec.layers)
        if overrides.layers is not None:
            if overrides.layers > len(layers):
                raise OverrideError("moa.layers", f"the pipeline has {len(layers)} proposer layer(s), not {overrides.layers}")
            layers = layers[: overrides.layers]
        if overrides.proposers is not None:
            layers = _keep_proposers(spec.model_copy(update={"layers": layers}), overrides.proposers, models)
        data["layers"] = [layer.model_dump() for layer in layers]
        if kind == "smoa" and spec.max_layers is not None:
            data["max_layers"] = min(spec.max_layers, len(layers))
    if overrides.k is not None:
        data["k"] = overrides.k
    if overrides.aggregator is not None:
        field = _ANSWERER[kind]
        data[field] = {**_answerer(spec).model_dump(), **overrides.aggregator.model_dump(exclude_none=True)}
    try:
        return type(spec).model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        param = "moa.k" if "k (" in message else "moa"
        raise OverrideError(param, f"the pipeline cannot run with these settings: {message}") from None
