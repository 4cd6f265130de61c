"""Human-readable views of traces (rich tables)."""

from __future__ import annotations

from collections import Counter

from rich.table import Table

from moa_ray.pipeline.trace import Trace


def layer_table(trace: Trace) -> Table:
    """One row per layer: models, calls ok/failed/cut, tokens, wall seconds (plus judge/moderator facts)."""
    table = Table(title=f"{trace.pipeline} ({trace.kind}): {trace.wall_s:.2f}s wall, {trace.critical_path_s:.2f}s critical path")
    for col in ("layer", "role", "models", "ok/err/cut", "prompt tok", "compl tok", "seconds", "notes"):
        table.add_column(col, justify="right" if col in ("prompt tok", "compl tok", "seconds") else "left")
    for layer in trace.layers:
        calls = trace.calls_in(layer.layer)
        status = Counter(c.status for c in calls)
        models = Counter(c.model for c in calls if c.role in ("proposer", "aggregator", "ranker"))
        roles = sorted({c.role for c in calls})
        notes = []
        if layer.selected is not None:
            notes.append(f"kept {layer.selected}")
        if layer.judge_fallback:
            notes.append(f"fallback: {layer.judge_fallback}")
        if layer.stopped:
            notes.append(f"moderator stop: {layer.stop_reason or 'consistent'}")
        table.add_row(
            str(layer.layer),
            "+".join(roles) or layer.role,
            ", ".join(f"{m} x{n}" if n > 1 else m for m, n in models.items()),
            f"{status['ok']}/{status['error']}/{status['cut']}",
            str(sum(c.prompt_tokens for c in calls)),
            str(sum(c.completion_tokens for c in calls)),
            f"{layer.wall_s:.2f}",
            "; ".join(notes),
        )
    total = trace.totals()
    table.add_row("all", "", "", str(len(trace.calls)), str(total.prompt_tokens), str(total.completion_tokens), f"{trace.wall_s:.2f}", "")
    return table
