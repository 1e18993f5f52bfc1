"""Training throughput: job's own path vs a bare unsloth loop vs transformers+peft+bitsandbytes QLoRA.

One process per implementation (run this script once per --impl), same shapes, random weights (throughput does
not depend on the weights' values). Prints one JSON line per run and appends it to --out.

  python bench/train_throughput.py make-model --shape 1b --dir /tmp/models/1b
  python bench/train_throughput.py run --impl job|unsloth|hf --model-dir /tmp/models/1b --batch 2 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

STARTED = time.monotonic()
SHAPES = {  # the published Llama configurations
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}


def make_model(shape: str, directory: str) -> None:
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t3")),
                                  bos_token="t0", eos_token="t1", pad_token="t2", unk_token="t3")
    tok.save_pretrained(directory)


def matmul_ceiling() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - t)


def matmul_params(config) -> int:
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    return config.num_hidden_layers * per_layer + h * config.vocab_size


def batches(vocab: int, batch: int, seq: int, n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(4, vocab, (batch, seq), generator=g)
        yield ids


def bare_loop(model, args, vocab):
    import bitsandbytes as bnb
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(params, lr=2e-4, weight_decay=0.01)
    times, first = [], None
    model.train()
    torch.cuda.synchronize()
    last = time.perf_counter()
    # Timed like job's trainer: from one step's end to the next, batch and copy included, with the same
    # gradient clipping and one host read of the loss a step (what a per-step log line costs).
    for step, ids in enumerate(batches(vocab, args.batch, args.seq, args.steps)):
        ids = ids.cuda()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if first is None:
            first = time.monotonic() - STARTED
    return [args.batch * args.seq / t for t in times[args.warmup:]], first


def run(args) -> dict:
    import torch

    lora = dict(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if args.impl == "unsloth":
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(args.model_dir, max_seq_length=args.seq, dtype=None,
                                                     load_in_4bit=args.precision == "4bit",
                                                     load_in_fp8=True if args.precision == "fp8" else False)
        model = FastLanguageModel.get_peft_model(model, use_gradient_checkpointing="unsloth" if args.checkpointing else False,
                                                 random_state=3407, **lora)
        rates, first = bare_loop(model, args, model.config.vocab_size)
    elif args.impl == "hf":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=q, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa", device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        rates, first = bare_loop(model, args, model.config.vocab_size)
    else:  # job's own path: the unsloth backend and the shared trl loop, exactly as `job run` calls them
        from pathlib import Path

        from job.backends import unsloth as backend
        from job.spec import LoraSection, ModelSection, TrainingSection
        from job import train
        import datasets

        training = TrainingSection(max_steps=args.steps, batch_size=args.batch, gradient_accumulation_steps=1,
                                   max_seq_length=args.seq, gradient_checkpointing=bool(args.checkpointing),
                                   warmup_steps=0, logging_steps=1)
        model, tokenizer, info = backend.load_for_training(Path(args.model_dir), ModelSection(name=args.model_dir, precision=args.precision),
                                                           LoraSection(), training)
        ids = [row.tolist() for ids in batches(model.config.vocab_size, args.batch, args.seq, args.steps) for row in ids]
        data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
        work = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-job-{os.getpid()}"
        work.mkdir(parents=True, exist_ok=True)
        train.run(model, tokenizer, data, training, work, info)
        steps = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
        rates = [s["tokens_per_second"] for s in steps[args.warmup:]]
        # the trainer's clock starts at train(); add the load time before it
        first = (time.monotonic() - STARTED) - steps[-1]["elapsed_seconds"] + steps[0]["elapsed_seconds"]
    config = model.config
    n = matmul_params(config)
    median = statistics.median(rates)
    ceiling = matmul_ceiling()
    return {
        "impl": args.impl, "shape": args.shape, "precision": args.precision, "batch": args.batch, "seq": args.seq, "checkpointing": bool(args.checkpointing),
        "tokens_per_second": round(median, 1), "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "time_to_first_step_s": round(first, 1) if first else None, "steps_measured": len(rates),
        "mfu": round(4 * n * median / ceiling, 4), "bf16_matmul_tflops": round(ceiling / 1e12, 1),
        "gpu": torch.cuda.get_device_name(0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-model")
    mk.add_argument("--shape", choices=SHAPES, required=True)
    mk.add_argument("--dir", required=True)
    rn = sub.add_parser("run")
    rn.add_argument("--impl", choices=["job", "unsloth", "hf"], required=True)
    rn.add_argument("--model-dir", required=True)
    rn.add_argument("--shape", default="")
    rn.add_argument("--batch", type=int, default=2)
    rn.add_argument("--seq", type=int, default=2048)
    rn.add_argument("--steps", type=int, default=12)
    rn.add_argument("--warmup", type=int, default=3)
    rn.add_argument("--checkpointing", type=int, default=1)
    rn.add_argument("--max-grad-norm", type=float, default=1.0, help="bare loops clip like job's trainer; 0: no clipping")
    rn.add_argument("--precision", choices=["4bit", "16bit", "fp8"], default="4bit", help="base weights (unsloth, job)")
    rn.add_argument("--out", default="")
    args = parser.parse_args()
    if args.cmd == "make-model":
        make_model(args.shape, args.dir)
        return
    result = run(args)
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
