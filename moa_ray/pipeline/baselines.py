"""The papers' baselines as pipeline kinds, so one evaluation compares them with MoA and SMoA.

- ``single``: one call to one model (the reference point of every comparison).
- ``ranker``: the LLM-ranker ablation of the MoA paper: n proposers answer, then
  the aggregator model picks ONE response, returned verbatim (no synthesis).
- ``self-moa``: one model sampled n times at its temperature (each sample with
  its own seed, so samples differ even where a backend would otherwise repeat
  itself), then aggregated with the MoA prompt.

All run their proposer layer through :meth:`Pipeline.run_layer`, so quorum and
deadline settings apply to them as to MoA.
"""

from __future__ import annotations

import hashlib
import time

from moa_ray.chat import ChatMessage, ChatParams
from moa_ray.config import RankerPipelineSpec, SelfMoAPipelineSpec, SinglePipelineSpec
from moa_ray.pipeline.base import FinalCall, KnownAnswer, Pipeline
from moa_ray.pipeline.selection import Selection, first_k, parse_verdict, pick_one, ranker_schema, seed_material
from moa_ray.pipeline.trace import LayerRecord, Trace
from moa_ray.prompts import ranker_prompt, render_question

#: Seed of the ranker's fallback draw (the ranker spec has no seed of its own).
RANKER_SEED = 0
#: The current request's base seed of Self-MoA samples (a context variable: each request's tasks see their own).


class SinglePipeline(Pipeline):
    """One model answers the conversation."""

    spec: SinglePipelineSpec

    async def plan(self, messages: list[ChatMessage], trace: Trace, t0: float) -> FinalCall:
        return FinalCall(spec=self.spec.model, layer=1, role="proposer")


class RankerPipeline(Pipeline):
    """n proposers, then the aggregator model picks one response verbatim."""

    spec: RankerPipelineSpec

    async def plan(self, messages: list[ChatMessage], trace: Trace, t0: float) -> KnownAnswer:
        responses = await self.run_layer(1, self.spec.resolved_layers()[0], messages, trace, t0)
        start = time.perf_counter()
        record = LayerRecord(layer=2, role="aggregator")
        trace.layers.append(record)
        n = len(responses)
        if n == 1:
            selection = Selection(positions=[0], fallback="only one response: returned without a ranker call")
        else:
            texts = [r.text for r in responses]
            prompt = ranker_prompt(render_question(messages), texts)
            completion = await self.call(
                self.spec.aggregator,
                [ChatMessage(role="user", content=prompt)],
                layer=2,
                index=0,
                role="ranker",
                trace=trace,
                t0=t0,
                params=ChatParams(json_mode=True, json_schema=ranker_schema(n), seed=RANKER_SEED),
            )
            if completion is None:
                selection = first_k(n, 1, f"ranker call failed ({trace.calls[-1].error})")
            else:
                selection = pick_one(parse_verdict(completion.text), n, seed_material(RANKER_SEED, 2, messages))
        chosen = responses[selection.positions[0]]
        record.selected, record.judge_fallback = [chosen.index], selection.fallback
        for c in trace.calls_in(1):
            if c.role == "proposer" and c.status == "ok":
                c.selected = c.index == chosen.index
        record.wall_s = time.perf_counter() - start
        return KnownAnswer(text=chosen.text, finish_reason=chosen.completion.finish_reason)


class SelfMoAPipeline(Pipeline):
    """One model sampled n times (distinct, reproducible seeds), then aggregated."""

    spec: SelfMoAPipelineSpec

    async def plan(self, messages: list[ChatMessage], trace: Trace, t0: float) -> FinalCall:
        layer = self.spec.resolved_layers()[0]
        base = sample_seed_base(self.spec.seed, messages)
        seeded = [p if p.seed is not None else p.model_copy(update={"seed": (base + i) % 2**31}) for i, p in enumerate(layer.proposers)]
        responses = await self.run_layer(1, layer.model_copy(update={"proposers": seeded}), messages, trace, t0)
        return FinalCall(spec=self.spec.aggregator_spec, references=[r.text for r in responses], layer=2)


def sample_seed_base(seed: int, messages: list[ChatMessage]) -> int:
    """The first sample's seed for this run seed and conversation; sample i adds i, so the n samples differ."""
    return int(hashlib.sha256(seed_material(seed, 1, messages).encode()).hexdigest()[:8], 16) % 2**31
