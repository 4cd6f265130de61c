"""GSM8K exact match: the extractor on the reference solutions and on tricky formats, accuracy, the outputs-file
metrics command, and the judge's exact-match path end to end on a stored generation table (no model, no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from moa_ray.cli import main
from moa_ray.eval.benchmarks.gsm8k import (
    GSM8K,
    GSM8KError,
    accuracy,
    answers_match,
    exact_table,
    extract_answer,
    is_correct,
    plan_exact,
    score_outputs,
)
from moa_ray.eval.benchmarks.registry import load_dataset
from moa_ray.eval.judging import ExactMatchSplit, plan_judging, split_exact_match
from moa_ray.eval.schema import GenerationRow
from moa_ray.eval.store import RowTable


def test_every_reference_solution_scores_itself() -> None:
    ds = load_dataset(GSM8K)
    flags = [is_correct(p.references[0], p.metadata["answer"]) for p in ds.prompts]
    assert accuracy(flags).accuracy == 1.0 and len(flags) == 1319


def test_reference_solutions_with_the_answer_phrased_as_prose() -> None:
    """The same 1,319 solutions with '#### X' rewritten as 'The answer is X.' plus a trailing sentence with a number."""
    ds = load_dataset(GSM8K)
    flags = []
    for p in ds.prompts:
        body, final = p.references[0].rsplit("####", 1)
        flags.append(is_correct(f"{body}The answer is {final.strip()}. Let me know if you have 2 more questions!", p.metadata["answer"]))
    assert all(flags)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She makes $1,234 in total.", "1234"),
        ("The total is 1,000,000 dollars.", "1000000"),
        ("It costs $12.50 per hour, so she earns $\\$25.00$.", "25.00"),
        ("Answer: 18 eggs", "18"),
        ("**Answer:** $18", "18"),
        ("The answer is 18. I hope this helps! Let me know if you have 2 more questions.", "18"),
        ("First 3 + 4 = 7, then 7 * 2 = 14. So she has 14 apples left.", "14"),
        ("16 - 3 - 4 = 9", "9"),  # minus between numbers is subtraction, not a sign
        ("The temperature drops to -5 degrees.", "-5"),
        ("The change is \u22127.", "-7"),
        ("So the answer is 0.75 kg.", "0.75"),
        ("x = .5", ".5"),
        ("50% of the cakes, that is 12.", "12"),
        ("The final answer is $\\boxed{1{,}000}$. Check: 3 + 4 = 7", "1000"),
        ("\\boxed{\\frac{3}{4}}", "3/4"),
        ("She ran 3/4 of the way, then 5 more miles at 12 km/h.", "12"),
        ("On 12/25/2023 she had 7 candles.", "7"),
        ("blah\n#### 72\nNote: I also checked 73.", "72"),
        ("The answer is:\n\n42", "42"),
        ("I am not sure.", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text: str | None, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_numeric_comparison() -> None:
    assert answers_match("12", "12") and answers_match("12.0", "12") and answers_match("12.00", "12")
    assert answers_match("3/4", "0.75") and answers_match("$1,000", "1000") and answers_match("-3", "-3")
    assert not answers_match("12.01", "12") and not answers_match(None, "12") and not answers_match("x", "12")
    with pytest.raises(GSM8KError, match="not a number"):
        answers_match("1", "twelve")


def test_accuracy_and_standard_error() -> None:
    acc = accuracy([True, True, False, True])
    assert (acc.accuracy, acc.n, acc.n_correct) == (0.75, 4, 3)
    assert acc.standard_error == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert accuracy([True]).standard_error == 0.0
    with pytest.raises(GSM8KError, match="no items"):
        accuracy([])


# --------------------------------------------------------------------------- eval metrics --dataset gsm8k --outputs


def _outputs(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "model_outputs.json"
    path.write_text(json.dumps(records))
    return path


def test_metrics_scores_an_outputs_file_in_file_order(tmp_path: Path) -> None:
    problems = load_dataset(GSM8K).prompts
    records = [
        {"instruction": problems[5].turns[0] + "\n", "output": f"So the answer is {problems[5].metadata['answer']}.", "generator": "m"},
        {"instruction": problems[0].turns[0], "output": "She makes $17 every day."},
        {"instruction": problems[1].turns[0], "output": f"#### {problems[1].metadata['answer']}"},
    ]
    result = CliRunner().invoke(main, ["eval", "metrics", "--dataset", "gsm8k", "--outputs", str(_outputs(tmp_path, records)), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert set(got) == {"accuracy", "standard_error", "n", "correct"}
    assert got["correct"] == [True, False, True] and got["n"] == 3
    assert got["accuracy"] == pytest.approx(2 / 3) and got["standard_error"] == pytest.approx(math.sqrt(2 / 9 / 3))
    table = CliRunner().invoke(main, ["eval", "metrics", "--dataset", "gsm8k", "--outputs", str(_outputs(tmp_path, records))])
    assert table.exit_code == 0 and "66.67%" in table.output


def test_metrics_names_unknown_instructions(tmp_path: Path) -> None:
    records = [{"instruction": "What is the capital of France?", "output": "Paris"}, {"instruction": "Count to 3", "output": "1 2 3"}]
    result = CliRunner().invoke(main, ["eval", "metrics", "--dataset", "gsm8k", "--outputs", str(_outputs(tmp_path, records)), "--json"])
    assert result.exit_code == 1
    assert "2 instruction(s) are not GSM8K test problems" in result.output and "capital of France" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "gsm8k"], "--dataset and --outputs go together"),
        (["--outputs", "x.json"], "--dataset and --outputs go together"),
        ([], "give one of"),
        (["--annotations", "a.json", "--just-eval", "b.json"], "give one of"),
        (["--dataset", "mt_bench", "--outputs", "x.json"], "'mt_bench' is not"),
    ],
)
def test_metrics_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["eval", "metrics", *args])
    assert result.exit_code == 2 and message in result.output


def test_score_outputs_rejects_malformed_records() -> None:
    with pytest.raises(GSM8KError, match="record 1"):
        score_outputs([{"output": "1"}], {"q": "1"})
    with pytest.raises(GSM8KError, match="no records"):
        score_outputs([], {"q": "1"})


# --------------------------------------------------------------------------- eval judge: exact match, no model


def _gsm8k_generations(path: Path) -> list[str]:
    """Two pipelines' answers to three GSM8K problems: 'good' right 3/3, 'bad' right 1/3; plus one AlpacaEval row."""
    problems = load_dataset(GSM8K).prompts[:3]
    rows = []
    for p in problems:
        answer = p.metadata["answer"]
        for pipeline, output in (("good", f"Working... so the answer is {answer}."), ("bad", "I think it is 123456.")):
            rows.append(
                GenerationRow(
                    run_id="g",
                    prompt_id=p.prompt_id,
                    pipeline=pipeline,
                    turn=1,
                    dataset=GSM8K,
                    category=p.category,
                    instruction=p.turns[0],
                    output=f"The answer is {answer}" if pipeline == "bad" and p is problems[0] else output,
                    reference=p.references[0],
                    config_hash="h",
                )
            )
    RowTable(str(path), GenerationRow).write_part(rows, "1")
    return [p.prompt_id for p in problems]


def test_judge_scores_gsm8k_by_exact_match_without_a_judge(tmp_path: Path) -> None:
    gen, judged, report = tmp_path / "gen", tmp_path / "judged", tmp_path / "report"
    ids = _gsm8k_generations(gen)
    result = CliRunner().invoke(main, ["eval", "judge", "--generations", str(gen), "--out", str(judged)])
    assert result.exit_code == 0, result.output
    assert "exact match: 6 answers scored (4 correct, 0 failed), 0 scored before" in result.output
    rows = exact_table(str(judged)).latest()
    assert len(rows) == 6 and not (judged / "pairwise").exists()
    assert [rows[(i, "good", 1)].correct for i in ids] == [True, True, True]
    assert [rows[(i, "bad", 1)].correct for i in ids] == [True, False, False]
    assert rows[(ids[1], "bad", 1)].prediction == "123456" and rows[(ids[1], "bad", 1)].answer is not None

    again = CliRunner().invoke(main, ["eval", "judge", "--generations", str(gen), "--out", str(judged), "--mode", "exact"])
    assert again.exit_code == 0 and "0 answers scored (0 correct, 0 failed), 6 scored before" in again.output
    assert len(exact_table(str(judged)).read()) == 6  # resumed: nothing scored twice

    result = CliRunner().invoke(main, ["eval", "report", "--generations", str(gen), "--judgments", str(judged), "--out", str(report)])
    assert result.exit_code == 0, result.output
    by_pipeline = {r["pipeline"]: r for r in json.loads((report / "report.json").read_text())}
    assert by_pipeline["good"]["gsm8k_accuracy"] == 1.0 and by_pipeline["good"]["gsm8k_n"] == 3
    assert by_pipeline["bad"]["gsm8k_accuracy"] == pytest.approx(1 / 3)
    assert by_pipeline["bad"]["gsm8k_standard_error"] == pytest.approx(math.sqrt(2 / 27))
    assert "GSM8K acc" in (report / "report.md").read_text() and "33.33%" in (report / "report.md").read_text()
    assert (report / "gsm8k_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_judge_without_a_judge_refuses_datasets_that_need_one(tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    RowTable(str(gen), GenerationRow).write_part(
        [
            GenerationRow(
                run_id="g",
                prompt_id="ae-000",
                pipeline="p",
                turn=1,
                dataset="alpaca_eval",
                instruction="q",
                output="o",
                reference="r",
                config_hash="h",
            )
        ],
        "1",
    )
    result = CliRunner().invoke(main, ["eval", "judge", "--generations", str(gen), "--out", str(tmp_path / "j")])
    assert result.exit_code == 2 and "--judge is needed for --mode auto" in result.output
    result = CliRunner().invoke(main, ["eval", "judge", "--generations", str(gen), "--out", str(tmp_path / "j"), "--mode", "exact"])
    assert result.exit_code == 0 and "0 answers scored" in result.output


def test_auto_judging_leaves_gsm8k_to_exact_match(tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    _gsm8k_generations(gen)
    gens = RowTable(str(gen), GenerationRow).latest()
    assert plan_judging(gens, "j", {}, {}) == []
    assert len(plan_judging(gens, "j", {}, {}, mode="pairwise")) == 6  # a forced mode still judges them
    assert len(plan_exact(gens, {}, pipelines=["good"], limit=2)) == 2


def test_the_judge_mode_splits_the_datasets_between_exact_match_and_a_judge_model() -> None:
    """auto scores gsm8k by exact match and leaves the rest to a model; exact needs no model; a forced mode is a
    model's for every dataset, gsm8k's answers too."""
    assert split_exact_match("auto", [GSM8K, "alpaca_eval"]) == ExactMatchSplit(scores=True, for_judge=["alpaca_eval"])
    assert split_exact_match("auto", [GSM8K]) == ExactMatchSplit(scores=True, for_judge=[])
    assert split_exact_match("auto", ["mt_bench"]) == ExactMatchSplit(scores=False, for_judge=["mt_bench"])
    assert split_exact_match("exact", [GSM8K, "alpaca_eval"]) == ExactMatchSplit(scores=True, for_judge=[])
    assert split_exact_match("pairwise", [GSM8K]) == ExactMatchSplit(scores=False, for_judge=[GSM8K])


def test_a_gsm8k_row_without_reference_is_a_failed_score_not_a_zero(tmp_path: Path) -> None:
    gen, judged = tmp_path / "gen", tmp_path / "judged"
    RowTable(str(gen), GenerationRow).write_part(
        [
            GenerationRow(
                run_id="g", prompt_id="gsm8k-0000", pipeline="p", turn=1, dataset=GSM8K, instruction="q", output="18", config_hash="h"
            )
        ],
        "1",
    )
    result = CliRunner().invoke(main, ["eval", "judge", "--generations", str(gen), "--out", str(judged)])
    assert result.exit_code == 3, result.output
    row = exact_table(str(judged)).latest()[("gsm8k-0000", "p", 1)]
    assert row.status == "error" and row.correct is None and "####" in (row.error or "")
