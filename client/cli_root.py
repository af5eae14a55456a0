"""The `roost` group's click classes: usage errors in one line, Ctrl-C as exit 130.

Apart from client.cli_common (the person-side commands' plumbing, which brings
the SDK's core, the client config and uuid): `roost serve` imports only this,
click and client.output, ~1 MB less of a serving broker's memory (issue 16: RSS
before the first client). client.cli_common re-exports these names.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from client.output import EXIT_INTERRUPTED, EXIT_USAGE, CliError

# ---- one-line usage errors -------------------------------------------------------------

class OneLineUsageError(click.UsageError):
    """A usage error shown as one line (click's default is usage + hint + message)."""

    exit_code = EXIT_USAGE

    def __init__(self, error: click.UsageError) -> None:
        super().__init__(error.format_message(), error.ctx)

    def show(self, file: Any = None) -> None:
        path = self.ctx.command_path if self.ctx is not None else "roost"
        CliError(f"{self.format_message().rstrip('.')} (see `{path} --help`)", EXIT_USAGE).show(file)


def _one_line(error: click.UsageError) -> click.UsageError:
    no_args_help = getattr(click.exceptions, "NoArgsIsHelpError", ())
    if isinstance(error, OneLineUsageError) or (no_args_help and isinstance(error, no_args_help)):
        return error
    return OneLineUsageError(error)


class OneLineCommand(click.Command):
    def make_context(self, *args: Any, **kw: Any) -> click.Context:
        try:
            return super().make_context(*args, **kw)
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise _one_line(e) from None


class OneLineGroup(click.Group):
    command_class = OneLineCommand

    def make_context(self, *args: Any, **kw: Any) -> click.Context:
        try:
            return super().make_context(*args, **kw)
        except click.UsageError as e:
            raise _one_line(e) from None

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            raise _one_line(e) from None


class RootGroup(OneLineGroup):
    """The `roost` group itself: every usage error below it (admin commands, `roost
    nosuch`, `roost user nosuch`) is one line too, and Ctrl-C in a command that does
    not handle it (admin commands, prompts) exits 130 instead of click's "Aborted!" 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise _one_line(e) from None
        except CliError:
            raise
        except click.ClickException as e:   # click's own "Error: ..." form: ours instead
            raise CliError(e.format_message(), e.exit_code) from None
        except KeyboardInterrupt:
            if _isatty(sys.stderr):
                click.echo(file=sys.stderr)   # end the terminal's `^C` echo first
            raise CliError("interrupted", EXIT_INTERRUPTED) from None
        except click.Abort:   # a prompt interrupted (click already ended the line)
            raise CliError("interrupted", EXIT_INTERRUPTED) from None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
