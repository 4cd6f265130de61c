"""The eval commands: bad input fails before Ray starts, with a clear message; report from stored tables."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from eval_support import eval_config

from moa_ray.cli import main
from moa_ray.eval.benchmarks.alpaca_eval import pairwise_table
from moa_ray.eval.benchmarks.mt_bench import single_table
from moa_ray.eval.report import pareto_frontier
from moa_ray.eval.schema import GenerationRow, GradeRow, PairwiseRow, RoleTokens
from moa_ray.eval.store import RowTable


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(eval_config("http://127.0.0.1:9/v1")))
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, ["eval", *args])


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--pipeline", "nope", "--dataset", "alpaca_eval"], 2, "unknown pipeline 'nope'"),
        (["--pipeline", "one,one", "--dataset", "alpaca_eval"], 2, "repeated"),
        (["--pipeline", "one", "--dataset", "missing.jsonl"], 1, "dataset file not found"),
        (
            ["--pipeline", "one", "--dataset", "flask_hard"],
            1,
            "unknown dataset 'flask_hard' (builtin: alpaca_eval, mt_bench, flask, flask-hard,",
        ),
        (["--pipeline", "one", "--dataset", "alpaca_eval", "--limit", "0"], 2, "--limit"),
    ],
)
def test_generate_rejects_bad_input_before_ray(config_file: Path, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    result = invoke("generate", "--config", str(config_file), "--out", str(tmp_path / "out"), *args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_generate_with_nothing_left_runs_no_ray(config_file: Path, tmp_path: Path, monkeypatch) -> None:
    """A finished directory: the rerun only reports (and exports) without starting Ray, reading the table once,
    without its traces."""
    from moa_ray.config import load_config
    from moa_ray.eval.generate import pipeline_fingerprint

    out = tmp_path / "out"
    fp = pipeline_fingerprint(load_config(config_file), "one")
    RowTable(str(out), GenerationRow).write_part(
        [
            GenerationRow(
                run_id="r",
                prompt_id="ae-000",
                pipeline="one",
                turn=1,
                dataset="alpaca_eval",
                instruction="q",
                output="o",
                config_hash=fp,
            )
        ],
        "1",
    )
    export = tmp_path / "model_outputs.json"
    reads: list[list[str] | None] = []
    read, batches, read_where = RowTable.read, RowTable.batches, RowTable.read_where

    def counting_read(self, files=None, *, columns=None):
        reads.append(columns)
        return read(self, files, columns=columns)

    def counting_batches(self, columns, batch_rows=65_536):
        reads.append(columns)
        return batches(self, columns, batch_rows)

    def counting_read_where(self, condition, columns):
        reads.append(columns)
        return read_where(self, condition, columns)

    monkeypatch.setattr(RowTable, "read", counting_read)
    monkeypatch.setattr(RowTable, "batches", counting_batches)
    monkeypatch.setattr(RowTable, "read_where", counting_read_where)
    result = invoke(
        "generate",
        "--config",
        str(config_file),
        "--pipeline",
        "one",
        "--dataset",
        "alpaca_eval",
        "--limit",
        "1",
        "--out",
        str(out),
        "--export-alpaca-eval",
        str(export),
    )
    assert result.exit_code == 0, result.output
    assert "1 already done, 0 to generate" in result.output
    assert json.loads(export.read_text())[0]["generator"] == "one"
    # planning, the summary and the export stream a few columns each: none reads every column, none the traces
    assert reads and None not in reads and not any("trace" in c for c in reads if c is not None)


def test_judge_rejects_unknown_judge_and_empty_generations(config_file: Path, tmp_path: Path) -> None:
    result = invoke("judge", "--config", str(config_file), "--judge", "gpt-9", "--generations", str(tmp_path), "--out", str(tmp_path / "j"))
    assert result.exit_code == 2 and "unknown judge model 'gpt-9'" in result.output
    result = invoke(
        "judge",
        "--config",
        str(config_file),
        "--judge",
        "judge",
        "--generations",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "j"),
    )
    assert result.exit_code == 1 and "no generations" in result.output


def _gen(pipeline: str, prompt_id: str, turn: int, latency: float, cost: float | None) -> GenerationRow:
    return GenerationRow(
        run_id="r",
        prompt_id=prompt_id,
        pipeline=pipeline,
        turn=turn,
        dataset="d",
        instruction="q",
        output="answer " * 10,
        config_hash="h",
        tokens_by_role=[RoleTokens(role="proposer", prompt_tokens=100, completion_tokens=50, calls=2)],
        prompt_tokens=100,
        completion_tokens=50,
        calls=2,
        latency_s=latency,
        cost_usd=cost,
        tflops=1.5,
    )


def test_report_writes_tables_and_plots(tmp_path: Path) -> None:
    gen, judged, out = tmp_path / "gen", tmp_path / "judged", tmp_path / "report"
    rows = [_gen("cheap", f"p{i}", 1, 1.0 + i, 0.001) for i in range(6)] + [_gen("big", f"p{i}", 1, 3.0, 0.01) for i in range(6)]
    RowTable(str(gen), GenerationRow).write_part(rows, "1")
    now = datetime.now(timezone.utc)
    prefs = [
        PairwiseRow(
            run_id="j",
            prompt_id=f"p{i}",
            pipeline=p,
            judge="gpt",
            judge_prompt="pair-v2",
            instruction=f"q{i}",
            output_1="r" * 100,
            generator_1="ref",
            output_2="m" * (50 + 10 * i),
            generator_2=p,
            preference=pref,
            created_at=now,
        )
        for i in range(6)
        for p, pref in (("cheap", 1.0 + (i % 2)), ("big", 2.0 if i else 1.5))
    ]
    pairwise_table(str(judged)).write_part(prefs, "1")
    single_table(str(judged)).write_part(
        [
            GradeRow(
                run_id="j",
                prompt_id="p0",
                pipeline="big",
                turn=1,
                judge="gpt",
                judge_prompt="single-v1",
                category="math",
                score=9.0,
            )
        ],
        "1",
    )
    result = CliRunner().invoke(main, ["eval", "report", "--generations", str(gen), "--judgments", str(judged), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {
        "report.md",
        "report.csv",
        "report.json",
        "quality_vs_cost.png",
        "quality_vs_latency.png",
    }
    report = {r["pipeline"]: r for r in json.loads((out / "report.json").read_text())}
    assert report["cheap"]["win_rate"] == pytest.approx(50.0)
    assert report["big"]["win_rate"] == pytest.approx(100 * (5 + 0.5) / 6)
    assert report["big"]["mt_bench"] == 9.0 and report["big"]["mt_bench_categories"] == {"math": 9.0}
    assert report["cheap"]["mean_cost_usd"] == pytest.approx(0.001) and report["cheap"]["total_cost_usd"] == pytest.approx(0.006)
    assert report["cheap"]["latency_p50_s"] == pytest.approx(3.5) and report["big"]["mean_tflops"] == pytest.approx(1.5)
    assert "MT-Bench by category" in (out / "report.md").read_text()


def test_pareto_frontier() -> None:
    # (cost, quality): the third is dominated by the first, the last ties the second on cost but is worse
    points = [(1.0, 50.0), (2.0, 60.0), (1.5, 45.0), (3.0, 70.0), (2.0, 55.0)]
    assert pareto_frontier(points) == [0, 1, 3]


def test_dataset_help_names_every_builtin_dataset() -> None:
    """The help is written out (the CLI does not import pyarrow to build it), so it is checked against BUILTIN."""
    from moa_ray.cli.eval import DATASET_HELP
    from moa_ray.eval.benchmarks.registry import BUILTIN

    assert DATASET_HELP.startswith(", ".join(BUILTIN) + ", or a ")


def test_report_of_several_benchmarks_gives_each_its_own_table_and_costs(tmp_path: Path) -> None:
    """AlpacaEval and GSM8K answers in one generations directory: one report per benchmark, tokens of its own answers."""
    from moa_ray.eval.benchmarks.gsm8k import exact_table
    from moa_ray.eval.schema import ExactRow, GenerationRow, PairwiseRow
    from moa_ray.eval.store import RowTable

    gen, judged, out = tmp_path / "gen", tmp_path / "judged", tmp_path / "report"
    common = {"run_id": "g", "pipeline": "moa", "turn": 1, "instruction": "q", "output": "o", "config_hash": "h", "latency_s": 1.0}
    RowTable(str(gen), GenerationRow).write_part(
        [
            GenerationRow(prompt_id="ae-000", dataset="alpaca_eval", reference="r", prompt_tokens=10, completion_tokens=10, **common),
            GenerationRow(prompt_id="gsm8k-0000", dataset="gsm8k", reference="#### 18", prompt_tokens=500, completion_tokens=500, **common),
        ],
        "1",
    )
    pair = {"pipeline": "moa", "judge": "j", "judge_prompt": "pair-v2", "instruction": "q", "output_1": "r", "generator_1": "ref"}
    pairwise_table(str(judged)).write_part(
        [PairwiseRow(run_id="j", prompt_id="ae-000", output_2="o", generator_2="moa", preference=2.0, **pair)], "1"
    )
    exact_table(str(judged)).write_part(
        [ExactRow(run_id="e", prompt_id="gsm8k-0000", pipeline="moa", turn=1, dataset="gsm8k", prediction="18", answer="18", correct=True)],
        "1",
    )
    result = invoke("report", "--generations", str(gen), "--judgments", str(judged), "--out", str(out))
    assert result.exit_code == 0, result.output
    (ae,) = json.loads((out / "alpaca_eval" / "report.json").read_text())
    (gsm,) = json.loads((out / "gsm8k" / "report.json").read_text())
    assert (ae["answers"], ae["mean_tokens"], ae["win_rate"], ae["gsm8k_accuracy"]) == (1, 20.0, 100.0, None)
    assert (gsm["answers"], gsm["mean_tokens"], gsm["win_rate"], gsm["gsm8k_accuracy"]) == (1, 1000.0, None, 1.0)
    assert (out / "gsm8k" / "gsm8k_accuracy.png").is_file() and not (out / "report.json").exists()
