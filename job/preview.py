"""`job preview`: the rows as training will see them, before a GPU is paid for.

`gather` runs job.data's own read → template → normalize → tokenize path (nothing re-implemented, so what is shown
is what trains); the rest are pure functions from that result to text.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import click

from job import data
from job.spec import DataSection
from job.storage import S3Settings

NO_TRAINED_TOKEN = "no trained token (after truncation)"
OPEN, CLOSE = "[[", "]]"
BAR = "█"


@dataclass
class Preview:
    source: str
    format: str
    detected: bool  # format came from data.format: auto
    chat_template: str
    max_seq_length: int
    rows_read: int
    rows: list[data.TokenizedRow]  # every row that survived normalizing, tokenized and truncated
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)  # reason → row numbers

    @property
    def untrained(self) -> list[int]:
        return [r.row for r in self.rows if not r.trained_tokens]

    @property
    def truncated(self) -> list[int]:
        return [r.row for r in self.rows if r.truncated]

    @property
    def used(self) -> list[data.TokenizedRow]:
        return [r for r in self.rows if r.trained_tokens]


def gather(section: DataSection, tokenizer, max_seq_length: int, work_dir: Path, s3: S3Settings) -> Preview:
    rows, origin = data.read_rows(section, work_dir, s3)
    template = data.choose_template(tokenizer, section.chat_template)
    normalized = data.normalize(rows, section, template)
    tokenized = list(data.tokenize_rows(tokenizer, normalized, max_seq_length, section.train_on_responses_only))
    preview = Preview(
        source=origin, format=normalized.format, detected=section.format == "auto", chat_template=template,
        max_seq_length=max_seq_length, rows_read=normalized.rows_read, rows=tokenized,
        dropped_rows=dict(normalized.dropped_rows),
    )
    if preview.untrained:
        preview.dropped_rows[NO_TRAINED_TOKEN] = preview.untrained
    return preview


# --- presentation (pure) -------------------------------------------------------------------------------------


def marked(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The row's text with the tokens that carry loss in green (color) or between [[ and ]]."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(input_ids, labels):
        trained = label != data.IGNORE
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    parts = []
    for trained, tokens in runs:
        text = tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if color:
            parts.append(click.style(text, fg="green", bold=True) if trained else click.style(text, dim=True))
        else:
            parts.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(parts)


def row_header(row: data.TokenizedRow) -> str:
    parts = [f"row {row.row}", f"{len(row.input_ids)} tokens", f"{row.trained_tokens} trained"]
    if row.truncated:
        parts.append(f"truncated from {row.full_length}")
    if not row.trained_tokens:
        parts.append("DROPPED: no trained token")
    return "── " + " · ".join(parts)


def histogram(lengths: list[int], max_seq_length: int, bins: int = 8, width: int = 40) -> str:
    """Rows per length bucket from 1 to max_seq_length, and one bucket for the rows that get truncated."""
    if not lengths:
        return "(no rows)"
    step = -(-max_seq_length // bins)
    edges = [(lo + 1, min(lo + step, max_seq_length)) for lo in range(0, max_seq_length, step)]
    buckets = [(f"{lo}–{hi}", sum(lo <= n <= hi for n in lengths)) for lo, hi in edges]
    over = sum(n > max_seq_length for n in lengths)
    if over:
        buckets.append((f"> {max_seq_length}", over))
    label_width = max(len(label) for label, _ in buckets)
    top = max(count for _, count in buckets)
    lines = []
    for label, count in buckets:
        bar = BAR * (round(width * count / top) if count else 0)
        note = "  truncated" if label.startswith(">") else ""
        lines.append(f"  {label:>{label_width}} | {bar} {count}{note}")
    lines.append(f"  min {min(lengths)} · median {statistics.median(lengths):g} · max {max(lengths)} tokens")
    return "\n".join(lines)


def warnings(preview: Preview) -> list[str]:
    found = []
    total = len(preview.rows)
    if preview.untrained:
        found.append(
            f"{len(preview.untrained)} of {total} rows have no trained token and are dropped ({_rows(preview.untrained)}): "
            "the answer is empty or was cut off by training.max_seq_length"
        )
    truncated = preview.truncated
    if total and len(truncated) * 2 > total:
        found.append(
            f"most rows ({len(truncated)} of {total}) are longer than training.max_seq_length={preview.max_seq_length} "
            "and get truncated: raise training.max_seq_length or shorten the rows"
        )
    return found


def _rows(numbers: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(n) for n in numbers[:limit])
    return f"rows {shown}" + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")


def render(preview: Preview, tokenizer, rows: int, color: bool) -> str:
    used = preview.used
    tokens = sum(len(r.input_ids) for r in used)
    trained = sum(r.trained_tokens for r in used)
    dropped = sum(len(numbers) for numbers in preview.dropped_rows.values())
    how = "detected" if preview.detected else "from data.format"
    legend = click.style("in green", fg="green", bold=True) if color else f"{OPEN}between double brackets{CLOSE}"
    lines = [
        f"data: {preview.source}",
        f"format {preview.format} ({how}) · chat template {preview.chat_template} · "
        f"max_seq_length {preview.max_seq_length}",
        f"rows: {preview.rows_read} read, {len(used)} used, {dropped} dropped, {len(preview.truncated)} truncated · "
        f"{tokens} tokens, {trained} trained ({100 * trained / max(tokens, 1):.0f}%)",
        f"tokens that carry loss are shown {legend}",
    ]
    for row in preview.rows[:rows]:
        lines += ["", row_header(row), marked(tokenizer, row.input_ids, row.labels, color)]
    if preview.dropped_rows:
        lines += ["", "dropped rows:"]
        lines += [f"  {reason}: {len(numbers)} ({_rows(numbers)})" for reason, numbers in preview.dropped_rows.items()]
    lines += ["", f"sequence lengths in tokens, before truncation (max_seq_length {preview.max_seq_length}):"]
    lines.append(histogram([r.full_length for r in preview.rows], preview.max_seq_length))
    for message in warnings(preview):
        lines += ["", click.style(f"warning: {message}", fg="yellow") if color else f"warning: {message}"]
    return "\n".join(lines)
