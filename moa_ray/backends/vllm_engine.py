"""vLLM in-process engine for GPU pools (imported lazily: vLLM is an optional extra).

Each Serve replica owns one ``AsyncLLMEngine`` on the GPUs Ray assigned to it;
vLLM batches the concurrent requests itself, so there is no lock here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from moa_ray.backends.base import effective_params
from moa_ray.chat import ChatMessage, ChatParams, Completion, StreamChunk, Usage
from moa_ray.config import VLLMModelSpec
from moa_ray.errors import BackendError, ConfigError, ContextLengthExceeded


class VLLMBackend:
    """A Hugging Face model served by vLLM on this replica's GPUs."""

    def __init__(self, spec: VLLMModelSpec) -> None:
        try:
            from vllm import AsyncEngineArgs, SamplingParams
            from vllm.engine.async_llm_engine import AsyncLLMEngine
        except ImportError as err:
            raise ConfigError("backend 'vllm' needs vLLM on the replica's node: pip install 'moa-ray[vllm]'") from err
        self.spec = spec
        self._sampling_params = SamplingParams
        args = AsyncEngineArgs(
            model=spec.model,
            tensor_parallel_size=spec.tensor_parallel_size,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            max_model_len=spec.max_model_len,
            dtype=spec.dtype,
        )
        self._engine = AsyncLLMEngine.from_engine_args(args)
        self._tokenizer: Any = None

    async def _prompt(self, messages: list[ChatMessage]) -> str:
        if self._tokenizer is None:
            self._tokenizer = await self._engine.get_tokenizer()
        return self._tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
        )

    def _sampling(self, params: ChatParams) -> Any:
        p = effective_params(self.spec, params)
        return self._sampling_params(
            temperature=p.temperature, max_tokens=p.max_tokens, top_p=p.top_p or 1.0, stop=p.stop, seed=p.seed,
            **structured_output(p),
        )

    async def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]:
        start = time.perf_counter()
        prompt = await self._prompt(messages)
        sent = 0
        final = None
        try:
            async for out in self._engine.generate(prompt, self._sampling(params), request_id=uuid.uuid4().hex):
                text = out.outputs[0].text
                if len(text) > sent:
                    yield StreamChunk(delta=text[sent:])
                    sent = len(text)
                final = out
        except ValueError as err:
            if "longer than" in str(err) or "context" in str(err).lower():
                raise ContextLengthExceeded(f"{self.spec.model}: {err}", model=self.spec.model) from None
            raise BackendError(f"{self.spec.model}: {err}", model=self.spec.model) from None
        if final is None:
            raise BackendError(f"{self.spec.model}: vLLM returned no output", model=self.spec.model)
        output = final.outputs[0]
        yield StreamChunk(
            completion=Completion(
                text=output.text,
                usage=Usage(prompt_tokens=len(final.prompt_token_ids or []), completion_tokens=len(output.token_ids)),
                latency_s=time.perf_counter() - start,
                finish_reason=output.finish_reason,
                model=self.spec.model,
            )
        )

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        async for chunk in self.stream(messages, params):
            if chunk.completion is not None:
                return chunk.completion
        raise BackendError(f"{self.spec.model}: stream ended without a completion", model=self.spec.model)

    async def aclose(self) -> None:
        self._engine.shutdown_background_loop() if hasattr(self._engine, "shutdown_background_loop") else None


def structured_output(params: ChatParams) -> dict[str, Any]:
    """vLLM's constrained decoding for JSON answers (the SMoA judge's schema), in the API this vLLM has.

    vLLM >= 0.10.2 takes ``structured_outputs=StructuredOutputsParams(...)``; older
    releases took ``guided_decoding=GuidedDecodingParams(...)`` with the same fields.
    """
    if not params.json_mode:
        return {}
    fields: dict[str, Any] = {"json": params.json_schema} if params.json_schema else {"json_object": True}
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(**fields)}
    return {"structured_outputs": StructuredOutputsParams(**fields)}
