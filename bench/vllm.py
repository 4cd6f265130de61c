"""vLLM through the MoA pipeline (Ray Serve LLM, Serve handles) vs the same calls straight into vLLM's engine.

The ``embedded-vllm`` preset (SmolLM2-135M on vLLM's CPU build) runs through Ray Serve with
every call recorded on the driver: its messages, sampling parameters and a fixed seed. The
same process also holds a plain vLLM ``AsyncLLM`` built from the same folder and engine
arguments, and replays each prompt's calls on it wave by wave (the calls the pipeline
had in flight together go in together), right after the pipeline ran that prompt, so
load from elsewhere hits both alike.

    pipeline tokens/s = completion tokens of every call / summed request wall time (Serve, driver, batching included)
    direct tokens/s   = the same calls' completion tokens / summed wave wall time on the in-process engine

The last line is ``ratio <pipeline / direct>`` (target >= 0.9).

    python -m bench.vllm --prompts 8 --max-tokens 64

``--prefix`` measures vLLM's automatic prefix caching instead, on the in-process engine
(once with it on, once off): for each prompt, layer 1's three proposers answer, then
layer 2's three proposers (one model, so one prompt: the question plus the same
references) are prefilled (``max_tokens=1``). It prints layer-2 prompt time dispatched
together (as the pipeline does) and staggered (the first call, then the rest), and
ends with ``prefix_ratio <on / off>`` for the pipeline's dispatch.

    python -m bench.vllm --prefix --prompts 8
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import time
import uuid
from typing import Any

from bench.embedded import PROMPTS, WARMUP_PROMPT, RecordedCall, RecordingAgent
from moa_ray.backends.base import effective_params
from moa_ray.chat import ChatMessage, ChatParams, as_messages
from moa_ray.config import MoARayConfig, VLLMModelSpec, load_config
from moa_ray.prompts import inject_references

APP_NAME = "bench-vllm"
PIPELINE = "embedded-vllm"


def waves(calls: list[RecordedCall]) -> list[list[RecordedCall]]:
    """Calls grouped as the pipeline had them in flight: a wave ends before the next call starts."""
    out: list[list[RecordedCall]] = []
    end = float("-inf")
    for call in sorted(calls, key=lambda c: c.start):
        if not out or call.start > end:
            out.append([])
        out[-1].append(call)
        end = max(end, call.end)
    return out


class DirectEngine:
    """vLLM's ``AsyncLLM`` in this process, built like the deployment's engine, with the model's chat template."""

    def __init__(self, spec: VLLMModelSpec, **overrides: Any) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from moa_ray.serve.llm import engine_env, engine_kwargs, model_source

        os.environ.update(engine_env(spec, {}))
        source = model_source(spec)
        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=source, **{**engine_kwargs(spec), **overrides}))

    def prompt(self, messages: list[ChatMessage]) -> str:
        return self.tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True)

    async def generate(self, messages: list[ChatMessage], params: ChatParams) -> tuple[str, int]:
        from vllm import SamplingParams

        p = effective_params(self.spec, params)
        sampling = SamplingParams(temperature=p.temperature, max_tokens=p.max_tokens, top_p=p.top_p or 1.0, seed=p.seed, stop=p.stop)
        final = None
        async for out in self.engine.generate(self.prompt(messages), sampling, request_id=uuid.uuid4().hex):
            final = out
        assert final is not None
        return final.outputs[0].text, len(final.outputs[0].token_ids)

    def shutdown(self) -> None:
        self.engine.shutdown()


def bench_config(max_tokens: int) -> MoARayConfig:
    config = load_config()
    for name in config.models_for([PIPELINE]):
        config.models[name] = config.models[name].model_copy(update={"max_tokens": max_tokens})
    return config


async def compare(args: argparse.Namespace) -> None:
    from moa_ray.pipeline import build_pipeline
    from moa_ray.serve.deploy import deploy_agents

    config = bench_config(args.max_tokens)
    ((name, spec),) = config.models_for([PIPELINE]).items()
    t = time.perf_counter()
    agents = deploy_agents(config, [PIPELINE], app_name=APP_NAME)
    print(f"ray up and {PIPELINE!r} deployed (Ray Serve LLM) in {time.perf_counter() - t:.1f}s", flush=True)
    t = time.perf_counter()
    direct = DirectEngine(spec)
    print(f"in-process vLLM engine started in {time.perf_counter() - t:.1f}s", flush=True)
    recorder = RecordingAgent(agents[name], name, itertools.count(1234), [])
    pipeline = build_pipeline(config, PIPELINE, {name: recorder})
    totals = {"pipe_tokens": 0, "pipe_s": 0.0, "direct_tokens": 0, "direct_s": 0.0, "calls": 0, "same": 0}
    per_prompt: list[float] = []
    try:
        for i, prompt in enumerate([WARMUP_PROMPT, *PROMPTS[: args.prompts]]):
            recorder.log.clear()
            start = time.perf_counter()
            result = await pipeline.run(prompt)
            wall = time.perf_counter() - start
            calls = list(recorder.log)
            pipe_tokens = sum(c.completion.usage.completion_tokens for c in calls)
            direct_tokens, direct_s, same = 0, 0.0, 0
            groups = waves(calls)
            for wave in groups:
                start = time.perf_counter()
                outs = await asyncio.gather(*(direct.generate(c.messages, c.params) for c in wave))
                direct_s += time.perf_counter() - start
                direct_tokens += sum(n for _, n in outs)
                same += sum(text == c.completion.text for (text, _), c in zip(outs, wave, strict=True))
            label = "warm-up" if i == 0 else f"prompt {i}/{args.prompts}"
            print(
                f"{label}: pipeline {pipe_tokens} tok in {wall:.2f}s ({pipe_tokens / wall:.1f} tok/s, {len(calls)} calls in "
                f"{len(groups)} waves, {result.trace.layers_run} layers) | direct {direct_tokens} tok in {direct_s:.2f}s "
                f"({direct_tokens / direct_s:.1f} tok/s) | identical outputs {same}/{len(calls)}",
                flush=True,
            )
            if i == 0:
                continue
            per_prompt.append((pipe_tokens / wall) / (direct_tokens / direct_s))
            for key, value in (
                ("pipe_tokens", pipe_tokens),
                ("pipe_s", wall),
                ("direct_tokens", direct_tokens),
                ("direct_s", direct_s),
                ("calls", len(calls)),
                ("same", same),
            ):
                totals[key] += value
    finally:
        direct.shutdown()
    pipe_rate = totals["pipe_tokens"] / totals["pipe_s"]
    direct_rate = totals["direct_tokens"] / totals["direct_s"]
    print(
        f"pipeline (Ray Serve LLM, handles, MoA driver): {totals['pipe_tokens']} completion tokens in {totals['pipe_s']:.2f}s = {pipe_rate:.1f} tok/s"
    )
    print(
        f"direct vLLM AsyncLLM, same calls and waves: {totals['direct_tokens']} completion tokens in {totals['direct_s']:.2f}s = {direct_rate:.1f} tok/s"
    )
    print(f"identical outputs: {totals['same']}/{totals['calls']} calls")
    print(f"median of per-prompt ratios {statistics.median(per_prompt):.3f}")
    print(f"ratio {pipe_rate / direct_rate:.3f}")


async def layer2_prefill(engine: DirectEngine, question: str, references: list[str], n: int, *, staggered: bool) -> float:
    """Wall time to prefill layer 2's ``n`` identical proposer prompts (max_tokens=1)."""
    messages = inject_references(as_messages(question), references)
    one = ChatParams(max_tokens=1, temperature=0.0)
    start = time.perf_counter()
    if staggered:
        await engine.generate(messages, one)
        await asyncio.gather(*(engine.generate(messages, one) for _ in range(n - 1)))
    else:
        await asyncio.gather(*(engine.generate(messages, one) for _ in range(n)))
    return time.perf_counter() - start


async def prefix(args: argparse.Namespace) -> None:
    config = bench_config(args.max_tokens)
    ((_, spec),) = config.models_for([PIPELINE]).items()
    layer1 = [p for p in config.pipeline(PIPELINE).layers[0].proposers]
    results: dict[bool, dict[str, list[float]]] = {}
    references_by_prompt: dict[str, list[str]] = {}
    for caching in (True, False):
        t = time.perf_counter()
        engine = DirectEngine(spec, enable_prefix_caching=caching)
        print(f"engine with prefix caching {'on' if caching else 'off'} started in {time.perf_counter() - t:.1f}s", flush=True)
        together: list[float] = []
        staggered: list[float] = []
        try:
            for i, question in enumerate([WARMUP_PROMPT, *PROMPTS[: args.prompts]]):
                if question not in references_by_prompt:  # the same references for both engines
                    outs = await asyncio.gather(
                        *(
                            engine.generate(
                                as_messages(question), ChatParams(temperature=p.temperature, max_tokens=args.max_tokens, seed=7 + j)
                            )
                            for j, p in enumerate(layer1)
                        )
                    )
                    references_by_prompt[question] = [text for text, _ in outs]
                refs = references_by_prompt[question]
                a = await layer2_prefill(engine, question, refs, len(layer1), staggered=False)
                b = await layer2_prefill(engine, question, refs[::-1], len(layer1), staggered=True)  # a prefix not yet cached
                tokens = len(engine.tokenizer(engine.prompt(inject_references(as_messages(question), refs)))["input_ids"])
                if i:
                    together.append(a)
                    staggered.append(b)
                print(
                    f"  {'warm-up' if i == 0 else f'prompt {i}'}: layer-2 prompt of {tokens} tokens x{len(layer1)}: "
                    f"together {a * 1000:.0f} ms, staggered {b * 1000:.0f} ms",
                    flush=True,
                )
        finally:
            engine.shutdown()
        results[caching] = {"together": together, "staggered": staggered}
    for mode in ("together", "staggered"):
        on, off = sum(results[True][mode]), sum(results[False][mode])
        print(f"layer-2 prompt time, dispatched {mode}: prefix caching on {on:.2f}s, off {off:.2f}s (on/off {on / off:.3f})")
    print(f"prefix_ratio {sum(results[True]['together']) / sum(results[False]['together']):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help=f"Measured prompts (at most {len(PROMPTS)}).")
    parser.add_argument("--max-tokens", type=int, default=64, help="Completion cap of every call.")
    parser.add_argument("--prefix", action="store_true", help="Measure prefix caching on layer 2 instead.")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: a local Ray).")
    args = parser.parse_args()
    if not 1 <= args.prompts <= len(PROMPTS):
        raise SystemExit(f"--prompts must be between 1 and {len(PROMPTS)}")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the engines' INFO lines would bury the table
    if args.prefix:
        asyncio.run(prefix(args))
        return
    from moa_ray.runtime import ray_session

    with ray_session(args.address, apps=[APP_NAME]):
        asyncio.run(compare(args))


if __name__ == "__main__":  # vLLM starts its engine by spawn: the guard keeps the child from rerunning this
    main()
