"""Peak memory of ``moa-ray eval generate`` as the dataset grows: does a run stay flat from 20k prompts to 100k?

A single-model pipeline over the LLM simulator (a test double for a remote provider, in its own process) at a
fixed latency, ``--concurrency 128``, a JSONL dataset of N synthetic prompts. Each size is one ``moa-ray eval
generate`` child process (with its own local Ray); its peak RSS is read from ``/usr/bin/time -v``, which counts
the driver, not the Ray workers. Run it alone on a quiet machine: rows/s is a timing.

    python -m bench.eval_memory --sizes 20000,100000

The last line: ``peak_rss_ratio <largest / smallest> rows_per_s <at the largest>``.

``--stage report`` measures ``moa-ray eval report`` instead, over N answers written directly (no model): two
pipelines' answers to N / 2 prompts with references, nine prompts in ten judged pairwise (:func:`write_judged_run`,
which tests/test_eval_large_judging.py writes too), ``--no-proposers``; its peak RSS from ``/usr/bin/time -v``.

    python -m bench.eval_memory --stage report --sizes 20000,100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from bench.simulator import free_port


def write_prompts(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i:07d}", "prompt": f"Synthetic question {i}: explain item {i} in one short paragraph."}) + "\n")


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def write_judged_run(out: Path, prompts: int) -> None:
    """``out/gen`` and ``out/judged``: two pipelines' answers to ``prompts`` prompts with references (texts of 30 to
    180 words), all but every tenth prompt judged pairwise, in part files of 10,000 answers."""
    from moa_ray.eval.benchmarks.alpaca_eval import pairwise_table
    from moa_ray.eval.schema import GenerationRow, PairwiseRow
    from moa_ray.eval.store import RowTable

    rnd = random.Random(1)

    def text(words: int) -> str:
        return " ".join(rnd.choice(WORDS) for _ in range(words))

    gens, judged = RowTable(str(out / "gen"), GenerationRow), pairwise_table(str(out / "judged"))
    answers: list[GenerationRow] = []
    judgments: list[PairwiseRow] = []
    for i in range(prompts):
        instruction, reference = text(30), text(150)
        for pipeline in ("one", "two"):
            output = text(100 + i % 80)
            fields = {"run_id": "g", "prompt_id": f"p{i:07d}", "pipeline": pipeline, "instruction": instruction}
            answers.append(
                GenerationRow(**fields, turn=1, dataset="prompts.jsonl", output=output, reference=reference, config_hash="h", latency_s=0.5)
            )
            if i % 10:
                judgments.append(
                    PairwiseRow(
                        **{**fields, "run_id": "j"},
                        judge="j",
                        judge_prompt="pair-v2",
                        output_1=reference,
                        generator_1="ref",
                        output_2=output,
                        generator_2=pipeline,
                        preference=rnd.choice([1.0, 1.5, 2.0]),
                        judgment_reference_first=text(60),
                        judgment_pipeline_first=text(60),
                    )
                )
        if len(answers) >= 10_000:
            gens.write_part(answers, f"{i:08d}")
            judged.write_part(judgments, f"{i:08d}")
            answers, judgments = [], []
    gens.write_part(answers, "last")
    judged.write_part(judgments, "last")


def measure_report(answers: int, tmp: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of ``moa-ray eval report --no-proposers`` over ``answers`` judged answers."""
    run = tmp / f"report-{answers}"
    write_judged_run(run, answers // 2)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "moa_ray.cli", "eval", "report", "--generations", str(run / "gen")]
    cmd += ["--judgments", str(run / "judged"), "--out", str(run / "report"), "--no-proposers"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"report failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))  # type: ignore[union-attr]
    return wall, peak_kb * 1024


def report_main(sizes: list[int]) -> None:
    """``--stage report``: the report's peak RSS at each size, and the ratio of the largest to the smallest."""
    results = []
    with tempfile.TemporaryDirectory() as d:
        for n in sizes:
            wall, peak = measure_report(n, Path(d))
            results.append(peak)
            print(f"{n:>9} answers  {wall:7.1f} s  peak RSS {peak / 2**30:5.2f} GB", flush=True)
    print(f"peak_rss_ratio {results[-1] / results[0]:.2f} peak_rss_gb {results[-1] / 2**30:.2f}")


def write_config(path: Path, base_url: str) -> None:
    model = {"backend": "openai", "model": "sim", "base_url": base_url, "max_ongoing_requests": 1024, "max_retries": 0}
    path.write_text(yaml.safe_dump({"models": {"sim": model}, "pipelines": {"one": {"kind": "single", "model": "sim"}}}))


def measure(n: int, tmp: Path, config: Path, concurrency: int, extra: list[str]) -> tuple[float, float, int]:
    """(wall seconds, rows/s, peak RSS bytes) of one generate run over n prompts into a fresh directory."""
    data = tmp / f"prompts-{n}.jsonl"
    write_prompts(data, n)
    out = tmp / f"out-{n}"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "moa_ray.cli", "eval", "generate", "--config", str(config)]
    cmd += ["--pipeline", "one", "--dataset", str(data), "--out", str(out), "--concurrency", str(concurrency), "--no-progress", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"generate failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))  # type: ignore[union-attr]
    rate = re.search(r"([\d.]+) rows/s", done.stderr)
    return wall, float(rate.group(1)) if rate else n / wall, peak_kb * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,100000", help="Prompt counts, comma separated (smallest first).")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--latency-ms", type=float, default=20)
    parser.add_argument("--extra", default="", help="More `eval generate` options, space separated (e.g. --no-call-store).")
    parser.add_argument("--stage", choices=["generate", "report"], default="generate", help="The command measured.")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.stage == "report":
        report_main(sizes)
        return

    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "bench.simulator", "--port", str(port), "--latency-ms", str(args.latency_ms), "--output-tokens", "32"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{base_url}/models", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        results = []
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            config = tmp / "config.yaml"
            write_config(config, base_url)
            for n in sizes:
                wall, rate, peak = measure(n, tmp, config, args.concurrency, args.extra.split())
                results.append((n, wall, rate, peak))
                print(f"{n:>9} prompts  {wall:7.1f} s  {rate:7.0f} rows/s  peak RSS {peak / 2**30:5.2f} GB", flush=True)
    finally:
        sim.terminate()
        sim.wait()
    smallest, largest = results[0], results[-1]
    print(f"peak_rss_ratio {largest[3] / smallest[3]:.2f} rows_per_s {largest[2]:.0f} peak_rss_gb {largest[3] / 2**30:.2f}")


if __name__ == "__main__":
    main()
