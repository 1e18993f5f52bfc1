"""Running out of GPU memory in training. There is no GPU here, so the card is played by a forward pre-hook on a real
tiny model that raises torch.OutOfMemoryError (what the CUDA allocator raises) for batches over a row limit, at a
chosen forward call; the trainer, the retry and the error a user sees are the real ones."""

import io
import json

import pytest

from tests.unit.test_train_tokens import ROW_LENGTHS, tiny_lora_model


def card_with_room_for(model, rows: int, from_call: int = 0):
    """Forward calls from `from_call` on with more than `rows` rows run out of memory."""
    import torch

    calls = {"n": 0}

    def check(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls["n"] += 1
        if calls["n"] > from_call and ids.shape[0] > rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({ids.shape[0]} rows)")

    model.register_forward_pre_hook(check, with_kwargs=True)
    return model


def train_on(tmp_path, tokenizer, model, *, batch_size, accumulation=1, steps=3, may_halve, resolved=None, name="run",
             checkpoints=None):
    import datasets

    from job import train
    from job.spec import TrainingSection

    rows = [list(range(10, 10 + n)) for n in ROW_LENGTHS * 8]
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    training = TrainingSection(max_steps=steps, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                               optim="adamw_torch", warmup_steps=0, max_seq_length=64)
    work = tmp_path / name
    work.mkdir()
    info = {"dtype": "float32", "backend": "hf", "precision": "16bit", **({"resolved": resolved} if resolved else {})}
    result = train.run_fitting(model, tokenizer, data, training, work, info, may_halve=may_halve, checkpoints=checkpoints)
    return [(r["step"], r["tokens"], r["loss"]) for r in map(json.loads, result.metrics_path.read_text().splitlines())]


def test_an_auto_batch_that_runs_out_of_memory_in_the_first_step_is_halved_and_trains_as_that_batch_would(
        tmp_path, smoke_tokenizer):
    from job import log

    events = io.StringIO()
    log.setup(stream=events, json_logs=True)
    # The second micro-batch of step 1 runs out: the first one's gradients are already accumulated when it does.
    resolved = {"batch_size": 8, "auto": ["batch_size"], "reason": "26.0 of 80 GiB predicted"}
    halved = train_on(tmp_path, smoke_tokenizer, card_with_room_for(tiny_lora_model(len(smoke_tokenizer)), 2, from_call=1),
                      batch_size=8, accumulation=2, may_halve=True, resolved=resolved, name="halved")
    direct = train_on(tmp_path, smoke_tokenizer, tiny_lora_model(len(smoke_tokenizer)), batch_size=2, accumulation=2,
                      may_halve=False, name="direct")

    assert len(direct) == 3 and halved == direct
    assert resolved["batch_size"] == 2 and resolved["reason"].endswith("halved from 4 after running out of memory")
    retries = [e for e in map(json.loads, events.getvalue().splitlines()) if e["event"] == "train.out_of_memory"]
    assert [(e["batch_size"], e["retry_batch_size"]) for e in retries] == [(8, 4), (4, 2)]


def test_out_of_memory_that_halving_may_not_mend_is_exit_2_with_the_step_and_the_settings(tmp_path, smoke_tokenizer):
    from job.errors import EXIT_USER, GpuOutOfMemory

    # A batch size the spec fixed: the user's to change, never changed behind their back.
    with pytest.raises(GpuOutOfMemory) as fixed:
        train_on(tmp_path, smoke_tokenizer, card_with_room_for(tiny_lora_model(len(smoke_tokenizer)), 2),
                 batch_size=4, may_halve=False, name="fixed")
    assert fixed.value.exit_code == EXIT_USER and fixed.value.step == 0
    assert "optimizer step 1 (training.batch_size 4 x max_seq_length 64" in str(fixed.value)
    assert "lower training.batch_size below 4" in fixed.value.hint and "new run.id" not in fixed.value.hint

    # An auto batch that runs out after two steps were taken: the weights moved, a retry would not be the same run.
    resolved = {"batch_size": 4, "auto": ["batch_size"], "reason": "predicted"}
    with pytest.raises(GpuOutOfMemory) as later:
        train_on(tmp_path, smoke_tokenizer, card_with_room_for(tiny_lora_model(len(smoke_tokenizer)), 2, from_call=2),
                 batch_size=4, may_halve=True, resolved=resolved, name="later")
    assert later.value.step == 2 and "optimizer step 3" in str(later.value)
    assert "auto chose 4" in later.value.hint and resolved["batch_size"] == 4


def test_a_resumed_auto_batch_that_runs_out_of_memory_keeps_the_global_batch_and_trains_on_as_it_would(
        tmp_path, smoke_tokenizer):
    """A spot run rescheduled onto a card with less memory (or an fp8 checkpoint going on with the 16-bit base)."""
    import shutil

    from job.train import CheckpointPlan

    saved = tmp_path / "saved"
    whole = train_on(tmp_path, smoke_tokenizer, tiny_lora_model(len(smoke_tokenizer)), batch_size=4, steps=4,
                     may_halve=False, name="whole", checkpoints=CheckpointPlan(
                         every_steps=2, every_minutes=None, save=lambda folder, step: shutil.copytree(folder, saved / folder.name)))
    assert (saved / "checkpoint-2").is_dir()

    resolved = {"batch_size": 4, "auto": ["batch_size"], "reason": "predicted"}
    resumed = train_on(tmp_path, smoke_tokenizer, card_with_room_for(tiny_lora_model(len(smoke_tokenizer)), 2),
                       batch_size=4, steps=4, may_halve=True, resolved=resolved, name="resumed", checkpoints=CheckpointPlan(
                           every_steps=None, every_minutes=None, save=lambda folder, step: None,
                           resume_from=saved / "checkpoint-2"))

    # what later checkpoints record, so a third attempt goes on with 2 x 2 as well
    assert resolved["batch_size"] == 2 and resolved["gradient_accumulation_steps"] == 2
    assert resolved["reason"].endswith("halved from 4 after running out of memory")
    assert [step for step, _, _ in resumed] == [1, 2, 3, 4] and resumed[:2] == whole[:2]
    # steps 3 and 4 at 2 rows x 2 micro-batches: the same rows and the same global batch as 4 x 1, so the same losses
    for (_, tokens, loss), (_, tokens_resumed, loss_resumed) in zip(whole[2:], resumed[2:]):
        assert tokens_resumed == tokens and loss_resumed == pytest.approx(loss, rel=1e-4)


def test_a_resumed_batch_the_spec_fixed_is_not_changed_behind_the_users_back(tmp_path, smoke_tokenizer):
    import shutil

    from job.errors import GpuOutOfMemory
    from job.train import CheckpointPlan

    saved = tmp_path / "saved"
    train_on(tmp_path, smoke_tokenizer, tiny_lora_model(len(smoke_tokenizer)), batch_size=4, steps=4, may_halve=False,
             name="whole", checkpoints=CheckpointPlan(every_steps=2, every_minutes=None,
                                                      save=lambda folder, step: shutil.copytree(folder, saved / folder.name)))
    with pytest.raises(GpuOutOfMemory) as refused:
        train_on(tmp_path, smoke_tokenizer, card_with_room_for(tiny_lora_model(len(smoke_tokenizer)), 2), batch_size=4,
                 steps=4, may_halve=False, name="resumed", checkpoints=CheckpointPlan(
                     every_steps=None, every_minutes=None, save=lambda folder, step: None, resume_from=saved / "checkpoint-2"))
    assert refused.value.step == 2 and "this run resumed a checkpoint" in refused.value.hint
