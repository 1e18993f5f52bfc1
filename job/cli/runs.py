"""`job runs list|show`: the runs under an output location, local or s3:// (thin commands over job.runs)."""

from __future__ import annotations

import json

import click

from job import errors
from job import runs as runs_lib
from job.cli.common import exits, json_option
from job.storage import S3Settings


@click.group()
def runs() -> None:
    """List and show runs under an output location (a local path or s3://bucket/prefix)."""


@runs.command(name="list")
@click.argument("location")
@json_option
def list_command(location: str, as_json: bool) -> None:
    """One row per run under LOCATION: status, base model, hyper-parameters, steps, losses, artifacts.

    complete: manifest.json present; incomplete: no manifest (checkpoints only); failed: failure.json present.
    S3 endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL_S3, …).
    """
    with exits():
        if runs_lib.is_run_folder(location, S3Settings()):
            raise errors.UsageError(f"{location} is one run's folder, not an output that holds runs",
                                    hint=f"`job runs show {location.rstrip('/')}` describes it; `job runs list` "
                                         "takes the run.output the runs were published to")
        found = runs_lib.list_runs(location, S3Settings())
    if as_json:
        click.echo(runs_lib.as_json(found))
    elif found:
        click.echo(runs_lib.table(found))
    else:
        click.echo(f"no runs under {location}", err=True)


@runs.command(name="show")
@click.argument("run_uri", metavar="LOCATION/RUN_ID | LOCATION RUN_ID")
@click.argument("run_id", required=False)
@json_option
def show_command(run_uri: str, run_id: str | None, as_json: bool) -> None:
    """One run's manifest summary and probe answers (or its failure record and checkpoints)."""
    location, run_id = (run_uri, run_id) if run_id else runs_lib.split_run_uri(run_uri)
    if not location or not run_id or location == "s3:/":
        raise click.UsageError("name the run as LOCATION/RUN_ID or LOCATION RUN_ID, e.g. s3://bucket/runs/my-run")
    with exits():
        run = runs_lib.find_run(location, run_id, S3Settings())
    if as_json:
        click.echo(json.dumps(run.as_dict(), indent=2))
    else:
        click.echo(runs_lib.describe(run))
