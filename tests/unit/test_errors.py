"""errors.EXIT_CODES is the one table of exit codes: the CLI, the README and the Kubernetes Job follow it."""

from pathlib import Path

import yaml
from click.testing import CliRunner

from job import errors
from job.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def test_job_exit_codes_prints_the_table_the_readme_holds():
    printed = CliRunner().invoke(main, ["exit-codes"])
    assert printed.exit_code == 0
    assert printed.output.strip() == errors.exit_code_table()
    assert errors.exit_code_table() in (REPO / "README.md").read_text()


def test_job_help_lists_every_exit_code():
    shown = CliRunner().invoke(main, ["--help"]).output
    for code, entry in errors.EXIT_CODES.items():
        assert f"{code:>4}  {entry.meaning}" in shown


def test_the_kubernetes_job_fails_at_once_on_exactly_the_codes_the_table_says():
    job = yaml.safe_load((REPO / "k8s" / "base" / "job.yaml").read_text())
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail_job = {code for rule in rules if rule["action"] == "FailJob" for code in rule["onExitCodes"]["values"]}
    assert fail_job == {code for code, entry in errors.EXIT_CODES.items() if entry.kubernetes == "FailJob"}


def test_a_provider_refusal_maps_to_the_exit_code_of_its_cause():
    def code(status=None, reason=None):
        return errors.ProviderError("refused", provider="RunPod", status=status, code=reason).exit_code

    assert code(401) == code(403) == code(404) == errors.EXIT_NOT_FOUND
    assert code(None) == code(429) == code(503) == code(400, "instance-operations/launch/insufficient-capacity") \
        == errors.EXIT_TRANSIENT
    assert code(400) == errors.EXIT_USER
    assert str(errors.ProviderError("HTTP 400: bad", provider="RunPod")) == "RunPod: HTTP 400: bad"
