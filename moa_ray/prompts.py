"""Every prompt moa-ray sends, in one place, with the papers' exact text where one exists."""

from __future__ import annotations

from moa_ray.chat import ChatMessage

#: MoA aggregate-and-synthesize system prompt (Wang et al. 2024, Table 1), verbatim.
AGGREGATE_AND_SYNTHESIZE = (
    "You have been provided with a set of responses from various open-source models to the latest user query. "
    "Your task is to synthesize these responses into a single, high-quality response. It is crucial to critically "
    "evaluate the information provided in these responses, recognizing that some of it may be biased or incorrect. "
    "Your response should not simply replicate the given answers but should offer a refined, accurate, and "
    "comprehensive reply to the instruction. Ensure your response is well-structured, coherent, and adheres to the "
    "highest standards of accuracy and reliability.\n\nResponses from models:"
)


def aggregate_system_prompt(references: list[str]) -> str:
    """The system prompt that carries the numbered references: ``\\n1. <ref>``, ``\\n2. <ref>``..."""
    return AGGREGATE_AND_SYNTHESIZE + "".join(f"\n{i}. {ref}" for i, ref in enumerate(references, start=1))


def merge_system(messages: list[ChatMessage], system: str) -> list[ChatMessage]:
    """Append ``system`` to an existing leading system message after a blank line, or prepend a new one."""
    if messages and messages[0].role == "system":
        first = ChatMessage(role="system", content=messages[0].content + "\n\n" + system)
        return [first, *messages[1:]]
    return [ChatMessage(role="system", content=system), *messages]


def inject_references(messages: list[ChatMessage], references: list[str]) -> list[ChatMessage]:
    """Inject the previous layer's responses as the paper does (reference code ``inject_references_to_messages``)."""
    if not references:
        return list(messages)
    return merge_system(messages, aggregate_system_prompt(references))


def with_role(messages: list[ChatMessage], system: str | None) -> list[ChatMessage]:
    """Give a proposer its own system role, placed before any system text of the conversation."""
    if not system:
        return list(messages)
    if messages and messages[0].role == "system":
        return [ChatMessage(role="system", content=system + "\n\n" + messages[0].content), *messages[1:]]
    return [ChatMessage(role="system", content=system), *messages]
