"""The call store of an evaluation: every call's text kept beside the answers, and reused by later pipelines and runs.

``eval generate`` writes one :class:`~moa_ray.eval.schema.CallRow` per call into ``<out>/_calls/`` (a table
Parquet readers skip as hidden, under the run's writer lease, written before the answers it made). A later run
(or ``--calls-from DIR``) hands each work item the stored calls of its prompt, and the pipelines answer any
identical call from them (:mod:`moa_ray.pipeline.reuse`): a rerun makes no call it made before, and a new
pipeline pays only for its new calls.

The original MoA code's round files (AlpacaEval ``model_outputs.json`` of each reference model) can be
imported as layer-1 answers (``--references-from``): each record stands for the layer-1 call of the proposer
whose model id is its ``generator`` on its instruction, so the paper's published round-1 outputs are reused.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow.compute as pc

from moa_ray.chat import ChatMessage
from moa_ray.config import MoARayConfig, ProposerSpec
from moa_ray.errors import ConfigError
from moa_ray.eval.datasets import read_rows
from moa_ray.eval.schema import CallRow, GenerationRow
from moa_ray.eval.store import RowTable, join, resolve_latest
from moa_ray.pipeline.base import call_params
from moa_ray.pipeline.reuse import StoredCall, call_key
from moa_ray.pipeline.trace import Trace
from moa_ray.prompts import with_role

#: The call table's folder inside a generations directory ("_": Parquet readers skip it).
CALLS_DIR = "_calls"
#: The columns a planner reads to hand items their stored calls (never the trace, never the instruction).
LOOKUP_COLUMNS = ["prompt_id", "key", "text", "prompt_tokens", "completion_tokens", "finish_reason", "source"]
#: A generator name's suffix in the original MoA code's outputs (``model + "-together"``).
_MOA_SUFFIXES = ("-together",)


def calls_table(generations: str) -> RowTable[CallRow]:
    """The call table of a generations directory (or of a directory that holds only a call table)."""
    return RowTable(join(generations.rstrip("/"), CALLS_DIR), CallRow)


def call_rows(trace: Trace, base: Mapping[str, Any]) -> list[CallRow]:
    """One row per call of ``trace``; ``base``: the columns of the answer (run, prompt, pipeline, turn, attempt)."""
    costs = trace.accounting.calls if trace.accounting is not None else []
    rows = []
    for i, call in enumerate(trace.calls):
        cost = costs[i] if i < len(costs) else None
        rows.append(
            CallRow(
                **base,
                status="ok" if call.status == "ok" else "error",
                error=call.error if call.status != "ok" else None,
                layer=call.layer,
                index=call.index,
                role=call.role,
                model=call.model,
                label=call.label,
                key=call.key,
                text=call.text,
                prompt_tokens=call.prompt_tokens,
                completion_tokens=call.completion_tokens,
                latency_s=call.latency_s,
                cost_usd=None if cost is None else cost.saved_cost_usd if call.reused else cost.cost_usd,
                finish_reason=call.finish_reason,
                selected=call.selected,
                reused=call.reused,
                source=call.reused_from or "model",
            )
        )
    return rows


def stored_calls(directories: Iterable[str], prompt_ids: set[str]) -> dict[str, list[StoredCall]]:
    """Per prompt id: the distinct answered calls stored in these call tables (missing tables hold none).

    Only the planner's columns are read, a batch at a time; the calls of other prompts are dropped as they are read,
    so a resume of a large run holds only the calls of the prompts it still has to answer.
    """
    out: dict[str, dict[str, StoredCall]] = defaultdict(dict)
    for directory in directories:
        for batch in calls_table(directory).batches([*LOOKUP_COLUMNS, "status"], batch_rows=16_384):  # a batch at a time
            for row in batch.to_pylist():
                if row["status"] != "ok" or row["key"] is None or row["text"] is None or row["prompt_id"] not in prompt_ids:
                    continue
                out[row["prompt_id"]].setdefault(
                    row["key"],
                    StoredCall(
                        key=row["key"],
                        text=row["text"],
                        prompt_tokens=row["prompt_tokens"],
                        completion_tokens=row["completion_tokens"],
                        finish_reason=row["finish_reason"],
                        source="references" if row["source"] == "references" else "store",
                    ),
                )
    return {pid: list(calls.values()) for pid, calls in out.items()}


# --------------------------------------------------------------------------- the original MoA's round files


def _model_for_generator(config: MoARayConfig, generator: str) -> str | None:
    """The config model a round file's ``generator`` names: a config model name, or a provider model id."""
    if generator in config.models:
        return generator
    names = {generator, *(generator.removesuffix(s) for s in _MOA_SUFFIXES)}
    found = [name for name, spec in config.models.items() if spec.model in names]
    return found[0] if found else None


def layer_one_proposers(config: MoARayConfig, pipelines: Iterable[str]) -> dict[str, list[ProposerSpec]]:
    """Per model: the distinct layer-1 proposers of these pipelines that call it."""
    out: dict[str, list[ProposerSpec]] = defaultdict(list)
    for name in pipelines:
        spec = config.pipeline(name)
        layers = spec.resolved_layers() if hasattr(spec, "resolved_layers") else []
        for proposer in layers[0].proposers if layers else []:
            if proposer not in out[proposer.model]:
                out[proposer.model].append(proposer)
    return out


def reference_calls(config: MoARayConfig, pipelines: list[str], paths: Iterable[str]) -> dict[str, list[StoredCall]]:
    """Per instruction: the layer-1 calls that the records of these round files stand for.

    Each record's ``generator`` must name a model of the config (its name or provider id, with or without the
    original code's ``-together`` suffix) that some pipeline's layer 1 calls; its ``output`` answers that
    proposer's call on the record's ``instruction`` as the first user turn.
    """
    proposers = layer_one_proposers(config, pipelines)
    out: dict[str, list[StoredCall]] = defaultdict(list)
    for path in paths:
        records = read_rows(path)
        for i, record in enumerate(records):
            if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) or not isinstance(record.get("output"), str):
                raise ConfigError(f"{path}: record {i} needs string 'instruction' and 'output' fields (AlpacaEval model_outputs format)")
            generator = str(record.get("generator", ""))
            model = _model_for_generator(config, generator)
            if model is None or model not in proposers:
                known = ", ".join(sorted(f"{n} ({config.models[n].model})" for n in proposers)) or "none"
                raise ConfigError(
                    f"{path}: record {i}'s generator {generator!r} is no layer-1 model of {', '.join(pipelines)} (layer-1 models: {known})"
                )
            messages = [ChatMessage(role="user", content=record["instruction"])]
            for proposer in proposers[model]:
                key = call_key(config.models[model], with_role(messages, proposer.system), call_params(proposer))
                out[record["instruction"]].append(StoredCall(key=key, text=record["output"], source="references"))
    return dict(out)


# --------------------------------------------------------------------------- proposers as entries of their own


PROPOSER_PREFIX = "proposer:"
#: What an entry takes from its proposer's call, and from the answer of the prompt's first turn.
ENTRY_CALL_COLUMNS = ("label", "key", "text", "finish_reason", "prompt_tokens", "completion_tokens", "latency_s", "cost_usd")
ENTRY_ANSWER_COLUMNS = ("dataset", "category", "instruction", "reference", "reference_generator")


def proposer_entries(generations: str, run_id: str) -> list[GenerationRow]:
    """Generation rows that make each stored layer-1 answer an entry of its own (``proposer:<label>``), so
    ``eval judge`` and ``eval report`` put every proposer beside the pipelines it fed, without a new call.

    First turns only (a later turn's proposers saw the pipeline's own history). A proposer that several
    pipelines share is one entry; proposers of one model with the same label but other settings (a system
    role) are told apart as ``#2``, ``#3`` in the order of their pipelines and positions.
    """
    # Parquet reads only the first turns' layer-1 proposer calls (key columns: the filter keeps whole keys, so each
    # key's standing row is among them) and, of the answers, the first turns that have some: a run without
    # proposers (single models) reads none, and no answer's text is read.
    table = calls_table(generations)
    first_proposers = (pc.field("layer") == 1) & (pc.field("role") == "proposer") & (pc.field("turn") == 1)
    found = table.read_where(first_proposers, [*ENTRY_CALL_COLUMNS])
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in resolve_latest(found.to_pylist(), table.key, table.row_type.RESOLVE).values():
        if row["status"] == "ok" and row["text"] is not None:
            by_prompt[row["prompt_id"]].append(row)
    del found
    if not by_prompt:
        return []
    generated = RowTable(generations, GenerationRow)
    first_turns_of = (pc.field("turn") == 1) & pc.field("prompt_id").isin(sorted(by_prompt))
    answers = resolve_latest(generated.read_where(first_turns_of, [*ENTRY_ANSWER_COLUMNS]).to_pylist(), generated.key)
    names: dict[tuple[str, int, str], str] = {}  # (pipeline, index, label) -> entry name, fixed where first needed
    used: dict[str, int] = defaultdict(int)
    entries: dict[tuple[str, str], GenerationRow] = {}
    first_turns = {pid: r for (pid, p, t), r in answers.items() if t == 1 and not p.startswith(PROPOSER_PREFIX)}
    for prompt_id, rows in sorted(by_prompt.items()):
        base = first_turns.get(prompt_id)
        if base is None:
            continue
        seen: set[str] = set()  # call keys of this prompt already made an entry
        for row in sorted(rows, key=lambda r: (r["pipeline"], r["index"])):
            slot = (row["pipeline"], row["index"], row["label"])
            key = row["key"] or "/".join(map(str, slot))
            if key in seen:
                continue
            seen.add(key)
            if slot not in names:
                used[row["label"]] += 1
                n = used[row["label"]]
                names[slot] = f"{PROPOSER_PREFIX}{row['label']}" + (f"#{n}" if n > 1 else "")
            name = names[slot]
            if (prompt_id, name) in entries:
                continue
            entries[(prompt_id, name)] = GenerationRow(
                run_id=run_id,
                prompt_id=prompt_id,
                pipeline=name,
                turn=1,
                dataset=base["dataset"],
                category=base["category"],
                instruction=base["instruction"],
                reference=base["reference"],
                reference_generator=base["reference_generator"],
                output=row["text"],
                finish_reason=row["finish_reason"],
                config_hash=(row["key"] or "")[:16] or "proposer",
                prompt_tokens=row["prompt_tokens"],
                completion_tokens=row["completion_tokens"],
                calls=1,
                latency_s=row["latency_s"],
                cost_usd=row["cost_usd"],
            )
    return list(entries.values())
