"""`job validate`: the resolved spec, secrets masked, or every problem with its dotted path."""

from __future__ import annotations

import os

import click
import yaml

from job.cli.common import exits, resolve_spec, set_option, setup_log, spec_option


@click.command()
@spec_option
@set_option
def validate(spec_arg: str | None, sets: tuple[str, ...]) -> None:
    """Print the resolved spec (secrets masked); exit 0 if valid, 2 if not."""
    environ = dict(os.environ)
    setup_log(environ)
    with exits():
        spec = resolve_spec(spec_arg, sets, environ)
    click.echo(yaml.safe_dump(spec.masked(), sort_keys=False), nl=False)
