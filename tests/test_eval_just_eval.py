"""Just-Eval's aggregation reproduces the official ``eval_res`` files exactly, from the module and from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from moa_ray.cli import main
from moa_ray.eval.benchmarks.just_eval import MULTI_ASPECTS, JustEvalError, aggregate, aggregate_file

DATA = Path(__file__).parent / "data" / "just_eval"
EXAMPLES = ["1.score_multi.gpt-4", "1.safety.score_safety.chatgpt"]
JUDGED = sorted(p.name for p in (DATA / "judged").glob("*.json"))


def official(name: str) -> dict:
    res = json.loads((DATA / "examples" / f"{name}.eval_res.json").read_text())
    res.pop("output_file")  # where upstream's run wrote the file, not a metric
    return res


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_reproduce_their_eval_res_exactly(name: str) -> None:
    got = aggregate_file(DATA / "examples" / f"{name}.json")
    assert got == official(name)  # exact float equality, every key
    assert list(got) == list(official(name))  # and the same key order


@pytest.mark.parametrize("name", EXAMPLES)
def test_cli_prints_the_eval_res(name: str) -> None:
    path = str(DATA / "examples" / f"{name}.json")
    result = CliRunner().invoke(main, ["eval", "metrics", "--just-eval", path, "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert got.pop("output_file") == path
    assert got == official(name)
    table = CliRunner().invoke(main, ["eval", "metrics", "--just-eval", path])
    assert table.exit_code == 0 and "total" in table.output and "_mean" in table.output


def test_multi_example_has_the_five_aspects() -> None:
    got = aggregate_file(DATA / "examples" / "1.score_multi.gpt-4.json")
    assert [k for k in got if k.endswith("_mean")] == [f"{a}_mean" for a in MULTI_ASPECTS]


@pytest.mark.parametrize("name", JUDGED)
def test_judged_safety_files_total_and_range(name: str) -> None:
    """No official eval_res ships for these: check the totals, the range and a recount of the raw scores."""
    items = json.loads((DATA / "judged" / name).read_text())
    got = aggregate_file(DATA / "judged" / name)
    assert set(got) == {"total", "safety_mean", "avg_lens"}
    assert got["total"] == 200 == len(items)
    assert 1.0 <= got["safety_mean"] <= 5.0
    assert got["safety_mean"] == pytest.approx(sum(float(i["parsed_result"]["safety"]["score"]) for i in items) / 200)
    assert got["avg_lens"] > 0


def test_judged_gpt4_safety_value() -> None:
    # 196 x 5, 3 x 4, 1 x 2 (counted from the file): 994 / 200
    assert aggregate_file(DATA / "judged" / "gpt-4-0613.score_safety.chatgpt.json")["safety_mean"] == 4.97


def test_not_applicable_counts_as_five_and_items_without_result_are_skipped() -> None:
    parsed = [{"depth": {"score": "N/A"}, "clarity": {"score": "3"}}, {"depth": {"score": 1}, "clarity": {"score": "4"}}]
    assert aggregate(parsed) == {"total": 2, "depth_mean": 3.0, "clarity_mean": 3.5}
    assert aggregate(parsed, ["one two", "three"])["avg_lens"] == 1.5
    from moa_ray.eval.benchmarks.just_eval import aggregate_records

    records = [{"parsed_result": parsed[0], "output_cand": "a b c"}, {"id": 9, "output_cand": "unjudged"}]
    assert aggregate_records(records) == {"total": 1, "depth_mean": 5.0, "clarity_mean": 3.0, "avg_lens": 3.0}


@pytest.mark.parametrize(
    "parsed, message",
    [
        ([{"safety": {"score": "five"}}], "not a number"),
        ([{"safety": {"score": "7"}}], "outside 1-5"),
        ([{"safety": {"reason": "no score"}}], "has no score"),
        (["not an object"], "parsed_result must be an object"),
        ([], "no judged items"),
    ],
)
def test_malformed_results_fail_clearly(parsed: list, message: str) -> None:
    with pytest.raises(JustEvalError, match=message):
        aggregate(parsed)


def test_cli_errors(tmp_path: Path) -> None:
    missing = CliRunner().invoke(main, ["eval", "metrics", "--just-eval", str(tmp_path / "nope.json")])
    assert missing.exit_code == 1 and "not found" in missing.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 1, "output_cand": "x"}]))
    result = CliRunner().invoke(main, ["eval", "metrics", "--just-eval", str(bad), "--json"])
    assert result.exit_code == 1 and "no item has a parsed_result" in result.output
