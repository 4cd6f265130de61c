"""The judge modes without Ray: single grading with K repeats, MT-Bench pairwise-baseline, AlpacaEval's
official annotator (prompt, logprob preference, token fallback, its files), and their report tables."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from eval_support import answer_records, generations, stored_row, stored_rows

from bench.simulator import Behaviour, SimulatorConfig
from moa_ray.chat import ChatMessage, ChatParams, Completion, TokenLogprob, TopLogprob, Usage
from moa_ray.errors import ConfigError
from moa_ray.eval.benchmarks.alpaca_eval import (
    ANNOTATION_KEYS,
    OfficialItem,
    annotate,
    annotator_config,
    annotator_messages,
    chatml_messages,
    is_switched_outputs,
    logprob_preference,
    prompt_template,
    prompt_text,
    token_preference,
    write_annotations,
)
from moa_ray.eval.benchmarks.mt_bench import BaselinePairItem, GradeItem, judge_baseline_pair
from moa_ray.eval.benchmarks.registry import load_dataset
from moa_ray.eval.judging import JudgeHandler, JudgeOptions, plan_judging
from moa_ray.eval.report import build_report, markdown
from moa_ray.eval.schema import BaselinePairRow, GenerationRow, GradeRow

DATA = Path(__file__).parent / "data" / "alpaca_eval"


class ScriptedJudge:
    """A judge agent whose reply is computed from the messages (or raises)."""

    def __init__(self, reply: Callable[[list[ChatMessage], int], Any]) -> None:
        self.reply = reply
        self.calls: list[tuple[list[ChatMessage], ChatParams]] = []

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        self.calls.append((messages, params))
        out = self.reply(messages, len(self.calls))
        if isinstance(out, Exception):
            raise out
        if isinstance(out, Completion):
            return out
        return Completion(text=out, usage=Usage(prompt_tokens=10, completion_tokens=2))

    def stream(self, messages: list[ChatMessage], params: ChatParams) -> Any:  # pragma: no cover - not used
        raise NotImplementedError


def handler(agent: ScriptedJudge) -> JudgeHandler:
    return JudgeHandler(agent, "judge", "run", ChatParams(temperature=0.0, max_tokens=64))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- single with repeats


def grade(replies: list[Any], repeats: int) -> Any:
    agent = ScriptedJudge(lambda m, n: replies[n - 1])
    item = GradeItem(
        prompt_id="mt-081", pipeline="p", turn=1, category="writing", questions=["q"], answers=["a"], references=[None], repeats=repeats
    )
    (row,) = asyncio.run(handler(agent).handle(item))
    assert len(agent.calls) == repeats
    return row


def test_one_repeat_grades_as_before() -> None:
    row = grade(["Fine. Rating: [[6]]"], 1)
    assert (row.status, row.score, row.judgment, row.scores, row.judge_prompt) == ("ok", 6.0, "Fine. Rating: [[6]]", [6.0], "single-v1")


def test_odd_repeats_keep_the_median_and_every_judgment() -> None:
    row = grade(["[[2]]", "[[9]]", "[[5]]"], 3)
    assert (row.status, row.score, row.scores) == ("ok", 5.0, [2.0, 9.0, 5.0])
    assert row.judgments == ["[[2]]", "[[9]]", "[[5]]"] and row.judge_prompt_tokens == 30


def test_even_repeats_average_the_middle_two() -> None:
    assert grade(["[[2]]", "[[9]]", "[[5]]", "[[6]]"], 4).score == 5.5


def test_failures_among_repeats() -> None:
    row = grade(["[[8]]", RuntimeError("judge down"), "no rating here", "[[4]]", "[[7]]"], 5)
    assert (row.status, row.score, row.scores) == ("ok", 7.0, [8.0, None, None, 4.0, 7.0])
    assert row.judgments[1] == "RuntimeError: judge down"
    failed = grade(["[[8]]", "no rating", RuntimeError("down")], 3)
    assert failed.status == "error" and failed.score is None and "only 1 of 3 repeats" in failed.error


def _gen(prompt_id: str, pipeline: str, turn: int, **extra: Any) -> GenerationRow:
    fields: dict[str, Any] = {
        "run_id": "g",
        "prompt_id": prompt_id,
        "pipeline": pipeline,
        "turn": turn,
        "dataset": "mt_bench",
        "category": "writing",
        "instruction": f"question {turn}",
        "output": f"{pipeline} answer {turn}",
        "config_hash": "h",
    }
    return GenerationRow(**{**fields, **extra})


def test_a_grade_with_other_repeats_is_made_again() -> None:
    gens = generations([_gen("mt-081", "p", 1)])
    stored = stored_rows(stored_row(GradeRow, ("mt-081", "p", 1, "judge"), status="ok", attempt=1, scores=[6.0]))
    assert plan_judging(gens, "judge", {}, stored, mode="single", repeats=1) == []
    (again,) = plan_judging(gens, "judge", {}, stored, mode="single", repeats=3)
    assert isinstance(again, GradeItem) and (again.repeats, again.attempt) == (3, 2)
    old_table = stored_rows(stored_row(GradeRow, ("mt-081", "p", 1, "judge"), status="ok", attempt=1, scores=None))  # before repeats
    assert plan_judging(gens, "judge", {}, old_table, mode="single") == []


def test_auto_mode_grades_mt_bench_with_repeats_too() -> None:
    """auto picks single grading for MT-Bench, so --judge-repeats applies to it without --mode single."""
    gens = generations([_gen("mt-081", "p", 1), _gen("mt-081", "p", 2)])
    items = plan_judging(gens, "judge", {}, {}, mode="auto", repeats=3)
    assert [(type(i).__name__, i.turn, i.repeats) for i in items] == [("GradeItem", 1, 3), ("GradeItem", 2, 3)]  # type: ignore[union-attr]
    assert JudgeOptions(judge="judge", generations="g", out="o", run_id="r", repeats=3).repeats == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "pairwise", "repeats": 3}, "--judge-repeats"),
        ({"mode": "pairwise-baseline"}, "needs --baseline"),
        ({"mode": "single", "baseline": "b"}, "--baseline is for mode pairwise-baseline"),
        ({"mode": "pairwise-baseline", "baseline": "b", "pipelines": ["b"]}, "only the baseline"),
    ],
)
def test_mode_options_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_judging({}, "judge", {}, {}, **kwargs)
    with pytest.raises(ValueError, match=message):
        JudgeOptions(judge="judge", generations="g", out="o", run_id="r", **kwargs)


# --------------------------------------------------------------------------- pairwise-baseline


def baseline_gens() -> dict[tuple[Any, ...], GenerationRow]:
    math_refs = {"category": "math", "reference": "ref"}
    rows = []
    for pipeline in ("moa", "solo", "base"):
        rows += [_gen("mt-081", pipeline, 1), _gen("mt-081", pipeline, 2)]
        rows += [_gen("mt-111", pipeline, 1, **math_refs)]
    rows.append(_gen("mt-111", "moa", 2, **math_refs))  # base has no turn 2 of mt-111: no match for it
    rows.append(_gen("mt-120", "moa", 1))  # base never answered mt-120
    return generations(rows)


def test_pairwise_baseline_plans_every_pipeline_against_the_baseline() -> None:
    items = plan_judging(baseline_gens(), "judge", {}, {}, mode="pairwise-baseline", baseline="base")
    got = sorted((i.pipeline, i.prompt_id, i.turn) for i in items)
    assert got == [(p, q, t) for p in ("moa", "solo") for q, t in (("mt-081", 1), ("mt-081", 2), ("mt-111", 1))]
    item = next(i for i in items if (i.pipeline, i.prompt_id, i.turn) == ("moa", "mt-081", 2))
    assert isinstance(item, BaselinePairItem)
    assert item.answers == ["moa answer 1", "moa answer 2"] and item.baseline_answers == ["base answer 1", "base answer 2"]
    only_moa = plan_judging(baseline_gens(), "judge", {}, {}, mode="pairwise-baseline", baseline="base", pipelines=["moa"], limit=1)
    assert sorted((i.pipeline, i.prompt_id, i.turn) for i in only_moa) == [("moa", "mt-081", 1), ("moa", "mt-081", 2)]
    done = stored_rows(stored_row(BaselinePairRow, ("mt-081", "moa", "base", 1, "judge"), status="ok", attempt=1))
    rest = plan_judging(baseline_gens(), "judge", {}, {}, mode="pairwise-baseline", baseline="base", pipelines=["moa"], baseline_done=done)
    assert ("mt-081", 1) not in {(i.prompt_id, i.turn) for i in rest} and len(rest) == 2
    with pytest.raises(ConfigError, match="no finished answers of the baseline pipeline 'nope'"):
        plan_judging(baseline_gens(), "judge", {}, {}, mode="pairwise-baseline", baseline="nope")


def play(reply: Callable[[list[ChatMessage], int], Any], item: BaselinePairItem) -> tuple[Any, ScriptedJudge]:
    agent = ScriptedJudge(reply)
    row = asyncio.run(judge_baseline_pair(item, handler(agent)._ask, run_id="r", judge="judge"))
    return row, agent


def _item(turn: int = 1, math_: bool = False) -> BaselinePairItem:
    refs: list[str | None] = ["ref 1", "ref 2"][:turn] if math_ else [None] * turn
    return BaselinePairItem(
        prompt_id="mt-111",
        pipeline="moa",
        baseline="base",
        turn=turn,
        category="math" if math_ else "writing",
        questions=["q1", "q2"][:turn],
        answers=["GOOD 1", "GOOD 2"][:turn],
        baseline_answers=["meh 1", "meh 2"][:turn],
        references=refs,
    )


def prefers_good(messages: list[ChatMessage], n: int) -> str:
    """A fair judge: picks the side whose answer says GOOD."""
    user = messages[-1].content
    a_part = user.split("Assistant B")[0]
    return "A is better [[A]]" if "GOOD" in a_part else "B is better [[B]]"


@pytest.mark.parametrize(
    "turn, math_, prompt",
    [(1, False, "pair-v2"), (2, False, "pair-v2-multi-turn"), (1, True, "pair-math-v1"), (2, True, "pair-math-v1-multi-turn")],
)
def test_a_consistent_judge_gives_a_win_with_fastchats_prompts(turn: int, math_: bool, prompt: str) -> None:
    row, agent = play(prefers_good, _item(turn, math_))
    assert (row.status, row.g1_winner, row.g2_winner, row.outcome, row.judge_prompt) == ("ok", "pipeline", "pipeline", "win", prompt)
    (g1, _), (g2, _) = agent.calls
    assert g1[0].content.startswith("Please act as an impartial judge")
    assert g1[1].content.index("GOOD 1") < g1[1].content.index("meh 1")  # game 1: the pipeline is A
    assert g2[1].content.index("meh 1") < g2[1].content.index("GOOD 1")  # game 2: swapped
    assert ("ref 1" in g1[1].content) == math_


def test_a_position_biased_judge_gives_a_tie_and_no_verdict_fails() -> None:
    row, _ = play(lambda m, n: "[[A]]", _item())
    assert (row.g1_winner, row.g2_winner, row.outcome) == ("pipeline", "baseline", "tie")
    bad, _ = play(lambda m, n: "[[A]]" if n == 1 else "cannot decide", _item())
    assert (bad.status, bad.outcome, bad.g2_winner) == ("error", None, "error") and "game 2" in bad.error


# --------------------------------------------------------------------------- the official annotator


def test_annotator_messages_follow_the_template() -> None:
    template = prompt_template()
    assert template.startswith("<|im_start|>system\n") and annotator_config().top_logprobs == 5
    messages, switched = annotator_messages("Name a colour.", "REFERENCE", "PIPELINE")
    assert [m.role for m in messages] == ["system", "user"]
    assert messages[0].content.startswith("You are a highly efficient assistant") and messages[0].content.endswith("answers.")
    user = messages[1].content
    assert '"instruction": """Name a colour.""",' in user
    first, second = ("PIPELINE", "REFERENCE") if switched else ("REFERENCE", "PIPELINE")
    assert f'"model_identifier": "m",\n        "output": """{first}"""' in user
    assert f'"model_identifier": "M",\n        "output": """{second}"""' in user
    assert user.endswith("## Best Model Identifier") and "<|im" not in user
    assert "{\n    {" in user  # the template's literal braces are not placeholders


def test_both_orders_occur_and_are_seeded() -> None:
    instructions = [p.turns[0] for p in load_dataset("alpaca_eval", limit=40).prompts]
    flips = [is_switched_outputs(i) for i in instructions]
    assert flips == [is_switched_outputs(i) for i in instructions] and 5 < sum(flips) < 35
    _, switched = annotator_messages(instructions[0], "r", "o")
    assert switched == flips[0]


def test_prompt_text_and_chatml_errors() -> None:
    assert prompt_text("{a} and {b} {a}", {"a": "1", "b": "2"}) == "1 and 2 {a}"  # each key replaced once, like make_prompts
    with pytest.raises(KeyError):
        prompt_text("{a}", {})
    with pytest.raises(ValueError, match="starts with"):
        chatml_messages("no markup")
    assert [m.role for m in chatml_messages("<|im_start|>system\nS\n<|im_end|>\n<|im_start|>user\nU\n<|im_end|>")] == ["system", "user"]


def test_logprob_preference() -> None:
    both = logprob_preference([TopLogprob(token="m", logprob=math.log(0.3)), TopLogprob(token="M", logprob=math.log(0.6))])
    assert both == pytest.approx(2 - 0.3 / 0.9)
    only_M = logprob_preference([TopLogprob(token="M", logprob=-0.1), TopLogprob(token="The", logprob=-3.0)])
    assert only_M == 2.0  # 'm' missing: probability 0, the second output wins outright
    only_m = logprob_preference([TopLogprob(token="m", logprob=-0.1)])
    assert only_m == 1.0
    assert logprob_preference([TopLogprob(token="The", logprob=-0.1), TopLogprob(token="Both", logprob=-2.0)]) is None


@pytest.mark.parametrize("text, preference", [("m", 1.0), (" M\n", 2.0), ("Model m", None), ("", None)])
def test_token_preference(text: str, preference: float | None) -> None:
    assert token_preference(text) == preference


def test_official_preferences_of_a_published_run_are_reproduced() -> None:
    """40 annotations of wizardlm-13b by weighted_alpaca_eval_gpt4_turbo (AlpacaEval's results/): the seeded
    order and the logprob formula give back the published preference of each."""
    records = json.loads((DATA / "weighted_alpaca_eval_gpt4_turbo_wizardlm-13b.json").read_text())
    switched = 0
    for r in records:
        flip = is_switched_outputs(r["instruction"])
        switched += flip
        raw = logprob_preference([TopLogprob(**t) for t in r["top_logprobs"]])
        assert raw is not None
        assert (3 - raw if flip else raw) == pytest.approx(r["preference"], abs=1e-9), r["instruction"][:60]
    assert 0 < switched < len(records)


def _official_item(instruction: str = "Name a colour.") -> OfficialItem:
    return OfficialItem(
        prompt_id="ae-001",
        pipeline="moa",
        instruction=instruction,
        category="helpful_base",
        reference="Red.",
        reference_generator="gpt4_1106_preview",
        output="Blue.",
    )


def run_annotate(completion: Completion | str, instruction: str = "Name a colour.") -> tuple[Any, ScriptedJudge]:
    agent = ScriptedJudge(lambda m, n: completion)
    row = asyncio.run(annotate(_official_item(instruction), handler(agent)._ask, run_id="r", judge="judge"))
    return row, agent


def test_annotate_uses_the_logprobs_and_unswitches() -> None:
    first = TokenLogprob(
        token="m",
        logprob=math.log(0.8),
        top_logprobs=[TopLogprob(token="m", logprob=math.log(0.8)), TopLogprob(token="M", logprob=math.log(0.2))],
    )
    row, agent = run_annotate(Completion(text="m", logprobs=[first]))
    params = agent.calls[0][1]
    assert (params.max_tokens, params.temperature, params.logprobs, params.top_logprobs) == (1, 1.0, True, 5)
    shown_first_wins = 2 - 0.8
    expected = 3 - shown_first_wins if row.is_switched_outputs else shown_first_wins
    assert (row.status, row.preference_source) == ("ok", "logprobs") and row.preference == pytest.approx(expected)
    assert (row.output_1, row.generator_1, row.output_2, row.generator_2) == ("Red.", "gpt4_1106_preview", "Blue.", "moa")
    assert json.loads(row.top_logprobs)["top_logprobs"][1] == {"token": "M", "logprob": math.log(0.2)}


@pytest.mark.parametrize("instruction", ["Name a colour.", "Say hello.", "Count to three.", "Write a haiku."])
def test_without_logprobs_the_generated_token_decides(instruction: str) -> None:
    row, _ = run_annotate("m", instruction)
    # "m" is the output shown first: the reference unless AlpacaEval's coin swapped the two
    assert (row.preference_source, row.preference) == ("token", 2.0 if row.is_switched_outputs else 1.0)
    bad, _ = run_annotate("I think the first")
    assert (bad.status, bad.preference, bad.preference_source) == ("error", None, "token") and "not 'm' or 'M'" in bad.error
    none_of_them = Completion(
        text="The", logprobs=[TokenLogprob(token="The", logprob=-0.1, top_logprobs=[TopLogprob(token="The", logprob=-0.1)])]
    )
    missing, _ = run_annotate(none_of_them)
    assert (missing.status, missing.preference_source) == ("error", "logprobs") and "neither 'm' nor 'M'" in missing.error


def test_official_annotation_through_the_http_backend(simulator) -> None:
    """Request settings and logprobs make the round trip through the OpenAI-compatible backend."""
    from moa_ray.backends.openai_http import OpenAIBackend
    from moa_ray.config import OpenAIModelSpec
    from moa_ray.pipeline.agents import LocalAgent

    sim = simulator(
        SimulatorConfig(
            latency_ms=5, models={"gpt-judge": Behaviour(latency_ms=5, reply="M", top_logprobs=[{"M": -0.5, "m": -1.0, "x": -9.0}])}
        )
    )
    agent = LocalAgent(OpenAIBackend(OpenAIModelSpec(backend="openai", model="gpt-judge", base_url=sim.base_url, max_retries=0)))
    row = asyncio.run(JudgeHandler(agent, "judge", "r", ChatParams()).handle(_official_item()))[0]
    p_m = math.exp(-1.0) / (math.exp(-1.0) + math.exp(-0.5))
    expected = 3 - (2 - p_m) if row.is_switched_outputs else 2 - p_m
    assert (row.status, row.preference_source, row.raw_completion) == ("ok", "logprobs", "M")
    assert row.preference == pytest.approx(expected)


def test_annotations_round_trip_through_eval_metrics(tmp_path: Path) -> None:
    rows = []
    for i, pref in enumerate([1.0, 2.0, 1.25, 1.9, 1.5, 2.0]):
        row, _ = run_annotate("m")
        rows.append(
            {**row.model_dump(), "prompt_id": f"ae-{i:03d}", "instruction": f"q{i}", "preference": pref, "output_2": "x" * (10 + i)}
        )
    rows.append({**rows[0], "prompt_id": "ae-999", "status": "error", "preference": None})  # failed: not written
    written = write_annotations(rows, str(tmp_path / "results"))
    path = tmp_path / "results" / "moa" / "weighted_alpaca_eval_gpt4_turbo" / "annotations.json"
    assert written == {str(path): 6}
    records = json.loads(path.read_text())
    assert (
        list(records[0])[: len(ANNOTATION_KEYS)] == list(ANNOTATION_KEYS) and records[0]["annotator"] == "weighted_alpaca_eval_gpt4_turbo"
    )
    outputs = json.loads((tmp_path / "results" / "moa" / "model_outputs.json").read_text())
    assert [o["output"] for o in outputs] == [r["output_2"] for r in records] and outputs[0]["generator"] == "moa"
    from moa_ray.cli import main

    result = CliRunner().invoke(main, ["eval", "metrics", "--annotations", str(path), "--json", "--no-lc"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["n_total"] == 6
    assert metrics["win_rate"] == pytest.approx(100 * (0 + 1 + 0.25 + 0.9 + 0.5 + 1) / 6)
    assert metrics["discrete_win_rate"] == pytest.approx(100 * (0 + 1 + 0 + 1 + 0.5 + 1) / 6)


def test_metrics_reads_the_official_table_of_a_judge_output(tmp_path: Path) -> None:
    from moa_ray.cli import main
    from moa_ray.eval.benchmarks.alpaca_eval import official_table, pairwise_table
    from moa_ray.eval.schema import OfficialAnnotationRow, PairwiseRow

    row, _ = run_annotate("M")
    official_table(str(tmp_path)).write_part([OfficialAnnotationRow.model_validate({**row.model_dump(), "preference": 2.0})], "1")
    result = CliRunner().invoke(main, ["eval", "metrics", "--annotations", str(tmp_path), "--json", "--no-lc"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["win_rate"] == 100.0
    pairwise_table(str(tmp_path)).write_part(
        [
            PairwiseRow(
                run_id="r",
                prompt_id="a",
                pipeline="p",
                judge="j",
                judge_prompt="pair-v2",
                instruction="q",
                output_1="r",
                generator_1="g",
                output_2="o",
                generator_2="p",
                preference=1.0,
            )
        ],
        "1",
    )
    both = CliRunner().invoke(main, ["eval", "metrics", "--annotations", str(tmp_path), "--json", "--no-lc"])
    assert both.exit_code != 0 and "name one of the subdirectories" in both.output


# --------------------------------------------------------------------------- report


def test_report_prints_fastchats_tables() -> None:
    gens = answer_records([_gen("mt-081", p, t) for p in ("moa", "solo") for t in (1, 2)])
    grades = [
        {"pipeline": p, "turn": t, "score": s, "category": "writing", "status": "ok", "judge": "j"}
        for p, t, s in [("moa", 1, 9.0), ("moa", 2, 7.0), ("solo", 1, 8.0), ("solo", 2, 4.0), ("solo", 1, 6.0)]
    ]
    versus = [{"pipeline": "moa", "baseline": "solo", "outcome": o, "status": "ok"} for o in ("win", "win", "tie", "loss")]
    rows = {r.pipeline: r for r in build_report(gens, (), grades, baseline_pairs=versus)}
    assert (rows["solo"].mt_bench_turn_1, rows["solo"].mt_bench_turn_2, rows["solo"].mt_bench) == (7.0, 4.0, 6.0)
    assert (rows["moa"].baseline_win, rows["moa"].baseline_loss, rows["moa"].baseline_tie) == (2, 1, 1)
    assert rows["moa"].baseline_win_rate == pytest.approx(62.5) and rows["solo"].baseline_win_rate is None
    text = markdown(list(rows.values()))
    assert "MT-Bench, first turn:" in text and "MT-Bench, second turn:" in text and "MT-Bench, average:" in text
    average = text.split("MT-Bench, average:")[1]
    assert average.index("| moa | 8.000000 |") < average.index("| solo | 6.000000 |")
    assert "MT-Bench pairwise against solo:" in text and "| moa | 2 | 1 | 1 | 50.00 | 25.00 | 62.50 |" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "pairwise-baseline"], "needs --baseline"),
        (["--mode", "alpaca-eval-official", "--judge-repeats", "3"], "--judge-repeats"),
        (["--mode", "pairwise-baseline", "--baseline", "nope"], "no finished answers of the baseline pipeline 'nope'"),
    ],
)
def test_judge_cli_refuses_bad_mode_options_before_ray(tmp_path: Path, args: list[str], message: str) -> None:
    import yaml
    from eval_support import eval_config

    from moa_ray.cli import main
    from moa_ray.eval.store import RowTable

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(eval_config("http://127.0.0.1:9/v1")))
    RowTable(str(tmp_path / "gen"), GenerationRow).write_part([_gen("mt-081", "one", 1)], "1")
    base = [
        "eval",
        "judge",
        "--config",
        str(config),
        "--judge",
        "judge",
        "--generations",
        str(tmp_path / "gen"),
        "--out",
        str(tmp_path / "j"),
    ]
    result = CliRunner().invoke(main, [*base, *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / "j").exists()


def test_auto_mode_picks_each_benchmarks_own_scoring() -> None:
    """One generation table with the first prompt of every builtin dataset: what auto plans for each."""
    from moa_ray.eval.benchmarks.gsm8k import plan_exact
    from moa_ray.eval.benchmarks.registry import BUILTIN, load_dataset

    rows = []
    for name in BUILTIN:
        prompt = load_dataset(name, limit=1).prompts[0]
        for turn, question in enumerate(prompt.turns, start=1):
            rows.append(
                _gen(
                    prompt.prompt_id,
                    "p",
                    turn,
                    dataset=name,
                    category=prompt.category,
                    instruction=question,
                    reference=prompt.references[turn - 1],
                )
            )
    gens = generations(rows)
    planned = {
        (type(i).__name__, getattr(i, "benchmark", None) or gens[(i.prompt_id, "p", 1)].dataset) for i in plan_judging(gens, "j", {}, {})
    }
    assert planned == {
        ("PairwiseItem", "alpaca_eval"),
        ("GradeItem", "mt_bench"),
        *(("RubricItem", n) for n in ("flask", "flask-hard", "just-eval", "ceb-s", "ceb-t")),
    }
    assert [r.dataset for r in plan_exact(gens, {})] == ["gsm8k"]
