"""The `job` command line. The only module that reads the process environment and calls sys.exit."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

import click
import yaml

from job import errors, log, spec as specs, verify
from job.storage import S3Settings, read_uri

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
              "MODELSCOPE_API_TOKEN", "RUNPOD_API_KEY", "LAMBDA_API_KEY", "WANDB_API_KEY")


def resolve_spec(spec_arg: str | None, sets: tuple[str, ...], environ: dict[str, str]) -> specs.Spec:
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


def paths_from_env(environ: dict[str, str]):
    from job.pipeline import Paths

    cache = Path(environ.get("JOB_CACHE_DIR") or Path(environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "job")
    return Paths(
        work_dir=Path(environ.get("JOB_WORK_DIR") or ".job-work"),
        cache_dir=cache,
        llama_cpp_dir=Path(environ.get("JOB_LLAMA_CPP_DIR") or cache / "llama.cpp-0.3.36"),
    )


def _private_stdout():
    try:
        stdout_fd, stderr_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (io.UnsupportedOperation, AttributeError):  # stdout is no file (click's test runner): nothing to protect
        return sys.stdout
    private = os.fdopen(os.dup(stdout_fd), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(stderr_fd, stdout_fd)
    return private


def _process_count(value: str) -> int:
    if value == "auto":
        import torch

        return torch.cuda.device_count()
    if not value.isdigit() or int(value) < 1:
        fail(errors.SpecError(f"JOB_NPROC={value!r} must be auto or a positive number of processes"))
    return int(value)


def process_from_env(environ: dict[str, str]):
    """This process's place under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE); alone: rank 0 of 1."""
    from job.pipeline import Process

    return Process(rank=int(environ.get("RANK", 0)), local_rank=int(environ.get("LOCAL_RANK", 0)),
                   world_size=int(environ.get("WORLD_SIZE", 1)))


def fail(exc: errors.JobError) -> None:
    log.get().error("run.failed", error=exc.kind, message=str(exc), exit_code=exc.exit_code)
    click.echo(f"error: {log.redact_text(str(exc))}", err=True)
    sys.exit(exc.exit_code)


spec_option = click.option("--spec", "spec_arg", metavar="PATH|s3://…|https://…", help="The run spec (else env JOB_SPEC or JOB_SPEC_URI).")
set_option = click.option("--set", "sets", multiple=True, metavar="SECTION.FIELD=VALUE", help="Override a spec field; repeatable.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="job")
def main() -> None:
    """Fine-tune an LLM with (Q)LoRA from one run spec and publish verified artifacts.

    Exit codes: 0 published, 2 invalid spec/data/usage (or too big for the GPU), 3 model/data/bucket missing or
    denied, 4 artifact failed verification, 75 transient infrastructure error (retry), 76 preempted (a checkpoint
    was written; rerun to resume), 1 bug.
    """


@main.command()
@spec_option
@set_option
def run(spec_arg: str | None, sets: tuple[str, ...]) -> None:
    """Train, export, verify and publish one run.

    Under torchrun every process runs this; rank 0 alone logs at info level, checkpoints and publishes.
    JOB_NPROC=auto|N (outside torchrun) starts one process per GPU through torchrun itself.
    """
    environ = dict(os.environ)
    if environ.get("JOB_NPROC") and "LOCAL_RANK" not in environ:
        count = _process_count(environ["JOB_NPROC"])
        if count > 1:
            from job.launch import torchrun

            argv = (["--spec", spec_arg] if spec_arg else []) + [arg for item in sets for arg in ("--set", item)]
            sys.exit(torchrun(["--standalone", "--nnodes", "1", "--nproc-per-node", str(count), "-m", "job.cli", "run", *argv]))
    process = process_from_env(environ)
    # trl's trainer reports each run to the Hub (its class, GPU, model type), huggingface_hub then fetches a
    # registry to describe the caller, and unsloth downloads a statistics repo on each model load (up to 120 s
    # behind a proxy that drops it): a batch job sends nothing its user did not ask for. HF_HUB_DISABLE_TELEMETRY=0
    # allows all three. Set before anything imports huggingface_hub or unsloth.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if os.environ["HF_HUB_DISABLE_TELEMETRY"].strip().lower() in ("1", "true", "yes", "on"):
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # unsloth reads only whether it is set
    # As PID 1 in a container Python gets no default SIGTERM action: without this, preemption ends in SIGKILL.
    # In the training loop SIGTERM asks for a stop after the current step and a checkpoint (exit 76); elsewhere
    # it ends the run at once with exit 75, so Kubernetes retries and the retry resumes from the last checkpoint.
    from job.train import StopRequest

    stop = StopRequest()
    signal.signal(signal.SIGTERM, stop.on_sigterm)
    # Libraries draw tqdm bars on stderr; the run reports progress as events instead.
    os.environ.setdefault("TQDM_DISABLE", "1")
    # stdout carries JSON events and nothing else: libraries that print (wandb, transformers' integrations, C code)
    # write to file descriptor 1, so it is pointed at stderr and the events keep a private copy of the original.
    events_stream = _private_stdout()
    level = "INFO" if process.rank == 0 else "WARNING"  # one log of record: rank 0's
    log.setup(secrets=[environ.get(k, "") for k in SECRET_ENV], stream=events_stream, level=level)
    events = log.get()
    try:
        spec = resolve_spec(spec_arg, sets, environ)
        log.setup(secrets=[environ.get(k, "") for k in SECRET_ENV] + [spec.model.token.get_secret_value() if spec.model.token else ""],
                  stream=events_stream, level=level)
        import structlog

        structlog.contextvars.bind_contextvars(run_id=spec.run_id, **({"rank": process.rank} if process.world_size > 1 else {}))
        events.info("run.started", run_id=spec.run_id, output=spec.run.output, model=spec.model.name, data=spec.data.source)
        from job import pipeline

        result = pipeline.run(spec, paths_from_env(environ), stop, process)
    except errors.JobError as exc:
        fail(exc)
        return
    except (KeyboardInterrupt, errors.Interrupted) as exc:
        fail(errors.TransientError(str(exc) or "interrupted", hint="a rerun resumes from the last checkpoint"))
        return
    except Exception:
        events.exception("run.crashed", exit_code=errors.EXIT_BUG)
        sys.exit(errors.EXIT_BUG)
    if result is None:  # a rank other than 0: its part ended with training
        return
    events.info("run.finished", run_id=result.run_id, destination=result.destination,
                files=len(result.manifest["files"]), final_loss=result.manifest["training"]["final_loss"])
    click.echo(summary(result), err=True)


def summary(result) -> str:
    m = result.manifest
    train = m["training"]
    lines = [
        "",
        f"run {result.run_id}: published to {result.destination}/ (manifest.json + {len(m['files'])} files)",
        f"  loss {train['first_loss']:.3f} → {train['final_loss']:.3f} over {train['steps']} steps "
        f"({train['backend']}, {train['precision']}, {train['seconds']} s)",
        f"  artifacts: adapter/, merged/{', gguf/ ' + ' '.join(m['export']['gguf_types']) if m['export']['gguf_types'] else ''}",
        "  verified against its reference (teacher-forced KL divergence):",
        *(f"    {row}" for row in verify.table(m.get("verification") or {})),
    ]
    for probe in m["probes"]:
        lines.append(f"  Q: {probe['prompt']}")
        lines.append(f"     before: {probe.get('base', '')!s:.160}")
        lines.append(f"     after:  {probe.get('merged') or probe.get('adapter')!s:.160}")
        for key, value in probe.items():
            if key.startswith("gguf_"):
                lines.append(f"     {key}: {value!s:.160}")
    return "\n".join(lines)


@main.command()
@spec_option
@set_option
def validate(spec_arg: str | None, sets: tuple[str, ...]) -> None:
    """Print the resolved spec (secrets masked); exit 0 if valid, 2 if not."""
    environ = dict(os.environ)
    log.setup(secrets=[environ.get(k, "") for k in SECRET_ENV], stream=sys.stderr)
    try:
        spec = resolve_spec(spec_arg, sets, environ)
    except errors.JobError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    click.echo(yaml.safe_dump(spec.masked(), sort_keys=False), nl=False)


@main.command()
def schema() -> None:
    """Print the run spec's JSON Schema."""
    click.echo(json.dumps(specs.json_schema(), indent=2))


@main.command(name="exit-codes")
def exit_codes() -> None:
    """Print the table of exit codes."""
    for code, meaning in errors.EXIT_CODES.items():
        click.echo(f"{code:>3}  {meaning}")


from job.cli_deploy import k8s, launch  # noqa: E402 - registered after the core commands
from job.cli_plan import plan  # noqa: E402
from job.cli_runs import preview, runs, verify_command  # noqa: E402

for command in (k8s, launch, plan, preview, runs, verify_command):
    main.add_command(command)

if __name__ == "__main__":
    main()
