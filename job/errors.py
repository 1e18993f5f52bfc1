"""Every failure a user can act on, with the exit code that is part of the CLI's interface.

| code | meaning                                                        | Kubernetes podFailurePolicy |
|------|----------------------------------------------------------------|-----------------------------|
| 0    | published                                                      | -                           |
| 1    | a bug: unexpected exception, traceback kept                    | counted against backoff     |
| 2    | invalid spec, data or usage: the user must change something   | FailJob                     |
|      | (also: the configuration does not fit the GPU's memory, or the |                             |
|      | container's memory or disk)                                    |                             |
| 3    | a model, dataset or bucket is missing or access is denied      | FailJob                     |
| 4    | an artifact failed verification                                | FailJob                     |
| 75   | transient infrastructure (network, throttling)                 | retried                     |
| 76   | preempted (SIGTERM): a checkpoint was written; rerun resumes   | retried (pod disruption)    |
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER = 2
EXIT_NOT_FOUND = 3
EXIT_VERIFICATION = 4
EXIT_TRANSIENT = 75
EXIT_PREEMPTED = 76

EXIT_CODES = {
    EXIT_OK: "published",
    EXIT_BUG: "bug (unexpected exception)",
    EXIT_USER: "invalid spec, data or usage; a configuration that does not fit the GPU's memory, or the container's "
               "memory or disk",
    EXIT_NOT_FOUND: "model, dataset or bucket missing or denied",
    EXIT_VERIFICATION: "artifact failed verification",
    EXIT_TRANSIENT: "transient infrastructure error; retry",
    EXIT_PREEMPTED: "preempted (SIGTERM): checkpoint written; rerun with the same run id resumes",
}


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
    """The container's memory or disk ran out (a llama.cpp tool killed by the kernel, a write that found no space).
    The same pod would run out again: the user gives it more (exit 2), not a retry."""

    exit_code = EXIT_USER
    kind = "out_of_resources"


class ToolMissingError(JobError):
    """A build tool or binary the run needs is not installed."""

    exit_code = EXIT_USER
    kind = "tool_missing"
