"""Sparse Mixture-of-Agents (Li et al. 2024).

Like MoA, but after each proposer layer one judge call keeps the best ``k``
responses: only those go on as the next layer's references and to the
aggregator, so every later call reads ``k`` instead of ``n`` responses. A
moderator (by default the same call as the judge, as in the paper; optionally a
separate model) decides by the responses' consistency whether to end the debate
early; ``max_layers`` bounds the loop. Optional role-playing gives each proposer
a generated role (see :mod:`moa_ray.pipeline.roles`).

With ``shuffle_responses`` the judge (and moderator) see the responses in a seeded
random order, against position bias; the judge's numbers are mapped back.

The moderator is not asked after the last layer (the loop ends anyway), and the
judge is skipped where there is nothing to choose (no more than ``k`` responses,
no moderation due). Selections that are missing, malformed or out of range are
repaired by the seeded fallback of :mod:`moa_ray.pipeline.selection`; a failed judge
keeps the first ``k`` responses; a failed or silent moderator never stops the
debate. Every such repair is recorded in ``LayerRecord.judge_fallback``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping

from moa_ray.chat import ChatMessage, ChatParams
from moa_ray.config import ModelSpecBase, ProposerSpec, SMoAPipelineSpec
from moa_ray.pipeline.agents import Agent
from moa_ray.pipeline.base import FinalCall, Pipeline, Response
from moa_ray.pipeline.reuse import CallReuse
from moa_ray.pipeline.roles import CallFn, RoleAssigner, RoleCache, assign_roles
from moa_ray.pipeline.selection import (
    Selection,
    SelectionVerdict,
    first_k,
    judge_schema,
    moderator_schema,
    parse_verdict,
    seed_material,
    select,
    shown_order,
)
from moa_ray.pipeline.trace import LayerRecord, Trace
from moa_ray.prompts import inject_references, judge_prompt, moderator_prompt, render_question


class SMoAPipeline(Pipeline):
    spec: SMoAPipelineSpec

    def __init__(
        self,
        name: str,
        spec: SMoAPipelineSpec,
        agents: Mapping[str, Agent],
        *,
        models: Mapping[str, ModelSpecBase] | None = None,
        role_cache: RoleCache | None = None,
        reuse: CallReuse | None = None,
    ) -> None:
        super().__init__(name, spec, agents, models=models, reuse=reuse)
        self._roles: RoleAssigner | None = None
        if spec.roles is not None:
            role_model = spec.roles.model or ProposerSpec(model=spec.aggregator.model)
            model_id = models[role_model.model].model if models and role_model.model in models else role_model.model
            n = max(len(layer.proposers) for layer in spec.layers)
            self._roles = RoleAssigner(spec.roles, role_model, model_id, n, role_cache or RoleCache(), spec.seed)

    async def plan(self, messages: list[ChatMessage], trace: Trace, t0: float) -> FinalCall:
        call: CallFn = functools.partial(self.call, trace=trace, t0=t0)
        roles = await self._roles.roles(call, trace) if self._roles is not None else []
        layers = self.spec.resolved_layers()[: self.spec.max_layers]
        references: list[str] = []
        layer_no = 0
        for layer_no, layer in enumerate(layers, start=1):
            if roles:
                layer = assign_roles(layer, roles)
            responses = await self.run_layer(layer_no, layer, inject_references(messages, references), trace, t0)
            moderate = self.spec.moderation_enabled and layer_no < len(layers)
            kept, stop = await self._judge(layer_no, messages, responses, moderate, call, trace)
            references = [r.text for r in kept]
            if stop:
                break
        return FinalCall(spec=self.spec.aggregator, references=references, layer=layer_no + 1)

    async def _judge(
        self,
        layer_no: int,
        messages: list[ChatMessage],
        responses: list[Response],
        moderate: bool,
        call: CallFn,
        trace: Trace,
    ) -> tuple[list[Response], bool]:
        """Keep ``k`` responses (and ask whether to stop); returns the kept responses and the stop decision."""
        start = time.perf_counter()
        record = next(r for r in reversed(trace.layers) if r.layer == layer_no and r.role == "proposer")
        n, k = len(responses), min(self.spec.k, len(responses))
        material = seed_material(self.spec.seed, layer_no, messages)
        order = shown_order(n, material if self.spec.shuffle_responses else None)
        texts = [responses[i].text for i in order]  # numbered 1..n in this order
        question = render_question(messages)
        separate = moderate and self.spec.moderator_spec is not None
        judge_moderates = moderate and not separate
        need_judge = n > self.spec.k or judge_moderates
        params = functools.partial(ChatParams, json_mode=True, seed=self.spec.seed)

        async def none() -> None:
            return None

        judge_task = (
            call(
                self.spec.judge_spec,
                [ChatMessage(role="user", content=judge_prompt(question, texts, k, moderate=judge_moderates))],
                layer=layer_no,
                index=0,
                role="judge",
                params=params(json_schema=judge_schema(n, k, moderate=judge_moderates)),
            )
            if need_judge
            else none()
        )
        moderator_task = (
            call(
                self.spec.moderator_spec,
                [ChatMessage(role="user", content=moderator_prompt(question, texts))],
                layer=layer_no,
                index=1,
                role="moderator",
                params=params(json_schema=moderator_schema()),
            )
            if separate
            else none()
        )
        judged, moderated = await asyncio.gather(judge_task, moderator_task)

        notes: list[str] = []
        judge_verdict = parse_verdict(judged.text) if judged is not None else None
        if not need_judge:
            selection = Selection(positions=list(range(n)))
            notes.append(f"only {n} responses (k={self.spec.k}): kept all without a judge call")
        elif judged is None:
            selection = first_k(n, k, f"judge call failed ({_last_error(trace, layer_no, 'judge')})")
        elif n <= self.spec.k:  # the judge ran only to moderate
            selection = Selection(positions=list(range(n)))
        else:
            assert judge_verdict is not None  # judged is not None here
            shown = select(judge_verdict.chosen, n, k, material)
            selection = Selection(positions=[order[p] for p in shown.positions], fallback=shown.fallback)
        if selection.fallback:
            notes.append(selection.fallback)

        stop = False
        if moderate:
            who = "moderator" if separate else "judge"
            verdict = (parse_verdict(moderated.text) if moderated is not None else None) if separate else judge_verdict
            if verdict is None:  # a failed judge is already noted above
                if separate:
                    notes.append(f"moderator call failed ({_last_error(trace, layer_no, 'moderator')}); continued")
            elif verdict.end_debate is None:
                notes.append(f"no end_debate decision from the {who}; continued")
            elif verdict.end_debate:
                stop = True
                self._record_stop(trace, record, layer_no, verdict)

        kept = [responses[p] for p in selection.positions]
        self._record_selection(trace, record, layer_no, kept, notes)
        record.wall_s += time.perf_counter() - start
        return kept, stop

    @staticmethod
    def _record_selection(trace: Trace, record: LayerRecord, layer_no: int, kept: list[Response], notes: list[str]) -> None:
        record.selected = [r.index for r in kept]
        record.judge_fallback = "; ".join(notes) or None
        for c in trace.calls_in(layer_no):
            if c.role == "proposer" and c.status == "ok":
                c.selected = c.index in record.selected

    @staticmethod
    def _record_stop(trace: Trace, record: LayerRecord, layer_no: int, verdict: SelectionVerdict) -> None:
        record.stopped = True
        reason = verdict.reasoning.strip() or "the responses are consistent"
        record.stop_reason = reason if len(reason) <= 300 else reason[:297] + "..."
        trace.stopped_at_layer = layer_no


def _last_error(trace: Trace, layer_no: int, role: str) -> str:
    errors = [c.error for c in trace.calls_in(layer_no) if c.role == role and c.error]
    return errors[-1] if errors else "no completion"
