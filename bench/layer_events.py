"""How soon a streamed request's layer events reach the client: the gap between each call's end (the trace's own
start_s + latency_s) and the client's receipt of its ``"moa": {"stream_layers": true}`` event.

A 2-layer x 3 MoA over a fake provider that answers each call after a set delay, behind the endpoint's app on
uvicorn (loopback). The client's clock starts before it sends the request, so the gap is overstated by the
request's parsing, never understated. The last line is ``max_gap_ms <max> median_gap_ms <median>``.

    python -m bench.layer_events --requests 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the fake provider the tests use

from serve_support import FakeProvider, fake_api, fake_layers_config, serve_app, sse_events
from test_stream_layers import LAYERED, is_call_event


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--delay-s", type=float, default=0.3, help="Each call's latency at the fake provider.")
    args = parser.parse_args()
    gaps: list[float] = []
    app = fake_api(fake_layers_config(server={"stream_coalesce_ms": 0}), FakeProvider(delay_s=args.delay_s))
    with serve_app(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        for _ in range(args.requests):
            start = time.perf_counter()
            body = {**LAYERED, "moa": {"stream_layers": True}}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: ") and is_call_event(event := sse_events(line + "\n\n")[0]):
                        call = event["moa"]["call"]
                        gaps.append(time.perf_counter() - start - (call["start_s"] + call["latency_s"]))
    print(f"{len(gaps)} call events over {args.requests} requests")
    print(f"max_gap_ms {max(gaps) * 1000:.1f} median_gap_ms {statistics.median(gaps) * 1000:.1f}")


if __name__ == "__main__":
    main()
