"""`job verify`: every publishing gate again, on a published run (a thin command over job.verify)."""

from __future__ import annotations

import json
import os

import click

from job import errors, llamacpp, log, model, verify
from job import runs as runs_lib
from job.cli.common import exits, fail, json_option, paths_from_env, setup_log
from job.spec import ModelSection
from job.storage import S3Settings


@click.command(name="verify")
@click.argument("run_uri", metavar="LOCATION/RUN_ID")
@json_option
def verify_command(run_uri: str, as_json: bool) -> None:
    """Run every publishing gate again on a published run: a local run folder or an s3:// run prefix.

    Checks each file against the manifest's sha256, then scores the merged weights against the adapter on its base
    and each GGUF against the merged weights (mean KL divergence and same-top-token rate on the run's own
    evaluation tokens), and each GGUF's tokenizer and end-of-turn ids. The same code as `job run`'s verify stage.
    Prints a table per artifact (or JSON); exit 0 when all pass, 4 naming each failing artifact.
    """
    environ = dict(os.environ)
    setup_log(environ)
    location, run_id = runs_lib.split_run_uri(run_uri)
    if not location or not run_id or location == "s3:/":
        raise click.UsageError("name the run as LOCATION/RUN_ID, e.g. s3://bucket/runs/my-run or runs/smoke")
    paths = paths_from_env(environ)
    with exits():
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
    body = result.as_dict()
    if as_json:
        click.echo(json.dumps(body, indent=2))
    else:
        click.echo("\n".join(verify.table(body)))
    if failures := result.failures():
        fail(errors.VerificationError("artifacts failed verification: " + " | ".join(failures)))
