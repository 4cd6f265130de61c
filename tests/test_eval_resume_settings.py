"""Resuming an output written by an older moa-ray: a setting added since, at its default, is no change; one the
user set is still refused, by name."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from moa_ray.config import parse_config
from moa_ray.errors import ConfigError
from moa_ray.eval.benchmarks.registry import answer_temperature, load_dataset
from moa_ray.eval.generate import load_settings, plan_generation, run_settings, save_settings, settings_fingerprint
from moa_ray.eval.schema import GenerationRow

CONFIG: dict[str, Any] = {
    "models": {"m": {"backend": "openai", "model": "x", "base_url": "http://127.0.0.1:9/v1", "temperature": 0.9}},
    "pipelines": {"p": {"kind": "moa", "layers": [["m", "m"]], "aggregator": "m"}},
}
# settings this test pretends an older moa-ray did not have: a layer's and a model's, both at their defaults
ADDED_LAYER_SETTING, ADDED_MODEL_SETTING = "straggler_wait_s", "max_tokens"


def _older_output(out: Path) -> dict[tuple[Any, ...], dict[str, Any]]:
    """An output whose stored settings lack the two added settings, with one answered row under their fingerprint."""
    chosen = run_settings(parse_config(CONFIG), ["p"], answer_temperature("alpaca_eval"))
    older = copy.deepcopy(chosen.settings["p"])
    for layer in older["pipeline"]["layers"]:
        del layer[ADDED_LAYER_SETTING]
    del older["models"]["m"][ADDED_MODEL_SETTING]
    save_settings(str(out), {"p": older})
    pid = load_dataset("alpaca_eval", limit=1).prompts[0].prompt_id
    row = GenerationRow(
        run_id="r",
        prompt_id=pid,
        pipeline="p",
        turn=1,
        dataset="alpaca_eval",
        instruction="q",
        output="o",
        config_hash=settings_fingerprint(older),
    )
    return {(pid, "p", 1): row.model_dump()}


def _plan(out: Path, latest: dict[tuple[Any, ...], dict[str, Any]], config: dict[str, Any]) -> Any:
    chosen = run_settings(parse_config(config), ["p"], answer_temperature("alpaca_eval"))
    return plan_generation(
        load_dataset("alpaca_eval", limit=2),
        ["p"],
        latest,
        chosen.fingerprints,
        settings=chosen.settings,
        stored_settings=lambda fp: load_settings(str(out), fp),
        base_fingerprints=chosen.base_fingerprints,
        explicit=chosen.explicit,
    )


def test_settings_added_since_at_their_defaults_do_not_stop_a_resume(tmp_path: Path) -> None:
    latest = _older_output(tmp_path)
    plan = _plan(tmp_path, latest, CONFIG)
    assert (plan.done_rows, plan.pending_rows) == (1, 1)


@pytest.mark.parametrize(
    "change, named",
    [
        (
            {"pipelines": {"p": {**CONFIG["pipelines"]["p"], "layers": [{"proposers": ["m", "m"], ADDED_LAYER_SETTING: 5}]}}},
            f"pipeline.layers[0].{ADDED_LAYER_SETTING}",
        ),
        ({"models": {"m": {**CONFIG["models"]["m"], ADDED_MODEL_SETTING: 100}}}, f"models.m.{ADDED_MODEL_SETTING}"),
        ({"models": {"m": {**CONFIG["models"]["m"], "temperature": 0.1}}}, "models.m.temperature: 0.9 -> 0.1"),
    ],
)
def test_an_added_setting_the_user_set_or_a_changed_one_is_still_refused(tmp_path: Path, change: dict[str, Any], named: str) -> None:
    latest = _older_output(tmp_path)
    with pytest.raises(ConfigError, match="different settings") as err:
        _plan(tmp_path, latest, {**CONFIG, **change})
    assert named in str(err.value)
