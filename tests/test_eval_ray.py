"""Eval on Ray: the worker pool's actors calling agents (one of them a Serve deployment; models are simulated),
a failed start, routing, and a failed deploy. The same generate -> judge -> report logic without Ray, in
every mode, is test_eval_end_to_end.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_support import flaky_eval_config, flaky_simulator_config, generate_options, judge_options

from bench.simulator import run_simulator
from moa_ray.eval.benchmarks.mt_bench import single_table
from moa_ray.eval.benchmarks.registry import load_dataset
from moa_ray.eval.generate import run_generation
from moa_ray.eval.judging import read_generations, read_report_answers, run_judging
from moa_ray.eval.report import build_report
from moa_ray.serve.deploy import deploy_models

pytestmark = pytest.mark.ray
APP = "t-eval"


@pytest.fixture(scope="module")
def env(ray_session):
    from ray import serve

    with run_simulator(flaky_simulator_config()) as sim:
        config = flaky_eval_config(sim.base_url, agg="deployment")
        agents = deploy_models(config, list(config.models), app_name=APP)
        yield config, agents, sim
        serve.delete(APP)


def test_generate_judge_and_report_on_ray_actors(env, tmp_path: Path) -> None:
    """The smoke test: items sharded over two actors, which call an in-process agent and a Serve handle."""
    from moa_ray.pipeline.agents import InProcessAgent
    from moa_ray.serve.handle import HandleAgent

    config, agents, sim = env
    assert isinstance(agents["agg"], HandleAgent) and isinstance(agents["a"], InProcessAgent)
    gen, judged = tmp_path / "gen", tmp_path / "judged"
    before = sim.stats.by_model.get("sim-agg", 0)
    summary = run_generation(config, load_dataset("mt_bench", limit=2), agents, generate_options(gen, ["one", "two"], pool="ray"))
    assert (summary.total_rows, summary.ok_rows, summary.failed_rows, summary.workers) == (8, 8, 0, 2)
    assert sim.stats.by_model["sim-agg"] - before == 8  # every answer's aggregator went through the deployment
    gens = read_generations(str(gen))
    graded = run_judging(gens, agents["grader"], judge_options(gen, judged, "grader", "single", pool="ray"))
    assert (graded.single_items, graded.failed_rows) == (8, 0)
    grades = single_table(str(judged)).read().to_pylist()
    rows = {r.pipeline: r for r in build_report(read_report_answers(str(gen)), [], grades)}
    assert {name: r.mt_bench for name, r in rows.items()} == {"one": 7.0, "two": 7.0}


def test_routed_items_with_one_key_go_to_one_actor(ray_session) -> None:
    from moa_ray.chat import ChatMessage
    from moa_ray.eval.runner import WorkerPool, route_index

    class WhoAmI:  # defined here so that cloudpickle ships it by value to the actors
        async def setup(self) -> None:
            import uuid

            self.actor = uuid.uuid4().hex

        async def handle(self, item):
            return [{"key": item.content, "actor": self.actor}]

        def failed(self, item, error):  # pragma: no cover - never reached
            return []

    items = [ChatMessage(role="user", content=f"prompt-{i % 6}") for i in range(24)]
    actor_of: dict[str, set[str]] = {}
    with WorkerPool(WhoAmI(), concurrency=8, workers=3, worker_cpus=0.01) as pool:
        stats = pool.run(
            items, lambda item, rows: actor_of.setdefault(rows[0]["key"], set()).add(rows[0]["actor"]), route=lambda m: m.content
        )
    assert stats.items == 24 and all(len(actors) == 1 for actors in actor_of.values())  # a key never moves
    slots = {key: route_index(key, 3) for key in actor_of}
    for a in actor_of:  # keys share an actor exactly when they hash to the same slot
        for b in actor_of:
            assert (actor_of[a] == actor_of[b]) == (slots[a] == slots[b])


def test_a_failed_pool_start_leaves_no_actor_alive(ray_session) -> None:
    import ray

    from moa_ray.eval.runner import WorkerPool

    class SetupFails:  # defined here so that cloudpickle ships it by value to the actors
        """A handler whose per-actor setup raises (a pipeline that cannot be built on the workers)."""

        async def setup(self) -> None:
            raise RuntimeError("setup failed on purpose")

        async def handle(self, item):  # pragma: no cover - never reached
            return []

        def failed(self, item, error):  # pragma: no cover
            return []

    pool = WorkerPool(SetupFails(), concurrency=2, workers=2, worker_cpus=0.01)
    started: list = []
    shutdown = pool.shutdown
    pool.shutdown = lambda: (started.extend(pool.actors), shutdown())  # type: ignore[method-assign]
    with pytest.raises(ray.exceptions.RayTaskError, match="setup failed on purpose"):
        pool.start()
    assert len(started) == 2 and pool.actors == []
    for actor in started:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.ready.remote(), timeout=60)


def test_a_deploy_that_fails_leaves_no_serve_app(ray_session, tmp_path: Path) -> None:
    """A replica that cannot start (here: a model file that is not there) fails the run and takes its app along."""
    import yaml
    from click.testing import CliRunner
    from ray import serve

    from moa_ray.cli import main

    config = {
        "models": {"gone": {"backend": "llamacpp", "model": str(tmp_path / "missing.gguf"), "num_cpus": 0.01}},
        "pipelines": {"p": {"kind": "single", "model": "gone"}},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    app = "t-eval-fails"
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "generate",
            "--config",
            str(path),
            "--pipeline",
            "p",
            "--dataset",
            "alpaca_eval",
            "--limit",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--app-name",
            app,
            "--no-progress",
        ],
    )
    assert result.exit_code != 0
    assert app not in serve.status().applications
