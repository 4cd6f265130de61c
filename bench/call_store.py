"""Model calls the call store saves on the papers' presets: ``moa`` + ``moa-lite`` (they share layer 1), then six
single-model baselines whose settings equal layer 1's, then a rerun.

The shipped Together AI presets (``moa_ray/presets/together.yaml``) are pointed at the LLM simulator (a test
double for the provider), whose request counter is the number of calls really made. The presets sample at
temperature 0.7, so sharing takes ``--reuse-sampled``; a run without the call store is the reference.

    python -m bench.call_store --prompts 20

Counts, not timings: the numbers do not depend on the machine's load. The last line prints the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bench.simulator import SimulatorConfig, run_simulator
from moa_ray.config import MoARayConfig, parse_config
from moa_ray.eval.benchmarks.registry import load_dataset
from moa_ray.eval.generate import GenerateOptions, run_generation
from moa_ray.pipeline.agents import in_process_agents


def presets_on(base_url: str) -> MoARayConfig:
    """together.yaml with every model served by the simulator, plus a ``single`` baseline per layer-1 model."""
    raw: dict[str, Any] = yaml.safe_load(resources.files("moa_ray.presets").joinpath("together.yaml").read_text())
    for spec in raw["models"].values():
        spec.update(base_url=base_url, max_retries=0, max_ongoing_requests=256)
        spec.pop("api_key_env", None)
    for name in raw["pipelines"]["moa"]["layers"][0]:
        raw["pipelines"][f"single-{name}"] = {"kind": "single", "model": name}
    return parse_config(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=20, help="AlpacaEval prompts (the shipped dataset's first N).")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    data = load_dataset("alpaca_eval", limit=args.prompts)
    n = len(data.prompts)
    with run_simulator(SimulatorConfig(latency_ms=5, output_tokens=32)) as sim, tempfile.TemporaryDirectory() as tmp:
        config = presets_on(sim.base_url)
        agents = in_process_agents(config, list(config.models))
        singles = [p for p in config.pipelines if p.startswith("single-")]

        def calls(out: str, pipelines: list[str], **options: Any) -> float:
            before = sum(sim.stats.by_model.values())
            opts = GenerateOptions(
                pipelines=pipelines, out=str(Path(tmp) / out), concurrency=args.concurrency, pool="in_process", progress=False, **options
            )
            summary = run_generation(config, data, agents, opts)
            assert summary.complete, summary.failures
            return (sum(sim.stats.by_model.values()) - before) / n

        rows = [
            ("moa + moa-lite, no call store", calls("plain", ["moa", "moa-lite"], store_calls=False)),
            ("moa + moa-lite, --reuse-sampled", calls("store", ["moa", "moa-lite"], reuse_sampled=True)),
            ("+ 6 single baselines (= layer 1)", calls("store", ["moa", "moa-lite", *singles], reuse_sampled=True)),
            ("rerun of all 8 pipelines", calls("store", ["moa", "moa-lite", *singles], reuse_sampled=True)),
            (
                "all 8 into a new dir, --calls-from",
                calls("other", ["moa", "moa-lite", *singles], reuse_sampled=True, calls_from=[str(Path(tmp) / "store")]),
            ),
        ]
    print(f"{n} AlpacaEval prompts, the together.yaml presets on the simulator: model calls per prompt")
    for label, value in rows:
        print(f"  {label:<40} {value:6.2f}")
    plain, shared, baselines, rerun, elsewhere = (v for _, v in rows)
    print(
        f"calls per prompt: moa+moa-lite {plain:.1f} -> {shared:.1f} ({shared / plain:.2f}x); +6 baselines +{baselines:.1f}; "
        f"rerun {rerun:.1f}; new dir with --calls-from {elsewhere:.1f}"
    )


if __name__ == "__main__":
    main()
