"""The options several commands share, defined once: the same flag, type and default wherever it appears.

Where a command needs its own words for one (``--address`` joins a cluster for ``run``, deploys on one for
``serve``), it passes its help text; the rest stays the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None, help="YAML config (default: shipped presets)."
)

max_tokens_option = click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Cap the final answer's tokens.")


def address_option(help: str = "Ray cluster to join (default: RAY_ADDRESS, else a local Ray).") -> Callable[[F], F]:
    """``--address``: the Ray cluster a command joins (None: RAY_ADDRESS, else a local Ray)."""
    return click.option("--address", default=None, help=help)


def timeout_option(help: str) -> Callable[[F], F]:
    """``--timeout`` (as ``timeout_s``): the seconds an answer may take, every call and retry included."""
    return click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True, help=help)


def app_name_option(default: str, help: str | None = None) -> Callable[[F], F]:
    """``--app-name``: the Ray Serve application a command deploys."""
    return click.option("--app-name", default=default, show_default=True, help=help)


def json_option(help: str) -> Callable[[F], F]:
    """``--json`` (as ``as_json``): print JSON instead of tables."""
    return click.option("--json", "as_json", is_flag=True, help=help)
