"""Datasets (shipped and user files) and the judge prompts and their parsers."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moa_ray.eval.benchmarks.registry import load_dataset
from moa_ray.eval.datasets import DatasetError, prompt_hash
from moa_ray.eval.judge_prompts import (
    judge_prompts,
    pairwise_messages,
    parse_rating,
    parse_verdict,
    single_grade_messages,
    verdict_preference,
)


def test_alpaca_eval_is_shipped_whole() -> None:
    ds = load_dataset("alpaca_eval")
    assert len(ds.prompts) == 805
    assert len({p.prompt_id for p in ds.prompts}) == 805
    first = ds.prompts[0]
    assert first.prompt_id == "ae-000" and first.category == "helpful_base"
    assert first.references[0] and first.reference_generator
    assert len(load_dataset("alpaca_eval", limit=3).prompts) == 3


def test_mt_bench_has_two_turns_and_references_for_math_reasoning_coding() -> None:
    ds = load_dataset("mt_bench")
    assert len(ds.prompts) == 80 and all(len(p.turns) == 2 for p in ds.prompts)
    with_ref = [p for p in ds.prompts if p.references[0] is not None]
    assert {p.category for p in with_ref} == {"math", "reasoning", "coding"}
    assert len(with_ref) == 30 and all(len(p.references) == 2 and p.references[1] for p in with_ref)
    assert ds.by_id()["mt-081"].category == "writing"


def test_jsonl_with_ids_and_without(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": 7, "prompt": "Say hi"}\n\n{"id": "x", "prompt": ["Turn one", "Turn two"], "category": "demo"}\n')
    ds = load_dataset(str(path))
    assert [p.prompt_id for p in ds.prompts] == ["7", "x"]
    assert ds.prompts[1].turns == ["Turn one", "Turn two"] and ds.prompts[1].category == "demo"

    no_ids = tmp_path / "noid.jsonl"
    no_ids.write_text('{"question": "What is 2+2?"}\n')
    again = load_dataset(str(no_ids)).prompts[0].prompt_id
    assert again == prompt_hash("What is 2+2?") == load_dataset(str(no_ids)).prompts[0].prompt_id


def test_parquet_with_named_columns(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "text": ["one", "two"], "reference": ["r1", None]}), path)
    ds = load_dataset(str(path), id_column="key", prompt_column="text")
    assert [(p.prompt_id, p.turns[0], p.references[0]) for p in ds.prompts] == [("a", "one", "r1"), ("b", "two", None)]
    via_uri = load_dataset(f"file://{path}", id_column="key", prompt_column="text")  # any pyarrow filesystem URI
    assert via_uri.prompts == ds.prompts


@pytest.mark.parametrize(
    "content, kwargs, message",
    [
        ('{"id": 1, "body": "x"}\n', {}, "no prompt column"),
        ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', {}, "duplicate prompt ids"),
        ('{"id": 1, "prompt": "  "}\n', {}, "row 1"),
        ('{"id": 1, "prompt": "a"}\n', {"id_column": "uid"}, "no id column 'uid'"),
        ("not json\n", {}, "line 1 is not JSON"),
    ],
)
def test_bad_files_fail_clearly(tmp_path: Path, content: str, kwargs: dict, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(path), **kwargs)


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("id,prompt\n")
    with pytest.raises(DatasetError, match="unsupported"):
        load_dataset(str(tmp_path / "x.csv"))
    (tmp_path / "l.json").write_text(json.dumps({"id": 1}))
    with pytest.raises(DatasetError, match="list of objects"):
        load_dataset(str(tmp_path / "l.json"))


def test_judge_prompts_are_the_mt_bench_ones() -> None:
    prompts = judge_prompts()
    assert {"pair-v2", "single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"} <= set(prompts)
    msgs = pairwise_messages("Q?", "answer one", "answer two")
    assert msgs[0].role == "system" and "[[A]]" in msgs[0].content
    assert "[The Start of Assistant A's Answer]\nanswer one" in msgs[1].content


def test_single_grade_prompt_choice() -> None:
    name, msgs = single_grade_messages(1, ["Q1"], ["A1"])
    assert name == "single-v1" and "A1" in msgs[1].content
    name, msgs = single_grade_messages(1, ["Q1"], ["A1"], ["R1", "R2"])
    assert name == "single-math-v1" and "R1" in msgs[1].content
    name, msgs = single_grade_messages(2, ["Q1", "Q2"], ["A1", "A2"], ["R1", "R2"])
    assert name == "single-math-v1-multi-turn"
    assert all(s in msgs[1].content for s in ("Q1", "Q2", "A1", "A2", "R1", "R2"))
    name, _ = single_grade_messages(2, ["Q1", "Q2"], ["A1", "A2"], [None, None])
    assert name == "single-v1-multi-turn"


def test_parsers() -> None:
    assert parse_rating("good. Rating: [[7]]") == 7.0
    assert parse_rating("Rating: [8.5]") == 8.5
    assert parse_rating("no rating") is None and parse_rating("[[11]]") is None
    assert parse_verdict("... [[B]]") == "B"
    assert parse_verdict("[[A]] or maybe [[B]]") is None and parse_verdict("tie") is None
    # reference shown as A: "A" means the reference won
    assert verdict_preference("A", pipeline_is_a=False) == 1.0
    assert verdict_preference("A", pipeline_is_a=True) == 2.0
    assert verdict_preference("C", pipeline_is_a=True) == 1.5


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"\xff\xfe", "cannot read"),
        (b"[{]", "is not JSON"),
        (b'{"instruction": "q"}', "expected a JSON list of objects"),
        (b'[{"a": 1}, 2]', "expected a JSON list of objects"),
    ],
)
def test_one_json_list_reader_for_outputs_and_judged_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    """eval metrics --just-eval and --outputs read their files alike, each failing with its own error class."""
    from click.testing import CliRunner

    from moa_ray.cli import main
    from moa_ray.eval.benchmarks.gsm8k import GSM8KError
    from moa_ray.eval.benchmarks.just_eval import JustEvalError
    from moa_ray.eval.datasets import read_json_list

    path = tmp_path / "f.json"
    if content is not None:
        path.write_bytes(content)
    for error in (GSM8KError, JustEvalError):
        with pytest.raises(error, match=message):
            read_json_list(path, error)
    for args in (["--just-eval", str(path)], ["--dataset", "gsm8k", "--outputs", str(path)]):
        result = CliRunner().invoke(main, ["eval", "metrics", *args, "--json"])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
