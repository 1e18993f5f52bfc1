"""`job exit-codes`: errors.EXIT_CODES, the one table of exit codes."""

from __future__ import annotations

import click

from job import errors


@click.command(name="exit-codes")
def exit_codes() -> None:
    """Print the table of exit codes (Markdown), with what Kubernetes does with each."""
    click.echo(errors.exit_code_table())
