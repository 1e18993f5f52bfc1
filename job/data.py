"""Load a dataset, normalize its rows to conversations, and tokenize them with loss masks.

Pure functions (detect, normalize, tokenize) are separate from the readers (files, S3, hub), so every
format is testable without a network.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job import log
from job.chat_templates import NAMED
from job.errors import DataError, NotFoundError, TransientError
from job.spec import DataSection, TrainingSection
from job.storage import S3Settings, open_location

SUPPORTED = (".jsonl", ".json", ".parquet", ".csv")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CHAT_ROLES = {"system", "user", "assistant"}
IGNORE = -100


@dataclass
class Example:
    messages: list[dict[str, Any]] | None = None  # chat formats
    text: str | None = None  # raw text
    prompt: str | None = None  # prompt_completion
    completion: str | None = None


class Rows(list):
    """Parsed rows, numbered from 1 on across the files of a directory or S3 prefix (in sorted order); `files` holds
    (first row, file) for each file, so an error about row 1,234 can name the file and the row inside it."""

    def __init__(self, rows=(), files: tuple[tuple[int, str], ...] = ()):
        super().__init__(rows)
        self.files = files


@dataclass
class Normalized:
    format: str
    examples: list[tuple[int, Example]]  # (row number, example)
    rows_read: int
    dropped: Counter = field(default_factory=Counter)
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)
    files: tuple[tuple[int, str], ...] = ()  # Rows.files of the source

    def where(self, row: int) -> str:
        """"row N", and for a source of several files also which file holds it and its row there."""
        return f"row {row}{self._in_file(row)}"

    def where_rows(self, rows: list[int]) -> str:
        """"rows [1, 2]", and for a source of several files each row's file and its row there."""
        if len(self.files) < 2:
            return f"rows {rows}"
        return "rows " + ", ".join(f"{row}{self._in_file(row)}" for row in rows)

    def _in_file(self, row: int) -> str:
        if len(self.files) < 2:
            return ""
        first, shown = max(start for start in self.files if start[0] <= row)
        return f" ({shown}, row {row - first + 1})"


@dataclass
class Tokenized:
    input_ids: list[list[int]]
    labels: list[list[int]]
    rows_truncated: int
    dropped: Counter
    tokens: int
    trained_tokens: int


# --- reading -------------------------------------------------------------------------------------------------


def read_rows(data: DataSection, work_dir: Path, s3: S3Settings) -> tuple[list[Any], str]:
    """Rows as parsed objects (malformed JSONL lines come back as `_Malformed`), and where they came from."""
    source = data.source
    if source.startswith("pkg://"):
        from job.model import package_file

        path = package_file(source, "data.source")
        return _read_local(path), source
    if source.startswith("s3://"):
        return _read_s3(source, work_dir, s3), source
    if source.startswith(("https://", "http://")):
        return _read_url(source, work_dir), source
    path = Path(source).expanduser()
    if path.exists():
        return _read_local(path), str(path)
    if source.startswith((".", "/", "~")) or source.endswith(SUPPORTED) or source.count("/") > 1:
        raise NotFoundError(f"data.source: no file or directory {source}")
    return read_hub(data), f"hub:{source}"


class _Malformed:
    def __init__(self, reason: str):
        self.reason = reason


def _decode(raw: bytes, shown: str, suffix: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not part of row 1
    except UnicodeDecodeError as exc:
        # utf-8-sig counts from after the byte-order mark; the file's offsets count it
        offset = exc.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)
        line = raw.count(b"\n", 0, offset) + 1
        where = f"row {line} (line {line})" if suffix == ".jsonl" else f"line {line}"
        raise DataError(
            f"data.source: {shown} is not UTF-8 text: {where} has the byte 0x{raw[offset]:02x} at byte offset {offset}",
            hint="re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT) or fix that row",
        ) from exc


def _read_file(path: Path, shown: str | None = None) -> list[Any]:
    """Rows of one file; `shown` is how the user named it (an s3:// URI for a downloaded object)."""
    shown = shown or str(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows: list[Any] = []
            lines = _decode(path.read_bytes(), shown, suffix).split("\n")
            if lines and lines[-1] == "":
                lines.pop()  # the newline that ends the last row
            for line in lines:
                if not line.strip():
                    rows.append(_Malformed("empty line"))
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    rows.append(_Malformed(f"invalid JSON ({exc.msg})"))
            return rows
        if suffix == ".json":
            loaded = json.loads(_decode(path.read_bytes(), shown, suffix))
            if isinstance(loaded, dict) and isinstance(loaded.get("data"), list):
                loaded = loaded["data"]
            if not isinstance(loaded, list):
                raise DataError(f"data.source: {shown} must hold a JSON list of rows (or {{\"data\": [...]}})")
            return loaded
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            return list(csv.DictReader(io.StringIO(_decode(path.read_bytes(), shown, suffix), newline="")))
    except json.JSONDecodeError as exc:
        raise DataError(f"data.source: {shown} is not valid JSON: {exc.msg} at line {exc.lineno}") from exc
    except DataError:
        raise
    except Exception as exc:  # pyarrow and csv raise many types for corrupt files
        raise DataError(f"data.source: cannot read {shown}: {exc}") from exc
    raise DataError(f"data.source: {shown} has an unsupported extension; use one of {', '.join(SUPPORTED)}")


def _read_local(path: Path) -> list[Any]:
    if path.is_file():
        return _read_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)
    if not files:
        raise DataError(f"data.source: directory {path} holds no {', '.join(SUPPORTED)} files")
    rows = Rows()
    for file in files:
        _extend_from(rows, _read_file(file), str(file))
    return rows


def _extend_from(rows: Rows, part: list[Any], shown: str) -> None:
    """Rows of several files are numbered on across them, in sorted order; this event says which file holds which."""
    log.get().info("data.file.read", file=shown, first_row=len(rows) + 1, rows=len(part))
    rows.files = (*rows.files, (len(rows) + 1, shown))
    rows.extend(part)


def _read_s3(uri: str, work_dir: Path, s3: S3Settings) -> list[Any]:
    if uri.lower().endswith(SUPPORTED):
        bucket_uri, _, key = uri.rpartition("/")
        return _read_file(_download(open_location(bucket_uri, s3), key, work_dir), uri)
    store = open_location(uri, s3)
    keys = [k for k in store.list() if k.lower().endswith(SUPPORTED)]
    if not keys:
        raise NotFoundError(f"data.source: no {', '.join(SUPPORTED)} objects under {uri}")
    rows = Rows()
    for key in keys:
        shown = f"{store.uri}/{key}"
        _extend_from(rows, _read_file(_download(store, key, work_dir), shown), shown)
    return rows


def _download(store, key: str, work_dir: Path) -> Path:
    from job.model import local_path_for

    local = local_path_for(work_dir / "data", key, f"data.source: object {store.uri}/{key}", DataError)
    try:
        store.download_file(key, local)
    except NotFoundError as exc:
        raise NotFoundError(f"data.source: {exc.message}",
                            hint=exc.hint or "check the bucket, the key and that the credentials may read it") from exc
    except TransientError as exc:
        raise TransientError(f"data.source: {exc.message}",
                             hint=exc.hint or "the storage did not answer; the same run may succeed when retried") from exc
    return local


def _read_url(url: str, work_dir: Path) -> list[Any]:
    """One file published on the web (a tutorial's dataset in its git repository, say)."""
    from urllib.parse import urlparse

    from job.storage import read_uri

    name = Path(urlparse(url).path).name
    if not name.lower().endswith(SUPPORTED):
        raise DataError(f"data.source: {url} does not name a {', '.join(SUPPORTED)} file",
                        hint="point data.source at the URL of one data file")
    try:
        body = read_uri(url)
    except (NotFoundError, TransientError) as exc:
        raise type(exc)(f"data.source: {exc.message}", hint=exc.hint) from exc
    local = work_dir / "data" / "url" / name
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(body)
    return _read_file(local, url)


def read_hub(data: DataSection) -> list[Any]:
    import datasets
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        loaded = datasets.load_dataset(data.source, split=data.split)
    except (RepositoryNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise NotFoundError(f"data.source: dataset {data.source!r} not found on the Hugging Face hub") from exc
    except (datasets.exceptions.DataFilesNotFoundError, datasets.data_files.EmptyDatasetError) as exc:
        # FileNotFoundError subclasses: caught before OSError, which would call them transient
        raise NotFoundError(f"data.source: {data.source!r} holds no data files that datasets can read ({exc})",
                            hint="point data.source at a dataset with .jsonl/.json/.parquet/.csv files") from exc
    except ValueError as exc:
        if "split" not in str(exc).lower():
            raise
        raise DataError(f"data.split: {exc}", hint="set data.split to one of the dataset's splits") from exc
    except RuntimeError as exc:
        if "scripts are no longer supported" not in str(exc):
            raise
        raise DataError(f"data.source: {exc}", hint="datasets 4 loads only data files: use a dataset (or its "
                        "refs/convert/parquet revision) that has them") from exc
    except (LocalEntryNotFoundError, ConnectionError, OSError) as exc:
        raise TransientError(f"data.source: could not reach the Hugging Face hub for {data.source!r}: {exc}") from exc
    return loaded.to_list()


# --- normalizing ---------------------------------------------------------------------------------------------


def detect_format(rows: list[Any]) -> str:
    for row in rows:
        if not isinstance(row, dict):
            continue
        keys = set(row)
        if "messages" in keys:
            return "messages"
        if "conversations" in keys:
            return "sharegpt"
        if {"instruction", "output"} <= keys:
            return "alpaca"
        if {"prompt", "completion"} <= keys:
            return "prompt_completion"
        if "text" in keys:
            return "text"
        if {"chosen", "rejected"} <= keys:
            raise DataError(f"data.format: the columns {sorted(keys)} are preference data (a chosen and a rejected "
                            "answer), which supervised fine-tuning cannot train on",
                            hint="set training.method: dpo (or orpo, kto) to train on the pairs")
        raise DataError(
            f"data.format: cannot detect the format from columns {sorted(keys)}",
            hint="expected messages, conversations, instruction/output, prompt/completion or text; or set data.format",
        )
    raise DataError(f"data.source: no row is a JSON object to detect the format from ({_first_problems(rows)})",
                    hint="fix those rows; each row must be one object such as {\"messages\": [...]}")


def _first_problems(rows: list[Any]) -> str:
    found = [f"row {n}: {row.reason if isinstance(row, _Malformed) else 'not an object'}"
             for n, row in enumerate(rows[:3], start=1)]
    return "; ".join(found) + (f"; and {len(rows) - 3} more" if len(rows) > 3 else "")


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def parse_turns(turns: Any, column: str, *, sharegpt: bool, where: str = "") -> list[dict[str, str]]:
    """A column of chat turns (role/content, or ShareGPT's from/value) → messages, or ValueError with the reason the
    row is dropped; `where` ends each reason (" in 'chosen'")."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"missing or empty '{column}'")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise ValueError(f"a turn in '{column}' is not an object")
        if sharegpt and "from" in turn:
            role, content = SHAREGPT_ROLES.get(str(turn.get("from")).lower()), turn.get("value")
        else:
            role, content = turn.get("role"), turn.get("content")
            role = role if role in CHAT_ROLES else None
        if role is None:
            raise ValueError(f"unknown role {turn.get('from', turn.get('role'))!r}{where}")
        if not isinstance(content, str):
            raise ValueError(f"a {role} turn has no text content{where}")
        messages.append({"role": role, "content": content})
    return messages


def normalize_row(row: Any, fmt: str, alpaca_template: bool) -> Example:
    """One row → Example, or ValueError with the reason it is dropped."""
    if isinstance(row, _Malformed):
        raise ValueError(row.reason)
    if not isinstance(row, dict):
        raise ValueError("not an object")
    if fmt in ("messages", "sharegpt"):
        column = "messages" if fmt == "messages" else "conversations"
        messages = parse_turns(row.get(column), column, sharegpt=fmt == "sharegpt")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise ValueError("no assistant turn with text")
        return Example(messages=messages)
    if fmt == "alpaca":
        instruction, output, extra = row.get("instruction"), row.get("output"), row.get("input") or ""
        if not _nonempty_str(instruction):
            raise ValueError("missing or empty 'instruction'")
        if not _nonempty_str(output):
            raise ValueError("missing or empty 'output'")
        if not isinstance(extra, str):
            raise ValueError("'input' is not text")
        if alpaca_template:
            user = {"role": "user", "content": instruction, "input": extra}
        else:
            user = {"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction}
        return Example(messages=[user, {"role": "assistant", "content": output}])
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str):
            raise ValueError("missing 'prompt'")
        if not _nonempty_str(completion):
            raise ValueError("missing or empty 'completion'")
        return Example(prompt=prompt, completion=completion)
    if fmt == "text":
        text = row.get("text")
        if not _nonempty_str(text):
            raise ValueError("missing or empty 'text'")
        return Example(text=text)
    raise ValueError(f"unknown format {fmt}")


def normalize(rows: list[Any], data: DataSection, template_name: str) -> Normalized:
    if not rows:
        raise DataError(f"data.source: {data.source} is empty: it holds no rows",
                        hint="point data.source at a dataset with at least one row")
    fmt = data.format if data.format != "auto" else detect_format(rows)
    if data.system_prompt and fmt in ("text", "prompt_completion"):
        raise DataError(f"data.system_prompt: format '{fmt}' has no conversation to put a system message in",
                        hint="use it with alpaca, sharegpt or messages rows, or remove it")
    files = rows.files if isinstance(rows, Rows) else ()
    if data.max_rows:
        rows = rows[: data.max_rows]
    result = Normalized(format=fmt, examples=[], rows_read=len(rows), files=files)
    for number, row in enumerate(rows, start=1):
        try:
            example = normalize_row(row, fmt, template_name == "alpaca")
            if data.system_prompt and not any(m["role"] == "system" for m in example.messages):
                example.messages.insert(0, {"role": "system", "content": data.system_prompt})
            result.examples.append((number, example))
        except ValueError as exc:
            reason = str(exc)
            result.dropped[reason] += 1
            result.dropped_rows.setdefault(reason, []).append(number)
    if not result.examples:
        first = ", ".join(f"{reason} ({result.where_rows(rows_[:5])})" for reason, rows_ in result.dropped_rows.items())
        raise DataError(
            f"data.source: no usable rows as format '{fmt}' out of {len(rows)} read" + (f": {first}" if first else ""),
            hint=_format_hint(rows, data.format, fmt),
        )
    return result


def _format_hint(rows: list[Any], declared: str, fmt: str) -> str:
    columns = next((sorted(row) for row in rows if isinstance(row, dict)), None)
    if declared != "auto":
        try:
            looks_like = detect_format(rows)
        except DataError:
            looks_like = None
        if looks_like and looks_like != fmt:
            return f"data.format is '{declared}' but the columns {columns} are format '{looks_like}': set data.format: {looks_like} (or auto)"
    return f"fix those rows, or set data.format to the format of the columns {columns}"


# --- templates and tokenizing --------------------------------------------------------------------------------


def choose_template(tokenizer, wanted: str) -> str:
    """Set the chat template on the tokenizer and return its name ('model' for the model's own)."""
    own = getattr(tokenizer, "chat_template", None)
    if wanted in ("auto", "model"):
        if own:
            return "model"
        if wanted == "model":
            raise DataError("data.chat_template: 'model' was asked for but the model has no chat template",
                            hint="name one of chatml, llama-3, alpaca")
        wanted = "chatml"
    tokenizer.chat_template = NAMED[wanted]
    return wanted


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _segments_for_chat(tokenizer, messages, row: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn (with its end-of-turn marker)."""
    full = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if message["content"].strip() and message["content"].strip() not in through:
            raise DataError(
                f"{row}: data.chat_template: the chat template drops the assistant's text (turn {i + 1}) "
                "when it renders the conversation, so that turn cannot be trained",
                hint="use a template that renders assistant messages: set data.chat_template: chatml (or llama-3, alpaca)",
            )
        if not full.startswith(before) or not full.startswith(through) or len(through) <= len(before):
            raise DataError(
                f"{row}: the chat template does not render turn {i + 1} as a stable prefix of the conversation",
                hint="use a template that renders earlier turns unchanged, or data.chat_template: chatml",
            )
        if message["content"].strip() and message["content"].strip() not in through[len(before):]:
            raise DataError(
                f"{row}: the chat template drops the assistant turn's text",
                hint="the template must render assistant messages; set data.chat_template to a named template",
            )
        spans.append((len(before), len(through)))
    return full, spans


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
        ids, offsets = [bos, *ids], [(0, 0), *offsets]
    return ids, offsets


def tokenize_example(tokenizer, example: Example, row: str, responses_only: bool) -> tuple[list[int], list[int]]:
    """`row` names the row in errors ("row 12", or with its file: Normalized.where)."""
    if example.messages is not None:
        text, spans = _segments_for_chat(tokenizer, example.messages, row)
    elif example.text is not None:
        text, spans = example.text, [(0, len(example.text))]
        responses_only = False
    else:
        text = example.prompt + example.completion
        spans = [(len(example.prompt), len(text))]
    ids, offsets = _encode(tokenizer, text)
    if responses_only:
        # Overlap, not start: a prompt's trailing space often fuses into the answer's first token (" Hello").
        trained = [end > start and any(start < b and end > a for a, b in spans) for start, end in offsets]
    else:
        trained = [True] * len(ids)
    eos = tokenizer.eos_token_id
    last_span = [i for i, flag in enumerate(trained) if flag]
    # A model that never sees EOS after an answer never learns to stop: append it unless the turn already ends with it.
    if eos is not None and not (last_span and eos in ids[last_span[-1] - 2 : last_span[-1] + 1]):
        ids.append(eos)
        trained.append(True)
    labels = [tok if flag else IGNORE for tok, flag in zip(ids, trained)]
    return ids, labels


@dataclass
class TokenizedRow:
    """One row as training sees it: `job preview` shows these, `tokenize` keeps those with a trained token."""

    row: int
    input_ids: list[int]
    labels: list[int]
    full_length: int  # tokens before truncation to max_seq_length

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


# No vocabulary's tokens average this many characters: a longer row is many times max_seq_length, training would
# keep a sliver of it, and tokenizing it whole can take gigabytes (a whole document or a broken file in one cell).
MAX_CHARS_PER_TOKEN = 64


def _refuse_huge(example: Example, row: str, max_seq_length: int) -> None:
    parts = [m["content"] for m in example.messages or []] + [example.text or "", example.prompt or "", example.completion or ""]
    chars = sum(len(part) for part in parts)
    if chars > max_seq_length * MAX_CHARS_PER_TOKEN:
        raise DataError(
            f"{row}: {chars:,} characters, many times what training.max_seq_length={max_seq_length} tokens can hold",
            hint="split long documents into several rows, remove the row, or raise training.max_seq_length",
        )


def tokenize_rows(tokenizer, normalized: Normalized, max_seq_length: int, responses_only: bool):
    """Yield every normalized row tokenized and truncated, including rows left with no trained token."""
    for row, example in normalized.examples:
        _refuse_huge(example, normalized.where(row), max_seq_length)
        ids, labels = tokenize_example(tokenizer, example, normalized.where(row), responses_only)
        yield TokenizedRow(row, ids[:max_seq_length], labels[:max_seq_length], len(ids))


def tokenize(tokenizer, normalized: Normalized, max_seq_length: int, responses_only: bool) -> Tokenized:
    out = Tokenized([], [], 0, Counter(), 0, 0)
    emptied: list[int] = []
    for item in tokenize_rows(tokenizer, normalized, max_seq_length, responses_only):
        ids, labels = item.input_ids, item.labels
        out.rows_truncated += item.truncated
        if not item.trained_tokens:
            out.dropped["no trained token (after truncation)"] += 1
            emptied.append(item.row)
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.tokens += len(ids)
        out.trained_tokens += sum(label != IGNORE for label in labels)
    if not out.input_ids:
        raise DataError(
            f"data: every row lost all its trained tokens to truncation at training.max_seq_length={max_seq_length} "
            f"({normalized.where_rows(emptied[:5])}{' …' if len(emptied) > 5 else ''}: the answer starts beyond "
            "that length)",
            hint="raise training.max_seq_length or shorten the prompts",
        )
    return out


SAMPLE_FILE, SAMPLE_ROWS = "tokenized-sample.jsonl", 16


def write_sample(path: Path, tokenized: Tokenized) -> None:
    """The first rows exactly as the trainer receives them (ids and labels), left in the work dir so the template,
    the EOS and the loss mask a run really used can be checked afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for ids, labels in list(zip(tokenized.input_ids, tokenized.labels))[:SAMPLE_ROWS]:
            fh.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")


def prepare(data: DataSection, tokenizer, max_seq_length: int, work_dir: Path, s3: S3Settings):
    """Read, normalize and tokenize. Returns (datasets.Dataset, stats dict, template name)."""
    import datasets

    events = log.get()
    events.info("data.load.started", source=data.source)
    rows, origin = read_rows(data, work_dir, s3)
    template = choose_template(tokenizer, data.chat_template)
    normalized = normalize(rows, data, template)
    if data.format == "auto":
        events.info("data.format.detected", format=normalized.format)
    tokenized = tokenize(tokenizer, normalized, max_seq_length, data.train_on_responses_only)
    dropped = normalized.dropped + tokenized.dropped
    stats = {
        "source": origin,
        "format": normalized.format,
        "chat_template": template,
        "rows_read": normalized.rows_read,
        "rows_used": len(tokenized.input_ids),
        "rows_dropped": sum(dropped.values()),
        "dropped_reasons": dict(dropped),
        "rows_truncated": tokenized.rows_truncated,
        "tokens": tokenized.tokens,
        "trained_tokens": tokenized.trained_tokens,
    }
    for reason, numbers in normalized.dropped_rows.items():
        events.warning("data.rows.dropped", reason=reason, count=len(numbers), first_rows=numbers[:10])
    events.info("data.load.finished", **stats)
    write_sample(work_dir / "data" / SAMPLE_FILE, tokenized)
    dataset = datasets.Dataset.from_dict({"input_ids": tokenized.input_ids, "labels": tokenized.labels})
    return dataset, stats, template


def prepare_with_eval(data: DataSection, tokenizer, training: TrainingSection, work_dir: Path, s3: S3Settings):
    """prepare() (or, for a preference method, job.preference's), and the evaluation rows: data.eval prepared the same
    way, or data.eval_split held out of the training rows (None when neither is set). Returns (train dataset, eval
    dataset, stats dict, template name); every dataset has an input_ids column of the rows as trained."""
    from job import preference

    def prepare_one(section: DataSection, folder: Path):
        if training.method == "sft":
            return prepare(section, tokenizer, training.max_seq_length, folder, s3)
        return preference.prepare(section, tokenizer, training, folder, s3)

    dataset, stats, template = prepare_one(data, work_dir)
    seed = training.seed
    eval_dataset = None
    if data.eval:
        eval_section = data.model_copy(update={"source": data.eval, "eval": None, "max_rows": None})
        eval_dataset, stats["eval"], _ = prepare_one(eval_section, work_dir / "eval")
    elif data.eval_split:
        try:
            parts = dataset.train_test_split(test_size=data.eval_split, seed=seed)
        except ValueError as exc:  # datasets refuses a split that leaves either side empty
            raise DataError(f"data.eval_split: {data.eval_split} of {len(dataset)} rows leaves no row on one "
                            f"side ({exc})", hint="use more rows, another eval_split, or a separate data.eval") from exc
        dataset, eval_dataset = parts["train"], parts["test"]
        stats["eval"] = {"rows": len(eval_dataset), "from": "data.eval_split"}
    return dataset, eval_dataset, stats, template
