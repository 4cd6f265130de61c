"""Reasoning models' thinking, kept apart from their answers.

A reasoning model thinks before it answers: in a separate field (``reasoning_content``, which the backends read
into :attr:`Completion.reasoning`) or inline, between ``<think>`` and ``</think>``. The next layer must read the
answer only: thinking is long, and an aggregator that reads it takes a proposer's doubts for its conclusions.
:func:`without_thinking` moves inline thinking into ``reasoning`` (the trace keeps it), and
:class:`ThinkSplitter` does the same to a stream, delta by delta.
"""

from __future__ import annotations

import re

from moa_ray.chat import Completion

OPEN, CLOSE = "<think>", "</think>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.S)


def split_thinking(text: str) -> tuple[str, str]:
    """``(answer, thinking)`` of a text: every ``<think>...</think>`` block (an unclosed one runs to the end) is
    thinking, and so is a text's start up to a ``</think>`` with no opening tag (templates that open the block in
    the prompt, as DeepSeek-R1's and Qwen3's do). Text without tags comes back as it is."""
    if OPEN not in text and CLOSE not in text:
        return text, ""
    thoughts: list[str] = []
    head, sep, rest = text.partition(CLOSE)
    if sep and OPEN not in head:  # the block was opened by the prompt
        thoughts.append(head)
        text = rest

    def take(match: re.Match[str]) -> str:
        thoughts.append(match.group(1))
        return ""

    answer = _BLOCK.sub(take, text)
    return answer.strip() if thoughts else answer, "\n\n".join(t.strip() for t in thoughts if t.strip())


def without_thinking(completion: Completion) -> Completion:
    """The completion with inline thinking moved from ``text`` to ``reasoning`` (after any the provider sent apart)."""
    answer, thinking = split_thinking(completion.text)
    if not thinking and answer == completion.text:
        return completion
    reasoning = "\n\n".join(part for part in (completion.reasoning, thinking) if part)
    return completion.model_copy(update={"text": answer, "reasoning": reasoning or None})


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that starts ``tag`` (a tag split between two deltas)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ThinkSplitter:
    """Splits a stream's text deltas into answer and thinking as they come.

    A tag may arrive in pieces, so a delta's end that could start one is held back until the next delta (at most
    ``len("</think>") - 1`` characters); whitespace right after a closing tag is dropped, as :func:`split_thinking`
    drops it. A stream whose prompt opened the block (no ``<think>`` in the output) is not split: only the whole
    answer can tell, and the trace's copy of the answer is split by :func:`split_thinking`.
    """

    def __init__(self) -> None:
        self.inside = False
        self._held = ""
        self._trim = False

    def feed(self, text: str) -> tuple[str, str]:
        """``(answer, thinking)`` of what can be told of the stream so far."""
        buffer, self._held = self._held + text, ""
        answer: list[str] = []
        thinking: list[str] = []
        while buffer:
            tag = CLOSE if self.inside else OPEN
            at = buffer.find(tag)
            if at < 0:
                keep = _partial_tag(buffer, tag)
                self._emit(buffer[: len(buffer) - keep], answer, thinking)
                self._held = buffer[len(buffer) - keep :]
                break
            self._emit(buffer[:at], answer, thinking)
            buffer = buffer[at + len(tag) :]
            self._trim = self.inside  # the answer after a closing tag starts at its first visible character
            self.inside = not self.inside
        return "".join(answer), "".join(thinking)

    def flush(self) -> tuple[str, str]:
        """What was held back, at the end of the stream."""
        answer: list[str] = []
        thinking: list[str] = []
        self._emit(self._held, answer, thinking)
        self._held = ""
        return "".join(answer), "".join(thinking)

    def _emit(self, text: str, answer: list[str], thinking: list[str]) -> None:
        if self.inside:
            thinking.append(text)
            return
        if self._trim:
            text = text.lstrip()
            self._trim = not text
        answer.append(text)
