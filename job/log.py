"""Structured logging: JSON lines when not on a terminal, readable console lines on one.

Events have fixed names and carry their data as fields. Known secret values are redacted from every
event before it is rendered, whatever field they hide in.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

import structlog

REDACTED = "***"
# The secret values of the current setup(): logging is process-wide, and so is what it must never print.
_secrets: list[str] = []


def redact_text(text: str) -> str:
    """A message printed outside the log (the CLI's one-line error) with the same secrets masked."""
    for secret in _secrets:
        text = text.replace(secret, REDACTED)
    return text


def _redactor(secrets: list[str]):
    def redact(value):
        if isinstance(value, str):
            for secret in secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: redact(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(redact(v) for v in value)
        return value

    def processor(_logger, _method, event_dict):
        return redact(event_dict) if secrets else event_dict

    return processor


def setup(*, secrets: Iterable[str] = (), json_logs: bool | None = None, level: str = "INFO", stream=None) -> None:
    """Configure structlog and route the stdlib loggers of transformers, datasets, etc. through it."""
    stream = stream or sys.stdout
    if json_logs is None:
        json_logs = not stream.isatty()
    # Short values (like "test") would redact half the log; real credentials are long.
    secret_values = sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True)
    _secrets[:] = secret_values
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_logs:
        renderer = structlog.processors.JSONRenderer()
        # No frame locals: they hold the environment and the spec, credentials included.
        shared.append(structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)))
    else:
        renderer = structlog.dev.ConsoleRenderer()
        shared.append(progress_line)
    shared.append(_redactor(secret_values))  # last, so it also sees the rendered traceback
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    route_library_logs()
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "filelock", "httpx", "httpcore", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _size(n) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _artifact_line(event_dict) -> str | None:
    """One line per artifact made, checked or sent after training, for a person at a terminal."""
    event, seconds = event_dict.get("event"), event_dict.get("seconds")
    took = f"  {seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
    size = f"  {_size(event_dict['bytes'])}" if isinstance(event_dict.get("bytes"), int) else ""
    if event == "export.gguf.convert.finished":
        return f"made     gguf/{event_dict.get('outtype')}{size}{took}"
    if event == "export.gguf.quantize.finished":
        return f"made     gguf/{event_dict.get('type')}{size}{took}"
    if event == "verify.artifact.checked":
        return f"checked  {event_dict.get('artifact')}{size}{took}"
    if event == "publish.early_upload":
        return f"sent     {event_dict.get('path')}{size}{took}"
    return None


def progress_line(_logger, _method, event_dict):
    """On a terminal, a `train.step` event, and each artifact made, checked or sent, reads as one line a person can
    follow; the JSON event is unchanged."""
    if (line := _artifact_line(event_dict)) is not None:
        kept = {k: event_dict[k] for k in ("timestamp", "level", "logger") if k in event_dict}
        return {**kept, "event": line}
    if event_dict.get("event") != "train.step":
        return event_dict
    step, max_steps = event_dict.get("step"), event_dict.get("max_steps")
    parts = [f"step {step}/{max_steps}" if max_steps and max_steps > 0 else f"step {step}"]
    if isinstance(event_dict.get("loss"), (int, float)):
        parts.append(f"loss {event_dict['loss']:.4f}")
    if isinstance(event_dict.get("tokens_per_second"), (int, float)):
        parts.append(f"{event_dict['tokens_per_second']:,.0f} tok/s")
    if isinstance(event_dict.get("gpu_memory_gib"), (int, float)):
        parts.append(f"{event_dict['gpu_memory_gib']:.1f} GiB")
    eta = event_dict.get("eta_seconds")
    parts.append(f"ETA {_clock(eta)}" if isinstance(eta, (int, float)) else "ETA -")
    kept = {k: event_dict[k] for k in ("timestamp", "level", "logger") if k in event_dict}
    return {**kept, "event": "  ".join(parts)}


def get(name: str = "job"):
    return structlog.get_logger(name)


def route_library_logs() -> None:
    """Send the logs of transformers, datasets and the hub through structlog (so they are JSON and redacted)
    and silence their progress bars. Touches only libraries already imported; call again after importing more."""
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.enable_propagation()
        transformers.utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
    logging.captureWarnings(True)
