"""MT-Bench as FastChat runs it: answer temperature per category, judge repeats with a median,
pairwise-baseline matches (planning, prompts, FastChat's verdicts and win/tie/loss), and the report tables."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from moa_ray.chat import ChatMessage, ChatParams, Completion, Usage
from moa_ray.config import parse_config
from moa_ray.errors import ConfigError
from moa_ray.eval.benchmarks.base import AnswerTemperature
from moa_ray.eval.benchmarks.mt_bench import (
    TEMPERATURE_CONFIG,
    baseline_win_rates,
    match_outcome,
    median_of_repeats,
    parse_fastchat_verdict,
)
from moa_ray.eval.benchmarks.registry import answer_temperature, load_dataset
from moa_ray.eval.generate import (
    GenerateHandler,
    WorkItem,
    load_settings,
    plan_generation,
    run_settings,
    save_settings,
)
from moa_ray.eval.schema import GenerationRow

FASTCHAT = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}

CONFIG = {
    "models": {"m": {"backend": "openai", "model": "x", "base_url": "http://127.0.0.1:9/v1", "temperature": 0.9}},
    "pipelines": {"p": {"kind": "single", "model": "m"}},
}


class RecordingAgent:
    """Answers at once and remembers the parameters of every call."""

    def __init__(self) -> None:
        self.params: list[ChatParams] = []

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        self.params.append(params)
        return Completion(text=f"answer {len(self.params)}", usage=Usage(prompt_tokens=3, completion_tokens=2))

    def stream(self, messages: list[ChatMessage], params: ChatParams) -> Any:  # pragma: no cover - not used
        raise NotImplementedError


def answer_temperatures(dataset: str, forced: float | None = None) -> dict[str, set[float | None]]:
    """Run every prompt of the dataset through GenerateHandler; the temperatures the model was called with, per category."""
    config = parse_config(CONFIG)
    data = load_dataset(dataset, limit=None if dataset == "mt_bench" else 3)
    agent = RecordingAgent()
    handler = GenerateHandler(config, {"m": agent}, ["p"], "r", {"p": "h"}, None, answer_temperature(data.kind, forced))
    seen: dict[str, set[float | None]] = {}

    async def run() -> None:
        await handler.setup()
        for prompt in data.prompts:
            before = len(agent.params)
            rows = await handler.handle(WorkItem(prompt=prompt, pipeline="p", dataset=data.name))
            assert [r.status for r in rows] == ["ok"] * len(prompt.turns)
            seen.setdefault(prompt.category or "", set()).update(p.temperature for p in agent.params[before:])

    asyncio.run(run())
    return seen


def test_fastchat_temperature_config_is_copied_exactly() -> None:
    assert TEMPERATURE_CONFIG == FASTCHAT
    assert answer_temperature("mt_bench").for_category("not-a-category") == 0.7  # gen_model_answer's default


def test_every_mt_bench_category_is_answered_at_fastchats_temperature() -> None:
    seen = answer_temperatures("mt_bench")
    assert set(seen) == set(FASTCHAT)  # all eight categories are in the shipped questions
    assert seen == {c: {t} for c, t in FASTCHAT.items()}  # both turns of every prompt, overriding the model's 0.9


def test_a_forced_temperature_wins_everywhere() -> None:
    assert answer_temperatures("mt_bench", forced=0.3) == {c: {0.3} for c in FASTCHAT}
    assert set().union(*answer_temperatures("alpaca_eval", forced=0.0).values()) == {0.0}


def test_other_datasets_keep_the_models_temperature() -> None:
    # no override in the call: the backend fills in the model's configured 0.9 (effective_params)
    assert set().union(*answer_temperatures("alpaca_eval").values()) == {None}
    assert answer_temperature("alpaca_eval").settings() is None


# --------------------------------------------------------------------------- resume fingerprint


def _gen_row(prompt_id: str, dataset: str, config_hash: str) -> dict[str, Any]:
    return GenerationRow(
        run_id="r", prompt_id=prompt_id, pipeline="p", turn=1, dataset=dataset, instruction="q", output="o", config_hash=config_hash
    ).model_dump()


def _plan(out: Path, dataset: str, latest: dict, temperature: AnswerTemperature) -> Any:
    config = parse_config(CONFIG)
    chosen = run_settings(config, ["p"], temperature)
    return plan_generation(
        load_dataset(dataset, limit=2),
        ["p"],
        latest,
        chosen.fingerprints,
        settings=chosen.settings,
        stored_settings=lambda fp: load_settings(str(out), fp),
        base_fingerprints=chosen.base_fingerprints,
    )


def _stored(out: Path, dataset: str, temperature: AnswerTemperature) -> dict:
    """A table holding the first prompt of the dataset answered under ``temperature`` (settings kept beside it)."""
    chosen = run_settings(parse_config(CONFIG), ["p"], temperature)
    save_settings(str(out), chosen.settings)
    pid = load_dataset(dataset, limit=1).prompts[0].prompt_id
    row = _gen_row(pid, dataset, chosen.fingerprints["p"])
    return {(pid, "p", 1): row}


@pytest.mark.parametrize(
    "then, changed",
    [
        (AnswerTemperature(forced=0.2), "answer_temperature.by_category"),  # forced after per-category
        (AnswerTemperature(by_category={**FASTCHAT, "writing": 0.5}, default=0.7), "answer_temperature.by_category.writing: 0.7 -> 0.5"),
        (AnswerTemperature(), "answer_temperature"),  # the models' own temperatures
    ],
)
def test_resuming_mt_bench_with_another_effective_temperature_is_refused(tmp_path: Path, then: AnswerTemperature, changed: str) -> None:
    latest = _stored(tmp_path, "mt_bench", answer_temperature("mt_bench"))
    assert _plan(tmp_path, "mt_bench", latest, answer_temperature("mt_bench")).done_rows == 1  # same: resumes
    with pytest.raises(ConfigError, match="different settings") as err:
        _plan(tmp_path, "mt_bench", latest, then)
    assert changed in str(err.value)


def test_mt_bench_temperatures_do_not_block_another_dataset_in_the_same_table(tmp_path: Path) -> None:
    latest = _stored(tmp_path, "mt_bench", answer_temperature("mt_bench"))
    plan = _plan(tmp_path, "alpaca_eval", latest, answer_temperature("alpaca_eval"))
    assert plan.pending_rows == 2
    # but a change of the model still does, whatever the dataset
    other = parse_config({**CONFIG, "models": {"m": {**CONFIG["models"]["m"], "temperature": 0.1}}})
    chosen = run_settings(other, ["p"], answer_temperature("alpaca_eval"))
    with pytest.raises(ConfigError, match=r"models\.m\.temperature: 0\.9 -> 0\.1"):
        plan_generation(
            load_dataset("alpaca_eval", limit=2),
            ["p"],
            latest,
            chosen.fingerprints,
            settings=chosen.settings,
            stored_settings=lambda fp: load_settings(str(tmp_path), fp),
            base_fingerprints=chosen.base_fingerprints,
        )


def test_the_forced_temperature_reaches_the_cli_fingerprint(tmp_path: Path) -> None:
    """`eval generate --temperature` is refused on a table answered at MT-Bench's temperatures, before Ray starts."""
    import yaml
    from click.testing import CliRunner

    from moa_ray.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "out"
    from moa_ray.eval.store import RowTable

    (row,) = _stored(out, "mt_bench", answer_temperature("mt_bench")).values()
    both_turns = [GenerationRow.model_validate({**row, "turn": t}) for t in (1, 2)]
    RowTable(str(out), GenerationRow).write_part(both_turns, "1")
    args = ["eval", "generate", "--config", str(path), "--pipeline", "p", "--dataset", "mt_bench", "--limit", "1", "--out", str(out)]
    done = CliRunner().invoke(main, args)  # nothing left to do: no Ray
    assert done.exit_code == 0 and "2 already done, 0 to generate" in done.output, done.output
    refused = CliRunner().invoke(main, [*args, "--temperature", "0.5"])
    assert refused.exit_code != 0 and "answer_temperature" in refused.output, refused.output


# --------------------------------------------------------------------------- median of repeats


@pytest.mark.parametrize(
    "values, expected",
    [
        ([7.0], 7.0),
        ([3.0, 9.0, 4.0], 4.0),  # odd K: the middle value
        ([3.0, 9.0, 4.0, 8.0], 6.0),  # even K: mean of the two middle values
        ([2.0, None, 6.0], 4.0),  # one failure among three: median of the two that parsed
        ([5.0, None], None),  # half failed: no majority, the item fails
        ([None], None),
        ([None, None, 8.0], None),
    ],
)
def test_median_of_repeats(values: list[float | None], expected: float | None) -> None:
    assert median_of_repeats(values) == expected


def test_median_of_no_repeats_is_an_error() -> None:
    with pytest.raises(ValueError):
        median_of_repeats([])


# --------------------------------------------------------------------------- FastChat verdicts and outcomes


@pytest.mark.parametrize(
    "judgment, verdict",
    [
        ("A is better. [[A]]", "A"),
        ("[[B]]", "B"),
        ("a tie [[C]]", "tie"),
        ("[[B]] ... on reflection [[A]]", "A"),  # FastChat checks [[A]] first
        ("A wins", "error"),
    ],
)
def test_fastchat_verdict_parser(judgment: str, verdict: str) -> None:
    assert parse_fastchat_verdict(judgment) == verdict


@pytest.mark.parametrize(
    "g1, g2, outcome",
    [
        ("pipeline", "pipeline", "win"),
        ("baseline", "baseline", "loss"),
        ("pipeline", "baseline", "tie"),  # the games disagree (position bias)
        ("tie", "pipeline", "tie"),
        ("pipeline", "tie", "tie"),
        ("tie", "tie", "tie"),
        ("error", "pipeline", None),
        ("pipeline", "error", None),
    ],
)
def test_match_outcome_follows_show_result(g1: str, g2: str, outcome: str | None) -> None:
    assert match_outcome(g1, g2) == outcome  # type: ignore[arg-type]


def test_baseline_win_rates() -> None:
    rows = [{"pipeline": "moa", "baseline": "ref", "outcome": o, "status": "ok"} for o in ["win"] * 5 + ["tie"] * 2 + ["loss"] * 3]
    rows.append({"pipeline": "moa", "baseline": "ref", "outcome": None, "status": "error"})
    rates = baseline_win_rates(pa.Table.from_pylist(rows))
    r = rates["moa"]
    assert (r.win, r.loss, r.tie, r.n) == (5, 3, 2, 10)
    assert (r.win_rate, r.loss_rate, r.win_rate_adjusted) == (0.5, 0.3, 0.6)
    with pytest.raises(ConfigError, match="several baselines"):
        baseline_win_rates(pa.Table.from_pylist([*rows, {"pipeline": "moa", "baseline": "other", "outcome": "win", "status": "ok"}]))


def test_fastchat_temperatures_cover_the_shipped_questions() -> None:
    counts = Counter(p.category for p in load_dataset("mt_bench").prompts)
    assert counts == {c: 10 for c in FASTCHAT}
    assert json.dumps(answer_temperature("mt_bench").settings(), sort_keys=True)  # stored as JSON in _settings/
