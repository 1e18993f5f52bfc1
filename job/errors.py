"""Every failure a user can act on, with the exit code that is part of the CLI's interface.

EXIT_CODES is the one table of exit codes: `job exit-codes`, `job --help` and the README's table are made from it
(a test holds the README and k8s/base/job.yaml's podFailurePolicy to it).
"""

from __future__ import annotations

from typing import NamedTuple

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER = 2
EXIT_NOT_FOUND = 3
EXIT_VERIFICATION = 4
EXIT_TRANSIENT = 75
EXIT_PREEMPTED = 76


class ExitCode(NamedTuple):
    meaning: str
    kubernetes: str  # what k8s/base/job.yaml's podFailurePolicy does with it


EXIT_CODES = {
    EXIT_OK: ExitCode("published", ""),
    EXIT_USER: ExitCode("invalid spec, data or usage; a configuration that does not fit the GPU's memory",
                        "FailJob"),
    EXIT_NOT_FOUND: ExitCode("what the run needs is missing, denied or too small: the model, dataset or bucket; a "
                             "usable GPU; the container's memory or disk", "FailJob"),
    EXIT_VERIFICATION: ExitCode("an artifact failed verification", "FailJob"),
    EXIT_TRANSIENT: ExitCode("transient infrastructure (network, throttling)", "retried"),
    EXIT_PREEMPTED: ExitCode("preempted (SIGTERM): a checkpoint was written; a rerun resumes", "ignored (retried)"),
    EXIT_BUG: ExitCode("a bug (unexpected exception, traceback logged)", "counted"),
}


def exit_code_table() -> str:
    """EXIT_CODES as the Markdown table `job exit-codes` prints and the README holds."""
    rows = ["| code | meaning | Kubernetes podFailurePolicy |", "|---|---|---|"]
    rows += [f"| {code} | {entry.meaning} | {entry.kubernetes} |" for code, entry in EXIT_CODES.items()]
    return "\n".join(rows)


def network_reason(exc: BaseException) -> str:
    """Why a connection failed, in words, rather than urllib's `<urlopen error [Errno -2] ...>`."""
    import socket
    import ssl

    reason = getattr(exc, "reason", exc)
    if isinstance(reason, socket.gaierror):
        return "its host name does not resolve (no DNS, or no network from here)"
    if isinstance(reason, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "no answer before the timeout"
    if isinstance(reason, ssl.SSLError):
        return f"TLS failed ({getattr(reason, 'reason', None) or 'certificate or protocol'})"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[0].lower() + reason.strerror[1:]
    return str(reason) or type(reason).__name__


class JobError(Exception):
    """An error with a message meant for the user and the exit code it maps to."""

    exit_code = EXIT_BUG
    kind = "error"

    def __init__(self, message: str, *, hint: str | None = None, where: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.where = where

    def __str__(self) -> str:
        parts = [self.message]
        if self.where:
            parts.insert(0, f"{self.where}:")
        if self.hint:
            parts.append(f"({self.hint})")
        return " ".join(parts)


class SpecError(JobError):
    """The run spec is invalid."""

    exit_code = EXIT_USER
    kind = "spec"


class DataError(JobError):
    """The dataset cannot be used as declared."""

    exit_code = EXIT_USER
    kind = "data"


class NotFoundError(JobError):
    """A model, dataset, spec or bucket does not exist or cannot be read with the given credentials."""

    exit_code = EXIT_NOT_FOUND
    kind = "not_found"


class VerificationError(JobError):
    """An artifact was produced but does not behave like the trained model."""

    exit_code = EXIT_VERIFICATION
    kind = "verification"


class TransientError(JobError):
    """Network, throttling or preemption: the same run may succeed when retried."""

    exit_code = EXIT_TRANSIENT
    kind = "transient"


class Preempted(JobError):
    """SIGTERM arrived: the current step finished and a checkpoint was written."""

    exit_code = EXIT_PREEMPTED
    kind = "preempted"


class GpuOutOfMemory(JobError):
    """The run ran out of GPU memory. The same spec on the same card would run out again, so it is the user's to
    change (exit 2), not a transient failure to retry."""

    exit_code = EXIT_USER
    kind = "out_of_memory"

    def __init__(self, message: str, *, step: int | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.step = step  # optimizer steps completed before the one that ran out (None: outside the training loop)


class Interrupted(BaseException):
    """SIGTERM outside the training loop (loading, exporting, publishing): nothing to checkpoint; a rerun resumes.
    A BaseException, like KeyboardInterrupt, so that no retry loop or error wrapper on its way up takes it for an
    ordinary failure and carries on while the pod's grace period runs out. The CLI exits 75."""


class OutOfResources(JobError):
    """The container's memory or disk is too small (a llama.cpp tool killed by the kernel, a write that found no
    space, a predicted peak above the free disk). The same pod would run out again: the user gives it more (exit 3),
    not a retry."""

    exit_code = EXIT_NOT_FOUND
    kind = "out_of_resources"


class NoUsableGpu(JobError):
    """A CUDA image started without a GPU it can use (no device, or a driver older than the image's CUDA needs).
    Training would fall back to the CPU and run for days; the pod's placement is what to fix (exit 3)."""

    exit_code = EXIT_NOT_FOUND
    kind = "no_usable_gpu"


class ToolMissingError(JobError):
    """A build tool or binary the run needs is not installed."""

    exit_code = EXIT_USER
    kind = "tool_missing"


class UsageError(JobError):
    """A command's arguments cannot do what they ask; `kind` says which command's."""

    exit_code = EXIT_USER
    kind = "usage"


class RenderError(UsageError):
    """The arguments of `job k8s render` cannot make a valid Job (bad sweep, unknown overlay, unreadable spec)."""
    kind = "render"


class LaunchError(UsageError):
    """A launch request that cannot be made as asked (a local spec, a bad accelerator or name)."""
    kind = "launch"


class ProviderError(LaunchError):
    """The cloud provider refused or failed the launch; the message is scrubbed of the API key.
    A rejected key or missing resource is denied (3); capacity, throttling, outages and an unreachable API are
    transient (75); any other refusal is the request's to fix (2)."""

    kind = "provider"

    def __init__(self, message: str, *, provider: str, status: int | None = None, code: str | None = None):
        super().__init__(message, where=provider)
        self.status = status
        self.code = code

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        if self.status in (401, 403, 404):
            return EXIT_NOT_FOUND
        if self.status is None or self.status == 429 or self.status >= 500 or "capacity" in (self.code or ""):
            return EXIT_TRANSIENT
        return EXIT_USER
