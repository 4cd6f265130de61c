"""``eval judge`` over a stored generations directory plans a range of prompts at a time: the same items, and the
same judgments, as over the whole table read at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from eval_support import eval_config, generate_options, judge_options, simulator_config

from moa_ray.config import parse_config
from moa_ray.eval.benchmarks.registry import load_dataset
from moa_ray.eval.generate import run_generation
from moa_ray.eval.judging import StoredAnswers, plan_for_options, read_generations, run_judging
from moa_ray.pipeline.agents import in_process_agents


def planned(items: list[Any]) -> list[tuple[Any, ...]]:
    return sorted((i.kind, i.prompt_id, i.pipeline, getattr(i, "turn", 1), i.attempt) for i in items)


def test_ranges_of_prompts_plan_and_judge_as_the_whole_table(simulator: Any, tmp_path: Path) -> None:
    sim = simulator(simulator_config(latency_ms=5))
    config = parse_config(eval_config(sim.base_url))
    agents = in_process_agents(config, list(config.models))
    gen, judged = tmp_path / "gen", tmp_path / "judged"
    for dataset, limit in (("alpaca_eval", 5), ("mt_bench", 2)):
        run_generation(config, load_dataset(dataset, limit=limit), agents, generate_options(gen, ["one", "two"]))
    options = judge_options(gen, judged, "grader", "auto")

    with StoredAnswers(str(gen), chunk_rows=4) as answers:
        assert answers.bounds() == ["ae-000", "ae-002", "ae-004", "mt-082"]  # whole prompts, about 4 answers a range
        first = planned(plan_for_options(answers, options))
        assert first == planned(plan_for_options(read_generations(str(gen)), options))
        assert {k for k, *_ in first} == {"pairwise", "single"} and len(first) == 5 * 2 + 2 * 2 * 2
        summary = run_judging(answers, agents["grader"], options)
    assert summary.items == {"pairwise": 10, "single": 8}
    rows = pq.read_table(judged / "single").to_pylist() + pq.read_table(judged / "pairwise").to_pylist()
    assert len(rows) == 18 and {r["status"] for r in rows} == {"ok", "error"}  # the grader gives no [[A]]/[[B]] verdict

    with StoredAnswers(str(gen), chunk_rows=6, proposers=True) as answers:  # the failed ones again, and the proposers
        again = planned(plan_for_options(answers, options))
    assert again == planned(plan_for_options(read_generations(str(gen), proposers=True), options))
    assert {(k, a) for k, _, p, _, a in again if not p.startswith("proposer:")} == {("pairwise", 2)}
    assert any(p.startswith("proposer:") for _, _, p, _, _ in again)
