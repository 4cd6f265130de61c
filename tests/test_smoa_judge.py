"""The judge/moderator/ranker parser and the seeded selection fallback (no model needed)."""

from __future__ import annotations

import jsonschema
import pytest

from moa_ray.chat import ChatMessage
from moa_ray.pipeline.selection import first_k, judge_schema, parse_verdict, pick_one, ranker_schema, seed_material, select, shown_order
from moa_ray.prompts import judge_prompt, numbered_responses, render_question


@pytest.mark.parametrize(
    ("text", "chosen", "end"),
    [
        ('{"reasoning": "ok", "chosen_responses": [1, 3], "end_debate": true}', [1, 3], True),
        ('Sure!\n```json\n{"chosen responses": ["2", "Response 4"], "end debate": "no"}\n```', [2, 4], False),
        ("**Reasoning**: both agree.\n**Chosen responses**: [1, 3]\n**End debate**: True", [1, 3], True),
        ("Reasoning: r\nChosen Responses: Response 2 and Response 4\nEnd Debate: false", [2, 4], False),
        ('{"reasoning": "cut off by max_tokens", "chosen_responses": [2, 3', [2, 3], None),
        ('{"reasoning": "a", "chosen_responses": [4, 1], "end_debate": tr', [4, 1], None),
        ('{"selected": 2, "stop": "yes"}', [2], True),
        ("[1, 4]", [1, 4], None),
        ("the model considers each part of the question", None, None),
        ("", None, None),
        ('{"chosen_responses": "1, 2", "end_debate": 1}', [1, 2], True),
        ('{"chosen_responses": [true, 2.0, 2.5, null, "x"]}', [2], None),
    ],
)
def test_parse_verdict_tolerates_many_forms(text, chosen, end):
    verdict = parse_verdict(text)
    assert verdict.chosen == chosen
    assert verdict.end_debate is end


def test_parse_verdict_reads_reasoning_and_form():
    assert parse_verdict('{"reasoning": " agree ", "chosen_responses": [1]}').reasoning == "agree"
    assert parse_verdict('{"reasoning": "x"}').form == "json"
    assert parse_verdict("**Reasoning**: they agree.\n").reasoning == "they agree."
    assert parse_verdict("filler words").form == "none"


def test_parse_verdict_ranker_forms():
    assert parse_verdict('{"reasoning": "r", "best_response": 3}').best == 3
    assert parse_verdict("Best response: Response 2").best == 2
    assert parse_verdict('{"best": "4"}').best == 4


MATERIAL = "0:1:abc"


def test_select_keeps_valid_picks_in_the_judges_order():
    sel = select([3, 1], n=4, k=2, material=MATERIAL)
    assert sel.positions == [2, 0] and sel.fallback is None


def test_select_cuts_over_long_selections_to_k():
    sel = select([4, 2, 1], n=4, k=2, material=MATERIAL)
    assert sel.positions == [3, 1] and sel.fallback == "cut 3 picks to k=2"


def test_select_drops_out_of_range_and_repeats_then_fills_deterministically():
    sel = select([2, 2, 9, 0, -1], n=4, k=2, material=MATERIAL)
    assert sel.positions[0] == 1 and len(set(sel.positions)) == 2 and all(0 <= p < 4 for p in sel.positions)
    assert "dropped out-of-range [9, 0, -1]" in sel.fallback
    assert "dropped repeated [2]" in sel.fallback
    assert "filled 1 missing pick by seeded shuffle" in sel.fallback
    assert select([2, 2, 9, 0, -1], n=4, k=2, material=MATERIAL) == sel  # same seed, same answer


def test_select_with_nothing_parsed_picks_k_distinct_by_seed():
    picks = {tuple(select(None, n=6, k=3, material=f"0:1:{i}").positions) for i in range(20)}
    assert all(len(set(p)) == 3 and all(0 <= x < 6 for x in p) for p in picks)
    assert len(picks) > 1  # the seed material matters
    assert select(None, 6, 3, "s").fallback == "no selection in the judge's output; filled 3 missing picks by seeded shuffle"


def test_select_never_asks_for_more_than_available():
    assert select([1, 2, 3], n=2, k=3, material=MATERIAL).positions == [0, 1]


def test_seed_material_depends_on_seed_layer_and_conversation():
    msgs = [ChatMessage(role="user", content="q")]
    other = [ChatMessage(role="user", content="q2")]
    base = seed_material(0, 1, msgs)
    assert base == seed_material(0, 1, list(msgs))
    assert len({base, seed_material(1, 1, msgs), seed_material(0, 2, msgs), seed_material(0, 1, other)}) == 4


def test_first_k_and_pick_one():
    assert first_k(4, 2, "judge call failed (x)").positions == [0, 1]
    assert "kept the first 2" in first_k(4, 2, "judge call failed (x)").fallback
    assert pick_one(parse_verdict('{"best_response": 2}'), 3, MATERIAL).positions == [1]
    bad = pick_one(parse_verdict('{"best_response": 7}'), 3, MATERIAL)
    assert "out-of-range 7" in bad.fallback and 0 <= bad.positions[0] < 3
    assert pick_one(parse_verdict("no idea"), 3, MATERIAL) == pick_one(parse_verdict("no idea"), 3, MATERIAL)


def test_schemas_constrain_numbers_and_counts():
    schema = judge_schema(4, 2, moderate=True)
    assert len(schema["properties"]["chosen_responses"]["anyOf"]) == 6  # C(4, 2): every choice of 2 distinct, listed
    for picks, valid in (([2, 4], True), ([1, 2], True), ([2, 2], False), ([4, 2], False), ([1, 5], False), ([1], False)):
        verdict = {"reasoning": "r", "chosen_responses": picks, "end_debate": False}
        assert jsonschema.Draft202012Validator(schema).is_valid(verdict) is valid, picks
    wide = judge_schema(12, 6, moderate=False)["properties"]["chosen_responses"]  # C(12, 6) = 924: bounded picks
    assert wide["items"]["enum"] == list(range(1, 13)) and wide["minItems"] == wide["maxItems"] == 6
    assert schema["required"] == ["reasoning", "chosen_responses", "end_debate"]
    assert "end_debate" not in judge_schema(4, 2, moderate=False)["properties"]
    assert ranker_schema(3)["properties"]["best_response"]["enum"] == [1, 2, 3]
    verdict = {"reasoning": "2 and 4 agree", "chosen_responses": [2, 4], "end_debate": False}
    jsonschema.Draft202012Validator(schema).validate(verdict)
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):  # a grammar for it stops after the last key
        jsonschema.Draft202012Validator(schema).validate({**verdict, "more": "text the model would write on"})


def test_judge_prompt_numbers_from_one_and_names_the_keys():
    prompt = judge_prompt("Q?", ["a", "b", "c"], 2, moderate=True)
    assert "Response 1:\na" in prompt and "Response 3:\nc" in prompt and "Response 0" not in prompt
    assert '"chosen_responses"' in prompt and '"end_debate"' in prompt and "consistency" in prompt
    assert '"end_debate"' not in judge_prompt("Q?", ["a", "b", "c"], 2, moderate=False)
    assert numbered_responses([" x "]) == "Response 1:\nx"


def test_render_question():
    assert render_question([ChatMessage(role="user", content="hi")]) == "hi"
    convo = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="a"),
        ChatMessage(role="assistant", content="b"),
        ChatMessage(role="user", content="c"),
    ]
    assert render_question(convo) == "System: be brief\n\nUser: a\n\nAssistant: b\n\nUser: c"


def test_shown_order_is_identity_without_material_and_a_seeded_permutation_with_it():
    assert shown_order(4, None) == [0, 1, 2, 3]
    orders = [shown_order(4, f"0:1:{i}") for i in range(20)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert orders == [shown_order(4, f"0:1:{i}") for i in range(20)]  # deterministic
    assert len({tuple(o) for o in orders}) > 5  # and it really shuffles
