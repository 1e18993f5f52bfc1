"""`job preview`: the first rows as training sees them, trained tokens marked (a thin command over job.preview)."""

from __future__ import annotations

import os
import sys

import click

from job import model
from job import preview as previews
from job.cli.common import exits, fail, paths_from_env, resolve_spec, set_option, setup_log, spec_option
from job.storage import S3Settings


@click.command()
@spec_option
@set_option
@click.option("--rows", default=5, show_default=True, type=click.IntRange(min=0), help="How many rows to show in full.")
@click.option("--color/--no-color", default=None, help="Mark trained tokens in colour (default: when stdout is a terminal).")
def preview(spec_arg: str | None, sets: tuple[str, ...], rows: int, color: bool | None) -> None:
    """Show the first rows as training sees them, with the tokens that carry loss marked.

    Reads, templates and tokenizes the data exactly as `job run` does (the model's tokenizer is fetched), then
    prints the first rows with trained tokens in green or [[between double brackets]], dropped rows with their
    reasons and a histogram of sequence lengths against training.max_seq_length. For training.method dpo, orpo or
    kto each row is its prompt and its answers (chosen and rejected, or kto's labelled completion), with what
    max_seq_length cuts off dimmed or ⟨cut⟩marked⟨/cut⟩. Exit 2 when no row would train.
    """
    environ = dict(os.environ)
    setup_log(environ)
    color = sys.stdout.isatty() if color is None else color
    with exits():
        spec = resolve_spec(spec_arg, sets, environ)
        paths = paths_from_env(environ)
        s3 = S3Settings(spec.run.endpoint_url, spec.run.region)
        fetched = model.fetch(spec.model, paths.cache_dir, s3)
        tokenizer = model.load_tokenizer(fetched.path, spec.model.trust_remote_code)
        shown = previews.gather(spec.data, tokenizer, spec.training.max_seq_length, paths.work_dir / spec.run_id, s3,
                                method=spec.training.method)
    click.echo(previews.render(shown, tokenizer, rows, color), color=color)
    refused = previews.refusal(shown)
    if refused:
        fail(refused)
