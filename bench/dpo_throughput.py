"""DPO through job against a bare unsloth + trl DPO loop: the same model, rows and settings, each variant in its own
process, both timed by the same TrainerCallback.

  python bench/dpo_throughput.py make-rows --out rows.jsonl --rows 256 --tokenizer DIR
  python bench/dpo_throughput.py run --variant bare|job --model-dir DIR --rows rows.jsonl --precision 4bit \
      --batch 2 --seq 2048 --steps 15 --warmup 5 --out dpo.jsonl
  python bench/dpo_throughput.py summary --rows dpo.jsonl      (job's median tokens/s over the bare loop's)
  python bench/dpo_throughput.py make-tiny --dir DIR           (the CPU tests' model)

bench/dpo_gpu.sh runs it all on the GPU host in one call, bare and job alternating, one process each.

  bare  FastLanguageModel.from_pretrained + FastLanguageModel.get_peft_model (the FineTome recipe's adapter: r 16,
        alpha 16, rsLoRA, all 7 projections) and trl's DPOTrainer, imported after unsloth so it is unsloth's patched
        one, with a DPOConfig that spells out every value job's trainer_config gives for dpo. The rows go in as trl's
        implicit-prompt conversational form (chosen and rejected as whole conversations): trl takes the prompt out
        and renders the chat template itself, as a notebook would leave it to.
  job   job's own path, as `job run` takes it for training.method dpo: the backend's load_for_training, the tokenizer
        job.model loads, job.preference.prepare on the same rows, and job.train.run, with the timing callback passed
        in as extra_callbacks. Spec: the FineTome recipe (examples/finetome-llama31-8b-chatml.yaml) with
        training.method dpo and this bench's batch, length, steps and precision.

What a row holds: tokens/s over the non-padding tokens of chosen and rejected that the policy's forward saw in a step
(the attention mask's sum, read after training so nothing waits on it), over the step's wall time from one
synchronised step end to the next (median of the steps after --warmup, and over all of them), pairs (rows) a second
the same way, padding's share of the batch, peak GPU memory, the losses, and a digest of the trainer's whole
TrainingArguments (written out in full beside the row) so that two rows can be checked to have trained alike.
The job row adds job's own TrainResult and metrics file: proof it went through job.train.run.

Without CUDA, `--backend hf` (transformers + peft, no unsloth) runs both variants on a tiny model (`make-tiny`) so
the CPU tests can run the script end to end; no figure means anything there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

STARTED = time.monotonic()
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import packed_throughput as packed  # noqa: E402 - stdlib-only at import: rows' words, the tiny model, versions

VARIANTS = ("bare", "job")
# The FineTome recipe's adapter and optimiser settings (examples/finetome-llama31-8b-chatml.yaml), shared by both
# variants; gradient accumulation 1, so a step is one batch of pairs.
LORA = packed.LORA
RECIPE = dict(learning_rate=3e-4, warmup_steps=10, lr_scheduler="linear", weight_decay=0.01, max_grad_norm=1.0, seed=0)
# job's training.dpo defaults (job/spec.py DpoSection), under trl's names.
DPO = dict(beta=0.1, loss_type=["sigmoid"], loss_weights=None, label_smoothing=0.0, use_weighting=False, ld_alpha=None)
TEMPLATE = "chatml"  # the recipe's data.chat_template; the bare loop sets the same on its tokenizer
# TrainingArguments fields that name this process's folders, left out when two runs' settings are compared.
PATH_FIELDS = ("output_dir", "logging_dir", "run_name")


# --- rows ----------------------------------------------------------------------------------------------------------


def span(text: str) -> tuple[int, int]:
    low, high = (int(v) for v in text.split(","))
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: want LOW,HIGH with 0 < LOW <= HIGH")
    return low, high


def words_text(rng: random.Random, words: list[str], tokens: int, tokens_per_word: float) -> str:
    count = max(2, round(tokens / tokens_per_word))
    start = rng.randrange(len(words))
    return " ".join(words[(start + i) % len(words)] for i in range(count))


def preference_row(rng: random.Random, words: list[str], tokens_per_word: float, prompt_tokens: tuple[int, int],
                   answer_tokens: tuple[int, int]) -> dict:
    """One row in job's preference_messages form: the prompt as text, chosen and rejected as the whole [user,
    assistant] conversation (the prompt's turn shared, each its own answer)."""
    prompt = words_text(rng, words, rng.randint(*prompt_tokens), tokens_per_word)
    chosen = words_text(rng, words, rng.randint(*answer_tokens), tokens_per_word)
    rejected = chosen
    while rejected == chosen:  # job drops a pair whose answers are equal
        rejected = words_text(rng, words, rng.randint(*answer_tokens), tokens_per_word)
    user = {"role": "user", "content": prompt}
    return {"prompt": prompt, "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}]}


def chatml_prompt(prompt: str) -> str:
    """The prompt as job's chatml template renders it with the generation prompt (job/chat_templates.py)."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def sequence_lengths(tokenizer, rows: list[dict]) -> dict:
    """Each row's tokens as trl makes them under chatml: the prompt, each answer, and prompt+answer sequences."""
    prompts = [chatml_prompt(r["prompt"]) for r in rows]
    answers = {side: [r[side][-1]["content"] + "<|im_end|>\n" for r in rows] for side in ("chosen", "rejected")}
    prompt_n = packed.token_lengths(tokenizer, prompts)
    full = {side: packed.token_lengths(tokenizer, [p + a for p, a in zip(prompts, texts)])
            for side, texts in answers.items()}
    return {"prompt": prompt_n, **{side: [f - p for f, p in zip(n, prompt_n)] for side, n in full.items()},
            "sequence": full["chosen"] + full["rejected"],
            "pair": [c + r for c, r in zip(full["chosen"], full["rejected"])]}


def make_rows(out: str, rows: int, tokenizer_dir: str, seed: int = 0, prompt_tokens=(200, 400),
              answer_tokens=(300, 700), seq: int = 2048) -> dict:
    tokenizer = packed.load_tokenizer_json(tokenizer_dir)
    words = packed.corpus_words()
    tokens_per_word = len(tokenizer.encode(" ".join(words), add_special_tokens=False).ids) / len(words)
    rng = random.Random(seed)
    made = [preference_row(rng, words, tokens_per_word, prompt_tokens, answer_tokens) for _ in range(rows)]
    with open(out, "w") as fh:
        for row in made:
            fh.write(json.dumps(row) + "\n")
    lengths = sequence_lengths(tokenizer, made)
    stats = {"rows": rows, "seed": seed, "tokens_per_word": round(tokens_per_word, 3),
             **{name: packed.length_stats(values, seq) for name, values in lengths.items()}}
    del stats["pair"]["over_seq"]  # a pair is two sequences, each held to --seq on its own
    Path(out + ".stats.json").write_text(json.dumps(stats) + "\n")
    return stats


# --- measurement ---------------------------------------------------------------------------------------------------


def digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rate_figures(ends: dict, tokens: dict, padded: dict, pairs: dict, warmup: int, steps: int) -> dict:
    """Rates over steps warmup..steps-1, each timed from the previous step's synchronised end to its own (the
    previous step's log line and this step's batch fetch included, as a training run lives them)."""
    measured = [k for k in range(max(warmup, 1), steps) if k in ends and k - 1 in ends and tokens.get(k)]
    if not measured:
        return {"steps_measured": 0}
    walls = [ends[k] - ends[k - 1] for k in measured]
    real, slots, rows = (sum(d.get(k, 0) for k in measured) for d in (tokens, padded, pairs))
    return {
        "steps_measured": len(measured),
        "tokens_per_second": round(statistics.median(tokens[k] / w for k, w in zip(measured, walls)), 1),
        "tokens_per_second_overall": round(real / sum(walls), 1),
        "rows_per_second": round(statistics.median(pairs.get(k, 0) / w for k, w in zip(measured, walls)), 3),
        "rows_per_second_overall": round(rows / sum(walls), 3),
        "step_ms": [round(w * 1000) for w in walls],
        "step_ms_median": round(statistics.median(walls) * 1000, 1),
        "tokens_per_step": [tokens[k] for k in measured],
        "padding_fraction": round(1 - real / slots, 4) if slots else None,
    }


class DpoProbe:
    """The timing callback both variants train with. Each step's end is synchronised with the GPU and timed; the
    policy's forward (the model called with gradients on: trl's reference forward runs under no_grad) is seen by a
    forward pre-hook that keeps each batch's attention-mask sum on the device until training is over."""

    def __init__(self, warmup: int, steps: int, settings_path: str = ""):
        self.warmup, self.steps, self.settings_path = warmup, steps, settings_path
        self.step, self.hook = 0, None
        self.begins, self.ends, self.pending, self.padded, self.pairs, self.forwards = {}, {}, [], {}, {}, {}
        self.seen_at_begin, self.seen_at_end = {}, None
        self.losses, self.settings, self.peak_gib, self.first_step_s = [], {}, None, None
        self.pairs_per_step = 0

    def forward(self, module, args, kwargs) -> None:
        import torch

        if not (torch.is_grad_enabled() and module.training):
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        self.pending.append((self.step, mask.sum() if mask is not None else ids.numel()))
        self.padded[self.step] = self.padded.get(self.step, 0) + ids.numel()
        self.pairs[self.step] = self.pairs.get(self.step, 0) + ids.shape[0] // 2  # chosen rows, then rejected ones
        self.forwards[self.step] = self.forwards.get(self.step, 0) + 1

    def tokens(self) -> tuple[dict, str]:
        """Each step's non-padding tokens, from the hook; from the trainer's own count (num_input_tokens_seen,
        which every trainer has brought up to date by the next step's start) where the hook saw no forward."""
        counted = {}
        for step, value in self.pending:
            counted[step] = counted.get(step, 0) + int(value)
        self.pending = [(step, n) for step, n in counted.items()]
        if counted:
            return counted, "forward hook"
        seen = {**self.seen_at_begin, self.steps: self.seen_at_end}
        self.pairs = {k: self.pairs_per_step for k in range(self.steps)}  # no padding figure without the batches
        return {k: seen[k + 1] - seen[k] for k in range(self.steps) if seen.get(k + 1) is not None and k in seen}, \
            "trainer count"

    def report(self) -> dict:
        tokens, source = self.tokens()
        return {
            **rate_figures(self.ends, tokens, self.padded, self.pairs, self.warmup, self.steps),
            "tokens_source": source,
            "tokens_counted": sum(tokens.values()),
            "tokens_seen_by_trainer": self.seen_at_end,
            "policy_forwards_per_step": max(self.forwards.values()) if self.forwards else 0,
            "peak_gpu_memory_gib": self.peak_gib,
            "time_to_first_step_s": self.first_step_s,
            "losses": [round(v, 5) for v in self.losses],
            "trainer_args_digest": digest(self.settings) if self.settings else None,
            "trainer_args": {k: self.settings.get(k) for k in (
                "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "beta", "loss_type",
                "optim", "learning_rate", "bf16", "gradient_checkpointing", "dataloader_num_workers",
                "dataloader_pin_memory", "include_num_input_tokens_seen", "precompute_ref_log_probs", "padding_free",
                "truncation_mode", "logging_steps", "seed", "data_seed") if self.settings},
        }

    def callback(self):
        import torch
        from transformers import TrainerCallback

        probe = self

        class DpoTiming(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                settings = args.to_dict()
                probe.settings = {k: v for k, v in settings.items() if k not in PATH_FIELDS}
                probe.pairs_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
                if probe.settings_path:
                    Path(probe.settings_path).write_text(json.dumps(probe.settings, sort_keys=True, default=str) + "\n")
                if model is not None and probe.hook is None:
                    probe.hook = model.register_forward_pre_hook(probe.forward, with_kwargs=True)
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()

            def on_step_begin(self, args, state, control, **kwargs):
                probe.step = state.global_step
                probe.seen_at_begin[state.global_step] = state.num_input_tokens_seen
                probe.begins[state.global_step] = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                packed.synchronize()
                probe.ends[state.global_step - 1] = time.perf_counter()
                if probe.first_step_s is None:  # from process start: loading, data preparation, the first step
                    probe.first_step_s = round(time.monotonic() - STARTED, 1)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    probe.losses.append(float(logs["loss"]))

            def on_train_end(self, args, state, control, **kwargs):
                probe.seen_at_end = state.num_input_tokens_seen
                probe.peak_gib = packed.peak_gib()
                if probe.hook is not None:
                    probe.hook.remove()
                    probe.hook = None

        return DpoTiming()


# --- variants ------------------------------------------------------------------------------------------------------


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def optimizer_name() -> str:
    return "adamw_8bit" if cuda() else "adamw_torch"  # bitsandbytes' 8-bit AdamW wants the GPU


def bare_config(args):
    """job.train.trainer_config's DPOConfig for the same spec, written out value by value (a bare loop does not call
    job); tests/unit/test_dpo_throughput.py checks the two agree field for field."""
    from trl import DPOConfig

    gpu = cuda()
    workers = 2 if gpu else 0  # job's dataloader_workers: auto
    return DPOConfig(
        output_dir=str(Path(args.work) / "trainer"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=RECIPE["learning_rate"],
        warmup_steps=RECIPE["warmup_steps"],
        lr_scheduler_type=RECIPE["lr_scheduler"],
        weight_decay=RECIPE["weight_decay"],
        max_grad_norm=RECIPE["max_grad_norm"],
        optim=optimizer_name(),
        seed=RECIPE["seed"],
        data_seed=RECIPE["seed"],
        max_steps=args.steps,
        num_train_epochs=1.0,
        logging_steps=1,
        logging_first_step=True,
        logging_nan_inf_filter=False,
        save_strategy="no",
        save_only_model=False,
        eval_strategy="no",
        eval_steps=None,
        per_device_eval_batch_size=args.batch,
        report_to=[],
        gradient_checkpointing=False,  # unsloth's own checkpointing is switched on while loading, as job does
        bf16=gpu,
        fp16=False,
        use_cpu=not gpu,
        dataloader_num_workers=workers,
        dataloader_prefetch_factor=4 if workers else None,
        dataloader_pin_memory=gpu,
        accelerator_config={"non_blocking": gpu},
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        remove_unused_columns=True,
        dataset_num_proc=None,
        max_length=args.seq,
        precompute_ref_log_probs=False,
        sync_ref_model=False,
        activation_offloading=False,
        **DPO,
        disable_dropout=True,
        truncation_mode="keep_start",
        padding_free=False,
        pad_to_multiple_of=None,
        f_divergence_type="reverse_kl",
    )


def load_bare(args):
    """The model with the recipe's adapter: unsloth as its notebooks load it, or transformers + peft on the CPU."""
    import torch

    if args.backend == "unsloth":
        from unsloth import FastLanguageModel  # first: unsloth patches transformers, trl and peft as it loads

        model, tokenizer = FastLanguageModel.from_pretrained(
            args.model_dir, max_seq_length=args.seq, dtype=None, load_in_4bit=args.precision == "4bit",
            load_in_fp8=True if args.precision == "fp8" else False)
        if args.precision == "fp8":  # as job/backends/unsloth.py: else unsloth's per-layer compile autotunes (minutes)
            import torch._inductor.config as inductor

            inductor.coordinate_descent_tuning = False
            inductor.coordinate_descent_check_all_directions = False
        model = FastLanguageModel.get_peft_model(
            model, use_gradient_checkpointing="unsloth" if args.checkpointing else False, random_state=RECIPE["seed"],
            **LORA)
        return model, tokenizer
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.config.use_cache = False
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    set_seed(RECIPE["seed"])  # LoRA's A matrices start random: the same start as job's hf backend
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA)), tokenizer


def run_bare(args, probe: DpoProbe) -> dict:
    model, tokenizer = load_bare(args)
    import datasets
    from trl import DPOTrainer  # after unsloth: its patched trainer

    from job.chat_templates import NAMED

    tokenizer.chat_template = NAMED[TEMPLATE]
    rows = packed.read_rows(args.rows)
    # trl's implicit-prompt form: trl extracts the shared prompt turns and renders the template itself
    dataset = datasets.Dataset.from_list([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    trainer = DPOTrainer(model=model, args=bare_config(args), train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[probe.callback()])
    trainer.train()
    return {"trainer": type(trainer).__name__, "trainer_bases": [c.__name__ for c in type(trainer).__mro__[1:4]],
            "rows_trained_on": len(trainer.train_dataset)}


def job_spec(args) -> dict:
    """The FineTome recipe's spec with training.method dpo and this bench's settings."""
    return {
        "run": {"id": f"dpo-bench-{os.getpid()}", "output": str(Path(args.work) / "runs")},
        "model": {"name": args.model_dir, "precision": args.precision},
        "lora": {"r": LORA["r"], "alpha": LORA["lora_alpha"], "dropout": LORA["lora_dropout"], "bias": LORA["bias"],
                 "use_rslora": LORA["use_rslora"], "target_modules": LORA["target_modules"]},
        "data": {"source": args.rows, "format": "preference_messages", "chat_template": TEMPLATE},
        "training": {"method": "dpo", "dpo": {k: v for k, v in DPO.items()}, "backend": args.backend,
                     "batch_size": args.batch, "gradient_accumulation_steps": 1, "max_steps": args.steps,
                     "max_seq_length": args.seq, "gradient_checkpointing": bool(args.checkpointing),
                     "optim": optimizer_name(), "lr_scheduler": RECIPE["lr_scheduler"],
                     **{k: RECIPE[k] for k in ("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm",
                                               "seed")},
                     "logging_steps": 1},
        "export": {"merged": False, "gguf": []},
    }


def run_job(args, probe: DpoProbe) -> dict:
    """job's path for a dpo run, stage by stage as job/pipeline.py takes it (backend first, so unsloth patches
    transformers, trl and peft before anything imports them; the tokenizer; the data; the model; train.run)."""
    from job import backends, log

    backend = backends.load(args.backend)
    log.setup(json_logs=True, stream=sys.stderr)
    from job import preference, train
    from job.model import load_tokenizer
    from job.spec import Spec
    from job.storage import S3Settings

    spec = Spec.model_validate(job_spec(args))
    work = Path(args.work) / "job"
    work.mkdir(parents=True, exist_ok=True)
    path = Path(args.model_dir)
    tokenizer = load_tokenizer(path, spec.model.trust_remote_code)
    dataset, stats, template = preference.prepare(spec.data, tokenizer, spec.training, work, S3Settings())
    model, _, info = backend.load_for_training(path, spec.model, spec.lora, spec.training)
    info["world_size"] = 1
    result = train.run(model, tokenizer, dataset, spec.training, work, info, extra_callbacks=[probe.callback()])
    metrics = [json.loads(line) for line in result.metrics_path.read_text().splitlines() if line.strip()]
    return {
        "job_train_run": True,
        "job_result": {"steps": result.steps, "tokens_per_second": result.tokens_per_second,
                       "peak_gpu_memory_gib": result.peak_gpu_memory_gib, "seconds": result.seconds,
                       "first_loss": result.first_loss, "final_loss": result.final_loss,
                       "preference": result.preference},
        "job_metrics_path": str(result.metrics_path),
        "job_metrics_steps": [m["step"] for m in metrics if "loss" in m],
        "job_data": {k: stats.get(k) for k in ("format", "chat_template", "rows_used", "rows_dropped",
                                               "rows_truncated", "tokens")},
        "job_info": {k: info.get(k) for k in ("backend", "precision", "dtype")},
        "rows_trained_on": len(dataset),
    }


def summary(path: str, floor: float = 0.97) -> dict:
    """The comparison over every row of a dpo.jsonl: each kind's tokens/s (median step, one figure a process) and
    the ratio of job's median to the bare loop's; whether every row trained with the same TrainingArguments and on
    the same batches (tokens each measured step); the rows that failed or were skipped."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    done = [r for r in rows if r.get("steps_measured")]
    rates = {kind: [r["tokens_per_second"] for r in done if r.get("kind") == kind] for kind in VARIANTS}
    median = {kind: statistics.median(v) if v else None for kind, v in rates.items()}
    ratio = median["job"] / median["bare"] if median["job"] and median["bare"] else None
    return {
        "tokens_per_second": rates,
        "median_tokens_per_second": median,
        "rows_per_second": {kind: [r["rows_per_second"] for r in done if r.get("kind") == kind] for kind in VARIANTS},
        "peak_gpu_memory_gib": {kind: [r.get("peak_gpu_memory_gib") for r in done if r.get("kind") == kind]
                                for kind in VARIANTS},
        "job_over_bare": round(ratio, 4) if ratio else None,
        "floor": floor,
        "meets_floor": ratio >= floor if ratio else None,
        "same_trainer_args": len({r.get("trainer_args_digest") for r in done}) == 1 if done else None,
        "same_batches": len({json.dumps(r.get("tokens_per_step")) for r in done}) == 1 if done else None,
        "failed": [r.get("variant") for r in rows if "exit" in r],
        "skipped": [r.get("variant") for r in rows if "skipped" in r],
    }


def run(args) -> dict:
    import torch

    if args.backend == "unsloth" and not torch.cuda.is_available():
        raise SystemExit("--backend unsloth needs CUDA; use --backend hf on the CPU")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    head = {"variant": args.label or args.variant, "kind": args.variant, "backend": args.backend,
            "precision": args.precision, "batch": args.batch, "seq": args.seq,
            "checkpointing": bool(args.checkpointing), "steps": args.steps, "warmup": args.warmup,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "env": packed.environment(), "versions": packed.versions()}
    probe = DpoProbe(args.warmup, args.steps, str(Path(args.work) / "trainer_args.json"))
    body = run_job(args, probe) if args.variant == "job" else run_bare(args, probe)
    return {**head, **probe.report(), **body, "wall_s": round(time.monotonic() - STARTED, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-rows", help="preference rows (JSONL, preference_messages); token statistics beside them")
    mk.add_argument("--out", required=True)
    mk.add_argument("--rows", type=int, default=256)
    mk.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json (the Llama 3 one on the GPU)")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--prompt-tokens", type=span, default=(200, 400), help="LOW,HIGH: each prompt's length (even draw)")
    mk.add_argument("--answer-tokens", type=span, default=(300, 700), help="LOW,HIGH: each answer's length")
    mk.add_argument("--seq", type=int, default=2048, help="the statistics count sequences longer than this")
    sm = sub.add_parser("summary", help="job's tokens/s over the bare loop's, from every row of a dpo.jsonl")
    sm.add_argument("--rows", required=True)
    sm.add_argument("--floor", type=float, default=0.97)
    tiny = sub.add_parser("make-tiny", help="a tiny random Llama and word-level tokenizer for the CPU tests")
    tiny.add_argument("--dir", required=True)
    rn = sub.add_parser("run")
    rn.add_argument("--variant", choices=VARIANTS, required=True)
    rn.add_argument("--label", default="", help="the row's name (the shell script numbers the processes)")
    rn.add_argument("--model-dir", required=True)
    rn.add_argument("--rows", required=True)
    rn.add_argument("--backend", choices=["unsloth", "hf"], default="unsloth")
    rn.add_argument("--precision", choices=["4bit", "16bit", "fp8"], default="4bit")
    rn.add_argument("--batch", type=int, default=2, help="pairs a step (each a chosen and a rejected sequence)")
    rn.add_argument("--seq", type=int, default=2048, help="max_length: prompt + answer")
    rn.add_argument("--checkpointing", type=int, default=0)
    rn.add_argument("--steps", type=int, default=15, help="optimizer steps, warm-up included")
    rn.add_argument("--warmup", type=int, default=5, help="steps left out of the rates")
    rn.add_argument("--work", default=f"/tmp/dpo-bench-{os.getpid()}")
    rn.add_argument("--out", default="")
    args = parser.parse_args()
    if args.cmd == "make-rows":
        print(json.dumps(make_rows(args.out, args.rows, args.tokenizer, args.seed, args.prompt_tokens,
                                   args.answer_tokens, args.seq)))
        return
    if args.cmd == "summary":
        print(json.dumps(summary(args.rows, args.floor)))
        return
    if args.cmd == "make-tiny":
        packed.make_tiny(args.dir)
        return
    row = run(args)
    line = json.dumps(row, default=str)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
