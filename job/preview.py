"""`job preview`: the rows as training will see them, before a GPU is paid for.

`gather` runs job.data's own read → template → normalize → tokenize path, or for a preference method (dpo, orpo,
kto) job.preference's (nothing re-implemented, so what is shown is what trains); the rest are pure functions from
that result to text.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import click

from job import data, errors, preference
from job.spec import DataSection
from job.storage import S3Settings

NO_TRAINED_TOKEN = "no trained token (after truncation)"
OPEN, CLOSE = "[[", "]]"
CUT_OPEN, CUT_CLOSE = "⟨cut⟩", "⟨/cut⟩"
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


@dataclass
class PreferencePreview:
    """A preference method's rows: each prompt with its answers, tokenized as trl will (job.preference)."""

    source: str
    format: str
    detected: bool
    chat_template: str
    max_seq_length: int
    method: str
    rows_read: int
    rows: list[preference.TokenizedAnswers]  # every normalized row (kto: a pair as two), prompt-filled ones too
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)

    @property
    def used(self) -> list[preference.TokenizedAnswers]:
        return [r for r in self.rows if not r.prompt_fills]

    @property
    def filled(self) -> list[int]:
        return _unique(r.row for r in self.rows if r.prompt_fills)

    @property
    def truncated(self) -> list[int]:
        return _unique(r.row for r in self.rows if r.truncated)

    @property
    def rows_used(self) -> int:
        return len(_unique(r.row for r in self.rows)) - len(self.filled)

    @property
    def tokens(self) -> int:
        """Counted as job.preference.prepare counts them for the manifest: the prompt once with each answer."""
        return sum(sum(r.sequence_lengths) for r in self.used)


def _unique(numbers) -> list[int]:
    return list(dict.fromkeys(numbers))


def gather(section: DataSection, tokenizer, max_seq_length: int, work_dir: Path, s3: S3Settings,
           method: str = "sft") -> Preview | PreferencePreview:
    rows, origin = data.read_rows(section, work_dir, s3)
    template = data.choose_template(tokenizer, section.chat_template)
    if method != "sft":
        return _gather_preference(section, tokenizer, max_seq_length, method, rows, origin, template)
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


def _gather_preference(section: DataSection, tokenizer, max_seq_length: int, method: str, rows, origin: str,
                       template: str) -> PreferencePreview:
    normalized = preference.normalize(rows, section, method)
    tokenized = [one for _, one in preference.tokenize_rows(tokenizer, normalized, max_seq_length, method)]
    preview = PreferencePreview(
        source=origin, format=normalized.format, detected=section.format == "auto", chat_template=template,
        max_seq_length=max_seq_length, method=method, rows_read=normalized.rows_read, rows=tokenized,
        dropped_rows=dict(normalized.dropped_rows),
    )
    if preview.filled:
        preview.dropped_rows[preference.PROMPT_FILLS] = preview.filled
    return preview


def refusal(preview: Preview | PreferencePreview) -> errors.DataError | None:
    """The error training would stop on with these rows (nothing left to train on), or None."""
    if isinstance(preview, Preview):
        if preview.used:
            return None
        return errors.DataError("data: every row lost all its trained tokens", hint="raise training.max_seq_length")
    if not preview.used:
        return errors.DataError(f"data: every prompt fills training.max_seq_length={preview.max_seq_length}, leaving "
                                "no room for an answer", hint="raise training.max_seq_length or shorten the prompts")
    if _one_label(preview):
        return errors.DataError(f"data: every kto row is {_one_label(preview)}; kto learns from both desirable and "
                                "undesirable completions", hint="add rows with the other label")
    return None


def _one_label(preview: PreferencePreview) -> str | None:
    """'desirable' or 'undesirable' when every kto completion that trains has that label (trl cannot train on it)."""
    labels = {r.label for r in preview.used}
    if preview.method != "kto" or len(labels) != 1:
        return None
    return _label_name(labels.pop())


def _label_name(label: bool | None) -> str:
    return "desirable" if label else "undesirable"


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


def render(preview: Preview | PreferencePreview, tokenizer, rows: int, color: bool) -> str:
    if isinstance(preview, PreferencePreview):
        return render_preference(preview, tokenizer, rows, color)
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


# --- preference methods --------------------------------------------------------------------------------------


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def answer_text(tokenizer, row: preference.TokenizedAnswers, name: str, color: bool) -> str:
    """The answer's tokens that train, then those that max_seq_length cuts off dimmed (color) or between ⟨cut⟩ and
    ⟨/cut⟩."""
    kept = row.kept(name)
    text = _decode(tokenizer, kept)
    cut = row.answers[name][len(kept):]
    if cut:
        cut_text = _decode(tokenizer, cut)
        text += click.style(cut_text, dim=True) if color else f"{CUT_OPEN}{cut_text}{CUT_CLOSE}"
    return text


def _answer_name(row: preference.TokenizedAnswers, name: str) -> str:
    return f"completion ({_label_name(row.label)})" if name == "completion" else name


def preference_header(row: preference.TokenizedAnswers) -> str:
    parts = [f"row {row.row}", f"prompt {len(row.prompt_ids)} tokens"]
    for name in row.answers:
        kept, full = len(row.kept(name)), len(row.answers[name])
        parts.append(f"{_answer_name(row, name)} {kept} tokens" + (f" of {full}" if kept < full else ""))
    if row.truncated:
        parts.append(f"truncated from {row.full_length}")
    if row.prompt_fills:
        parts.append("DROPPED: prompt alone fills max_seq_length")
    return "── " + " · ".join(parts)


def preference_warnings(preview: PreferencePreview) -> list[str]:
    found = []
    total = len(_unique(r.row for r in preview.rows))
    filled = preview.filled
    if filled:
        found.append(
            f"{len(filled)} of {total} rows have a prompt that fills training.max_seq_length={preview.max_seq_length} "
            f"and are dropped ({_rows(filled)}): raise training.max_seq_length or shorten the prompts"
        )
    truncated = preview.truncated
    if total and len(truncated) * 2 > total:
        found.append(
            f"most rows ({len(truncated)} of {total}) are longer than training.max_seq_length={preview.max_seq_length} "
            "and get truncated: raise training.max_seq_length or shorten the rows"
        )
    if _one_label(preview):
        found.append(f"every kto completion is {_one_label(preview)}: kto needs both desirable and undesirable ones, "
                     "and training stops on this data")
    return found


def render_preference(preview: PreferencePreview, tokenizer, rows: int, color: bool) -> str:
    dropped = sum(len(numbers) for numbers in preview.dropped_rows.values())
    how = "detected" if preview.detected else "from data.format"
    sequences = f"{len(preview.used)} completions" if preview.method == "kto" else f"{len(preview.used)} pairs"
    cut = click.style("dimmed", dim=True) if color else f"{CUT_OPEN}between cut marks{CUT_CLOSE}"
    lines = [
        f"data: {preview.source}",
        f"method {preview.method} · format {preview.format} ({how}) · chat template {preview.chat_template} · "
        f"max_seq_length {preview.max_seq_length}",
        f"rows: {preview.rows_read} read, {preview.rows_used} used, {dropped} dropped, {len(preview.truncated)} "
        f"truncated · {sequences}, {preview.tokens} tokens",
        f"each row shows its prompt, then its answers as trained; answer tokens past max_seq_length are shown {cut}",
    ]
    shown = set(_unique(r.row for r in preview.rows)[:rows])
    for row in preview.rows:
        if row.row not in shown:
            continue
        lines += ["", preference_header(row), _decode(tokenizer, row.prompt_ids)]
        for name in row.answers:
            lines += [f"{_answer_name(row, name)}:", answer_text(tokenizer, row, name, color)]
    if preview.dropped_rows:
        lines += ["", "dropped rows:"]
        lines += [f"  {reason}: {len(numbers)} ({_rows(numbers)})" for reason, numbers in preview.dropped_rows.items()]
    lines += ["", f"sequence lengths in tokens (prompt and longest answer), before truncation (max_seq_length "
                  f"{preview.max_seq_length}):"]
    lines.append(histogram([r.full_length for r in preview.rows], preview.max_seq_length))
    for message in preference_warnings(preview):
        lines += ["", click.style(f"warning: {message}", fg="yellow") if color else f"warning: {message}"]
    return "\n".join(lines)
