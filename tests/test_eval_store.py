"""Parquet part files, resume planning and the generation handler (no Ray: the handler runs in-process)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_support import eval_config, simulator_config

from moa_ray.backends import create_backend
from moa_ray.config import parse_config
from moa_ray.errors import ConfigError
from moa_ray.eval.benchmarks.registry import load_dataset
from moa_ray.eval.datasets import EvalDataset, EvalPrompt
from moa_ray.eval.generate import GenerateHandler, WorkItem, export_alpaca_eval, pipeline_fingerprint, plan_generation
from moa_ray.eval.schema import GenerationRow
from moa_ray.eval.store import RowTable, StoreError, typed_row
from moa_ray.pipeline.agents import LocalAgent

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def row(
    prompt_id: str,
    pipeline: str = "p",
    turn: int = 1,
    *,
    status: str = "ok",
    attempt: int = 1,
    at: int = 0,
    output: str = "out",
    config_hash: str = "h",
) -> GenerationRow:
    return GenerationRow(
        run_id="r",
        prompt_id=prompt_id,
        pipeline=pipeline,
        turn=turn,
        dataset="d",
        instruction=f"q {prompt_id} {turn}",
        output=output if status == "ok" else None,
        status=status,
        error=None if status == "ok" else "boom",
        attempt=attempt,
        config_hash=config_hash,
        created_at=T0 + timedelta(seconds=at),
    )


def test_latest_prefers_first_ok_then_latest_error(tmp_path: Path) -> None:
    table = RowTable(str(tmp_path / "t"), GenerationRow)
    table.write_part([row("a", status="error", at=1), row("b", status="error", attempt=1, at=1)], "1")
    table.write_part([row("a", output="first", at=2), row("b", status="error", attempt=2, at=2)], "2")
    table.write_part([row("a", output="second", at=3)], "3")
    latest = table.latest()
    assert latest[("a", "p", 1)].output == "first"
    assert latest[("b", "p", 1)].attempt == 2
    assert table.done_keys() == {("a", "p", 1)}
    assert table.latest_records(["output"])[("a", "p", 1)]["output"] == "first"  # a projection: dicts of a few columns
    assert table.latest(without=("trace",)) == latest  # unread columns take their defaults


def test_latest_reads_an_older_version_s_table_with_the_defaults_of_its_missing_columns(tmp_path: Path) -> None:
    """A column an older version did not write reads as null: its field's default applies; a required one fails."""
    (tmp_path / "t").mkdir()
    old = GenerationRow.SCHEMA.remove(GenerationRow.SCHEMA.get_field_index("tflops"))
    stored = row("a", output="kept").model_dump()
    pq.write_table(pa.Table.from_pylist([stored], schema=old), tmp_path / "t" / "part-old.parquet")
    (got,) = RowTable(str(tmp_path / "t"), GenerationRow).latest().values()
    assert (got.output, got.tflops) == ("kept", None)
    # what a range's reader (file by file, no check of the non-nullable columns) may hand over: the default applies
    assert typed_row(GenerationRow, {**stored, "tokens_by_role": None, "tflops": None}, "t") == got
    with pytest.raises(StoreError, match="t holds a row that is not a GenerationRow"):
        typed_row(GenerationRow, {**stored, "instruction": None}, "t")


def test_compaction_leaves_one_row_per_key(tmp_path: Path) -> None:
    table = RowTable(str(tmp_path / "t"), GenerationRow)
    table.write_part([row("a", status="error", at=1), row("b", at=1)], "1")
    table.write_part([row("a", at=2), row("c", status="error", at=2)], "2")
    (tmp_path / "t" / ".tmp-killed-mid-write.parquet").write_bytes(b"torn")  # a killed writer's leftover
    assert len(table.read()) == 4  # hidden files are never read
    result = table.compact("run2")
    assert (result.files_before, result.files_after, result.rows_after) == (2, 1, 3)
    rows = table.read().to_pylist()
    assert sorted((r["prompt_id"], r["status"]) for r in rows) == [("a", "ok"), ("b", "ok"), ("c", "error")]
    # the output is plain Parquet: any reader sees the same rows
    assert pq.read_table(tmp_path / "t").num_rows == 3
    assert table.compact("run3").files_after == 1  # idempotent


def test_foreign_files_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "t" / "part-foreign.parquet")
    with pytest.raises(StoreError, match="do not match the GenerationRow schema"):
        RowTable(str(tmp_path / "t"), GenerationRow).latest()


def test_writer_flushes_each_batch_caps_rows_and_flushes_on_exit(tmp_path: Path) -> None:
    table = RowTable(str(tmp_path / "t"), GenerationRow)
    with table.writer("r", flush_rows=3) as writer:
        writer.add([row("a")])
        writer.add([row("b")])
        assert table.part_files() == []  # results that arrived together...
        writer.maybe_flush()
        assert len(table.part_files()) == 1  # ...land in one file, before the runner waits again
        writer.add([row(x) for x in "cdef"])
        assert len(table.part_files()) == 2  # the flush_rows cap writes a large batch at once
    assert len(table.part_files()) == 2 and writer.written == 6
    with table.writer("r2", flush_s=3600) as slow:
        slow.add([row("g")])
        slow.maybe_flush()
        assert len(table.part_files()) == 2  # batching for an hour
    assert len(table.part_files()) == 3


def test_file_uri(tmp_path: Path) -> None:
    table = RowTable(f"file://{tmp_path}/uri", GenerationRow)
    table.write_part([row("a")], "1")
    assert table.done_keys() == {("a", "p", 1)}


def test_plan_skips_done_retries_failed_and_resumes_turn_two() -> None:
    ds = EvalDataset(
        name="d",
        kind="file",
        prompts=[
            EvalPrompt(prompt_id="x", turns=["q1", "q2"]),
            EvalPrompt(prompt_id="y", turns=["q1", "q2"]),
            EvalPrompt(prompt_id="z", turns=["q"]),
        ],
    )
    latest = {
        r.row_key(): r.model_dump()
        for r in [
            row("x", turn=1, output="x-answer-1"),
            row("x", turn=2, status="error", attempt=2),
            row("y", turn=1),
            row("y", turn=2),
        ]
    }
    plan = plan_generation(ds, ["p"], latest, {"p": "h"})
    assert (plan.total_rows, plan.done_rows, plan.pending_rows) == (5, 3, 2)
    by_id = {i.prompt.prompt_id: i for i in plan.items}
    assert set(by_id) == {"x", "z"}
    assert by_id["x"].start_turn == 2 and by_id["x"].history == ["x-answer-1"] and by_id["x"].attempts == {2: 3}
    assert by_id["z"].start_turn == 1 and by_id["z"].attempts == {1: 1}


def test_plan_refuses_a_changed_config() -> None:
    ds = EvalDataset(name="d", kind="file", prompts=[EvalPrompt(prompt_id="x", turns=["q"])])
    latest = {r.row_key(): r.model_dump() for r in [row("x", config_hash="old")]}
    with pytest.raises(ConfigError, match="different settings"):
        plan_generation(ds, ["p"], latest, {"p": "new"})
    assert plan_generation(ds, ["p"], latest, {"p": "new"}, allow_config_change=True).pending_rows == 0


def test_fingerprint_ignores_endpoints_but_not_sampling() -> None:
    a = parse_config(eval_config("http://127.0.0.1:1/v1"))
    b = parse_config(eval_config("http://10.0.0.1:2/v1"))
    assert pipeline_fingerprint(a, "one") == pipeline_fingerprint(b, "one")
    cfg = eval_config("http://127.0.0.1:1/v1")
    cfg["models"]["agg"]["temperature"] = 0.1
    assert pipeline_fingerprint(parse_config(cfg), "one") != pipeline_fingerprint(a, "one")


def test_handler_asks_turn_two_with_its_own_turn_one_answer(simulator) -> None:
    sim = simulator(simulator_config())
    config = parse_config(eval_config(sim.base_url))
    agents = {name: LocalAgent(create_backend(config.models[name])) for name in ("a", "agg", "broken")}
    handler = GenerateHandler(config, agents, ["one", "bad"], "run", {"one": "h1", "bad": "h2"})
    prompt = load_dataset("mt_bench").by_id()["mt-111"]  # math: carries reference answers

    async def run() -> tuple[list, list]:  # one event loop: the backends' HTTP clients live in it
        await handler.setup()
        ok = await handler.handle(WorkItem(prompt=prompt, pipeline="one", dataset="mt_bench", attempts={1: 1, 2: 1}))
        return ok, await handler.handle(WorkItem(prompt=prompt, pipeline="bad", dataset="mt_bench"))

    rows, failed = asyncio.run(run())
    assert [(r.turn, r.status) for r in rows] == [(1, "ok"), (2, "ok")]
    assert rows[0].reference and rows[1].reference and rows[0].category == "math"
    words = lambda s: len(s.split())  # noqa: E731 - the simulator counts words as tokens
    proposer = lambda r: next(t for t in r.tokens_by_role if t.role == "proposer")  # noqa: E731
    assert proposer(rows[0]).prompt_tokens == words(prompt.turns[0])
    assert proposer(rows[1]).prompt_tokens == words(prompt.turns[0]) + words(rows[0].output) + words(prompt.turns[1])
    trace = json.loads(rows[1].trace)
    assert trace["pipeline"] == "one" and len(trace["calls"]) == 2

    assert len(failed) == 1 and failed[0].status == "error" and "aggregator" in failed[0].error
    assert failed[0].prompt_tokens > 0  # the partial trace is kept
    assert handler.failed(WorkItem(prompt=prompt, pipeline="one", dataset="mt_bench", start_turn=2, history=["x"]), "lost")[0].turn == 2


def test_export_alpaca_eval(tmp_path: Path) -> None:
    ds = load_dataset("alpaca_eval", limit=3)
    table = RowTable(str(tmp_path / "gen"), GenerationRow)
    ids = [p.prompt_id for p in ds.prompts]
    table.write_part([row(ids[0], "p1", output="o1"), row(ids[1], "p1", status="error"), row(ids[0], "p2", output="o2")], "1")
    written = export_alpaca_eval(str(tmp_path / "gen"), ds, ["p1", "p2"], str(tmp_path / "model_outputs.json"))
    assert written == {str(tmp_path / "model_outputs-p1.json"): 1, str(tmp_path / "model_outputs-p2.json"): 1}
    records = json.loads((tmp_path / "model_outputs-p1.json").read_text())
    assert records == [{"instruction": ds.prompts[0].turns[0], "output": "o1", "generator": "p1", "dataset": "helpful_base"}]


def test_trace_columns_take_cost_and_tflops_from_the_accounting_totals() -> None:
    from moa_ray.eval.generate import trace_columns
    from moa_ray.pipeline.accounting import Accounting, CostBucket
    from moa_ray.pipeline.trace import CallRecord, LayerRecord, Trace

    trace = Trace(
        pipeline="p",
        kind="moa",
        layers=[LayerRecord(layer=1, role="proposer")],
        calls=[CallRecord(layer=1, role="proposer", model="a", prompt_tokens=3, completion_tokens=4, latency_s=0.5)],
    )
    cols = trace_columns(trace)
    assert (cols["cost_usd"], cols["tflops"]) == (None, None)  # no accounting: unknown, not zero
    assert cols["tokens_by_role"][0].model_dump() == {"role": "proposer", "prompt_tokens": 3, "completion_tokens": 4, "calls": 1}
    assert cols["critical_path_s"] == 0.5 and json.loads(cols["trace"])["tokens"]["total_tokens"] == 7
    trace.accounting = Accounting(totals=CostBucket(cost_usd=0.25, tflops=None))
    assert (trace_columns(trace)["cost_usd"], trace_columns(trace)["tflops"]) == (0.25, None)  # unknown stays unknown
    trace.accounting = Accounting(totals=CostBucket(cost_usd=1.0, tflops=2.5))
    assert (trace_columns(trace)["cost_usd"], trace_columns(trace)["tflops"]) == (1.0, 2.5)
    assert trace_columns(None) == {}


ANSWER_CONFIG = {
    "models": {
        "smol": {"backend": "llamacpp", "model": "x.gguf", "seed": -1, "n_ctx": 4096, "n_threads": 2},
        "big": {"backend": "vllm", "model": "org/big", "dtype": "auto", "max_model_len": 4096},
    },
    "pipelines": {"p": {"kind": "moa", "layers": [["smol", {"model": "big", "top_p": 0.9}]], "aggregator": "big"}},
}


def _changed(path: list, value) -> dict:
    import copy

    cfg = copy.deepcopy(ANSWER_CONFIG)
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return cfg


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["models", "smol", "seed"], 7),
        (["models", "smol", "chat_format"], "chatml"),
        (["models", "smol", "n_ctx"], 2048),
        (["models", "big", "dtype"], "float32"),
        (["models", "big", "max_model_len"], 2048),
        (["models", "big", "enable_prefix_caching"], False),
        (["pipelines", "p", "aggregator"], {"model": "big", "system": "Be brief."}),
        (["pipelines", "p", "layers"], [["smol", {"model": "big", "top_p": 0.5}]]),
    ],
)
def test_every_answer_setting_is_in_the_fingerprint(path, value) -> None:
    """Derived from the specs: any field not declared operational counts (issue: seed, chat_format, dtype...)."""
    assert pipeline_fingerprint(parse_config(_changed(path, value)), "p") != pipeline_fingerprint(parse_config(ANSWER_CONFIG), "p")


@pytest.mark.parametrize(
    ("path", "value"),
    [(["models", "smol", "n_threads"], 1), (["models", "big", "num_replicas"], 3), (["models", "big", "gpu_memory_utilization"], 0.5)],
)
def test_operational_settings_are_not(path, value) -> None:
    assert pipeline_fingerprint(parse_config(_changed(path, value)), "p") == pipeline_fingerprint(parse_config(ANSWER_CONFIG), "p")


def test_a_refused_resume_names_the_setting_that_changed(tmp_path) -> None:
    from moa_ray.eval.generate import answer_settings, load_settings, save_settings, settings_fingerprint

    old = parse_config(ANSWER_CONFIG)
    new = parse_config(_changed(["models", "smol", "seed"], 7))
    out = str(tmp_path / "run")
    save_settings(out, {"p": answer_settings(old, "p")})
    ds = load_dataset("alpaca_eval", limit=1)
    latest = {r.row_key(): r.model_dump() for r in [row(ds.prompts[0].prompt_id, pipeline="p", config_hash=pipeline_fingerprint(old, "p"))]}
    settings = {"p": answer_settings(new, "p")}
    with pytest.raises(ConfigError, match=r"models\.smol\.seed: -1 -> 7"):
        plan_generation(
            ds,
            ["p"],
            latest,
            {"p": settings_fingerprint(settings["p"])},
            settings=settings,
            stored_settings=lambda fp: load_settings(out, fp),
        )
