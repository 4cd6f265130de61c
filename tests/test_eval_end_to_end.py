"""Generate, judge and report end to end without Ray: the in-process worker pool, in-process agents calling
the LLM simulator. The same run on Ray actors (and a Serve-deployed model) is test_eval_ray.py's smoke test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from eval_support import LOGPROB_TOPS, flaky_eval_config, flaky_simulator_config, generate_options, judge_options

from bench.simulator import run_simulator
from moa_ray.eval.benchmarks.alpaca_eval import ALPACA_RESULTS_DIR, official_table, pairwise_table
from moa_ray.eval.benchmarks.mt_bench import baseline_table, single_table
from moa_ray.eval.benchmarks.registry import load_dataset
from moa_ray.eval.generate import run_generation
from moa_ray.eval.judging import read_generations, read_report_answers, run_judging
from moa_ray.eval.report import build_report, write_report
from moa_ray.eval.schema import GenerationRow
from moa_ray.eval.store import RowTable
from moa_ray.pipeline.agents import InProcessAgent, in_process_agents


@pytest.fixture(scope="module")
def env():
    with run_simulator(flaky_simulator_config()) as sim:
        config = flaky_eval_config(sim.base_url)
        agents = in_process_agents(config, list(config.models))
        assert all(isinstance(a, InProcessAgent) for a in agents.values())  # nothing here needs Ray
        yield config, agents, sim


def test_two_pipelines_share_models_and_rerun_skips(env, tmp_path: Path) -> None:
    config, agents, sim = env
    ds = load_dataset("mt_bench", limit=3)
    before = sim.stats.by_model.get("sim-a", 0)
    summary = run_generation(config, ds, agents, generate_options(tmp_path, ["one", "two"]))
    errors = [r["error"] for r in pq.read_table(tmp_path).to_pylist() if r["error"]]
    assert (summary.total_rows, summary.ok_rows, summary.failed_rows, summary.workers) == (12, 12, 0, 1), errors
    assert summary.complete
    # sim-a is a proposer of both pipelines: 1 call per turn for "one", 2 for "two" (two layers)
    assert sim.stats.by_model["sim-a"] - before == 3 * 2 * (1 + 2)
    rows = pq.read_table(tmp_path).to_pylist()
    assert len(rows) == 12 and len({(r["prompt_id"], r["pipeline"], r["turn"]) for r in rows}) == 12
    assert {r["layers_run"] for r in rows if r["pipeline"] == "two"} == {3}
    again = run_generation(config, ds, agents, generate_options(tmp_path, ["one", "two"]))
    assert (again.skipped_rows, again.attempted_rows, again.items) == (12, 0, 0)
    assert pq.read_table(tmp_path).num_rows == 12


def test_failures_are_recorded_then_retried(env, tmp_path: Path) -> None:
    config, agents, _ = env
    ds = load_dataset("alpaca_eval", limit=8)
    first = run_generation(config, ds, agents, generate_options(tmp_path, ["flaky"]))
    assert first.failed_rows > 0 and not first.complete
    failed = {k for k, r in RowTable(str(tmp_path), GenerationRow).latest().items() if r.status == "error"}
    assert all("503" in r["error"] for r in pq.read_table(tmp_path).to_pylist() if r["status"] == "error")
    runs = 1
    while runs < 12 and not run_generation(config, ds, agents, generate_options(tmp_path, ["flaky"])).complete:
        runs += 1
    rows = pq.read_table(tmp_path).to_pylist()
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert {r["attempt"] for r in rows if (r["prompt_id"], r["pipeline"], r["turn"]) in failed} != {1}


def test_judge_and_report(env, tmp_path: Path) -> None:
    config, agents, _ = env
    gen, judged, report = tmp_path / "gen", tmp_path / "judged", tmp_path / "report"
    for dataset, limit in (("alpaca_eval", 4), ("mt_bench", 2)):  # one table can hold several datasets
        run_generation(config, load_dataset(dataset, limit=limit), agents, generate_options(gen, ["one", "two"]))
    gens = read_generations(str(gen))

    def judge(name: str, mode: str):
        return run_judging(gens, agents[name], judge_options(gen, judged, name, mode))

    pair = judge("judge", "pairwise")
    assert (pair.pairwise_items, pair.single_items, pair.failed_rows) == (8, 0, 0)  # mt_bench has no reference for writing
    single = judge("grader", "single")  # grades every turn: mt_bench's 2 x 2 and alpaca_eval's 4 per pipeline
    assert (single.single_items, single.failed_rows) == (2 * (2 * 2 + 4), 0)
    assert judge("judge", "pairwise").pairwise_items == 0  # resumable: nothing left to judge

    prefs = pairwise_table(str(judged)).read().to_pylist()
    # the judge always answers [[A]]: asking in both orders cancels its position bias exactly
    assert {(r["verdict_reference_first"], r["verdict_pipeline_first"], r["preference"]) for r in prefs} == {("A", "A", 1.5)}
    grades = single_table(str(judged)).read().to_pylist()
    assert {r["score"] for r in grades} == {7.0}
    # alpaca_eval's reference outputs make its grading reference-guided; mt_bench writing has none
    assert {(r["turn"], r["judge_prompt"]) for r in grades} == {
        (1, "single-v1"),
        (2, "single-v1-multi-turn"),
        (1, "single-math-v1"),
    }

    rows = build_report(read_report_answers(str(gen)), prefs, grades)
    by_name = {r.pipeline: r for r in rows}
    assert set(by_name) == {"one", "two"}
    assert by_name["one"].win_rate == pytest.approx(50.0) and by_name["one"].mt_bench == pytest.approx(7.0)
    assert by_name["two"].mean_tokens > by_name["one"].mean_tokens
    assert by_name["one"].latency_p95_s >= by_name["one"].latency_p50_s > 0
    written = write_report(rows, str(report))
    names = {Path(p).name for p in written}
    assert names == {"report.md", "report.csv", "report.json", "quality_vs_cost.png", "quality_vs_latency.png"}
    assert (report / "quality_vs_cost.png").read_bytes()[:4] == b"\x89PNG"
    assert "| one |" in (report / "report.md").read_text()


def test_the_other_judge_modes(env, tmp_path: Path) -> None:
    """pairwise-baseline, single with repeats and the official annotator through the worker pool, resumable."""
    config, agents, _ = env
    gen, judged = tmp_path / "gen", tmp_path / "judged"
    run_generation(config, load_dataset("mt_bench", limit=2), agents, generate_options(gen, ["one", "two"]))
    run_generation(config, load_dataset("alpaca_eval", limit=3), agents, generate_options(gen, ["one"]))
    gens = read_generations(str(gen))

    def judge(name: str, mode: str, **kw):
        return run_judging(gens, agents[name], judge_options(gen, judged, name, mode, **kw))

    versus = judge("judge", "pairwise-baseline", baseline="two", pipelines=["one"])
    assert (versus.baseline_items, versus.failed_rows) == (2 * 2, 0)  # 2 mt_bench prompts x 2 turns (alpaca: "two" has none)
    rows = baseline_table(str(judged)).read().to_pylist()
    assert {(r["g1_winner"], r["g2_winner"], r["outcome"]) for r in rows} == {("pipeline", "baseline", "tie")}  # always [[A]]
    graded = judge("grader", "single", repeats=3, pipelines=["one"])
    assert (graded.single_items, graded.failed_rows) == (2 * 2 + 3, 0)
    assert {tuple(r["scores"]) for r in single_table(str(judged)).read().to_pylist()} == {(7.0, 7.0, 7.0)}
    official = judge("official", "alpaca-eval-official")
    assert (official.official_items, official.failed_rows) == (3, 0)
    p_m = math.exp(LOGPROB_TOPS[0]["m"]) / (math.exp(LOGPROB_TOPS[0]["m"]) + math.exp(LOGPROB_TOPS[0]["M"]))
    for r in official_table(str(judged)).read().to_pylist():
        assert r["preference_source"] == "logprobs"
        assert r["preference"] == pytest.approx(3 - (2 - p_m) if r["is_switched_outputs"] else 2 - p_m)
    (path,) = official.annotation_files
    assert path == str(judged / ALPACA_RESULTS_DIR / "one" / "weighted_alpaca_eval_gpt4_turbo" / "annotations.json")
    assert len(json.loads(Path(path).read_text())) == 3
    assert judge("official", "alpaca-eval-official").official_items == 0  # resumable
