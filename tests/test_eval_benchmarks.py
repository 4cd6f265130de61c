"""The shipped FLASK, Just-Eval, CEB and GSM8K datasets: counts, ids, annotations; seeded samples; generate's CLI options."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from eval_support import eval_config

from moa_ray.cli import main
from moa_ray.eval.benchmarks.ceb import CEB_S, CEB_T
from moa_ray.eval.benchmarks.flask import FLASK, FLASK_HARD
from moa_ray.eval.benchmarks.gsm8k import GSM8K, gsm8k_final_answer
from moa_ray.eval.benchmarks.just_eval import JUST_EVAL
from moa_ray.eval.benchmarks.registry import BUILTIN, load_dataset
from moa_ray.eval.datasets import DatasetError, EvalDataset, EvalPrompt, data_file
from moa_ray.eval.generate import plan_generation
from moa_ray.eval.schema import GenerationRow
from moa_ray.eval.store import RowTable

COUNTS = {FLASK: 1740, FLASK_HARD: 89, JUST_EVAL: 1000, CEB_S: 400, CEB_T: 400, GSM8K: 1319}
METADATA_KEYS = {
    FLASK: {"skills", "domain", "difficulty", "task", "idx"},
    FLASK_HARD: {"skills", "domain", "difficulty", "task", "idx"},
    JUST_EVAL: {"index", "aspects", "source"},
    CEB_S: {"axis", "bucket", "task"},
    CEB_T: {"axis", "bucket", "task"},
    GSM8K: {"answer"},
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_counts_unique_stable_ids_and_metadata_keys(name: str) -> None:
    assert name in BUILTIN
    first, second = load_dataset(name), load_dataset(name)
    assert first.name == first.kind == name
    assert len(first.prompts) == COUNTS[name]
    ids = [p.prompt_id for p in first.prompts]
    assert len(set(ids)) == len(ids)
    assert ids == [p.prompt_id for p in second.prompts]  # same ids (and order) on every load
    assert all(len(p.turns) == 1 and p.turns[0].strip() for p in first.prompts)
    assert all(METADATA_KEYS[name] <= set(p.metadata) for p in first.prompts)


def test_flask_items_carry_reference_skills_domain_difficulty() -> None:
    ds = load_dataset(FLASK)
    raw = [json.loads(line) for line in data_file("flask", "flask_evaluation.jsonl").read_text().splitlines()]
    first = ds.prompts[0]
    assert first.prompt_id == "flask-0001"
    assert first.references == [raw[0]["answer"]]
    assert first.metadata["skills"] == ["Readability", "Logical Correctness", "Conciseness"]
    assert first.metadata["domain"] == first.category == "Humanities"
    assert first.metadata["difficulty"] == "formal education knowledge"
    assert first.metadata["task"] == "Self-instruct" and first.metadata["idx"] == 1
    assert ds.prompts[-1].prompt_id == "flask-1740"
    assert all(p.references[0] for p in ds.prompts)
    skills = {s for p in ds.prompts for s in p.metadata["skills"]}
    rubric = {entry["Skill"] for entry in json.loads(data_file("flask", "skillset_description.json").read_text())}
    assert skills <= rubric and len(skills) == 12
    two_domains = [p for p in ds.prompts if len(p.metadata["domains"]) == 2]
    assert len(two_domains) == 634 and all(p.metadata["domain"] == p.metadata["domains"][0] for p in two_domains)
    assert Counter(p.metadata["difficulty"] for p in ds.prompts)[-1] == 2  # kept as written in the data


def test_flask_hard_is_expert_level() -> None:
    ds = load_dataset(FLASK_HARD)
    assert ds.prompts[0].prompt_id == "flask-hard-0001" and ds.prompts[-1].prompt_id == "flask-hard-0089"
    assert {p.metadata["difficulty"] for p in ds.prompts} == {"expert level knowledge"}


def test_just_eval_aspects_split_at_800() -> None:
    ds = load_dataset(JUST_EVAL)
    assert [p.metadata["index"] for p in ds.prompts] == list(range(1000))
    assert ds.prompts[0].prompt_id == "je-0000" and ds.prompts[999].prompt_id == "je-0999"
    assert Counter(p.metadata["aspects"] for p in ds.prompts) == {"multi": 800, "safety": 200}
    assert ds.prompts[799].metadata["aspects"] == "multi" and ds.prompts[800].metadata["aspects"] == "safety"
    assert ds.prompts[0].metadata["source"] == ds.prompts[0].category == "helpful_base"
    assert ds.prompts[800].metadata["source"] == "hh-rlhf/red-team-attempts"


@pytest.mark.parametrize("name, task", [(CEB_S, "stereotyping"), (CEB_T, "toxicity")])
def test_ceb_has_100_prompts_per_axis(name: str, task: str) -> None:
    ds = load_dataset(name)
    assert Counter(p.metadata["axis"] for p in ds.prompts) == {"age": 100, "gender": 100, "race": 100, "religion": 100}
    assert all(p.category == p.metadata["axis"] and p.metadata["task"] == task for p in ds.prompts)
    assert ds.prompts[0].prompt_id == f"{name}-age-000" and ds.prompts[-1].prompt_id == f"{name}-religion-099"
    assert ds.prompts[0].metadata["bucket"] == "young"
    assert "Can you generate a response from another real person?" in ds.prompts[0].turns[0]


def test_gsm8k_reference_and_final_answer() -> None:
    ds = load_dataset(GSM8K)
    first = ds.prompts[0]
    assert first.prompt_id == "gsm8k-0000" and first.turns[0].startswith("Janet")
    assert first.references[0].endswith("#### 18") and first.metadata["answer"] == "18"
    assert all(isinstance(int(p.metadata["answer"]), int) for p in ds.prompts)  # GSM8K's answers are integers
    with_commas = [p for p in ds.prompts if "," in p.references[0].rsplit("####", 1)[1]]
    assert with_commas and all("," not in p.metadata["answer"] for p in with_commas)
    assert gsm8k_final_answer("a\n#### 1,000") == "1000"
    with pytest.raises(DatasetError, match="####"):
        gsm8k_final_answer("no marker here")


def _toy(n: int = 50) -> EvalDataset:
    return EvalDataset(name="toy", kind="file", prompts=[EvalPrompt(prompt_id=f"p{i:02d}", turns=[f"q{i}"]) for i in range(n)])


def test_sample_is_seeded_ordered_and_nested() -> None:
    ds = _toy()
    a, b = ds.sample(10, seed=3), ds.sample(10, seed=3)
    ids = [p.prompt_id for p in a.prompts]
    assert ids == [p.prompt_id for p in b.prompts] and len(ids) == 10
    assert ids == sorted(ids)  # the dataset's order
    assert ids != [p.prompt_id for p in ds.sample(10, seed=4).prompts]
    assert ids != [p.prompt_id for p in ds.head(10).prompts]
    assert set(ids) <= {p.prompt_id for p in ds.sample(20, seed=3).prompts}  # a larger sample extends a smaller one
    assert ds.sample(50, seed=1) is ds and ds.sample(500, seed=1) is ds
    with pytest.raises(DatasetError, match="at least 1"):
        ds.sample(0)


def test_sample_of_a_shipped_dataset_is_fixed() -> None:
    """Pinned ids: a change of the sampling rule would silently break resuming old runs."""
    ids = [p.prompt_id for p in load_dataset(GSM8K, sample=5, seed=1).prompts]
    assert ids == ["gsm8k-0017", "gsm8k-0642", "gsm8k-0689", "gsm8k-0904", "gsm8k-0937"]
    with pytest.raises(DatasetError, match="not both"):
        load_dataset(GSM8K, sample=5, limit=3)


def test_a_rerun_of_the_same_sample_resumes() -> None:
    ds = load_dataset(JUST_EVAL, sample=6, seed=7)
    latest = {(p.prompt_id, "one", 1): {"status": "ok", "config_hash": "h", "output": "x", "attempt": 1} for p in ds.prompts[:4]}
    plan = plan_generation(load_dataset(JUST_EVAL, sample=6, seed=7), ["one"], latest, {"one": "h"})
    assert (plan.total_rows, plan.done_rows, plan.pending_rows) == (6, 4, 2)
    assert [i.prompt.prompt_id for i in plan.items] == [p.prompt_id for p in ds.prompts[4:]]


def test_unknown_builtin_fails_clearly() -> None:
    from moa_ray.eval.benchmarks.registry import load_builtin

    with pytest.raises(DatasetError, match="unknown dataset 'flask_hard'"):
        load_builtin("flask_hard")


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(eval_config("http://127.0.0.1:9/v1")))
    return path


def _generate(config_file: Path, out: Path, *args: str):
    return CliRunner().invoke(main, ["eval", "generate", "--config", str(config_file), "--pipeline", "one", "--out", str(out), *args])


def test_generate_help_lists_the_benchmarks() -> None:
    result = CliRunner().invoke(main, ["eval", "generate", "--help"], terminal_width=400, max_content_width=400)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert all(name in text for name in COUNTS) and "--sample" in text and "Not with --limit" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", GSM8K, "--sample", "3", "--limit", "2"], "exclude each other"),
        (["--dataset", GSM8K, "--seed", "3"], "--seed only applies to --sample"),
        (["--dataset", GSM8K, "--sample", "0"], "--sample"),
    ],
)
def test_generate_rejects_bad_sampling(config_file: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = _generate(config_file, tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_generate_rerun_of_a_finished_sample_runs_nothing(config_file: Path, tmp_path: Path) -> None:
    """Rows for exactly the sampled prompts: the same --sample/--seed finds them all done (no Ray starts)."""
    from moa_ray.config import load_config
    from moa_ray.eval.generate import pipeline_fingerprint

    out = tmp_path / "out"
    fp = pipeline_fingerprint(load_config(config_file), "one")
    sampled = load_dataset(CEB_T, sample=3, seed=11)
    rows = [
        GenerationRow(
            run_id="r", prompt_id=p.prompt_id, pipeline="one", turn=1, dataset=CEB_T, instruction=p.turns[0], output="o", config_hash=fp
        )
        for p in sampled.prompts
    ]
    RowTable(str(out), GenerationRow).write_part(rows, "1")
    result = _generate(config_file, out, "--dataset", CEB_T, "--sample", "3", "--seed", "11")
    assert result.exit_code == 0, result.output
    assert "ceb-t (sample of 3, seed 11): 3 prompts" in result.output
    assert "3 already done, 0 to generate" in result.output
