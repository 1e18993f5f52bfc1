import csv
import io
import json

import pytest

from job import data, log
from job.chat_templates import ALPACA_PREAMBLE
from job.errors import DataError
from job.spec import DataSection
from job.storage import S3Settings

ROWS = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                              {"role": "assistant", "content": "Hello friend"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello friend"}]},
    "alpaca": {"instruction": "Greet", "input": "a friend", "output": "Hello friend"},
    "prompt_completion": {"prompt": "Say hi: ", "completion": "Hello friend"},
    "text": {"text": "Hello friend, this is raw text."},
}


def write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def prepare(tmp_path, tokenizer, rows, name="rows.jsonl", **kwargs):
    source = write(tmp_path / name, rows)
    section = DataSection(source=str(source), **kwargs)
    return data.prepare(section, tokenizer, 256, tmp_path, S3Settings())


@pytest.mark.parametrize("fmt", list(ROWS))
def test_every_format_is_detected_and_trains_only_the_answer(tmp_path, smoke_tokenizer, fmt):
    dataset, stats, _ = prepare(tmp_path, smoke_tokenizer, [ROWS[fmt]] * 3)
    assert stats["format"] == fmt and stats["rows_used"] == 3
    ids, labels = dataset[0]["input_ids"], dataset[0]["labels"]
    trained = smoke_tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert "Hello friend" in trained
    if fmt != "text":
        assert "Hi there" not in trained and "Say hi" not in trained and "Greet" not in trained
    assert smoke_tokenizer.eos_token_id in [t for t, lab in zip(ids, labels) if lab != -100]


def test_loss_on_everything_when_switched_off(tmp_path, smoke_tokenizer):
    dataset, _, _ = prepare(tmp_path, smoke_tokenizer, [ROWS["messages"]], train_on_responses_only=False)
    assert all(label != -100 for label in dataset[0]["labels"])


@pytest.mark.parametrize("name", ["rows.json", "rows.csv", "rows.parquet"])
def test_file_types(tmp_path, smoke_tokenizer, name):
    _, stats, _ = prepare(tmp_path, smoke_tokenizer, [ROWS["alpaca"]] * 2, name=name)
    assert stats["format"] == "alpaca" and stats["rows_used"] == 2


def test_directory_source_reads_every_file(tmp_path, smoke_tokenizer):
    folder = tmp_path / "d"
    folder.mkdir()
    write(folder / "a.jsonl", [ROWS["alpaca"]] * 2)
    write(folder / "b.parquet", [ROWS["alpaca"]] * 3)
    events = io.StringIO()
    log.setup(stream=events, json_logs=True)
    _, stats, _ = data.prepare(DataSection(source=str(folder)), smoke_tokenizer, 256, tmp_path, S3Settings())
    assert stats["rows_read"] == 5
    # rows are numbered on across the files: the events say which rows each file holds
    parts = [(e["file"], e["first_row"], e["rows"]) for e in map(json.loads, events.getvalue().splitlines())
             if e["event"] == "data.file.read"]
    assert parts == [(str(folder / "a.jsonl"), 1, 2), (str(folder / "b.parquet"), 3, 3)]


def test_an_error_about_a_row_of_a_directory_names_its_file_and_its_row_there(tmp_path, smoke_tokenizer):
    folder = tmp_path / "d"
    folder.mkdir()
    write(folder / "a.jsonl", [ROWS["alpaca"]] * 2)
    write(folder / "b.jsonl", [ROWS["alpaca"], {**ROWS["alpaca"], "output": "x" * 256 * data.MAX_CHARS_PER_TOKEN}])
    with pytest.raises(DataError, match=rf"row 4 \({folder / 'b.jsonl'}, row 2\): .* characters"):
        data.prepare(DataSection(source=str(folder)), smoke_tokenizer, 256, tmp_path, S3Settings())
    # no usable row at all: each row named the same way
    write(folder / "a.jsonl", [{"instruction": "x"}])
    write(folder / "b.jsonl", [{"instruction": "y"}])
    with pytest.raises(DataError, match=rf"rows 1 \({folder / 'a.jsonl'}, row 1\), 2 \({folder / 'b.jsonl'}, row 1\)"):
        data.prepare(DataSection(source=str(folder), format="alpaca"), smoke_tokenizer, 256, tmp_path, S3Settings())


def test_s3_prefix_source(tmp_path, smoke_tokenizer, s3_env, bucket):
    import boto3

    client = boto3.client("s3")
    for i in range(2):
        client.put_object(Bucket=bucket, Key=f"data/part-{i}.jsonl", Body=json.dumps(ROWS["sharegpt"]).encode() + b"\n")
    _, stats, _ = data.prepare(DataSection(source=f"s3://{bucket}/data/"), smoke_tokenizer, 256, tmp_path, S3Settings())
    assert stats["rows_read"] == 2 and stats["format"] == "sharegpt"


def test_dropped_rows_are_counted_with_reasons(tmp_path, smoke_tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS["alpaca"]) + "\n{not json\n" + json.dumps({"instruction": "x", "output": ""}) + "\n")
    _, stats, _ = data.prepare(DataSection(source=str(path), format="alpaca"), smoke_tokenizer, 256, tmp_path, S3Settings())
    assert stats["rows_used"] == 1 and stats["rows_dropped"] == 2
    assert set(stats["dropped_reasons"]) == {"invalid JSON (Expecting property name enclosed in double quotes)",
                                             "missing or empty 'output'"}


def test_truncation_is_counted(tmp_path, smoke_tokenizer):
    long = {"prompt": "Q: ", "completion": "word " * 400}
    dataset, stats, _ = data.prepare(DataSection(source=str(write(tmp_path / "r.jsonl", [long, ROWS["prompt_completion"]]))),
                                     smoke_tokenizer, 64, tmp_path, S3Settings())
    assert stats["rows_truncated"] == 1
    assert max(len(ids) for ids in dataset["input_ids"]) == 64


def test_wrong_format_declared_is_a_data_error(tmp_path, smoke_tokenizer):
    with pytest.raises(DataError) as err:
        prepare(tmp_path, smoke_tokenizer, [ROWS["alpaca"]], format="sharegpt")
    assert "no usable rows as format 'sharegpt'" in str(err.value) and "rows [1]" in str(err.value)


def test_undetectable_columns(tmp_path, smoke_tokenizer):
    with pytest.raises(DataError) as err:
        prepare(tmp_path, smoke_tokenizer, [{"question": "a", "answer": "b"}])
    assert "['answer', 'question']" in str(err.value)


def test_alpaca_template_renders_the_classic_prompt_with_eos(tmp_path, smoke_tokenizer):
    tok = type(smoke_tokenizer).from_pretrained(smoke_tokenizer.name_or_path)
    dataset, stats, template = prepare(tmp_path, tok, [ROWS["alpaca"]], chat_template="alpaca")
    assert template == "alpaca"
    text = tok.decode(dataset[0]["input_ids"])
    assert text.startswith(ALPACA_PREAMBLE)
    assert "### Instruction:\nGreet\n\n### Input:\na friend\n\n### Response:\nHello friend" in text
    assert dataset[0]["input_ids"][-1] == tok.eos_token_id and dataset[0]["labels"][-1] == tok.eos_token_id


def test_template_that_drops_the_assistant_turn_is_refused(tmp_path, smoke_tokenizer):
    tok = type(smoke_tokenizer).from_pretrained(smoke_tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    with pytest.raises(DataError) as err:
        prepare(tmp_path, tok, [ROWS["messages"]], chat_template="model")
    assert "row 1" in str(err.value)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_non_utf8_file_names_the_row_and_the_byte(tmp_path, smoke_tokenizer, bom):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(bom + b'{"text": "tea"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as err:
        data.prepare(DataSection(source=str(path)), smoke_tokenizer, 64, tmp_path, S3Settings())
    offset = len(bom) + 29
    assert path.read_bytes()[offset] == 0xE9
    assert f"not UTF-8 text: row 2 (line 2) has the byte 0xe9 at byte offset {offset}" in str(err.value)


def test_hub_dataset_id_reaches_the_network_boundary(tmp_path, smoke_tokenizer, monkeypatch):
    from job.errors import NotFoundError, TransientError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((TransientError, NotFoundError)) as err:
        data.read_rows(DataSection(source="yahma/alpaca-cleaned"), tmp_path, S3Settings())
    assert "yahma/alpaca-cleaned" in str(err.value)


def test_hub_loader_errors_keep_their_kind(tmp_path, monkeypatch):
    """What datasets raises for a repository without data files (FileNotFoundError subclasses, once taken for
    network trouble) and for a split it lacks, through the loader a hub id uses, on folders it can read offline."""
    from job.errors import NotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "README.md").write_text("no data here\n")
    with pytest.raises(NotFoundError, match="holds no data files"):
        data.read_hub(DataSection(source=str(tmp_path / "nothing")))
    (tmp_path / "train-only").mkdir()
    (tmp_path / "train-only" / "train.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match='data.split: Unknown split "validation"'):
        data.read_hub(DataSection(source=str(tmp_path / "train-only"), split="validation"))
