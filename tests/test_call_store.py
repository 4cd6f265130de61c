"""The call store of evaluations: every call kept once in <out>/_calls, identical calls made once, reruns and new
pipelines paying only for calls never made, sampled calls reused only when asked, per-proposer entries.

No Ray: the in-process worker pool and in-process agents calling the LLM simulator (a test double for a remote
model service) whose request counter is the number of calls really made.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from eval_support import generate_options, judge_options, model, simulator_config

from bench.simulator import Behaviour
from moa_ray.config import parse_config
from moa_ray.eval.benchmarks.registry import load_dataset
from moa_ray.eval.calls import PROPOSER_PREFIX, calls_table
from moa_ray.eval.generate import run_generation
from moa_ray.eval.judging import read_generations, read_report_answers, run_judging
from moa_ray.eval.report import build_report
from moa_ray.eval.schema import CallRow
from moa_ray.pipeline.agents import in_process_agents

PROPOSERS = ["p1", "p2", "p3"]


def store_config(base_url: str, temperature: float = 0.0, **extra_pipelines: Any) -> Any:
    """The papers' two presets in miniature: ``moa`` (2 layers of 3 + aggregator) and ``moa-lite`` (its layer 1 + aggregator)."""
    models = {
        name: model(base_url, f"sim-{name}", temperature=temperature, pricing={"input_per_mtok": 1.0, "output_per_mtok": 1.0})
        for name in PROPOSERS
    }
    models["agg"] = model(base_url, "sim-agg", temperature=temperature)
    models["judge"] = model(base_url, "judge-always-a", temperature=0.0)
    return parse_config(
        {
            "models": models,
            "pipelines": {
                "moa": {"kind": "moa", "layers": [PROPOSERS, PROPOSERS], "aggregator": "agg"},
                "moa-lite": {"kind": "moa", "layers": [PROPOSERS], "aggregator": "agg"},
                **extra_pipelines,
            },
        }
    )


def write_dataset(path: Path, n: int = 4) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question number {i}?"}) + "\n" for i in range(n)))
    return path


@pytest.fixture
def sim(simulator):
    """A fresh simulator per test, stopped in the background as the test ends (conftest's ``simulator``)."""
    return simulator(simulator_config(latency_ms=20))


def made(sim) -> int:
    return sum(sim.stats.by_model.values())


def call_table(out: Path) -> list[CallRow]:
    return list(calls_table(str(out)).latest().values())


def test_moa_and_moa_lite_make_each_identical_call_once(sim, tmp_path: Path) -> None:
    config = store_config(sim.base_url)
    data = load_dataset(str(write_dataset(tmp_path / "q.jsonl")))
    agents = in_process_agents(config, list(config.models))
    summary = run_generation(config, data, agents, generate_options(tmp_path / "out", ["moa", "moa-lite"]))
    assert summary.complete and summary.ok_rows == 8
    rows = call_table(tmp_path / "out")
    # every call of both pipelines has a row: 3 + 3 + 1 (moa) and 3 + 1 (moa-lite) per prompt
    assert len(rows) == 4 * (7 + 4)
    distinct = {r.key for r in rows}
    # layer 1 is shared: 14 -> 8 distinct calls per prompt (the paper's 20 -> 14 at 6 proposers), each made once
    assert len(distinct) == 4 * 8
    assert made(sim) == len(distinct)
    assert sum(not r.reused for r in rows) == len(distinct) and sum(r.reused for r in rows) == 4 * 3
    assert summary.calls is not None and (summary.calls.made, summary.calls.reused) == (32, 12)
    assert summary.calls.saved_cost_usd is not None and summary.calls.saved_cost_usd > 0
    assert all(r.text for r in rows)  # every text kept
    layer_one = [r for r in rows if r.pipeline == "moa" and r.layer == 1]
    assert sorted({r.model for r in layer_one}) == PROPOSERS and {r.index for r in layer_one} == {0, 1, 2}


def test_rerun_and_a_new_pipeline_pay_only_for_calls_never_made(sim, tmp_path: Path) -> None:
    single = {"kind": "single", "model": "p1"}
    config = store_config(sim.base_url, baseline=single)
    data = load_dataset(str(write_dataset(tmp_path / "q.jsonl")))
    agents = in_process_agents(config, list(config.models))
    out = tmp_path / "out"
    run_generation(config, data, agents, generate_options(out, ["moa-lite"]))
    first = made(sim)
    # adding moa: its layer 1 is moa-lite's, stored: only layer 2 and its aggregator are new (4 calls per prompt)
    run_generation(config, data, agents, generate_options(out, ["moa-lite", "moa"]))
    assert made(sim) - first == 4 * 4
    # a single-model baseline whose settings equal a layer-1 proposer's: answered from the store, no call
    before = made(sim)
    summary = run_generation(config, data, agents, generate_options(out, ["moa-lite", "moa", "baseline"]))
    assert made(sim) == before and summary.complete and summary.calls is not None and summary.calls.reused == 4
    # another output directory reading this store (--calls-from) makes no call either
    again = run_generation(config, data, agents, generate_options(tmp_path / "other", ["moa"], calls_from=[str(out)]))
    assert made(sim) == before and again.calls is not None and again.calls.made == 0


def test_a_kill_between_the_calls_and_their_answers_leaves_no_duplicate_and_no_lost_call(sim, tmp_path: Path) -> None:
    config = store_config(sim.base_url)
    data = load_dataset(str(write_dataset(tmp_path / "q.jsonl")))
    agents = in_process_agents(config, list(config.models))
    out = tmp_path / "out"
    run_generation(config, data, agents, generate_options(out, ["moa", "moa-lite"]))
    calls_made = made(sim)
    # the window a kill -9 can hit: the calls' part files are written, the answers' are not
    for part in out.glob("part-*.parquet"):
        part.unlink()
    summary = run_generation(config, data, agents, generate_options(out, ["moa", "moa-lite"], run_id="rerun"))
    assert summary.complete and made(sim) == calls_made  # every call answered from the store
    table = pq.read_table(out / "_calls").to_pylist()
    keys = [(r["prompt_id"], r["pipeline"], r["turn"], r["attempt"], r["layer"], r["role"], r["index"]) for r in table]
    assert len(keys) == len(set(keys)) == 4 * 11  # compacted: one row per call, none lost
    assert {r["run_id"] for r in table} == {"rerun"}  # the rows of the calls that made the stored answers


def test_sampled_calls_are_reused_only_with_the_flag(sim, tmp_path: Path) -> None:
    config = store_config(sim.base_url, temperature=0.7)
    data = load_dataset(str(write_dataset(tmp_path / "q.jsonl", n=2)))
    agents = in_process_agents(config, list(config.models))
    run_generation(config, data, agents, generate_options(tmp_path / "a", ["moa", "moa-lite"]))
    assert made(sim) == 2 * (7 + 4)  # nothing shared
    before = made(sim)
    summary = run_generation(config, data, agents, generate_options(tmp_path / "b", ["moa", "moa-lite"], reuse_sampled=True))
    assert made(sim) - before == 2 * 8 and summary.calls is not None and summary.calls.reused == 2 * 3
    # and a stored sampled call is not reused by a run that did not ask
    before = made(sim)
    run_generation(config, data, agents, generate_options(tmp_path / "c", ["moa-lite"], calls_from=[str(tmp_path / "b")]))
    assert made(sim) - before == 2 * 4


def test_a_provider_key_ending_in_a_newline_never_reaches_the_stored_texts(tmp_path: Path, monkeypatch, simulator) -> None:
    secret = "sk-call-store-secret-42"
    monkeypatch.setenv("SIM_KEY", secret + "\n")
    behaviour = simulator_config(latency_ms=5)
    behaviour.models["sim-echo"] = Behaviour(latency_ms=5, reply=f"my key is {secret} and {secret!r}")
    server = simulator(behaviour)
    config = parse_config(
        {
            "models": {"echo": model(server.base_url, "sim-echo", temperature=0.0, api_key_env="SIM_KEY")},
            "pipelines": {"one": {"kind": "single", "model": "echo"}},
        }
    )
    data = load_dataset(str(write_dataset(tmp_path / "q.jsonl", n=2)))
    run_generation(config, data, in_process_agents(config, ["echo"]), generate_options(tmp_path / "out", ["one"]))
    texts = [r.text for r in call_table(tmp_path / "out")]
    assert texts and all("[REDACTED]" in t and secret not in t for t in texts)
    assert not any(secret in p.read_bytes().decode("latin-1") for p in (tmp_path / "out" / "_calls").glob("*.parquet"))


def test_imported_round_files_answer_layer_one(sim, tmp_path: Path) -> None:
    config = store_config(sim.base_url, temperature=0.7)  # sampled, yet an imported answer stands: the user asked
    data = load_dataset(str(write_dataset(tmp_path / "q.jsonl", n=2)))
    paths = []
    for name in PROPOSERS:  # the original MoA code's files: AlpacaEval model_outputs, generator = provider id + "-together"
        records = [
            {"instruction": p.turns[0], "output": f"{name} said {i}", "generator": f"sim-{name}-together"}
            for i, p in enumerate(data.prompts)
        ]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(records))
        paths.append(str(path))
    agents = in_process_agents(config, list(config.models))
    summary = run_generation(config, data, agents, generate_options(tmp_path / "out", ["moa-lite"], references_from=paths))
    assert summary.complete and made(sim) == 2  # the aggregator only
    rows = [r for r in call_table(tmp_path / "out") if r.layer == 1]
    assert {r.source for r in rows} == {"references"} and all(r.reused for r in rows)
    assert sorted(r.text for r in rows if r.prompt_id == data.prompts[0].prompt_id) == ["p1 said 0", "p2 said 0", "p3 said 0"]


def test_an_unknown_generator_in_a_round_file_is_a_clear_error(sim, tmp_path: Path) -> None:
    from moa_ray.errors import ConfigError

    config = store_config(sim.base_url)
    data = load_dataset(str(write_dataset(tmp_path / "q.jsonl", n=1)))
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"instruction": "Question number 0?", "output": "o", "generator": "gpt-nobody"}]))
    with pytest.raises(ConfigError, match="gpt-nobody"):
        run_generation(config, data, {}, generate_options(tmp_path / "out", ["moa"], references_from=[str(path)]))


def test_proposers_are_judged_and_reported_beside_their_pipelines_without_a_generation_call(sim, tmp_path: Path) -> None:
    config = store_config(sim.base_url)
    data = load_dataset("alpaca_eval", limit=3)
    agents = in_process_agents(config, list(config.models))
    gens = tmp_path / "gens"
    run_generation(config, data, agents, generate_options(gens, ["moa", "moa-lite"]))
    calls = made(sim)
    entries = read_generations(str(gens), proposers=True)
    names = sorted({k[1] for k in entries})
    assert names == ["moa", "moa-lite", *(f"{PROPOSER_PREFIX}{p}" for p in PROPOSERS)]  # layer 1 shared: one entry per proposer
    judged = run_judging(entries, agents["judge"], judge_options(gens, tmp_path / "judged", "judge", "pairwise"))
    assert judged.failed_rows == 0
    from moa_ray.eval.judging import read_judgments

    rows = build_report(read_report_answers(str(gens), proposers=True), read_judgments(str(tmp_path / "judged")).pairwise, [])
    by_name = {r.pipeline: r for r in rows}
    assert set(by_name) == set(names)
    assert by_name[f"{PROPOSER_PREFIX}p1"].win_rate is not None
    # the generation side made no call for the proposer entries (the judge's calls are the only new ones)
    assert sim.stats.by_model.get("sim-p1", 0) == sum(1 for r in call_table(gens) if r.model == "p1" and not r.reused)
    assert made(sim) - calls == sim.stats.by_model["judge-always-a"]


def test_eval_report_cli_prints_a_row_per_proposer(sim, tmp_path: Path) -> None:
    from moa_ray.cli import main

    config = store_config(sim.base_url)
    data = load_dataset(str(write_dataset(tmp_path / "q.jsonl", n=2)))
    gens = tmp_path / "gens"
    run_generation(config, data, in_process_agents(config, list(config.models)), generate_options(gens, ["moa"]))
    result = CliRunner().invoke(main, ["eval", "report", "--generations", str(gens), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    for name in PROPOSERS:
        assert f"{PROPOSER_PREFIX}{name}" in result.output
    shutil.rmtree(tmp_path / "report")


def test_each_proposer_against_its_aggregator_head_to_head_with_no_generation_call(sim, tmp_path: Path) -> None:
    """Is MoA better than each of its proposers? pairwise-baseline judging of the proposer entries against the pipeline."""
    from moa_ray.eval.judging import read_judgments

    config = store_config(sim.base_url)
    data = load_dataset("mt_bench", limit=2)
    agents = in_process_agents(config, list(config.models))
    gens = tmp_path / "gens"
    run_generation(config, data, agents, generate_options(gens, ["moa-lite"]))
    generated = made(sim)
    entries = read_generations(str(gens), proposers=True)
    options = judge_options(gens, tmp_path / "judged", "judge", "pairwise-baseline", baseline="moa-lite")
    summary = run_judging(entries, agents["judge"], options)
    assert summary.failed_rows == 0 and summary.baseline_items > 0
    judged = read_judgments(str(tmp_path / "judged"))
    answers = read_report_answers(str(gens), proposers=True)  # what eval report reads, the proposer entries too
    rows = {r.pipeline: r for r in build_report(answers, baseline_pairs=judged.baseline_pairs)}
    for name in PROPOSERS:  # every proposer has its win rate against the aggregator's answers
        assert rows[f"{PROPOSER_PREFIX}{name}"].baseline == "moa-lite" and rows[f"{PROPOSER_PREFIX}{name}"].baseline_win_rate is not None
    assert made(sim) - generated == sim.stats.by_model["judge-always-a"]  # only judge calls: no generation call
