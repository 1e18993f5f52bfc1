"""What train.step reports from a real (tiny) training run. The token count (`tokens`, tokens/s) is read without a
per-micro-batch host sync: it must still count every non-padding token exactly once, across accumulation and logging
intervals. The ETA counts down to zero at the last step."""

import json

import pytest

ROW_LENGTHS = [3, 5, 7, 9, 11, 13]


def tiny_lora_model(vocab_size: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("batch_size, accumulation, logging_steps", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_every_non_padding_token_is_counted_once(tmp_path, smoke_tokenizer, batch_size, accumulation, logging_steps):
    import datasets

    from job import train
    from job.spec import TrainingSection

    rows = [list(range(10, 10 + n)) for n in ROW_LENGTHS]
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    steps = len(rows) // (batch_size * accumulation)
    training = TrainingSection(max_steps=steps, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                               logging_steps=logging_steps, optim="adamw_torch", warmup_steps=0, max_seq_length=64)
    result = train.run(tiny_lora_model(len(smoke_tokenizer)), smoke_tokenizer, data, training, tmp_path,
                       {"dtype": "float32", "backend": "hf"})
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert result.steps == steps
    assert records[-1]["step"] == steps
    assert records[-1]["tokens"] == sum(ROW_LENGTHS)
    counts = [r["tokens"] for r in records]
    assert counts == sorted(counts) and counts[0] > 0
    assert records[-1]["eta_seconds"] == 0.0 and all(r["eta_seconds"] >= 0 for r in records)


def test_collating_in_worker_processes_trains_on_the_same_batches(tmp_path, smoke_tokenizer):
    """`training.dataloader_workers` (2 by default on a GPU) moves collation into worker processes. The batches, their
    order and so every step's loss and token count must be those of collation in the training process."""
    import datasets

    from job import train
    from job.spec import TrainingSection

    rows = [list(range(10, 10 + n)) for n in ROW_LENGTHS * 2]
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    runs = {}
    for workers in (0, 2):
        training = TrainingSection(max_steps=6, batch_size=2, gradient_accumulation_steps=1, optim="adamw_torch",
                                   warmup_steps=0, max_seq_length=64, dataloader_workers=workers)
        (tmp_path / str(workers)).mkdir()
        result = train.run(tiny_lora_model(len(smoke_tokenizer)), smoke_tokenizer, data, training, tmp_path / str(workers),
                           {"dtype": "float32", "backend": "hf"})
        runs[workers] = [(r["step"], r["tokens"], r["loss"]) for r in map(json.loads, result.metrics_path.read_text().splitlines())]
    assert len(runs[2]) == 6
    assert runs[2] == runs[0]


def test_a_mask_that_masks_nothing_is_left_out_of_the_batch_and_a_padded_or_packed_one_is_kept(smoke_tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from job.trainer_overrides import WithoutFullAttentionMask

    pad = smoke_tokenizer.pad_token_id
    collate = WithoutFullAttentionMask(DataCollatorForLanguageModeling(pad_token_id=pad))
    same_length = collate([{"input_ids": [10, 11, 12]}, {"input_ids": [13, 14, 15]}])
    assert "attention_mask" not in same_length and same_length["input_ids"].shape == (2, 3)
    padded = collate([{"input_ids": [10, 11, 12]}, {"input_ids": [13]}])
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert padded["labels"].tolist()[1] == [13, -100, -100]
    packed = WithoutFullAttentionMask(DataCollatorForLanguageModeling(pad_token_id=pad, return_position_ids=True))
    assert "attention_mask" in packed([{"input_ids": [10, 11, 12]}, {"input_ids": [13, 14, 15]}])


def test_leaving_out_a_mask_of_ones_trains_exactly_as_with_it(tmp_path, smoke_tokenizer):
    """Rows of one length: every batch's mask is all ones, so job leaves it out. The losses and token counts must be
    those of the same run with the mask passed to the model."""
    import datasets

    from job import train
    from job.spec import TrainingSection
    from job.trainer_overrides import TrainerVariant

    rows = [list(range(10 + i, 18 + i)) for i in range(8)]
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    training = TrainingSection(max_steps=4, batch_size=2, gradient_accumulation_steps=1, optim="adamw_torch",
                               warmup_steps=0, max_seq_length=64)
    runs, masks = {}, {}
    for mask in ("left out", "passed"):
        model = tiny_lora_model(len(smoke_tokenizer))
        seen = masks[mask] = []  # whether each call of the model carried a mask

        def watch(module, args, kwargs, seen=seen):
            seen.append("attention_mask" in kwargs)
        model.register_forward_pre_hook(watch, with_kwargs=True)
        (tmp_path / mask).mkdir()
        result = train.run(model, smoke_tokenizer, data, training, tmp_path / mask, {"dtype": "float32", "backend": "hf"},
                           trainer_variant=TrainerVariant(full_attention_mask=mask == "passed"))
        runs[mask] = [(r["step"], r["tokens"], r["loss"]) for r in map(json.loads, result.metrics_path.read_text().splitlines())]
    assert len(masks["left out"]) >= 4 and not any(masks["left out"])
    assert len(masks["passed"]) >= 4 and all(masks["passed"])
    assert len(runs["passed"]) == 4 and runs["passed"][-1][1] == 4 * 2 * 8
    assert runs["left out"] == runs["passed"]


def test_module_walks_once_keeps_every_module_in_the_mode_it_asks_for():
    from job.trainer_overrides import ModuleWalksOnce

    model = tiny_lora_model(64)
    model.base_model.eval()  # as a loaded model can be: its wrapper in training mode over an inner model in eval mode
    trainable = [p for p in model.parameters() if p.requires_grad]
    leaf = model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"]
    with ModuleWalksOnce(model, trainable):
        model.train()
        assert all(m.training for m in model.modules())  # the first train() walks in full
        leaf.training = False
        model.train()
        assert not leaf.training  # the model was in training mode: no walk
        model.eval()
        assert not any(m.training for m in model.modules())
        model.train()
        assert all(m.training for m in model.modules())  # the first train() after an eval() walks in full
        for p in model.parameters():
            p.grad = None if not p.requires_grad else p.detach().clone()
        model.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    assert "train" not in model.__dict__ and "zero_grad" not in model.__dict__


def test_skipping_the_per_step_module_walks_trains_exactly_as_transformers_own_loop(tmp_path, smoke_tokenizer):
    """job's trainer walks the module tree once a run, not three times a step (train(), zero_grad(), the clip's
    parameter list). LoRA dropout makes training mode matter, and the model starts half in eval mode: the losses,
    gradient norms and token counts must be those of transformers' own loop."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    from job import train
    from job.spec import TrainingSection
    from job.trainer_overrides import TrainerVariant, lean_sft_trainer

    def model():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(smoke_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
        peft_model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=4, lora_dropout=0.5,
                                                                         target_modules=["q_proj", "v_proj", "down_proj"]))
        peft_model.base_model.eval()  # as a loaded model can be: in training mode over an inner model in eval mode
        return peft_model

    rows = [list(range(10 + i, 18 + i)) for i in range(8)]
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    training = TrainingSection(max_steps=4, batch_size=2, gradient_accumulation_steps=1, optim="adamw_torch",
                               warmup_steps=0, max_seq_length=64, max_grad_norm=0.01)
    lean = lean_sft_trainer()
    # job's trainer with transformers' own train() and clipping
    from trl import SFTTrainer

    walking = type("Walking", (lean,), {"train": SFTTrainer.train, "_clip_grad_norm": Trainer._clip_grad_norm})
    variants = {"job": TrainerVariant(), "transformers": TrainerVariant(trainer_class=walking)}
    walks = []

    runs, trained = {}, {}
    for loop in ("job", "transformers"):
        net = model()
        leaf = net.base_model.model.model.layers[1].mlp.down_proj.lora_dropout["default"]
        counted = type(leaf).train

        def counting(mode=True, leaf=leaf, loop=loop, counted=counted):
            walks.append(loop)
            return counted(leaf, mode)
        leaf.train = counting
        (tmp_path / loop).mkdir()
        result = train.run(net, smoke_tokenizer, data, training, tmp_path / loop, {"dtype": "float32", "backend": "hf"},
                           trainer_variant=variants[loop])
        runs[loop] = [(r["step"], r["tokens"], r["loss"], r["grad_norm"]) for r in map(json.loads, result.metrics_path.read_text().splitlines())]
        trained[loop] = [p.detach().clone() for p in net.parameters() if p.requires_grad]
        assert "train" not in net.__dict__ and "zero_grad" not in net.__dict__
    assert len(runs["job"]) == 4 and all(r[3] > 0.01 for r in runs["job"])  # the norms were clipped
    assert runs["job"] == runs["transformers"]
    # the logged loss has 4 decimals: the adapters themselves must be equal, bit for bit
    assert len(trained["job"]) == 12 and all(torch.equal(a, b) for a, b in zip(trained["job"], trained["transformers"]))
    assert walks.count("transformers") >= 4 and walks.count("job") == 1
