"""`job plan`: memory, speed and cost of a spec on each GPU kind, before a GPU is rented."""

from __future__ import annotations

import click


@click.command()
def plan() -> None:
    """Predict peak memory, tokens/s, wall time and cost of a run spec on each GPU kind."""
    raise click.ClickException("not built yet")
