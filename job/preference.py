"""Preference data for dpo, orpo and kto: rows read like SFT rows (job.data's readers and chat templates), normalized
to a prompt (messages) and its answers, and handed to trl's trainers in trl's conversational form, which trl renders
with the tokenizer's chat template and tokenizes.

`tokenize_rows` computes the same tokens trl will (the rendered prompt with the generation prompt, and the rendered
conversation with each answer, cut where the two diverge), for the counts in the manifest, `job preview`, and the
held-out rows verification scores the exported models on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job import log
from job.data import Normalized, _Malformed, _nonempty_str, choose_template, parse_turns, read_rows
from job.errors import DataError
from job.spec import DataSection, TrainingSection
from job.storage import S3Settings

PAIRED = ("preference", "preference_messages")
PROMPT_FILLS = "prompt alone fills training.max_seq_length"  # a dropped row's reason: no answer token fits
LABELS = {True: True, False: False, 1: True, 0: False, "true": True, "false": False, "desirable": True,
          "undesirable": False}


@dataclass
class Answers:
    """One prompt and its answers: chosen and rejected (a pair), or one completion with its label (kto)."""

    prompt: list[dict[str, Any]]
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None


def detect_format(rows: list[Any]) -> str | None:
    """The preference format of the first object row, or None when its columns are not preference data."""
    for row in rows:
        if not isinstance(row, dict):
            continue
        if {"chosen", "rejected"} & set(row):  # a row that lacks a side is still a pair, dropped with its reason
            answer = row.get("chosen", row.get("rejected"))
            return "preference_messages" if isinstance(answer, list) else "preference"
        if {"prompt", "completion", "label"} <= set(row):
            return "kto"
        return None
    return None


def _messages(value: Any, column: str) -> list[dict[str, Any]]:
    return parse_turns(value, column, sharegpt=True, where=f" in '{column}'")


def _prompt(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("missing or empty 'prompt'")
        return [{"role": "user", "content": value}]
    messages = _messages(value, "prompt")
    if messages[-1]["role"] == "assistant":
        raise ValueError("'prompt' ends with an assistant turn")
    return messages


def _answer(value: Any, column: str) -> str:
    """An answer given as text, or as message lists' last (assistant) turn."""
    if isinstance(value, list):
        messages = _messages(value, column)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise ValueError(f"'{column}' is not one assistant turn")
        value = messages[0]["content"]
    if not _nonempty_str(value):
        raise ValueError(f"missing or empty '{column}'")
    return value


def _split_conversations(row: dict) -> tuple[list[dict], str, str]:
    """Chosen and rejected as whole conversations: the turns they share are the prompt, each last turn its answer."""
    chosen, rejected = _messages(row.get("chosen"), "chosen"), _messages(row.get("rejected"), "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError("'chosen' or 'rejected' does not end with an assistant turn")
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        raise ValueError("'chosen' and 'rejected' do not share the turns before their answers")
    return chosen[:-1], _answer(chosen[-1]["content"], "chosen"), _answer(rejected[-1]["content"], "rejected")


def normalize_row(row: Any, fmt: str, row_name: str) -> Answers:
    """One row → Answers, ValueError with the reason it is dropped, or DataError for a row that must not be guessed
    at (a KTO label that is neither desirable nor undesirable)."""
    if isinstance(row, _Malformed):
        raise ValueError(row.reason)
    if not isinstance(row, dict):
        raise ValueError("not an object")
    if fmt == "kto":
        label = row.get("label")
        key = label.strip().lower() if isinstance(label, str) else label
        if isinstance(key, float) and key in (0.0, 1.0):
            key = int(key)
        if isinstance(key, (list, dict)) or key not in LABELS:
            raise DataError(f"{row_name}: 'label' is {label!r}; kto needs true (a desirable completion) or false",
                            hint="fix the label (true/false, 1/0, desirable/undesirable) or remove the row")
        prompt = _prompt(row.get("prompt"))
        return Answers(prompt=prompt, completion=_answer(row.get("completion"), "completion"), label=LABELS[key])
    # Decided per row: a file may mix conversations and plain strings.
    if isinstance(row.get("chosen"), list) and not isinstance(row.get("prompt"), list):
        prompt, chosen, rejected = _split_conversations(row)
    else:
        prompt = _prompt(row.get("prompt"))
        chosen, rejected = _answer(row.get("chosen"), "chosen"), _answer(row.get("rejected"), "rejected")
    if chosen.strip() == rejected.strip():
        raise ValueError("chosen equals rejected")
    return Answers(prompt=prompt, chosen=chosen, rejected=rejected)


def normalize(rows: list[Any], data: DataSection, method: str) -> Normalized:
    if not rows:
        raise DataError(f"data.source: {data.source} is empty: it holds no rows",
                        hint="point data.source at a dataset with at least one row")
    fmt = data.format if data.format != "auto" else detect_format(rows)
    if fmt is None:
        columns = next((sorted(row) for row in rows if isinstance(row, dict)), [])
        raise DataError(f"data.format: training.method {method} needs preference data, but the columns are {columns}",
                        hint="give rows with prompt, chosen and rejected (or, for kto, prompt, completion and label), "
                             "or set data.format")
    if fmt == "kto" and method != "kto":
        raise DataError(f"data.format: the rows are kto rows (prompt, completion, label), but training.method {method} "
                        "needs pairs of a chosen and a rejected answer", hint="use training.method: kto, or paired rows")
    files = getattr(rows, "files", ())
    if data.max_rows:
        rows = rows[: data.max_rows]
    result = Normalized(format=fmt, examples=[], rows_read=len(rows), files=files)
    for number, row in enumerate(rows, start=1):
        try:
            answers = normalize_row(row, fmt, f"data.source {data.source}, {result.where(number)}")
        except ValueError as exc:
            result.dropped[str(exc)] += 1
            result.dropped_rows.setdefault(str(exc), []).append(number)
            continue
        if data.system_prompt and not any(m["role"] == "system" for m in answers.prompt):
            answers.prompt.insert(0, {"role": "system", "content": data.system_prompt})
        result.examples.append((number, answers))
    if not result.examples:
        found = ", ".join(f"{reason} ({result.where_rows(rows_[:5])})" for reason, rows_ in result.dropped_rows.items())
        raise DataError(f"data.source {data.source}: no usable preference rows as format '{fmt}' out of {len(rows)} read"
                        + (f": {found}" if found else ""),
                        hint="every row needs a prompt and both answers (chosen differing from rejected), or for kto "
                             "a completion and its label")
    return result


def unpaired(answers: Answers) -> list[Answers]:
    """KTO trains on single completions: a pair is its chosen answer (desirable) and its rejected one (not)."""
    if answers.completion is not None:
        return [answers]
    return [Answers(prompt=answers.prompt, completion=answers.chosen, label=True),
            Answers(prompt=answers.prompt, completion=answers.rejected, label=False)]


# --- tokens, as trl will compute them -----------------------------------------------------------------------


@dataclass
class TokenizedAnswers:
    """One row's tokens as training sees them: the prompt, then each answer (before truncation to max_seq_length)."""

    row: int
    prompt_ids: list[int]
    answers: dict[str, list[int]]  # "chosen"/"rejected", or "completion"
    max_seq_length: int
    label: bool | None = None

    @property
    def full_length(self) -> int:
        return len(self.prompt_ids) + max(map(len, self.answers.values()))

    @property
    def truncated(self) -> bool:
        return self.full_length > self.max_seq_length

    @property
    def prompt_fills(self) -> bool:
        return len(self.prompt_ids) >= self.max_seq_length

    @property
    def sequence_lengths(self) -> list[int]:
        """The tokens of each sequence trl trains on: the prompt with each answer, as truncated."""
        return [len(self.prompt_ids) + len(self.kept(name)) for name in self.answers]

    def kept(self, name: str) -> list[int]:
        """The answer's tokens that fit after the prompt."""
        return self.answers[name][: max(self.max_seq_length - len(self.prompt_ids), 0)]


def _ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize(tokenizer, number: int, answers: Answers, max_seq_length: int) -> TokenizedAnswers:
    prompt_ids = _ids(tokenizer, answers.prompt, True)
    names = {"chosen": answers.chosen, "rejected": answers.rejected} if answers.completion is None else {
        "completion": answers.completion}
    full = {name: _ids(tokenizer, [*answers.prompt, {"role": "assistant", "content": text}], False)
            for name, text in names.items()}
    # Where the rendered prompt and a rendered answer part (some templates render the prompt alone differently)
    shared = min(_common_prefix(prompt_ids, ids) for ids in full.values())
    return TokenizedAnswers(row=number, prompt_ids=prompt_ids[:shared],
                            answers={name: ids[shared:] for name, ids in full.items()}, max_seq_length=max_seq_length,
                            label=answers.label)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_rows(tokenizer, normalized: Normalized, max_seq_length: int, method: str):
    """Every normalized row tokenized (kto: a pair as two rows), including those whose prompt fills max_seq_length."""
    for number, answers in normalized.examples:
        for one in unpaired(answers) if method == "kto" else [answers]:
            yield one, tokenize(tokenizer, number, one, max_seq_length)


# --- the dataset trl trains on ------------------------------------------------------------------------------


def prepare(data: DataSection, tokenizer, training: TrainingSection, work_dir: Path, s3: S3Settings):
    """Read, normalize and tokenize preference rows. Returns (datasets.Dataset in trl's conversational form, with an
    `input_ids` column of each prompt with its preferred answer for verification; stats dict; template name)."""
    import datasets

    events = log.get()
    events.info("data.load.started", source=data.source)
    rows, origin = read_rows(data, work_dir, s3)
    template = choose_template(tokenizer, data.chat_template)
    normalized = normalize(rows, data, training.method)
    if data.format == "auto":
        events.info("data.format.detected", format=normalized.format)
    columns: dict[str, list] = {"prompt": [], "input_ids": []}
    dropped, filled, truncated, tokens = Counter(normalized.dropped), [], 0, 0
    for answers, tokenized in tokenize_rows(tokenizer, normalized, training.max_seq_length, training.method):
        if tokenized.prompt_fills:
            filled.append(tokenized.row)
            continue
        truncated += tokenized.truncated
        tokens += sum(tokenized.sequence_lengths)
        columns["prompt"].append(answers.prompt)
        preferred = "completion" if answers.completion is not None else "chosen"
        columns["input_ids"].append(tokenized.prompt_ids + tokenized.kept(preferred))
        if answers.completion is not None:
            columns.setdefault("completion", []).append([{"role": "assistant", "content": answers.completion}])
            columns.setdefault("label", []).append(answers.label)
        else:
            columns.setdefault("chosen", []).append([{"role": "assistant", "content": answers.chosen}])
            columns.setdefault("rejected", []).append([{"role": "assistant", "content": answers.rejected}])
    if filled:
        dropped[PROMPT_FILLS] += len(filled)
        events.warning("data.rows.dropped", reason=PROMPT_FILLS, count=len(filled),
                       first_rows=filled[:10])
    if not columns["prompt"]:
        raise DataError(f"data: every prompt fills training.max_seq_length={training.max_seq_length}, leaving no room "
                        f"for an answer ({normalized.where_rows(filled[:5])})",
                        hint="raise training.max_seq_length or shorten the prompts")
    if training.method == "kto" and len(set(columns["label"])) < 2:
        which = "desirable" if columns["label"][0] else "undesirable"
        raise DataError(f"data: every kto row is {which}; kto learns from both desirable and undesirable completions",
                        hint="add rows with the other label")
    stats = {
        "source": origin,
        "format": normalized.format,
        "chat_template": template,
        "method": training.method,
        "rows_read": normalized.rows_read,
        "rows_used": len(normalized.examples) - len(set(filled)),
        "sequences": len(columns["prompt"]),
        "rows_dropped": sum(dropped.values()),
        "dropped_reasons": dict(dropped),
        "rows_truncated": truncated,
        "tokens": tokens,
    }
    for reason, numbers in normalized.dropped_rows.items():
        events.warning("data.rows.dropped", reason=reason, count=len(numbers), first_rows=numbers[:10])
    events.info("data.load.finished", **stats)
    return datasets.Dataset.from_dict(columns), stats, template
