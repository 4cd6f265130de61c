"""What a model's ``rpm``/``tpm`` costs per call on Ray: the caller's CPU and the limits actor's, over a bare agent.

The agent under the limit answers after a fixed 2 ms (no HTTP), so everything measured is the limiter's: the
leases (one actor call reserves the calls waiting in the process and spare room for the calls it expects next, sized
to its recent rate), the calls started on a lease's spare room with no actor call, and the settlements (what the
leases spent, sent with the next lease or in a call nothing waits for). Each
concurrency runs the same calls through the bare agent and through the limited one; the limit is never reached,
so nothing waits for room. The last line gives the extra CPU per call (caller + actor, ms) at each concurrency.

    python -m bench.rate_limits --calls 2000 --concurrency 1 16 64
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time

import psutil

from moa_ray.chat import ChatMessage, ChatParams, Completion, Usage
from moa_ray.config import parse_config
from moa_ray.pipeline.limits import RateLimitedAgent
from moa_ray.runtime import ray_session


class TwoMillisecondAgent:
    """An agent that answers after 2 ms and reports 10 tokens: a stand-in with no CPU of its own to speak of."""

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        await asyncio.sleep(0.002)
        return Completion(text="ok", usage=Usage(prompt_tokens=5, completion_tokens=5), model="m")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def actor_cpu_s() -> float:
    """CPU seconds of the limits actor's process (Ray titles it after the actor's class)."""
    total = 0.0
    for process in psutil.process_iter(["cmdline"]):
        if "LocalWindows" in " ".join(process.info["cmdline"] or []):
            times = process.cpu_times()
            total += times.user + times.system
    return total


async def run_calls(agent: object, calls: int, concurrency: int) -> None:
    messages, params = [ChatMessage(role="user", content="hello")], ChatParams(timeout_s=60)
    slots = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with slots:
            await agent.chat(messages, params)  # type: ignore[attr-defined]

    await asyncio.gather(*(one() for _ in range(calls)))


def cpu_per_call_ms(agent: object, calls: int, concurrency: int) -> tuple[float, float, float]:
    """(caller ms, actor ms, wall ms) per call, after a warm-up."""
    asyncio.run(run_calls(agent, 100, concurrency))
    own, actor, start = own_cpu_s(), actor_cpu_s(), time.perf_counter()
    asyncio.run(run_calls(agent, calls, concurrency))
    return (
        (own_cpu_s() - own) / calls * 1e3,
        (actor_cpu_s() - actor) / calls * 1e3,
        (time.perf_counter() - start) / calls * 1e3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--tpm", action="store_true", help="limit tokens too (a settlement per group)")
    args = parser.parse_args()
    limits = {"rpm": 10**9, **({"tpm": 10**12} if args.tpm else {})}
    config = parse_config({"models": {"m": {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1", **limits}}})
    extra = {}
    with ray_session(num_cpus=2):
        for concurrency in args.concurrency:
            bare = cpu_per_call_ms(TwoMillisecondAgent(), args.calls, concurrency)
            limited = cpu_per_call_ms(
                RateLimitedAgent(TwoMillisecondAgent(), f"m-{concurrency}", config.models["m"]), args.calls, concurrency
            )
            extra[concurrency] = limited[0] + limited[1] - bare[0] - bare[1]
            print(
                f"concurrency {concurrency:3d}: bare {bare[0]:.3f} ms CPU/call; limited: caller {limited[0]:.3f} + actor "
                f"{limited[1]:.3f} ms CPU/call, wall {limited[2]:.3f} ms/call (bare {bare[2]:.3f})"
            )
    print("extra CPU per call, ms: " + ", ".join(f"{c} concurrent {ms:.3f}" for c, ms in extra.items()))


if __name__ == "__main__":
    main()
