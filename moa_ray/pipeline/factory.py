"""Pipeline kind -> driver class."""

from __future__ import annotations

from collections.abc import Mapping

from moa_ray.config import MoARayConfig
from moa_ray.pipeline.agents import Agent
from moa_ray.pipeline.base import Pipeline
from moa_ray.pipeline.baselines import RankerPipeline, SelfMoAPipeline, SinglePipeline
from moa_ray.pipeline.moa import MoAPipeline
from moa_ray.pipeline.reuse import CallReuse
from moa_ray.pipeline.smoa import SMoAPipeline

PIPELINE_KINDS: dict[str, type[Pipeline]] = {
    "moa": MoAPipeline,
    "smoa": SMoAPipeline,
    "single": SinglePipeline,
    "ranker": RankerPipeline,
    "self-moa": SelfMoAPipeline,
}


def build_pipeline(config: MoARayConfig, name: str, agents: Mapping[str, Agent], *, reuse: CallReuse | None = None) -> Pipeline:
    """The driver for pipeline ``name`` of ``config``, calling models through ``agents``.

    The config's model specs go along so every trace carries its cost accounting (and its texts are redacted
    of the models' keys); ``reuse``: identical calls answered once (see :mod:`moa_ray.pipeline.reuse`).
    """
    spec = config.pipeline(name)
    return PIPELINE_KINDS[spec.kind](name, spec, agents, models=config.models, reuse=reuse)
