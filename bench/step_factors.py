"""What single parts of job's step cost the host, measured inside one process on one loaded unsloth model.

The bare unsloth loop (train_throughput.py's) with one thing of job's trainer added at a time, the variants taking
turns in short blocks, round after round: a host whose speed drifts within the process slows every variant alike, so
their medians compare where separate processes' do not (on the GPU host the same bare loop at 1B ran at 29,090 tokens/s
in one process and 17,299 in another; docs/benchmarks.md).

  plain     input_ids and labels, as the bare loop
  autocast  the forward under torch.autocast(bfloat16), as the trainer runs it when unsloth turns bf16 on
  mask      an attention mask of ones beside the input ids, as trl's collator makes it
  pinned    the batch copied from pinned memory without blocking, as job's data loader does
  trainer   model.train(), model.zero_grad() and a learning-rate scheduler step each step, as the trainer does

  python bench/step_factors.py --model-dir /tmp/bench-models/1b --variants plain,autocast,mask --out rows.jsonl

One JSON line a variant: the median over the measured blocks of the step's wall time and the training thread's
CPU time (time.thread_time), and the rate they make. The first round is warm-up (unsloth compiles there) and is left
out. Without CUDA it runs on the tiny shape so the CPU tests can run it (no figure means anything there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # noqa: E402

VARIANTS = ("plain", "autocast", "mask", "pinned", "trainer")


def load(model_dir: str, seq: int):
    import torch

    lora = dict(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if torch.cuda.is_available():
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_dir, max_seq_length=seq, dtype=None, load_in_4bit=True)
        return FastLanguageModel.get_peft_model(model, use_gradient_checkpointing="unsloth", random_state=3407, **lora)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(task_type="CAUSAL_LM", **lora))


def step_runner(model, variant: str, batch: int, seq: int):
    """A function that runs one optimizer step of `variant` on the next batch and returns its loss tensor."""
    import torch

    cuda = torch.cuda.is_available()
    device = next(model.parameters()).device
    params, opt = tt.bare_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    data = tt.batches(model.config.vocab_size, batch, seq, 10**9)
    autocast = (torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16) if variant == "autocast"
                else contextlib.nullcontext())

    def step():
        ids = next(data)
        if variant == "pinned" and cuda:
            ids = ids.pin_memory().to(device, non_blocking=True)
        else:
            ids = ids.to(device)
        inputs = {"input_ids": ids, "labels": ids}
        if variant == "mask":
            inputs["attention_mask"] = torch.ones_like(ids)
        if variant == "trainer":
            model.train()
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if variant == "trainer":
            scheduler.step()
            model.zero_grad(set_to_none=True)
        else:
            opt.zero_grad(set_to_none=True)
        return loss

    return step


def measure(model, variants: list[str], batch: int, seq: int, rounds: int, block: int) -> list[dict]:
    runners = {v: step_runner(model, v, batch, seq) for v in variants}
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    model.train()
    for round_ in range(rounds):
        for variant in variants:
            tt.synchronize()
            last_wall, last_cpu = time.perf_counter(), time.thread_time()
            for _ in range(block):
                runners[variant]().item()  # one host read of the loss a step, as a per-step log line costs
                now_wall, now_cpu = time.perf_counter(), time.thread_time()
                if round_:
                    wall[variant].append(now_wall - last_wall)
                    cpu[variant].append(now_cpu - last_cpu)
                last_wall, last_cpu = now_wall, now_cpu
    rows = []
    for variant in variants:
        median_wall = statistics.median(wall[variant])
        rows.append({"variant": variant, "batch": batch, "seq": seq, "steps_measured": len(wall[variant]),
                     "tokens_per_second": round(batch * seq / median_wall, 1),
                     "wall_ms_per_step": round(median_wall * 1000, 2),
                     "cpu_ms_per_step": round(statistics.median(cpu[variant]) * 1000, 2),
                     # per measured round: shows whether the variants kept their order while the host drifted
                     "wall_ms_by_round": [round(statistics.median(wall[variant][i:i + block]) * 1000, 1)
                                          for i in range(0, len(wall[variant]), block)]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--shape", default="1b", help="made in --model-dir when it does not exist")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=7, help="the first is warm-up and left out")
    parser.add_argument("--block", type=int, default=5, help="steps of one variant before the next takes its turn")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if not os.path.isdir(args.model_dir):
        tt.make_model(args.shape, args.model_dir)
    model = load(args.model_dir, args.seq)
    for row in measure(model, variants, args.batch, args.seq, args.rounds, args.block):
        row["shape"] = args.shape
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
