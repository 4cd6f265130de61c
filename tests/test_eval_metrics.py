"""AlpacaEval / MT-Bench metrics: the leaderboard's numbers are reproduced from its own annotation files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from moa_ray.eval.benchmarks.mt_bench import mt_bench_scores
from moa_ray.eval.metrics import (
    GLMData,
    MetricsError,
    head_to_head,
    length_controlled_win_rate,
    read_records,
    win_rates,
)

DATA = Path(__file__).parent / "data" / "alpaca_eval"
MODELS = ["FuseChat-Llama-3.1-8B-Instruct", "wizardlm-13b"]


def leaderboard() -> dict[str, dict[str, str]]:
    with (DATA / "leaderboard_rows.csv").open(newline="") as f:
        return {row[""]: row for row in csv.DictReader(f)}


@pytest.mark.parametrize("model", MODELS)
def test_cli_reproduces_the_leaderboard(model: str) -> None:
    from moa_ray.cli import main

    result = CliRunner().invoke(main, ["eval", "metrics", "--annotations", str(DATA / f"annotations_{model}.jsonl.gz"), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert set(got) == {"win_rate", "standard_error", "discrete_win_rate", "lc_win_rate", "avg_length", "n_total"}
    row = leaderboard()[model]
    assert got["win_rate"] == pytest.approx(float(row["win_rate"]), abs=0.01)
    assert got["standard_error"] == pytest.approx(float(row["standard_error"]), abs=0.01)
    assert got["discrete_win_rate"] == pytest.approx(float(row["discrete_win_rate"]), abs=0.01)
    assert got["avg_length"] == int(row["avg_length"])
    assert got["n_total"] == int(row["n_total"])
    # Without AlpacaEval's instruction-difficulty file the minimal LC model is fitted: it moves the
    # win rate the same way as the leaderboard's LC (towards 50 for the short wizardlm answers).
    assert 0 < got["lc_win_rate"] < 100
    assert np.sign(got["lc_win_rate"] - got["win_rate"]) == np.sign(float(row["length_controlled_winrate"]) - float(row["win_rate"]))


@pytest.mark.parametrize("model, expected", [(MODELS[0], 65.003), (MODELS[1], 15.529)])
def test_minimal_lc_matches_scikit_learn(model: str, expected: float) -> None:
    """AlpacaEval's ``length_controlled_minimal`` GLM fitted offline with alpaca_eval's own recipe
    (scikit-learn 1.9 LogisticRegressionCV, L1, liblinear, GroupKFold(5), soft labels) gives these values."""
    result = win_rates(read_records(DATA / f"annotations_{model}.jsonl.gz"))[model]
    assert result.lc_model == "length_controlled_minimal"
    assert result.lc_win_rate == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("model", MODELS)
def test_counts_match_the_leaderboard(model: str) -> None:
    result = win_rates(read_records(DATA / f"annotations_{model}.jsonl.gz"), lc=False)[model]
    row = leaderboard()[model]
    assert (result.n_wins, result.n_wins_base, result.n_draws) == (
        int(row["n_wins"]),
        int(row["n_wins_base"]),
        int(row["n_draws"]),
    )
    assert result.lc_win_rate is None


def test_head_to_head_encodings() -> None:
    # 1 = reference wins, 2 = model wins, 1.5 and the legacy 0 = draw, None / out of range dropped
    out = head_to_head([1.0, 2.0, 2.0, 1.5, 0, None, 3.0, 1.75])
    assert out["n_total"] == 6
    assert out["n_draws"] == 2
    assert out["n_wins"] == 3 and out["n_wins_base"] == 1  # 1.75 rounds to a win
    assert out["win_rate"] == pytest.approx(np.mean([0, 1, 1, 0.5, 0.5, 0.75]) * 100)
    assert out["discrete_win_rate"] == pytest.approx((3 + 2 / 2) / 6 * 100)
    with pytest.raises(MetricsError):
        head_to_head([None, 5.0])


def _synthetic(n: int = 600, seed: int = 0, bias: float = 1.5, quality: float = 0.0):
    """A judge that likes long answers: preference depends on true quality and on the length difference."""
    rng = np.random.default_rng(seed)
    ref_len = rng.integers(800, 2500, n)
    model_len = (ref_len * rng.uniform(0.3, 3.0, n)).astype(int)
    z = (ref_len - model_len) / np.std(ref_len - model_len)
    p_model = 1 / (1 + np.exp(-(quality - bias * np.tanh(z))))
    prefs = 1 + rng.binomial(1, p_model).astype(float)
    return prefs, model_len, ref_len


def test_lc_win_rate_removes_a_length_bias() -> None:
    prefs, model_len, ref_len = _synthetic(quality=0.0)
    raw = head_to_head(prefs)["win_rate"]
    lc, se, name = length_controlled_win_rate(prefs, model_len, ref_len)
    assert name == "length_controlled_minimal"
    assert raw > 58  # the long answers win with an equally good model...
    assert abs(lc - 50) < 6  # ...and the length-controlled win rate sees through it
    assert se == 0.0  # one prediction for every instruction without difficulties


def test_lc_with_instruction_difficulty(tmp_path: Path) -> None:
    prefs, model_len, ref_len = _synthetic(n=300, seed=1)
    difficulty = np.linspace(-1, 1, 300)
    (tmp_path / "instruction_difficulty.csv").write_text(
        "index,instruction_difficulty\n" + "".join(f"{i},{d}\n" for i, d in enumerate(difficulty))
    )
    glm = GLMData.from_dir(tmp_path)
    lc, se, name = length_controlled_win_rate(prefs, model_len, ref_len, list(range(300)), glm)
    assert name == "length_controlled_noreg" and 0 < lc < 100 and se >= 0
    with pytest.raises(MetricsError, match=r"instruction_difficulty\.csv"):
        GLMData.from_dir(tmp_path / "missing")


def test_own_pairwise_rows_resolve_attempts() -> None:
    base = {
        "instruction": "q",
        "output_1": "r" * 10,
        "output_2": "m" * 20,
        "generator_2": "p",
        "pipeline": "p",
        "turn": 1,
        "judge": "j",
    }
    rows = [
        {**base, "prompt_id": "a", "preference": None, "status": "error", "attempt": 1, "created_at": 1},
        {**base, "prompt_id": "a", "preference": 2.0, "status": "ok", "attempt": 2, "created_at": 2},
        {**base, "prompt_id": "b", "preference": 1.0, "status": "ok", "attempt": 1, "created_at": 1},
    ]
    result = win_rates(rows, lc=False)["p"]
    assert result.n_total == 2 and result.win_rate == pytest.approx(50.0)


def test_read_records_errors(tmp_path: Path) -> None:
    with pytest.raises(MetricsError, match="not found"):
        read_records(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(MetricsError, match="not JSON"):
        read_records(bad)
    with pytest.raises(MetricsError, match="lack the columns"):
        win_rates([{"instruction": "q", "preference": 1.0}])


def test_cli_rejects_bad_annotations(tmp_path: Path) -> None:
    from moa_ray.cli import main

    bad = tmp_path / "a.json"
    bad.write_text(json.dumps([{"instruction": "q", "output_1": "a", "output_2": "b", "preference": 7}]))
    result = CliRunner().invoke(main, ["eval", "metrics", "--annotations", str(bad), "--json"])
    assert result.exit_code == 1
    assert "no valid preference" in result.output


def test_mt_bench_scores() -> None:
    grades = [
        {"pipeline": "p", "turn": 1, "category": "math", "score": 8.0, "status": "ok"},
        {"pipeline": "p", "turn": 2, "category": "math", "score": 6.0, "status": "ok"},
        {"pipeline": "p", "turn": 1, "category": "writing", "score": 10.0, "status": "ok"},
        {"pipeline": "p", "turn": 2, "category": "writing", "score": None, "status": "error"},
    ]
    s = mt_bench_scores(pa.Table.from_pylist(grades))["p"]
    assert s.score == pytest.approx(8.0) and s.turn_1 == pytest.approx(9.0) and s.turn_2 == pytest.approx(6.0)
    assert s.by_category == {"math": 7.0, "writing": 10.0} and s.n_graded == 3


def test_read_records_takes_uris_and_a_judge_outputs_pairwise_dir(tmp_path: Path) -> None:
    """A URI goes to its pyarrow filesystem whole (``Path("s3://b/x")`` would fold it to ``s3:/b/x``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "judged" / "pairwise").mkdir(parents=True)
    rows = [{"instruction": "q", "preference": 2.0}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "judged" / "pairwise" / "part-0.parquet")
    assert read_records(f"file://{tmp_path / 'judged'}") == rows
    assert read_records(tmp_path / "judged") == rows
    with pytest.raises(MetricsError, match="cannot read"):
        read_records(f"file://{tmp_path / 'missing'}")
