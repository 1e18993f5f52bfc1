"""`job run`: train, export, verify and publish one run (job.pipeline), as one process or under torchrun."""

from __future__ import annotations

import io
import os
import signal
import sys

import click

from job import errors, log, verify
from job.cli.common import exit_with, exits, fail, paths_from_env, resolve_spec, set_option, setup_log, spec_option
from job.runtime import Process


@click.command()
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
            from job.deploy.launch import torchrun

            argv = (["--spec", spec_arg] if spec_arg else []) + [arg for item in sets for arg in ("--set", item)]
            exit_with(torchrun(["--standalone", "--nnodes", "1", "--nproc-per-node", str(count), "-m", "job.cli", "run", *argv]))
    process = Process(rank=int(environ.get("RANK", 0)), local_rank=int(environ.get("LOCAL_RANK", 0)),
                      world_size=int(environ.get("WORLD_SIZE", 1)))
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
    setup_log(environ, stream=events_stream, level=level)
    with exits(event="run.failed", crash_event="run.crashed"):
        spec = resolve_spec(spec_arg, sets, environ)
        setup_log(environ, spec=spec, stream=events_stream, level=level)
        import structlog

        structlog.contextvars.bind_contextvars(run_id=spec.run_id, **({"rank": process.rank} if process.world_size > 1 else {}))
        log.get().info("run.started", run_id=spec.run_id, output=spec.run.output, model=spec.model.name, data=spec.data.source)
        from job import pipeline

        result = pipeline.run(spec, paths_from_env(environ), stop, process)
    if result is None:  # a rank other than 0: its part ended with training
        return
    log.get().info("run.finished", run_id=result.run_id, destination=result.destination,
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
        f"  artifacts: {_artifacts(m)}",
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


def _artifacts(manifest) -> str:
    """What was published: the folders the manifest lists files in, and the GGUF types."""
    folders = dict.fromkeys(f["path"].split("/", 1)[0] for f in manifest["files"] if "/" in f["path"])
    shown = [f"{folder}/" for folder in ("adapter", "merged") if folder in folders]
    if manifest["export"]["gguf_types"]:
        shown.append("gguf/ " + " ".join(manifest["export"]["gguf_types"]))
    return ", ".join(shown)


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
