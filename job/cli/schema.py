"""`job schema`: the run spec's JSON Schema."""

from __future__ import annotations

import json

import click

from job import spec as specs


@click.command()
def schema() -> None:
    """Print the run spec's JSON Schema."""
    click.echo(json.dumps(specs.json_schema(), indent=2))
