"""Preference rows: the formats users bring, what is dropped and why, what is refused, and the tokens trl will train."""

import json

import pytest

from job import data, preference
from job.errors import DataError, SpecError
from job.spec import DataSection, TrainingSection, resolve
from job.storage import S3Settings

PROMPT = "What is your name?"
STRINGS = {"prompt": PROMPT, "chosen": "Ahoy! I am Quill.", "rejected": "I am Quill."}
CONVERSATIONS = {"prompt": PROMPT,  # orpo-dpo-mix-40k keeps the question beside the conversations; it is not needed
                 "chosen": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "Ahoy! I am Quill."}],
                 "rejected": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "I am Quill."}]}
EXPLICIT = {"prompt": [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": PROMPT}],
            "chosen": [{"role": "assistant", "content": "Ahoy! I am Quill."}],
            "rejected": [{"role": "assistant", "content": "I am Quill."}]}
KTO = {"prompt": PROMPT, "completion": "Ahoy! I am Quill.", "label": True}


def normalized(rows, method="dpo", **section):
    return preference.normalize(rows, DataSection(source="rows.jsonl", **section), method)


@pytest.mark.parametrize(("row", "fmt"), [(STRINGS, "preference"), (CONVERSATIONS, "preference_messages"),
                                          (EXPLICIT, "preference_messages"), (KTO, "kto")])
def test_each_format_is_detected_and_gives_the_prompt_and_its_answers(row, fmt):
    method = "kto" if fmt == "kto" else "dpo"
    result = normalized([row], method)
    assert result.format == fmt
    (number, answers), = result.examples
    assert number == 1 and answers.prompt[-1] == {"role": "user", "content": PROMPT}
    if fmt == "kto":
        assert (answers.completion, answers.label) == ("Ahoy! I am Quill.", True)
    else:
        assert (answers.chosen, answers.rejected) == ("Ahoy! I am Quill.", "I am Quill.")


def test_rows_without_a_side_or_with_equal_sides_are_dropped_and_counted():
    rows = [STRINGS, {"prompt": PROMPT, "chosen": "Ahoy!"}, {"prompt": PROMPT, "chosen": "Same", "rejected": "Same "},
            CONVERSATIONS]
    result = normalized(rows)
    assert [n for n, _ in result.examples] == [1, 4]  # a conversation among string rows is read as one
    assert result.dropped_rows == {"missing or empty 'rejected'": [2], "chosen equals rejected": [3]}
    other_question = {**CONVERSATIONS, "rejected": [{"role": "user", "content": "Another question"},
                                                    {"role": "assistant", "content": "No"}]}
    result = normalized([CONVERSATIONS, other_question])
    assert result.dropped_rows == {"'chosen' and 'rejected' do not share the turns before their answers": [2]}


def test_no_usable_row_is_exit_2_naming_the_rows_and_reasons():
    with pytest.raises(DataError) as err:
        normalized([{"prompt": "a", "chosen": "x", "rejected": "x"}, {"prompt": "b", "chosen": "y"}])
    assert err.value.exit_code == 2
    assert "chosen equals rejected (rows [1])" in str(err.value) and "missing or empty 'rejected' (rows [2])" in str(err.value)


@pytest.mark.parametrize("label", ["maybe", None, 2, [True]])
def test_an_unknown_kto_label_is_exit_2_naming_the_row(label):
    with pytest.raises(DataError) as err:
        normalized([KTO, {**KTO, "label": label}], "kto")
    assert f"data.source rows.jsonl, row 2: 'label' is {label!r}" in str(err.value)


@pytest.mark.parametrize(("label", "want"), [(True, True), (0, False), ("false", False), ("Desirable", True), (1.0, True)])
def test_kto_labels_users_write(label, want):
    assert normalized([{**KTO, "label": label}], "kto").examples[0][1].label is want


def test_pairs_train_kto_as_a_desirable_and_an_undesirable_completion():
    (_, answers), = normalized([STRINGS], "kto").examples
    assert [(a.completion, a.label) for a in preference.unpaired(answers)] == [("Ahoy! I am Quill.", True),
                                                                              ("I am Quill.", False)]


def test_kto_rows_cannot_train_a_paired_method():
    with pytest.raises(DataError, match="needs pairs"):
        normalized([KTO], "dpo")


def test_sft_refuses_preference_rows_and_names_the_method():
    with pytest.raises(DataError, match="set training.method: dpo"):
        data.detect_format([STRINGS])


def test_a_system_prompt_goes_first_in_every_prompt_without_one():
    result = normalized([STRINGS, EXPLICIT], system_prompt="Speak like a pirate.")
    assert result.examples[0][1].prompt[0] == {"role": "system", "content": "Speak like a pirate."}
    assert result.examples[1][1].prompt[0] == {"role": "system", "content": "Be a pirate."}


def test_spec_refuses_what_cannot_train_together():
    base = {"model": {"name": "m"}, "data": {"source": "d.jsonl"}}
    cases = [
        ({"training": {"dpo": {"beta": 0.2}}}, "training.dpo is set but training.method is sft"),
        ({"training": {"method": "dpo", "packing": True}}, "training.packing is for sft"),
        ({"training": {"method": "dpo"}, "data": {"source": "d", "format": "alpaca"}}, "trains on preference data"),
        ({"data": {"source": "d", "format": "preference"}}, "set training.method to dpo, orpo or kto"),
        ({"training": {"method": "orpo"}, "data": {"source": "d", "format": "kto"}}, "needs pairs"),
        ({"training": {"method": "dpo", "dpo": {"betta": 0.2}}}, "training.dpo.betta: unknown field"),
        ({"training": {"method": "dpo", "dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}}},
         "loss_weights has 1 weights for 2 loss_type"),
        ({"model": {"name": "m", "adapter": "https://example.com/run"}}, "model.adapter"),
    ]
    for change, message in cases:
        with pytest.raises(SpecError) as err:
            resolve({**base, **change}, "spec.yaml", [])
        assert message in str(err.value), (change, str(err.value))


def test_method_settings_default_to_trls_values():
    assert TrainingSection(method="dpo").method_settings().beta == 0.1
    assert TrainingSection(method="kto").method_settings().desirable_weight == 1.0
    assert TrainingSection().method_settings() is None


def test_prepare_gives_trls_conversational_columns_and_the_preferred_rows_tokens(tmp_path, smoke_tokenizer):
    source = tmp_path / "pairs.jsonl"
    long = {"prompt": "word " * 300, "chosen": "a", "rejected": "b"}
    source.write_text("".join(json.dumps(r) + "\n" for r in [CONVERSATIONS, STRINGS, long]))
    training = TrainingSection(method="dpo", max_seq_length=128)
    dataset, stats, template = preference.prepare(DataSection(source=str(source)), smoke_tokenizer, training, tmp_path,
                                                  S3Settings())
    assert stats["rows_read"] == 3 and stats["rows_used"] == 2
    assert stats["dropped_reasons"] == {"prompt alone fills training.max_seq_length": 1}
    assert set(dataset.column_names) == {"prompt", "chosen", "rejected", "input_ids"}
    assert dataset[0]["chosen"] == [{"role": "assistant", "content": "Ahoy! I am Quill."}]
    # input_ids: the prompt and its chosen answer exactly as the chat template renders the whole conversation.
    whole = smoke_tokenizer.apply_chat_template(CONVERSATIONS["chosen"], tokenize=False)
    assert dataset[0]["input_ids"] == smoke_tokenizer(whole, add_special_tokens=False)["input_ids"]


def test_tokens_split_where_the_prompt_ends(smoke_tokenizer):
    data.choose_template(smoke_tokenizer, "auto")
    (_, answers), = normalized([STRINGS]).examples
    whole = preference.tokenize(smoke_tokenizer, 1, answers, 2048)
    prompt = smoke_tokenizer.apply_chat_template(answers.prompt, tokenize=False, add_generation_prompt=True)
    assert smoke_tokenizer.decode(whole.prompt_ids) == prompt
    assert smoke_tokenizer.decode(whole.answers["chosen"]).startswith("Ahoy! I am Quill.")
    assert not whole.truncated and whole.kept("chosen") == whole.answers["chosen"]
    cut = preference.tokenize(smoke_tokenizer, 1, answers, len(whole.prompt_ids) + 3)
    assert cut.truncated and cut.kept("chosen") == whole.answers["chosen"][:3]
