"""job.plan.estimate: predictions against the H100 measurements, the shipped tables, the choice of `auto`."""

from __future__ import annotations

import dataclasses
import random

import pytest

from job.plan import estimate
from job.errors import SpecError
from job.spec import Spec

ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {"1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "8b": "llama-3.1-8b"}

# Measured on an H100 80GB HBM3: LoRA r=16 on all 7 projections, adamw_8bit, random weights,
# torch.cuda.max_memory_allocated() for memory, median step for tokens/s (bench/results/2026-11-25-h100-plan-calibration).
# (backend, shape, precision, checkpointing, batch, seq, tokens/s, peak GiB)
CALIBRATION = [  # the constants in job/plan/estimate.py were fitted to these
    ("unsloth", "8b", "4bit", True, 2, 2048, 9661, 6.8),
    ("unsloth", "8b", "4bit", True, 8, 2048, 10702, 9.9),
    ("unsloth", "8b", "4bit", True, 16, 2048, 10894, 14.0),
    ("unsloth", "8b", "4bit", False, 2, 2048, 14203, 20.8),
    ("unsloth", "8b", "4bit", False, 4, 2048, 14880, 35.9),
    ("unsloth", "8b", "16bit", False, 4, 2048, 15051, 45.6),
    ("unsloth", "8b", "fp8", False, 4, 2048, 17007, 39.1),
    ("unsloth", "1b", "4bit", True, 2, 2048, 21773, 1.7),
    ("unsloth", "1b", "4bit", True, 8, 2048, 52132, 3.381),
    ("unsloth", "1b", "4bit", True, 16, 2048, 53783, 5.675),
    ("unsloth", "1b", "4bit", False, 1, 2048, 14693, 3.342),
    ("unsloth", "1b", "4bit", False, 2, 2048, 30678, 5.342),
    ("unsloth", "1b", "4bit", False, 4, 2048, 53417, 9.464),
    ("unsloth", "1b", "4bit", False, 8, 2048, 71524, 17.842),
    ("unsloth", "1b", "16bit", False, 2, 2048, 38655, 6.687),
    ("unsloth", "1b", "16bit", False, 4, 2048, 69465, 10.809),
    ("hf", "1b", "4bit", True, 2, 2048, 7372, 7.976),
    ("hf", "1b", "4bit", True, 4, 2048, 7840, 14.378),
    ("hf", "1b", "4bit", True, 1, 4096, 5010, 10.233),
    ("hf", "1b", "4bit", False, 1, 2048, 9155, 18.523),
    ("hf", "1b", "4bit", False, 2, 2048, 10026, 35.472),
    ("hf", "1b", "4bit", False, 4, 2048, 10609, 69.371),
]
HELD_OUT = [  # never used to fit: other shapes, other sequence lengths
    ("unsloth", "1b", "4bit", True, 2, 512, 4860, 1.376),
    ("unsloth", "1b", "4bit", True, 2, 1024, 11852, 1.412),
    ("unsloth", "1b", "4bit", True, 1, 8192, 38684, 2.467),
    ("unsloth", "3b", "4bit", True, 2, 2048, 9449, 3.036),
    ("unsloth", "3b", "4bit", True, 8, 2048, 21727, 5.001),
    ("unsloth", "3b", "4bit", False, 2, 2048, 14495, 11.325),
    ("unsloth", "3b", "4bit", False, 4, 2048, 27247, 20.18),
    ("unsloth", "3b", "16bit", True, 2, 2048, 11879, 6.932),
    ("unsloth", "3b", "16bit", True, 8, 2048, 22226, 8.897),
    ("hf", "3b", "4bit", True, 2, 2048, 3957, 10.257),
    ("hf", "3b", "4bit", True, 4, 2048, 4198, 17.487),
    ("hf", "8b", "4bit", True, 2, 2048, 2534, 15.51),
]


def _predict(point):
    backend, shape, precision, checkpointing, batch, seq, _, _ = point
    arch = estimate.arch_from_table(SHAPES[shape])
    kwargs = dict(precision=precision, lora_r=16, target_modules=ALL_SEVEN, batch_size=batch, seq_len=seq,
                  checkpointing=checkpointing, backend=backend)
    return estimate.estimate_throughput(arch, estimate.gpu("h100-sxm"), **kwargs), estimate.estimate_memory(arch, **kwargs)


def _label(point) -> str:
    backend, shape, precision, checkpointing, batch, seq = point[:6]
    return f"{backend}-{shape}-{precision}-{'ckpt' if checkpointing else 'full'}-{batch}x{seq}"


@pytest.mark.parametrize("point", CALIBRATION, ids=_label)
def test_calibration_points_within_the_goals(point):
    speed, memory = _predict(point)
    assert memory.peak_allocated == pytest.approx(point[7], rel=0.10)
    assert speed.tokens_per_second == pytest.approx(point[6], rel=0.20)


@pytest.mark.parametrize("point", HELD_OUT, ids=_label)
def test_held_out_points(point):
    """Memory meets the 10% goal everywhere. Tokens/s meets 20% where the GPU's own work decides the step; where a
    small model at a small batch waits on kernel launches ("host"-bound), the 3B shape runs up to 34% slower than
    predicted, and that known error is what is asserted (docs/plan.md)."""
    speed, memory = _predict(point)
    assert memory.peak_allocated == pytest.approx(point[7], rel=0.10)
    assert speed.tokens_per_second == pytest.approx(point[6], rel=0.20 if speed.bound == "gpu" else 0.35)


# Packed FineTome-like rows (about 4 documents a 2048-token sequence), 8B, fp8, batch 4, measured through the finetome
# recipe's trainer settings (bench/results/2026-12-06-h100-packed-rows-vs-fixed): (checkpointing, packed tokens/s)
PACKED = [(False, 8086), (True, 6932)]


@pytest.mark.parametrize(("checkpointing", "measured"), PACKED)
def test_packed_rows_are_predicted_within_20_percent(checkpointing, measured):
    arch, card = estimate.arch_from_table("llama-3.1-8b"), estimate.gpu("h100-sxm")
    kwargs = dict(precision="fp8", lora_r=16, target_modules=ALL_SEVEN, batch_size=4, seq_len=2048,
                  checkpointing=checkpointing)
    packed = estimate.estimate_throughput(arch, card, packed=True, **kwargs).tokens_per_second
    assert packed == pytest.approx(measured, rel=0.20)
    assert packed < 0.6 * estimate.estimate_throughput(arch, card, **kwargs).tokens_per_second  # not the fixed rate
    hf = dict(kwargs, precision="4bit", backend="hf")  # only unsloth's packed path is slower
    assert estimate.estimate_throughput(arch, card, packed=True, **hf) == estimate.estimate_throughput(arch, card, **hf)


def test_table_architectures_have_their_published_sizes():
    published = {"llama-3.2-1b": 1.236e9, "llama-3.2-3b": 3.213e9, "llama-3.1-8b": 8.030e9, "llama-3.1-70b": 70.55e9,
                 "mistral-7b-v0.3": 7.248e9, "qwen2.5-7b": 7.616e9, "qwen2.5-0.5b": 0.494e9, "smollm2-135m": 0.1348e9,
                 "gemma-2-2b": 2.614e9, "qwen3-8b": 8.19e9}
    for key, size in published.items():
        assert estimate.arch_from_table(key).total_params == pytest.approx(size, rel=0.01), key


def test_model_ids_match_the_table():
    assert estimate.arch_from_table("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit").name == "llama-3.1-8b"
    assert estimate.arch_from_table("modelscope://LLM-Research/Meta-Llama-3.1-8B-Instruct").name == "llama-3.1-8b"
    assert estimate.arch_from_table("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b"
    assert estimate.arch_from_table("someone/unknown-model") is None


def test_choose_never_picks_a_configuration_predicted_over_memory():
    rng = random.Random(0)
    archs = [estimate.arch_from_table(k) for k in ("smollm2-135m", "llama-3.2-1b", "llama-3.1-8b", "qwen2.5-14b", "llama-3.1-70b")]
    for _ in range(60):
        arch, card = rng.choice(archs), rng.choice(list(estimate.gpus().values()))
        seq, headroom, backend = rng.choice([256, 2048, 8192]), rng.choice([0.0, 0.1, 0.3]), rng.choice(["unsloth", "hf"])
        choice = estimate.choose(arch, card, lora_r=16, target_modules=ALL_SEVEN, seq_len=seq, backend=backend, headroom=headroom)
        if choice.fits:
            assert choice.memory.total <= card.memory_gib * (1 - headroom)
            # and it is the fastest that fits, give or take the 2% tie band that prefers the more precise base
            for precision in estimate.supported_precisions(card, backend):
                for ckpt in (False, True):
                    if precision == "fp8" and (ckpt or not arch.fp8_compatible):
                        continue  # auto's fp8 exclusions: the note at estimate.FP8_MIN_CAPABILITY
                    for batch in estimate.BATCH_CANDIDATES:
                        kw = dict(precision=precision, lora_r=16, target_modules=ALL_SEVEN, batch_size=batch, seq_len=seq,
                                  checkpointing=ckpt, backend=backend)
                        if estimate.estimate_memory(arch, **kw).total <= card.memory_gib * (1 - headroom):
                            assert estimate.estimate_throughput(arch, card, **kw).tokens_per_second <= choice.tokens_per_second / 0.98
        else:
            assert "does not fit" in choice.reason


def test_choose_keeps_fixed_fields_and_refuses_what_does_not_fit():
    arch, h100 = estimate.arch_from_table("llama-3.1-8b"), estimate.gpu("h100-sxm")
    fixed = estimate.choose(arch, h100, lora_r=16, target_modules=ALL_SEVEN, seq_len=2048, batch_size=2,
                        gradient_checkpointing=True, precision="4bit")
    assert (fixed.batch_size, fixed.gradient_checkpointing, fixed.precision, fixed.fits) == (2, True, "4bit", True)
    big = estimate.choose(estimate.arch_from_table("llama-3.1-70b"), estimate.gpu("l4"), lora_r=16, target_modules=ALL_SEVEN,
                      seq_len=2048, precision="16bit")
    assert not big.fits and "does not fit" in big.reason


def test_fp8_only_on_compute_capability_9():
    arch = estimate.arch_from_table("llama-3.1-8b")
    for card in estimate.gpus().values():
        picked = estimate.choose(arch, card, lora_r=16, target_modules=ALL_SEVEN, seq_len=2048, batch_size=4,
                             gradient_checkpointing=False)
        assert picked.precision != "fp8" or card.compute_capability >= (9, 0)
        assert ("fp8" in estimate.supported_precisions(card, "unsloth")) == (card.compute_capability >= (9, 0))
    assert estimate.choose(arch, estimate.gpu("h100-sxm"), lora_r=16, target_modules=ALL_SEVEN, seq_len=2048, batch_size=4,
                       gradient_checkpointing=False).precision == "fp8"  # the measured fastest on the H100
    refused = estimate.choose(arch, estimate.gpu("a100-80gb"), lora_r=16, target_modules=ALL_SEVEN, seq_len=2048, precision="fp8")
    assert not refused.fits and "compute capability" in refused.reason
    assert "fp8" not in estimate.supported_precisions(estimate.gpu("h100-sxm"), "hf")


def test_padded_length_is_the_expected_longest_row_of_a_batch():
    assert estimate.expected_batch_length([10] * 5, 8) == pytest.approx(10)
    assert estimate.expected_batch_length([10, 20], 1) == pytest.approx(15)
    assert estimate.expected_batch_length([10, 20], 2) == pytest.approx(17.5)  # max of two draws: 20 unless both are 10


def test_run_time_lookup_of_the_card_and_the_spec_choice():
    h100 = estimate.gpu_for_device("NVIDIA H100 80GB HBM3", 79.18, (9, 0))
    assert h100.kind == "h100-sxm" and h100.supports_fp8
    assert estimate.gpu_for_device("NVIDIA L40S", 44.4, (8, 9)).kind == "l40s"
    assert estimate.gpu_for_device("NVIDIA L40", 44.4, (8, 9)).kind == "unknown"  # not an L4: its memory says so
    spec = Spec.model_validate({"model": {"name": "unsloth/Llama-3.2-1B-Instruct", "precision": "4bit"},
                                "data": {"source": "d.jsonl"},
                                "training": {"batch_size": "auto", "gradient_checkpointing": "auto", "max_seq_length": 2048}})
    choice = estimate.choose_for_spec(spec, estimate.arch_from_table("llama-3.2-1b"), h100, longest=900, rows=3)
    assert choice.fits and choice.precision == "4bit" and choice.batch_size <= 4
    assert choice.memory.peak_allocated < estimate.choose_for_spec(spec, estimate.arch_from_table("llama-3.2-1b"), h100).memory.peak_allocated


def test_auto_leaves_fp8_out_for_a_model_whose_projections_fp8_cannot_hold():
    llama = estimate.arch_from_table("llama-3.1-8b")
    odd = dataclasses.replace(llama, intermediate_size=14_344)  # not a multiple of 16: torchao keeps it in bf16
    h100 = estimate.gpu("h100-sxm")
    common = dict(lora_r=16, target_modules=ALL_SEVEN, seq_len=2048, gradient_checkpointing=False)
    assert llama.fp8_compatible and not odd.fp8_compatible
    assert estimate.choose(llama, h100, **common).precision == "fp8"
    assert estimate.choose(odd, h100, **common).precision != "fp8"
    assert estimate.choose(odd, h100, precision="fp8", **common).precision == "fp8"  # named, it is the user's call


@pytest.mark.parametrize(("name", "kind"), [
    ("h100-sxm", "h100-sxm"), ("H100", "h100-sxm"), ("h100", "h100-sxm"), ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("H100:8", "h100-sxm"), ("gpu_1x_h100_pcie", "h100-pcie"), ("A100", "a100-40gb"), ("A100-80GB", "a100-80gb"),
    ("gpu_8x_a100_80gb_sxm4", "a100-80gb"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("L4", "l4"),
    ("NVIDIA L40S", "l40s"), ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("H200", "h200"), ("A10G", "a10g"),
])
def test_gpu_names_as_users_runpod_skypilot_and_lambda_write_them(name, kind):
    assert estimate.gpu(name).kind == kind


def test_an_unknown_gpu_name_gets_a_did_you_mean_and_the_known_kinds():
    with pytest.raises(SpecError, match=r"unknown GPU 'h10'.*did you mean h100-sxm\?.*known kinds: h100-sxm"):
        estimate.gpu("h10")


def _both(method, *, backend="unsloth", batch=4, shape="llama-3.1-8b", card="h100-sxm"):
    arch = estimate.arch_from_table(shape)
    kwargs = dict(precision="4bit", lora_r=16, target_modules=ALL_SEVEN, batch_size=batch, seq_len=2048,
                  checkpointing=True, backend=backend, method=method)
    return estimate.estimate_memory(arch, **kwargs), estimate.estimate_throughput(arch, estimate.gpu(card), **kwargs)


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_a_dpo_row_is_two_sequences_and_a_reference_pass(backend):
    sft_memory, sft_speed = _both("sft", backend=backend)
    dpo_memory, dpo_speed = _both("dpo", backend=backend)
    # chosen and rejected: the saved activations of twice the sequences, as sft at twice the batch
    assert dpo_memory.activations == pytest.approx(2 * sft_memory.activations, rel=0.05)
    assert dpo_memory.activations == _both("sft", backend=backend, batch=8)[0].activations
    assert dpo_memory.total > sft_memory.total
    # twice the tokens a step, and a reference forward on top: fewer rows a second, fewer than half here (GPU-bound)
    assert dpo_speed.rows_per_second < 0.5 * sft_speed.rows_per_second
    assert dpo_speed.step_seconds > _both("sft", backend=backend, batch=8)[1].step_seconds


def test_unsloth_preference_runs_count_the_logits_that_its_sft_loss_never_makes():
    sft_memory, _ = _both("sft")
    dpo_memory, _ = _both("dpo")
    assert sft_memory.logits == 0 and _both("dpo", backend="hf")[0].logits == 0  # hf's fit counts them per token
    assert dpo_memory.logits > 0 and dpo_memory.total > _both("sft", batch=8)[0].total


def test_orpo_has_no_reference_pass_and_kto_trains_one_sequence_a_row():
    dpo_memory, dpo_speed = _both("dpo")
    orpo_memory, orpo_speed = _both("orpo")
    sft_memory, sft_speed = _both("sft")
    kto_memory, kto_speed = _both("kto")
    assert orpo_speed.rows_per_second > dpo_speed.rows_per_second
    assert orpo_speed.tokens_per_second > dpo_speed.tokens_per_second
    assert orpo_memory.activations == dpo_memory.activations  # the same pairs; the reference keeps no activations
    assert orpo_memory.lora_weights < dpo_memory.lora_weights  # and there is no frozen copy of the adapter
    # kto: one sequence with gradient (sft's activations), but its KL completion and the reference run forward too
    assert kto_memory.activations == sft_memory.activations
    assert kto_speed.rows_per_second < sft_speed.rows_per_second
    assert kto_speed.rows_per_second < orpo_speed.rows_per_second * 2 and kto_speed.tokens_per_second < sft_speed.tokens_per_second


def _preference_spec(method: str, precision: str = "auto", **training) -> Spec:
    data = {"source": "d.jsonl"} if method == "sft" else {"source": "d.jsonl", "format": "preference"}
    return Spec.model_validate({"model": {"name": "unsloth/Llama-3.1-8B-Instruct", "precision": precision}, "data": data,
                                "training": {"method": method, "batch_size": "auto", "max_seq_length": 2048, **training}})


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "llama-3.1-8b"])
@pytest.mark.parametrize("card", ["h100-sxm", "a100-40gb", "l4"])
@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_auto_batch_of_a_preference_spec_is_no_larger_than_sfts(shape, card, method):
    """With checkpointing and precision as the spec sets them (auto may switch either, and with it the batch)."""
    arch, gpu = estimate.arch_from_table(shape), estimate.gpu(card)
    for precision in ("4bit", "16bit"):
        sft = estimate.choose_for_spec(_preference_spec("sft", precision), arch, gpu)
        pairs = estimate.choose_for_spec(_preference_spec(method, precision), arch, gpu)
        assert sft.fits
        if pairs.fits:
            assert pairs.batch_size <= sft.batch_size and pairs.memory.total <= gpu.memory_gib * 0.9
        else:  # a pair can need more than the card has where one sequence fits (8B 16-bit on the L4)
            assert pairs.batch_size == 1 and pairs.memory.total > sft.memory.total


def test_a_dpo_spec_on_the_h100_gets_half_sfts_batch():
    arch, h100 = estimate.arch_from_table("llama-3.1-8b"), estimate.gpu("h100-sxm")
    sft = estimate.choose_for_spec(_preference_spec("sft", gradient_checkpointing=False), arch, h100)
    dpo = estimate.choose_for_spec(_preference_spec("dpo", gradient_checkpointing=False), arch, h100)
    assert (sft.batch_size, dpo.batch_size) == (4, 2) and sft.precision == dpo.precision == "fp8"
