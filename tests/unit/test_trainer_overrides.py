"""The private names and undocumented behaviour that job/trainer_overrides.py lists are still those of the installed
transformers and trl: these fail first when a pin moves, before a run trains on a trainer that overrides nothing."""

import inspect
import re
import sys

from job.trainer_overrides import STEP_PHASES


def test_the_private_trainer_methods_job_overrides_or_calls_keep_their_signatures():
    from transformers import Trainer

    for name, parameters in {"_track_num_input_tokens": ["self", "inputs"], "_save_checkpoint": ["self", "model", "trial"],
                             "_clip_grad_norm": ["self", "model"], "_has_mixed_mesh_grads": ["self", "model"]}.items():
        assert list(inspect.signature(getattr(Trainer, name)).parameters) == parameters, name


def test_transformers_step_calls_what_job_replaces_through_the_model_and_reads_the_collator_late():
    from transformers import Trainer

    epoch = inspect.getsource(Trainer._run_epoch)
    for call in ("self._track_num_input_tokens(inputs)", "self._clip_grad_norm(model)", "model.zero_grad()"):
        assert call in epoch, call
    assert "model.train()" in inspect.getsource(Trainer.training_step)
    assert "self.data_collator" in inspect.getsource(Trainer._get_dataloader)


def test_the_attributes_job_sets_on_its_trainer_are_not_transformers_or_trls():
    from transformers import Trainer
    from trl import SFTTrainer

    sources = [inspect.getsource(sys.modules[cls.__module__]) for cls in (Trainer, SFTTrainer)]
    for name in ("_pending_tokens", "_trainable", "_flush_token_count"):
        assert not any(re.search(rf"\.{name}\b|['\"]{name}['\"]", source) for source in sources), name


def test_every_step_phase_the_bench_times_is_a_method_of_trls_trainer():
    from trl import SFTTrainer

    assert all(callable(getattr(SFTTrainer, name, None)) for name, _ in STEP_PHASES)


def test_job_loss_is_trls_loss_without_its_metrics(tmp_path, smoke_tokenizer):
    """job's trainer computes the loss with transformers' compute_loss, skipping trl's: the two must be equal."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from job.trainer_overrides import lean_sft_trainer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smoke_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    rows = [[10, 11, 12, 13], [14, 15, 16, 17]]
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    trainer = lean_sft_trainer()(model=model, args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                                             max_length=64), train_dataset=data, processing_class=smoke_tokenizer)
    ids = torch.tensor(rows)

    def inputs():
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        assert torch.equal(trainer.compute_loss(model, inputs()), SFTTrainer.compute_loss(trainer, model, inputs()))
