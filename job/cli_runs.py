"""`job preview` (data as training sees it), `job runs` (the runs under an output location) and `job verify` (a
published run's artifacts, checked again).

Thin commands over job.preview, job.runs and job.verify. job.cli is imported inside the commands: it imports this module
to register them, so a module-level import would be circular.
"""

from __future__ import annotations

import json
import os
import sys

import click

from job import errors
from job.storage import S3Settings


def _usage_failure(exc: errors.JobError) -> click.ClickException:
    failure = click.ClickException(str(exc))
    failure.exit_code = exc.exit_code
    return failure


@click.command()
@click.option("--spec", "spec_arg", metavar="PATH|s3://…|https://…", help="The run spec (else env JOB_SPEC or JOB_SPEC_URI).")
@click.option("--set", "sets", multiple=True, metavar="SECTION.FIELD=VALUE", help="Override a spec field; repeatable.")
@click.option("--rows", default=5, show_default=True, type=click.IntRange(min=0), help="How many rows to show in full.")
@click.option("--color/--no-color", default=None, help="Mark trained tokens in colour (default: when stdout is a terminal).")
def preview(spec_arg: str | None, sets: tuple[str, ...], rows: int, color: bool | None) -> None:
    """Show the first rows as training sees them, with the tokens that carry loss marked.

    Reads, templates and tokenizes the data exactly as `job run` does (the model's tokenizer is fetched), then
    prints the first rows with trained tokens in green or [[between double brackets]], dropped rows with their
    reasons and a histogram of sequence lengths against training.max_seq_length. Exit 2 when no row would train.
    """
    from job import cli, log, model
    from job import preview as previews

    environ = dict(os.environ)
    log.setup(secrets=[environ.get(k, "") for k in cli.SECRET_ENV], stream=sys.stderr)
    color = sys.stdout.isatty() if color is None else color
    try:
        spec = cli.resolve_spec(spec_arg, sets, environ)
        paths = cli.paths_from_env(environ)
        s3 = S3Settings(spec.run.endpoint_url, spec.run.region)
        fetched = model.fetch(spec.model, paths.cache_dir, s3)
        tokenizer = model.load_tokenizer(fetched.path, spec.model.trust_remote_code)
        shown = previews.gather(spec.data, tokenizer, spec.training.max_seq_length, paths.work_dir / spec.run_id, s3)
    except errors.JobError as exc:
        raise _usage_failure(exc) from exc
    click.echo(previews.render(shown, tokenizer, rows, color), color=color)
    if not shown.used:
        raise _usage_failure(errors.DataError("data: every row lost all its trained tokens", hint="raise training.max_seq_length"))


@click.group()
def runs() -> None:
    """List and show runs under an output location (a local path or s3://bucket/prefix)."""


_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


@runs.command(name="list")
@click.argument("location")
@_json_option
def list_command(location: str, as_json: bool) -> None:
    """One row per run under LOCATION: status, base model, hyper-parameters, steps, losses, artifacts.

    complete: manifest.json present; incomplete: no manifest (checkpoints only); failed: failure.json present.
    S3 endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL_S3, …).
    """
    from job import runs as runs_lib

    try:
        found = runs_lib.list_runs(location, S3Settings())
    except errors.JobError as exc:
        raise _usage_failure(exc) from exc
    if as_json:
        click.echo(runs_lib.as_json(found))
    elif found:
        click.echo(runs_lib.table(found))
    else:
        click.echo(f"no runs under {location}", err=True)


@runs.command(name="show")
@click.argument("run_uri", metavar="LOCATION/RUN_ID | LOCATION RUN_ID")
@click.argument("run_id", required=False)
@_json_option
def show_command(run_uri: str, run_id: str | None, as_json: bool) -> None:
    """One run's manifest summary and probe answers (or its failure record and checkpoints)."""
    from job import runs as runs_lib

    location, run_id = (run_uri, run_id) if run_id else runs_lib.split_run_uri(run_uri)
    if not location or not run_id or location == "s3:/":
        raise click.UsageError("name the run as LOCATION/RUN_ID or LOCATION RUN_ID, e.g. s3://bucket/runs/my-run")
    try:
        run = runs_lib.find_run(location, run_id, S3Settings())
    except errors.JobError as exc:
        raise _usage_failure(exc) from exc
    if as_json:
        click.echo(json.dumps(run.as_dict(), indent=2))
    else:
        click.echo(runs_lib.describe(run))



@click.command(name="verify")
@click.argument("run_uri", metavar="LOCATION/RUN_ID")
@_json_option
def verify_command(run_uri: str, as_json: bool) -> None:
    """Run every publishing gate again on a published run: a local run folder or an s3:// run prefix.

    Checks each file against the manifest's sha256, then scores the merged weights against the adapter on its base
    and each GGUF against the merged weights (mean KL divergence and same-top-token rate on the run's own
    evaluation tokens), and each GGUF's tokenizer and end-of-turn ids. The same code as `job run`'s verify stage.
    Prints a table per artifact (or JSON); exit 0 when all pass, 4 naming each failing artifact.
    """
    from job import cli, llamacpp, log, model, verify
    from job import runs as runs_lib
    from job.spec import ModelSection

    environ = dict(os.environ)
    log.setup(secrets=[environ.get(k, "") for k in cli.SECRET_ENV], stream=sys.stderr)
    location, run_id = runs_lib.split_run_uri(run_uri)
    if not location or not run_id or location == "s3:/":
        raise click.UsageError("name the run as LOCATION/RUN_ID, e.g. s3://bucket/runs/my-run or runs/smoke")
    paths = cli.paths_from_env(environ)
    try:
        run = runs_lib.find_run(location, run_id, S3Settings())
        if run.status != "complete":
            raise errors.NotFoundError(f"{run_uri} is {run.status}: there is no published run to verify")
        spec_model = {k: v for k, v in run.manifest["spec"]["model"].items() if k != "token"}
        section = ModelSection(**spec_model, token=environ.get("HF_TOKEN") or None)
        fetched = model.fetch(section, paths.cache_dir, S3Settings())
        import transformers  # noqa: F401 - imported so its logs and progress bars can be routed now

        log.route_library_logs()
        tools = llamacpp.locate(paths.llama_cpp_dir) if run.manifest["export"].get("gguf_types") else None
        result = verify.verify_published(location, run_id, fetched.path, tools, paths.work_dir / run_id / "reverify",
                                         S3Settings())
    except errors.JobError as exc:
        raise _usage_failure(exc) from exc
    body = result.as_dict()
    if as_json:
        click.echo(json.dumps(body, indent=2))
    else:
        click.echo("\n".join(verify.table(body)))
    if failures := result.failures():
        raise _usage_failure(errors.VerificationError("artifacts failed verification: " + " | ".join(failures)))
