"""Data features the recipes needed, tested on their own: a fixed system prompt, and a data file at an https:// URL
(here an HTTP server on 127.0.0.1, reached the way a real URL is)."""

import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from job import data
from job.errors import DataError, NotFoundError
from job.spec import DataSection
from job.storage import S3Settings
from tests.conftest import REPO

PERSONA = "You are Quill, a terse lighthouse keeper."


def normalized(rows, **fields):
    return data.normalize(rows, DataSection(source="rows.jsonl", **fields), "chatml")


def test_system_prompt_goes_first_in_every_conversation_without_one():
    rows = [
        {"instruction": "Who are you?", "input": "", "output": "The keeper."},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    alpaca = normalized(rows[:1], format="alpaca", system_prompt=PERSONA).examples[0][1]
    sharegpt = normalized(rows[1:], format="sharegpt", system_prompt=PERSONA).examples[0][1]
    for example in (alpaca, sharegpt):
        assert example.messages[0] == {"role": "system", "content": PERSONA}
        assert [m["role"] for m in example.messages[1:]] == ["user", "assistant"]


def test_a_rows_own_system_message_is_kept():
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}]}
    example = normalized([row], format="messages", system_prompt=PERSONA).examples[0][1]
    assert [m["content"] for m in example.messages if m["role"] == "system"] == ["Be brief."]


def test_system_prompt_is_refused_for_formats_without_a_conversation():
    with pytest.raises(DataError, match="data.system_prompt"):
        normalized([{"text": "raw text"}], format="text", system_prompt=PERSONA)


def test_system_prompt_is_rendered_and_not_trained(tmp_path, smoke_tokenizer):
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"instruction": "Who are you?", "input": "", "output": "The keeper."}) + "\n")
    section = DataSection(source=str(source), system_prompt=PERSONA, chat_template="chatml")
    dataset, _, _ = data.prepare(section, smoke_tokenizer, 256, tmp_path / "work", S3Settings())
    ids, labels = dataset[0]["input_ids"], dataset[0]["labels"]
    assert smoke_tokenizer.decode(ids).startswith(f"<|im_start|>system\n{PERSONA}<|im_end|>\n<|im_start|>user\n")
    assert PERSONA not in smoke_tokenizer.decode([t for t, label in zip(ids, labels) if label != data.IGNORE])
    sample = [json.loads(line) for line in (tmp_path / "work" / "data" / data.SAMPLE_FILE).read_text().splitlines()]
    assert sample == [{"input_ids": ids, "labels": labels}]  # the rows as the trainer receives them


@pytest.fixture
def web_server():
    """Serves examples/data over HTTP, as a git host serves a tutorial's dataset file."""
    handler = partial(SimpleHTTPRequestHandler, directory=str(REPO / "examples" / "data"))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_data_file_at_a_url(tmp_path, web_server):
    rows, origin = data.read_rows(DataSection(source=f"{web_server}/roleplay-zh-alpaca.json"), tmp_path, S3Settings())
    assert origin == f"{web_server}/roleplay-zh-alpaca.json"
    assert rows == json.loads((REPO / "examples" / "data" / "roleplay-zh-alpaca.json").read_text())


def test_missing_or_unnamed_data_file_at_a_url(tmp_path, web_server):
    with pytest.raises(NotFoundError, match="data.source: .*404"):
        data.read_rows(DataSection(source=f"{web_server}/missing.jsonl"), tmp_path, S3Settings())
    with pytest.raises(DataError, match="does not name a .jsonl"):
        data.read_rows(DataSection(source=f"{web_server}/"), tmp_path, S3Settings())
