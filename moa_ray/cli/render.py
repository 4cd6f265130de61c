"""Human-readable views of traces: rich tables of the layers and costs, and a panel per call (what it said); and the
consoles the commands print them on (stderr for everything but the answer and the reports)."""

from __future__ import annotations

import sys
from collections import Counter

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from moa_ray.pipeline.accounting import account
from moa_ray.pipeline.trace import CallRecord, Trace


def _layer_notes(trace: Trace, layer_no: int) -> list[str]:
    layer = next((lr for lr in trace.layers if lr.layer == layer_no), None)
    notes: list[str] = []
    if layer is None:
        return notes
    if layer.selected is not None:
        n = sum(1 for c in trace.calls_in(layer_no) if c.role == "proposer")
        kept = ", ".join(str(i + 1) for i in layer.selected)
        notes.append(f"kept {kept} of {n}" if layer.role == "proposer" else f"picked {kept} verbatim")
    if layer.judge_fallback:
        notes.append(f"fallback: {layer.judge_fallback}")
    if layer.stopped:
        notes.append(f"moderator stop: {layer.stop_reason or 'consistent'}")
    return notes


def make_console(stderr: bool = True) -> Console:
    """A console whose tables stay wide in job logs (not a terminal: rich would squeeze them into 80 columns)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, soft_wrap=True, width=None if stream.isatty() else 160)


err_console = make_console(stderr=True)


def layer_table(trace: Trace) -> Table:
    """One row per layer: models, calls ok/failed/cut, tokens, wall seconds (plus judge/moderator facts).

    Proposers are numbered from 1 in the notes ("kept 3, 1 of 4": proposers 3 and 1, best first).
    """
    table = Table(title=f"{trace.pipeline} ({trace.kind}): {trace.wall_s:.2f}s wall, {trace.critical_path_s:.2f}s critical path")
    for col in ("layer", "role", "models", "ok/err/cut", "prompt tok", "compl tok", "seconds", "notes"):
        table.add_column(col, justify="right" if col in ("prompt tok", "compl tok", "seconds") else "left")
    rows: list[tuple[int, float | None]] = [(layer.layer, layer.wall_s) for layer in trace.layers]
    if trace.calls_in(0) and all(layer.layer != 0 for layer in trace.layers):  # role generation has no layer record
        rows.insert(0, (0, None))
    for layer_no, wall in rows:
        calls = trace.calls_in(layer_no)
        status = Counter(c.status for c in calls)
        models = Counter(c.model for c in calls if c.role in ("proposer", "aggregator", "ranker", "roles"))
        roles = sorted({c.role for c in calls})
        table.add_row(
            str(layer_no),
            "+".join(roles),
            ", ".join(f"{m} x{n}" if n > 1 else m for m, n in models.items()),
            f"{status['ok']}/{status['error']}/{status['cut']}",
            str(sum(c.prompt_tokens for c in calls)),
            str(sum(c.completion_tokens for c in calls)),
            f"{wall if wall is not None else sum(c.latency_s for c in calls):.2f}",
            "; ".join(_layer_notes(trace, layer_no)),
        )
    total = trace.totals()
    table.add_row("all", "", "", str(len(trace.calls)), str(total.prompt_tokens), str(total.completion_tokens), f"{trace.wall_s:.2f}", "")
    return table


def _num(value: float | None, fmt: str) -> str:
    return "unknown" if value is None else format(value, fmt)


def accounting_table(trace: Trace) -> Table:
    """Tokens, TFLOPs and cost per role, with the latency facts underneath; unknown facts say so."""
    acc = trace.accounting or account(trace)
    table = Table(title="cost by role")
    for col in ("role", "calls", "prompt tok", "compl tok", "TFLOPs", "cost USD"):
        table.add_column(col, justify="left" if col == "role" else "right")
    for role, b in [*acc.by_role.items(), ("total", acc.totals)]:
        table.add_row(role, str(b.calls), str(b.prompt_tokens), str(b.completion_tokens), _num(b.tflops, ".3f"), _num(b.cost_usd, ".6f"))
    caption = (
        f"{acc.proposer_layers_run} proposer layer(s) run"
        + (f", moderator stopped after layer {acc.stopped_at_layer}" if acc.stopped_at_layer else "")
        + f"; critical path {acc.critical_path_s:.2f}s vs {acc.sum_latency_s:.2f}s sum of call latencies"
    )
    if acc.unknown_parameters:
        caption += f"; parameters unknown for {', '.join(acc.unknown_parameters)}"
    if acc.unknown_pricing:
        caption += f"; prices unknown for {', '.join(acc.unknown_pricing)}"
    table.caption = caption
    return table


def roles_text(trace: Trace) -> Text | None:
    """The proposers' roles (role-playing SMoA), numbered like the proposers."""
    if trace.roles is None:
        return None
    lines = [f"roles ({trace.roles_source}):"] + [f"  {i}. {role}" for i, role in enumerate(trace.roles, start=1)]
    return Text("\n".join(lines))


def trace_view(trace: Trace) -> RenderableType:
    """Everything ``moa-ray run`` shows under the answer: roles, layers, cost."""
    parts: list[RenderableType] = []
    if (roles := roles_text(trace)) is not None:
        parts.append(roles)
    parts += [layer_table(trace), accounting_table(trace)]
    return Group(*parts)


# --------------------------------------------------------------------------- what each call said

_STATUS_STYLE = {"ok": "green", "error": "red", "cut": "yellow"}


def call_title(record: CallRecord) -> str:
    """``layer 1 · proposer 2 · <label>``: proposers numbered from 1, as in the layer table's notes."""
    who = f"{record.role} {record.index + 1}" if record.role in ("proposer", "roles") else record.role
    return f"layer {record.layer} · {who} · {record.label or record.model}"


def call_facts(record: CallRecord) -> str:
    """Status, tokens, seconds, and what the judge or the call store made of it."""
    facts = [record.status, f"{record.prompt_tokens} prompt + {record.completion_tokens} completion tok", f"{record.latency_s:.2f}s"]
    if record.label and record.label != record.model:
        facts.append(record.model)
    if record.selected is not None:
        facts.append("kept by the judge" if record.selected else "dropped by the judge")
    if record.reused:
        facts.append("reused from the call store")
    return " · ".join(facts)


def call_view(record: CallRecord) -> Panel:
    """One call as a panel: its title, its text (a judge's or moderator's raw verdict too) or its error, its facts.

    Texts are shown as they are (never read as rich markup): a model may write ``[bold]``.
    """
    if record.status == "ok":
        body = Text(record.text) if record.text is not None else Text("(no text recorded)", style="dim")
    else:
        body = Text(record.error or record.status, style=_STATUS_STYLE[record.status])
    return Panel(
        body,
        title=Text(call_title(record), style="bold"),
        title_align="left",
        subtitle=Text(call_facts(record), style=_STATUS_STYLE.get(record.status, "")),
        subtitle_align="right",
        border_style=_STATUS_STYLE.get(record.status, "white"),
    )


def earlier_calls(trace: Trace) -> list[CallRecord]:
    """Every call but the final one (whose text is the answer): proposers, judges, moderators, rankers, roles."""
    final = trace.layers[-1].layer if trace.layers and trace.layers[-1].role == "aggregator" else None
    return [c for c in trace.calls if not (c.layer == final and c.role in ("aggregator", "proposer"))]


def calls_view(trace: Trace) -> RenderableType:
    """A panel per call before the final one, in the order they started (``moa-ray run --trace full``)."""
    return Group(*(call_view(c) for c in earlier_calls(trace)))
