"""Pipelines: the driver that runs layers of agents and records a trace."""

from moa_ray.pipeline.base import Pipeline, PipelineResult
from moa_ray.pipeline.factory import build_pipeline

__all__ = ["Pipeline", "PipelineResult", "build_pipeline"]
