"""Pipeline kind -> driver class."""

from __future__ import annotations

from collections.abc import Mapping

from moa_ray.config import MoARayConfig
from moa_ray.pipeline.agents import Agent
from moa_ray.pipeline.base import Pipeline
from moa_ray.pipeline.moa import MoAPipeline

PIPELINE_KINDS: dict[str, type[Pipeline]] = {
    "moa": MoAPipeline,
}


def build_pipeline(config: MoARayConfig, name: str, agents: Mapping[str, Agent]) -> Pipeline:
    """The driver for pipeline ``name`` of ``config``, calling models through ``agents``."""
    spec = config.pipeline(name)
    return PIPELINE_KINDS[spec.kind](name, spec, agents)
