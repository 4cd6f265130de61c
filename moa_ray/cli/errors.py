"""The commands' exit policy: a moa-ray error is one clear line on stderr and an exit code, never a traceback.

Exit codes: 0 done, 1 a run failed, 2 bad input (a config, an option, a missing extra), 3 an eval run that left
rows failed or missing (rerun the same command to retry them).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click
from rich.markup import escape

from moa_ray.backends.registry import missing_module_message
from moa_ray.cli.render import err_console
from moa_ray.errors import ConfigError, MoARayError

EXIT_PARTIAL = 3


def run_reporting_errors(invoke: Callable[[], Any]) -> Any:
    """Run a click command, turning moa-ray errors into one clear line: exit 2 for bad input, 1 for a failed run."""
    try:
        return invoke()
    except ModuleNotFoundError as err:
        message = missing_module_message(err.name or "")
        if message is None:
            raise
        err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
        sys.exit(2)
    except ConfigError as err:
        err_console.print(f"[red]config error:[/red] {escape(str(err))}", highlight=False)
        sys.exit(2)
    except MoARayError as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        sys.exit(1)


class ReportingCommand(click.Command):
    """A command that reports moa-ray errors by :func:`run_reporting_errors`, also when run on its own, outside the
    ``moa-ray`` group (``python -m jobs.generate``)."""

    def invoke(self, ctx: click.Context) -> Any:
        return run_reporting_errors(lambda: super(ReportingCommand, self).invoke(ctx))


class ReportingGroup(ReportingCommand, click.Group):
    """A group whose subcommands' moa-ray errors are reported by :func:`run_reporting_errors`."""
