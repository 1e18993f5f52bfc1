"""The `job` group: each command lives in its own module of this package and is registered here."""

from __future__ import annotations

import click

from job import errors
from job.cli.exit_codes import exit_codes
from job.cli.k8s import k8s
from job.cli.launch import launch
from job.cli.plan import plan
from job.cli.preview import preview
from job.cli.run import run
from job.cli.runs import runs
from job.cli.schema import schema
from job.cli.validate import validate
from job.cli.verify import verify_command

_HELP = "\n".join([
    "Fine-tune an LLM with (Q)LoRA from one run spec and publish verified artifacts.", "",
    "\b", "Exit codes (`job exit-codes`):", *(f"{code:>4}  {entry.meaning}" for code, entry in errors.EXIT_CODES.items()),
])


@click.group(help=_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="job")
def main() -> None:
    pass


for command in (run, validate, schema, plan, preview, runs, verify_command, k8s, launch, exit_codes):
    main.add_command(command)
