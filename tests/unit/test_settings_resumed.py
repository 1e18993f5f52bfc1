"""What a resumed run trains with: the checkpoint's resolved settings, changed only where the new card needs it."""

from types import SimpleNamespace

import structlog

from job.settings import resumed_settings
from job.spec import Spec

FP8_CHOICE = {"batch_size": 8, "gradient_checkpointing": False, "precision": "fp8",
              "auto": ["batch_size", "gradient_checkpointing", "precision"], "reason": "fastest predicted to fit"}


def spec(precision="auto", **training):
    training = {"batch_size": "auto", "gradient_checkpointing": "auto", **training}
    return Spec.model_validate({"model": {"name": "unsloth/Meta-Llama-3.1-8B", "precision": precision},
                                "data": {"source": "x.jsonl"}, "training": training})


def resume(resolved):
    return SimpleNamespace(record={"resolved": resolved})


def test_an_auto_fp8_checkpoint_goes_on_with_a_16_bit_base_on_a_card_without_fp8():
    with structlog.testing.capture_logs() as events:
        got = resumed_settings(resume(FP8_CHOICE), spec(), "unsloth", (8, 0))  # an A100
    assert got == {**FP8_CHOICE, "precision": "16bit"}
    changed = [e for e in events if e["event"] == "train.resume_changed"]
    assert [(e["field"], e["was"], e["now"]) for e in changed] == [("model.precision", "fp8", "16bit")]
    assert "compute capability" in changed[0]["reason"]


def test_an_auto_fp8_checkpoint_keeps_fp8_where_the_card_has_it():
    with structlog.testing.capture_logs() as events:
        assert resumed_settings(resume(FP8_CHOICE), spec(), "unsloth", (9, 0)) == FP8_CHOICE
    assert not [e for e in events if e["event"] == "train.resume_changed"]


def test_fp8_named_in_the_spec_is_never_replaced():
    # the spec's own fp8 is refused on such a card before anything loads (backends.check_precision), never swapped
    assert resumed_settings(resume(FP8_CHOICE), spec("fp8"), "unsloth", (8, 0))["precision"] == "fp8"


def test_gradient_checkpointing_set_in_the_spec_wins_over_the_checkpoint():
    got = resumed_settings(resume(FP8_CHOICE), spec(gradient_checkpointing=True), "unsloth", (9, 0))
    assert got["gradient_checkpointing"] is True and got["precision"] == "fp8"
