"""The aggregate-and-synthesize prompt is the paper's text, injected the way the reference code does."""

from __future__ import annotations

from moa_ray.chat import ChatMessage
from moa_ray.prompts import (
    AGGREGATE_AND_SYNTHESIZE,
    aggregate_system_prompt,
    inject_references,
    merge_system,
    with_role,
)

# Copied by hand from shared/design/prompts.md (Wang et al. 2024, Table 1); never built from the module under test.
PAPER_PROMPT = (
    "You have been provided with a set of responses from various open-source models to the latest user query. "
    "Your task is to synthesize these responses into a single, high-quality response. It is crucial to critically "
    "evaluate the information provided in these responses, recognizing that some of it may be biased or incorrect. "
    "Your response should not simply replicate the given answers but should offer a refined, accurate, and "
    "comprehensive reply to the instruction. Ensure your response is well-structured, coherent, and adheres to the "
    "highest standards of accuracy and reliability.\n"
    "\n"
    "Responses from models:"
)

USER = ChatMessage(role="user", content="What is 2 + 2?")


def test_prompt_is_the_papers_text_verbatim():
    assert AGGREGATE_AND_SYNTHESIZE == PAPER_PROMPT


def test_references_are_numbered_on_their_own_lines():
    assert aggregate_system_prompt(["Four.", "It is 4.", "2+2=4"]) == PAPER_PROMPT + "\n1. Four.\n2. It is 4.\n3. 2+2=4"


def test_multiline_references_keep_their_text():
    assert aggregate_system_prompt(["line one\nline two"]) == PAPER_PROMPT + "\n1. line one\nline two"


def test_injection_prepends_a_system_message_when_there_is_none():
    out = inject_references([USER], ["A", "B"])
    assert out == [ChatMessage(role="system", content=PAPER_PROMPT + "\n1. A\n2. B"), USER]


def test_injection_appends_to_an_existing_system_message_after_a_blank_line():
    convo = [ChatMessage(role="system", content="Answer in French."), USER]
    out = inject_references(convo, ["Quatre."])
    assert out == [ChatMessage(role="system", content="Answer in French.\n\n" + PAPER_PROMPT + "\n1. Quatre."), USER]


def test_injection_keeps_multi_turn_conversations_intact():
    convo = [
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hello!"),
        ChatMessage(role="user", content="What is 2 + 2?"),
    ]
    out = inject_references(convo, ["4"])
    assert out[0] == ChatMessage(role="system", content=PAPER_PROMPT + "\n1. 4")
    assert out[1:] == convo


def test_no_references_means_no_injection():
    convo = [ChatMessage(role="system", content="Be brief."), USER]
    assert inject_references(convo, []) == convo


def test_injection_does_not_mutate_the_input():
    convo = [ChatMessage(role="system", content="Be brief."), USER]
    snapshot = [m.model_copy() for m in convo]
    inject_references(convo, ["x"])
    with_role(convo, "You are a teacher.")
    merge_system(convo, "more")
    assert convo == snapshot


def test_role_becomes_the_system_message():
    assert with_role([USER], "You are a careful fact checker.") == [
        ChatMessage(role="system", content="You are a careful fact checker."),
        USER,
    ]


def test_role_goes_before_the_references_of_a_later_layer():
    """A role-playing proposer of layer 2 sees its role first, then the paper's prompt and references."""
    injected = inject_references([USER], ["first answer", "second answer"])
    out = with_role(injected, "You are a patient teacher.")
    assert out == [
        ChatMessage(
            role="system",
            content="You are a patient teacher.\n\n" + PAPER_PROMPT + "\n1. first answer\n2. second answer",
        ),
        USER,
    ]


def test_no_role_leaves_messages_unchanged():
    convo = [ChatMessage(role="system", content="Be brief."), USER]
    assert with_role(convo, None) == convo
    assert with_role(convo, "") == convo
