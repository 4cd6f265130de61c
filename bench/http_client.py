"""CPU per call of a remote model's HTTP client: httpx's own transport against aiohttp's (``http_transport``).

The same ``OpenAIBackend`` calls the simulator (in its own process) at a fixed concurrency with each transport,
plain and streamed, and the run reports this process's CPU seconds per call (``time.process_time``): the cost
each in-process agent pays per call, in the CLI, an eval worker or an ingress replica.

    python -m bench.http_client --calls 1500 --concurrency 20

The last line is ``cpu_ratio <aiohttp / httpx, plain> stream_cpu_ratio <aiohttp / httpx, streamed>``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.serve_load import simulator_process
from moa_ray.backends.openai_http import OpenAIBackend
from moa_ray.chat import ChatMessage, ChatParams
from moa_ray.config import OpenAIModelSpec

MESSAGES = [ChatMessage(role="user", content="hi")]


async def cpu_per_call_ms(backend: OpenAIBackend, calls: int, concurrency: int, *, stream: bool) -> float:
    slots = asyncio.Semaphore(concurrency)
    params = ChatParams(max_tokens=32)

    async def one() -> None:
        async with slots:
            if stream:
                async for _ in backend.stream(MESSAGES, params):
                    pass
            else:
                await backend.chat(MESSAGES, params)

    await asyncio.gather(*(one() for _ in range(min(50, calls))))  # warm: connections, imports
    start = time.process_time()
    await asyncio.gather(*(one() for _ in range(calls)))
    return 1000 * (time.process_time() - start) / calls


async def measure(base_url: str, calls: int, concurrency: int) -> dict[tuple[str, bool], float]:
    out = {}
    for transport in ("httpx", "aiohttp"):
        for stream in (False, True):
            spec = OpenAIModelSpec(backend="openai", model="m", base_url=base_url, http_transport=transport, max_connections=concurrency)
            backend = OpenAIBackend(spec)
            try:
                out[(transport, stream)] = await cpu_per_call_ms(backend, calls, concurrency, stream=stream)
            finally:
                await backend.aclose()
            print(f"{transport:<8} {'streamed' if stream else 'plain':<9} {out[(transport, stream)]:.2f} ms CPU per call", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="Simulated latency of every call.")
    parser.add_argument("--output-tokens", type=int, default=32, help="Tokens per answer (events per streamed call).")
    args = parser.parse_args()
    try:
        import uvloop  # the loop Ray Serve's replicas run on, when installed

        uvloop.install()
    except ImportError:
        pass
    with simulator_process(args.latency_ms, args.output_tokens) as (base_url, _):
        out = asyncio.run(measure(base_url, args.calls, args.concurrency))
    print(
        f"cpu_ratio {out[('aiohttp', False)] / out[('httpx', False)]:.3f} "
        f"stream_cpu_ratio {out[('aiohttp', True)] / out[('httpx', True)]:.3f}"
    )


if __name__ == "__main__":
    main()
