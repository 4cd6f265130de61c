"""Mixture-of-Agents (Wang et al. 2024).

Layer 1 answers the conversation; every later layer answers it again with the
previous layer's responses injected by the aggregate-and-synthesize prompt; the
aggregator synthesises the last layer's responses into the answer.
"""

from __future__ import annotations

from moa_ray.chat import ChatMessage
from moa_ray.config import MoAPipelineSpec
from moa_ray.pipeline.base import FinalCall, Pipeline
from moa_ray.pipeline.trace import Trace
from moa_ray.prompts import inject_references


class MoAPipeline(Pipeline):
    spec: MoAPipelineSpec

    async def plan(self, messages: list[ChatMessage], trace: Trace, t0: float) -> FinalCall:
        references: list[str] = []
        layers = self.spec.resolved_layers()
        for layer_no, layer in enumerate(layers, start=1):
            responses = await self.run_layer(layer_no, layer, inject_references(messages, references), trace, t0)
            references = [r.text for r in responses]
        return FinalCall(spec=self.spec.aggregator, references=references, layer=len(layers) + 1)
