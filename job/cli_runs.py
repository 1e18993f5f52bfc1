"""`job preview` (data as training sees it) and `job runs` (the runs under an output location)."""

from __future__ import annotations

import click


@click.command()
def preview() -> None:
    """Show the first rows as training sees them, with the tokens that carry loss marked."""
    raise click.ClickException("not built yet")


@click.group()
def runs() -> None:
    """List and show runs under an output location."""
