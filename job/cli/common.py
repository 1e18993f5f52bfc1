"""What the commands share: the spec options, the spec and machine paths resolved from arguments and environment,
log set-up with every known secret masked, and the one exit path (`exits`, `fail`), the only sys.exit."""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import sys
from pathlib import Path
from typing import NoReturn

import click

from job import errors, log
from job import spec as specs
from job.runtime import Paths
from job.storage import S3Settings, read_uri

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
              "MODELSCOPE_API_TOKEN", "RUNPOD_API_KEY", "LAMBDA_API_KEY", "WANDB_API_KEY")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

set_option = click.option("--set", "sets", multiple=True, metavar="SECTION.FIELD=VALUE",
                          help="Override a spec field; repeatable.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def spec_option(command):
    """The spec as a positional SPEC or as --spec (either; the same once given twice), passed on as `spec_arg`."""

    @functools.wraps(command)
    def with_spec(*args, spec_arg: str | None = None, spec_path: str | None = None, **kwargs):
        if spec_arg and spec_path and spec_arg != spec_path:
            raise click.UsageError(f"two specs given: {spec_path} and --spec {spec_arg}; give one")
        return command(*args, spec_arg=spec_arg or spec_path, **kwargs)

    with_spec = click.argument("spec_path", required=False, metavar="[SPEC]")(with_spec)
    return click.option("--spec", "spec_arg", metavar="PATH|s3://…|https://…",
                        help="The run spec, also accepted as the first argument (else env JOB_SPEC or "
                             "JOB_SPEC_URI).")(with_spec)


def setup_log(environ: dict[str, str], *, spec: specs.Spec | None = None, stream=None, level: str = "INFO") -> None:
    """Events to `stream` (stderr by default), with the secrets of the environment and of the spec masked."""
    secrets = [environ.get(name, "") for name in SECRET_ENV]
    if spec is not None and spec.model.token:
        secrets.append(spec.model.token.get_secret_value())
    log.setup(secrets=secrets, stream=stream or sys.stderr, level=level)


def resolve_spec(spec_arg: str | None, sets: tuple[str, ...], environ: dict[str, str]) -> specs.Spec:
    """The spec from --spec, else JOB_SPEC (its text) or JOB_SPEC_URI, with JOB__SECTION__FIELD and --set applied."""
    if spec_arg:
        origin = spec_arg
        text = read_uri(spec_arg, S3Settings()).decode("utf-8")
    elif environ.get("JOB_SPEC"):
        origin, text = "env JOB_SPEC", environ["JOB_SPEC"]
    elif environ.get("JOB_SPEC_URI"):
        origin = environ["JOB_SPEC_URI"]
        text = read_uri(origin, S3Settings()).decode("utf-8")
    else:
        raise errors.SpecError("no run spec given", hint="pass --spec PATH|s3://…|https://…, or set JOB_SPEC or JOB_SPEC_URI")
    base = specs.parse_text(text, origin)
    overrides = specs.env_overrides(environ) + [specs.parse_set(item) for item in sets]
    return specs.resolve(base, origin, overrides)


# A spec read here only to check it before sending: a short try, since the target reads it again itself.
QUICK_READ = S3Settings(request_attempts=2, step_attempts=1, connect_timeout=5.0, read_timeout=20.0)


def check_sendable(spec_ref: str, spec_text: str | None, sets: tuple[str, ...],
                   sweeps: tuple[str, ...] = ()) -> list[specs.Spec | None]:
    """A spec with the --set and --sweep values a remote target will apply, validated here as `job run` will
    validate it there (job.spec.check_sendable), so a typo costs an exit 2 now, not a rented GPU later. A spec given
    as a URI is read here too when this machine can (else its overrides are checked field by field, and stderr says
    so). Returns each experiment's resolved spec (None where the spec could not be read)."""
    from job.deploy.k8s import parse_assignment, parse_sweep

    travels = spec_text is not None  # a local spec's text goes into the manifest; a URI is read by the target
    if spec_text is None:
        try:
            spec_text = read_uri(spec_ref, QUICK_READ).decode("utf-8")
        except (errors.JobError, UnicodeDecodeError) as exc:
            click.echo(f"note: cannot read {spec_ref} from here ({log.redact_text(str(exc))}): only the overrides "
                       "are checked; the run checks the whole spec when it starts", err=True)
    base = specs.parse_text(spec_text, spec_ref) if spec_text is not None else None
    fixed = [(key, value, f"--set {key}") for key, value in map(parse_assignment, sets)]
    swept = [[(key, value, f"--sweep {key}") for value in values] for key, values in map(parse_sweep, sweeps)]
    return specs.check_sendable(base, spec_ref, [fixed + list(point) for point in itertools.product(*swept)],
                                base_travels=travels)


def largest_disk(resolved: list[specs.Spec | None], default: str = "k8s/base/job.yaml's sizes"):
    """The largest predicted peak disk of the experiments (job.plan.inputs.disk_at_hand), said on stderr; None, with
    `default` named, when a spec could not be read here or no local source knows its model."""
    from job.plan.inputs import disk_at_hand

    if not resolved or any(spec is None for spec in resolved):
        click.echo(f"note: no disk prediction without the spec: the disk keeps {default}", err=True)
        return None
    predictions = [disk_at_hand(spec) for spec in resolved]
    why_not = next((p for p in predictions if isinstance(p, str)), None)
    if why_not is not None:
        click.echo(f"note: no disk prediction ({why_not}): the disk keeps {default}", err=True)
        return None
    disk, source = max(predictions, key=lambda p: p[0].total)
    click.echo(f"note: disk sized for a predicted peak of {disk.total:.1f} GiB (model cache {disk.cache:.1f}, "
               f"scratch {disk.scratch:.1f}; model from {source})", err=True)
    return disk


def refuse_secret_values(env: dict[str, str], option: str) -> None:
    """Values that end up in a file a user applies or commits may not be credentials."""
    for name in env:
        if name in SECRET_ENV:
            raise errors.SpecError(f"{option} {name}=… would write a credential into the rendered file",
                                   hint="keep it in the target's secrets: a Kubernetes Secret (docs/deploy.md), or "
                                        "--pass-env NAME for SkyPilot, which sends a reference")


def paths_from_env(environ: dict[str, str]) -> Paths:
    cache = Path(environ.get("JOB_CACHE_DIR") or Path(environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "job")
    return Paths(
        work_dir=Path(environ.get("JOB_WORK_DIR") or ".job-work"),
        cache_dir=cache,
        llama_cpp_dir=Path(environ.get("JOB_LLAMA_CPP_DIR") or cache / "llama.cpp-0.3.36"),
        image_variant=environ.get("JOB_IMAGE_VARIANT") or None,
    )


def env_pairs_from(pairs: tuple[str, ...], names: tuple[str, ...], environ: dict[str, str]) -> dict[str, str]:
    """--env KEY=VALUE pairs, then --pass-env NAME values copied from this shell."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not ENV_NAME.match(key):
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--env")
        env[key] = value
    for name in names:
        if name not in environ:
            raise click.BadParameter(f"{name} is not set in this shell", param_hint="--pass-env")
        env[name] = environ[name]
    return env


def exit_with(code: int) -> NoReturn:
    sys.exit(code)


def fail(exc: errors.JobError, *, event: str | None = None) -> NoReturn:
    """One line on stderr, secrets masked, and the error's exit code; `event` also logs it as that event."""
    if event:
        log.get().error(event, error=exc.kind, message=str(exc), exit_code=exc.exit_code)
    click.echo(f"error: {log.redact_text(str(exc))}", err=True)
    exit_with(exc.exit_code)


@contextlib.contextmanager
def exits(*, event: str | None = None, crash_event: str = "command.crashed"):
    """Turns what the block raises into the exit code of errors.EXIT_CODES: a JobError its own, an interrupt 75,
    anything unexpected 1 with its traceback logged. Click's own usage errors pass through to click (exit 2)."""
    try:
        yield
    except errors.JobError as exc:
        fail(exc, event=event)
    except (KeyboardInterrupt, errors.Interrupted) as exc:
        fail(errors.TransientError(str(exc) or "interrupted", hint="a rerun resumes from the last checkpoint"), event=event)
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except Exception:
        log.get().exception(crash_event, exit_code=errors.EXIT_BUG)
        exit_with(errors.EXIT_BUG)
