"""bench.sparsity's split of SMoA's token change into its causes (the run itself takes an hour of real models)."""

from __future__ import annotations

import pytest

from bench.sparsity import drivers


def summary(name: str, proposer: int, aggregator: int, judge: int = 0) -> dict:
    roles = {"proposer": proposer, "aggregator": aggregator, **({"judge": judge} if judge else {})}
    return {"pipeline": name, "total_tokens": proposer + aggregator + judge, "tokens_by_role": roles}


def test_drivers_add_up_to_the_ratio_and_name_each_cause() -> None:
    summaries = {
        "moa": summary("moa", 1000, 100),
        "smoa": summary("smoa", 400, 60, judge=150),
        "smoa-nomod": summary("smoa-nomod", 700, 70, judge=250),
    }
    parts = drivers(summaries)
    assert parts["fewer_references"] == pytest.approx((770 - 1100) / 1100)
    assert parts["judge_overhead"] == pytest.approx(250 / 1100)
    assert parts["early_stops"] == pytest.approx((610 - 1020) / 1100)
    assert 1 + sum(parts.values()) == pytest.approx(610 / 1100)
