"""Judge work items shared by several judge modes."""

from __future__ import annotations

from pydantic import BaseModel


class ReferenceComparison(BaseModel):
    """One pipeline's first-turn answer to compare with the prompt's reference answer (pairwise or AlpacaEval's
    official annotator: the same comparison, judged two ways)."""

    prompt_id: str
    pipeline: str
    instruction: str
    category: str | None
    reference: str
    reference_generator: str
    output: str
    attempt: int = 1
