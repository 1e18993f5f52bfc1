"""Training throughput: job's own path vs a bare unsloth loop vs transformers+peft+bitsandbytes QLoRA.

One process per implementation (run this script once per --impl), same shapes, random weights (throughput does
not depend on the weights' values). Prints one JSON line per run and appends it to --out.

  python bench/train_throughput.py make-model --shape 1b --dir /tmp/models/1b
  python bench/train_throughput.py run --impl job|unsloth|hf --model-dir /tmp/models/1b --batch 2 --seq 2048

Without CUDA only `--shape tiny` and `--impl job --backend hf` run (no figure means anything there): the CPU tests
run the script that way, so a GPU call never finds it broken.
"""

from __future__ import annotations

import argparse
import contextlib
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
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,  # CPU checks only
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=500000.0),
}


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_model(shape: str, directory: str) -> None:
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t3")),
                                  bos_token="t0", eos_token="t1", pad_token="t2", unk_token="t3")
    tok.save_pretrained(directory)


def matmul_ceiling() -> float | None:
    import torch

    if not cuda():
        return None
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


# Tokens are drawn from the first ids of the vocabulary only: a model can learn that in a few steps (the loss falls
# from about ln(vocab) toward ln(LEARNABLE_IDS)), so the rows' loss curves show whether two precisions train alike.
# Which ids are drawn does not change the work a step does.
LEARNABLE_IDS = 512


def batches(vocab: int, batch: int, seq: int, n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(4, min(vocab, 4 + LEARNABLE_IDS), (batch, seq), generator=g)
        yield ids


def bare_optimizer(model):
    """The trainable (LoRA) parameters and the bare loops' optimizer over them: 8-bit AdamW on a GPU, as job's spec
    asks (adamw_8bit), torch's AdamW on the CPU."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if cuda():
        import bitsandbytes as bnb

        return params, bnb.optim.AdamW8bit(params, lr=2e-4, weight_decay=0.01)
    return params, torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)


def bare_step(model, device, ids, params, opt, max_grad_norm: float, phases, step: int) -> float:
    """One step of the bare loop, with the same gradient clipping as job's trainer and one host read of the loss
    (what a per-step log line costs); its parts timed into `phases`."""
    import torch

    with phases("forward_backward", step):
        ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    with phases("clip", step):
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    with phases("optimizer", step):
        opt.step()
        opt.zero_grad(set_to_none=True)
    with phases("sync_read_loss", step):
        return loss.item()


def bare_loop(model, args, vocab, batch, window, phases=None):
    phases = phases if phases is not None else Phases()
    params, opt = bare_optimizer(model)
    device = next(model.parameters()).device
    times, first, losses = [], None, []
    model.train()
    synchronize()
    last = time.perf_counter()
    # Timed like job's trainer: from one step's end to the next, batch and copy included.
    for step, ids in enumerate(batches(vocab, batch, args.seq, args.steps + window.count)):
        window.step_begin(step)
        losses.append(bare_step(model, device, ids, params, opt, args.max_grad_norm, phases, step))
        now = time.perf_counter()
        times.append(now - last)
        last = now
        window.step_end(step)
        if first is None:
            first = time.monotonic() - STARTED
    return [batch * args.seq / t for t in times[args.warmup:args.steps]], first, losses[:args.steps]


class Phases:
    """Host wall time spent in named parts of a step, summed over the measured steps (warmup..steps). On a
    host-bound step (small model) these add up to the step; on a GPU-bound one the wait lands in the first sync."""

    def __init__(self, warmup: int = 0, steps: int = 0):
        self.warmup, self.steps, self.totals = warmup, steps, {}

    def __call__(self, name: str, step: int):
        import contextlib

        @contextlib.contextmanager
        def timed():
            began = time.perf_counter()
            try:
                yield
            finally:
                if self.warmup <= step < self.steps:
                    self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - began
        return timed()

    def report(self) -> dict:
        n = max(self.steps - self.warmup, 1)
        return {f"host_ms_{k}": round(v * 1000 / n, 2) for k, v in self.totals.items()}


class GcClock:
    """Time the interpreter spends in its cyclic garbage collector over a measurement (warm-up steps and the trainer's
    set-up included, so not per measured step), and its passes, by generation:
    on a host-bound step a pass over the oldest generation (every live object) counts."""

    def __init__(self):
        import gc

        self.gc, self.began, self.seconds, self.collections = gc, None, [0.0, 0.0, 0.0], [0, 0, 0]

    def __call__(self, phase, info):
        if phase == "start":
            self.began = time.perf_counter()
        elif self.began is not None:
            self.seconds[info["generation"]] += time.perf_counter() - self.began
            self.collections[info["generation"]] += 1
            self.began = None

    def __enter__(self):
        self.gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        self.gc.callbacks.remove(self)

    def report(self, steps: int) -> dict:
        return {"gc_ms_per_step": round(sum(self.seconds) * 1000 / max(steps, 1), 2), "gc_collections": self.collections,
                "gc_ms_by_generation": [round(s * 1000, 1) for s in self.seconds],
                "gc_tracked_objects": len(self.gc.get_objects())}


class ProfileWindow:
    """torch.profiler over steps [start, start + count), run after the measured steps so its overhead stays out of
    them: how busy the GPU was between the first step's start and
    the last step's end (the union of kernel intervals over that span), and the host's own costliest calls. Writes a
    text report to `path`; does nothing when path is empty."""

    def __init__(self, path: str, start: int, count: int = 3):
        count = count if path else 0
        self.path, self.start, self.count, self.prof, self.report = path, start, count, None, {}

    def step_begin(self, step: int) -> None:
        if self.path and step == self.start:
            import torch

            synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda() else [])
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.start()
            self.began = time.perf_counter()

    def step_end(self, step: int) -> None:
        if self.prof is None or step != self.start + self.count - 1:
            return
        import torch

        synchronize()
        wall = time.perf_counter() - self.began
        self.prof.stop()
        spans = sorted((e.time_range.start, e.time_range.end) for e in self.prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)
        busy, cur_s, cur_e = 0.0, None, None
        for s_, e_ in spans:
            if cur_e is None or s_ > cur_e:
                if cur_e is not None:
                    busy += cur_e - cur_s
                cur_s, cur_e = s_, e_
            else:
                cur_e = max(cur_e, e_)
        if cur_e is not None:
            busy += cur_e - cur_s
        window_us = (spans[-1][1] - spans[0][0]) if spans else 0
        averages = self.prof.key_averages()
        # ops and launches a step: on a host-bound step, two paths with the same kernels but more ops differ here
        self.report = {"profiled_steps": self.count, "profiled_wall_s": round(wall, 4),
                       "gpu_busy_fraction": round(busy / window_us, 4) if window_us else None,
                       "host_ops_per_step": round(sum(e.count for e in averages if e.device_type != torch.autograd.DeviceType.CUDA) / self.count),
                       "gpu_kernels_per_step": round(len(spans) / self.count)}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(self.report) + "\n")
            fh.write(averages.table(sort_by="self_cpu_time_total", row_limit=40) + "\n")
            fh.write(averages.table(sort_by="count", row_limit=40) + "\n")
        self.prof = None


class StackSampler:
    """py-spy over the measured steps (warmup..steps) of this process: every thread's Python stacks, sampled without
    pausing the process, written as collapsed stacks (one line a stack, its sample count last) to `path`, for
    `bench/stack_diff.py` to compare two paths by. Does nothing when path is empty."""

    def __init__(self, path: str, warmup: int, steps: int, rate: int = 250):
        self.path, self.warmup, self.steps, self.rate, self.proc = path, warmup, steps, rate, None

    def step_begin(self, step: int) -> None:
        if self.path and step == self.warmup:
            import subprocess

            self.proc = subprocess.Popen(["py-spy", "record", "--pid", str(os.getpid()), "--rate", str(self.rate),
                                          "--nonblocking", "--threads", "--format", "raw", "--output", self.path],
                                         stdout=subprocess.DEVNULL, stderr=open(self.path + ".log", "w"))

    def step_end(self, step: int) -> None:
        if self.proc is not None and step == self.steps - 1:
            import signal

            self.proc.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits; waited for in close()

    def close(self) -> None:
        if self.proc is not None:
            self.proc.wait(timeout=60)
            self.proc = None


class HostClock:
    """The training thread's own CPU time a step (time.thread_time, which a hypervisor's stolen time and waits leave
    out), the whole process's (time.process_time: the autograd thread's too) and the whole machine's steal time over the measured steps (/proc/stat): on a host-bound step the CPU time
    is the work the host does for it, so two paths can be compared on it when the virtual machine's speed swings."""

    def __init__(self, warmup: int, steps: int, window, sampler: StackSampler | None = None):
        self.warmup, self.steps, self.window, self.count = warmup, steps, window, window.count
        self.sampler = sampler or StackSampler("", warmup, steps)
        self.cpu, self.process_cpu, self.last, self.last_process, self.stat = [], [], None, None, {}

    @staticmethod
    def ticks() -> tuple[int, int]:
        try:
            with open("/proc/stat") as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
        except OSError:
            return 0, 0
        return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])

    def step_begin(self, step: int) -> None:
        self.window.step_begin(step)
        self.sampler.step_begin(step)
        if step == self.warmup:
            self.stat["began"] = self.ticks()

    def step_end(self, step: int) -> None:
        now, process = time.thread_time(), time.process_time()
        if self.warmup <= step < self.steps and self.last is not None:
            self.cpu.append(now - self.last)
            self.process_cpu.append(process - self.last_process)
        self.last_process = process
        if step == self.steps - 1:
            self.stat["ended"] = self.ticks()
        self.last = now
        self.sampler.step_end(step)
        self.window.step_end(step)

    def report(self) -> dict:
        if not self.cpu:
            return {}
        (steal0, total0), (steal1, total1) = self.stat.get("began", (0, 0)), self.stat.get("ended", (0, 0))
        return {"cpu_ms_per_step": round(statistics.median(self.cpu) * 1000, 2),
                "cpu_ms_steps": [round(c * 1000, 1) for c in self.cpu],
                # every thread of the process: PyTorch runs the backward (and unsloth's recomputed forward) on its
                # own autograd thread, while the training thread waits
                "process_cpu_ms_per_step": round(statistics.median(self.process_cpu) * 1000, 2),
                "steal_fraction": round((steal1 - steal0) / (total1 - total0), 4) if total1 > total0 else None}


def module_walk_ms(model) -> dict:
    """What one walk of the model's module tree costs this host now, in ms (median of 21): nn.Module's own train()
    and zero_grad(), and listing the parameters (what clipping model.parameters() starts with). transformers' loop
    does all three every step; job's trainer once a run (job/trainer_overrides.py, ModuleWalksOnce)."""
    import torch

    mode = model.training
    ms = {name: round(median_seconds(walk, 21) * 1000, 3) for name, walk in [
        ("train", lambda: torch.nn.Module.train(model, mode)), ("zero_grad", lambda: torch.nn.Module.zero_grad(model)),
        ("parameters", lambda: list(model.parameters()))]}
    return {"modules": sum(1 for _ in model.modules()), **ms}


def median_seconds(fn, reps: int) -> float:
    spent = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        spent.append(time.perf_counter() - began)
    return statistics.median(spent)


def host_probe() -> dict:
    """How fast this process's host is right now, apart from any training: a fixed pure-Python loop and a run of
    tiny CUDA kernel launches (a host-bound step is made of both), each the median of 7 timings, plus the CPU the
    process was on and the load average. Taken before and after the measured steps: if the rate moves with these
    from process to process, the host, not the implementation, sets it."""
    import torch

    def interpreter():
        total = 0
        for i in range(200_000):
            total += i & 7
        return total

    probe = {"python_loop_ms": round(median_seconds(interpreter, 7) * 1000, 2)}
    if cuda():
        x = torch.zeros(1, device="cuda")

        def launches(n=2000):
            for _ in range(n):
                x.add_(1)
            torch.cuda.synchronize()
        launches(200)
        probe["launch_us"] = round(median_seconds(launches, 7) / 2000 * 1e6, 2)
    with open("/proc/self/stat") as fh:  # field 39 (after the parenthesised name): the CPU it last ran on
        probe["cpu"] = int(fh.read().rsplit(")", 1)[1].split()[36])
    probe["cpus_allowed"] = len(os.sched_getaffinity(0))
    probe["loadavg_1m"] = os.getloadavg()[0]
    return probe


def bare_measure(model, args):
    def measure(batch, window):
        phases = Phases(args.warmup, args.steps)
        rates, first, losses = bare_loop(model, args, model.config.vocab_size, batch, window, phases)
        return rates, first, phases, losses
    return measure


def run(args):
    """Yields one row per (batch size, variant), as each is measured."""
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
        measure = bare_measure(model, args)
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
        measure = bare_measure(model, args)
    else:  # job's own path: the unsloth backend and the shared trl loop, exactly as `job run` calls them
        from pathlib import Path

        from job import backends
        from job.spec import LoraSection, ModelSection, TrainingSection
        from job import train
        import datasets

        backend = backends.load(args.backend)
        training = TrainingSection(max_steps=args.steps, batch_size=args.batches[0], gradient_accumulation_steps=1,
                                   max_seq_length=args.seq, gradient_checkpointing=bool(args.checkpointing),
                                   warmup_steps=0, logging_steps=1)
        model, tokenizer, info = backend.load_for_training(Path(args.model_dir), ModelSection(name=args.model_dir, precision=args.precision),
                                                           LoraSection(), training)

        def measure(batch, window):
            steps_run = args.steps + window.count
            ids = [row.tolist() for ids in batches(model.config.vocab_size, batch, args.seq, steps_run) for row in ids]
            data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
            work = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-job-{os.getpid()}-{batch}"
            work.mkdir(parents=True, exist_ok=True)
            phases = Phases(args.warmup, args.steps)
            variant = job_variant(args.variant, phases)
            began = time.monotonic()
            with frozen_gc() if args.variant == "gcfreeze" else contextlib.nullcontext():
                train.run(model, tokenizer, data, training.model_copy(update={"batch_size": batch, "max_steps": steps_run}),
                          work, info, extra_callbacks=[step_window(window)], trainer_variant=variant)
            steps = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
            # the trainer's clock starts at train(); add the load time before it
            first = (began - STARTED) + steps[0]["elapsed_seconds"]
            # each logged rate covers the steps since the previous log line: keep those wholly inside warmup..steps
            rates, previous = [], 0
            for s in steps:
                if previous >= args.warmup and s["step"] <= args.steps:
                    rates.append(s["tokens_per_second"])
                previous = s["step"]
            losses = [s["loss"] for s in steps if "loss" in s and s["step"] <= args.steps]
            return rates, first, phases, losses

        bare = bare_measure(model, args)

        if args.variant.startswith("interleaved"):
            def measure(batch, window, job_measure=measure):
                interleave = Interleave(model, args, batch, window)
                _, first, phases, losses = job_measure(batch, interleave)
                INTERLEAVED.update(interleave.report())
                # the trainer's logged rates span the bare blocks too: the job steps' own times instead
                return [batch * args.seq / t for t in interleave.job], first, phases, losses

        if args.compare:  # the same loaded model through each in turn: the bare loop and job's trainer variants
            def measure(batch, window, job_measure=measure):
                return bare(batch, window) if args.variant == "bare" else job_measure(batch, window)
    config = model.config
    n = matmul_params(config)
    ceiling = matmul_ceiling()
    variants = args.compare.split(",") if args.compare else [args.variant]
    # variant by variant, each over every batch size: so a bare loop runs before any trainer has touched the model
    for variant, batch in [(v, b) for v in variants for b in args.batches]:
        args.variant = variant
        if cuda():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        window = HostClock(args.warmup, args.steps, ProfileWindow(args.profile, start=args.steps),
                           StackSampler(args.py_spy, args.warmup, args.steps))
        row = {"impl": args.impl, "variant": args.variant, "shape": args.shape, "precision": args.precision,
               "batch": batch, "seq": args.seq, "checkpointing": bool(args.checkpointing),
               "gpu": torch.cuda.get_device_name(0) if cuda() else None}
        before = host_probe()
        try:
            with GcClock() as collector:
                rates, first, phases, losses = measure(batch, window)
        except torch.OutOfMemoryError:
            window.sampler.close()
            yield {**row, "out_of_memory": True}
            continue
        window.sampler.close()
        median = statistics.median(rates)
        yield {**row,
            "tokens_per_second": round(median, 1), "step_rates": [round(r) for r in rates],
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda() else None,
            "time_to_first_step_s": round(first, 1) if first else None, "steps_measured": len(rates),
            "mfu": round(4 * n * median / ceiling, 4) if ceiling else None,
            "bf16_matmul_tflops": round(ceiling / 1e12, 1) if ceiling else None, **window.window.report,
            **window.report(),
            **phases.report(), **collector.report(args.steps + window.count), "losses": [round(x, 4) for x in losses],
            **({"trainer": TRAINER_USED[0]} if args.impl == "job" and args.variant != "bare" else {}),
            **INTERLEAVED,
            "host_probe_before": before, "host_probe_after": host_probe(), "module_walk_ms": module_walk_ms(model),
        }


INTERLEAVED = {}  # the bare loop's figures from an `interleaved` row


class Interleave:
    """The bare loop in blocks of `block` steps inside job's trainer, on the same model, after every `block` of its
    steps (`--variant interleaved`): a host whose speed drifts within the process slows both alike, so their
    medians compare where separate processes' do not. A job step is timed from the end of the step, or bare block,
    before it to its own end (its predecessor's log line, the batch's fetch and the step itself); a bare step as in
    bare_loop. The bare steps run under the trainer's bf16 autocast (accelerate wraps the model's forward): at 1B
    batch 2 autocast costs the bare loop nothing measurable (bench/step_factors.py's `autocast` against `plain`)."""

    def __init__(self, model, args, batch, window, block: int = 4):
        self.model, self.args, self.batch, self.window, self.block = model, args, batch, window, block
        self.count = window.count
        self.params, self.opt = bare_optimizer(model)
        self.device = next(model.parameters()).device
        self.data = batches(model.config.vocab_size, batch, args.seq, 10**9)
        self.last, self.job, self.bare, self.job_process_cpu, self.bare_process_cpu = None, [], [], [], []

    def step_begin(self, step: int) -> None:
        self.window.step_begin(step)

    def step_end(self, step: int) -> None:
        self.window.step_end(step)
        now, process = time.perf_counter(), time.process_time()
        measured = self.args.warmup <= step < self.args.steps
        if measured and self.last is not None:
            self.job.append(now - self.last[0])
            self.job_process_cpu.append(process - self.last[1])
        self.last = (now, process)
        if (step + 1) % self.block or step >= self.args.steps:
            return
        synchronize()
        last = (time.perf_counter(), time.process_time())
        for _ in range(self.block):
            bare_step(self.model, self.device, next(self.data), self.params, self.opt, self.args.max_grad_norm, Phases(), step)
            now, process = time.perf_counter(), time.process_time()
            if measured:
                self.bare.append(now - last[0])
                self.bare_process_cpu.append(process - last[1])
            last = (now, process)
        synchronize()
        self.last = (time.perf_counter(), time.process_time())
        self.window.last, self.window.last_process = time.thread_time(), self.last[1]  # the block is no job step's

    def report(self) -> dict:
        tokens = self.batch * self.args.seq
        job, bare = statistics.median(self.job), statistics.median(self.bare)
        return {"interleaved_block": self.block, "job_step_ms": round(job * 1000, 2), "bare_step_ms": round(bare * 1000, 2),
                "bare_tokens_per_second": round(tokens / bare, 1), "bare_step_rates": [round(tokens / t) for t in self.bare],
                "job_tokens_per_second_interleaved": round(tokens / job, 1), "job_vs_bare": round(bare / job - 1, 4),
                "job_process_cpu_ms_per_step": round(statistics.median(self.job_process_cpu) * 1000, 2),
                "bare_process_cpu_ms_per_step": round(statistics.median(self.bare_process_cpu) * 1000, 2)}


TRAINER_USED = [None]  # the trainer class's name, for the row
VARIANTS = ("default", "inline", "noautocast", "log5", "gcfreeze", "trl", "interleaved", "interleaved-mask")


def job_variant(variant: str, phases: Phases):
    """job's trainer as `variant` departs from it, to compare inside one call ("default" is exactly what job runs),
    with the host time of its step's parts added to `phases`."""
    from trl import SFTTrainer

    from job.trainer_overrides import TrainerVariant, lean_sft_trainer

    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant}")
    os.environ.pop("UNSLOTH_MIXED_PRECISION", None)
    if variant == "noautocast":  # read when the trainer is made; without it unsloth turns bf16 autocast back on
        os.environ["UNSLOTH_MIXED_PRECISION"] = "bfloat16"

    def configure(config):
        if variant == "inline":  # collation in the training process, blocking copies: job's data loading before workers
            config.dataloader_num_workers = 0
            config.dataloader_prefetch_factor = None
            config.dataloader_pin_memory = False
            config.accelerator_config.non_blocking = False
        elif variant == "noautocast":  # the model is bf16 already; the bare loops run without autocast
            config.bf16 = False
        elif variant == "log5":  # one host read of loss and grad norm every 5 steps instead of every step
            config.logging_steps = 5
        elif variant == "trl":  # what unsloth's notebooks run: trl's SFTTrainer, transformers' data loading defaults
            config.dataloader_num_workers = 0
            config.dataloader_prefetch_factor = None
            config.dataloader_pin_memory = True
            config.accelerator_config.non_blocking = False

    if variant == "trl":
        trainer = timed_trainer(SFTTrainer, phases, name="PlainSFTTrainer")
    else:
        trainer = timed_trainer(lean_sft_trainer(), phases)
    TRAINER_USED[0] = trainer.__name__
    # trl's own loss reads the mask (for its token metrics), and unsloth's notebooks pass it: interleaved-mask is
    # job's trainer with the mask of ones passed to the model as they pass it
    return TrainerVariant(trainer_class=trainer, configure=configure,
                          full_attention_mask=variant in ("trl", "interleaved-mask"))


def timed_trainer(base: type, phases: Phases, name: str = "") -> type:
    """A subclass of `base` (named `name`, or as `base`) that adds the host time in its step's parts to `phases`."""
    from job.trainer_overrides import STEP_PHASES

    def timed(method, phase):
        original = getattr(base, method)

        def wrapper(self, *a, **kw):
            # the log runs after the step's count went up; the rest before: keep the bare loop's step numbers
            with phases(phase, self.state.global_step - (phase == "log")):
                return original(self, *a, **kw)
        return wrapper

    return type(name or base.__name__, (base,), {method: timed(method, phase) for method, phase in STEP_PHASES})


def step_window(window):
    """A TrainerCallback that drives `window` (a HostClock or an Interleave) from job's trainer, steps counted from 0
    as in the bare loop."""
    from transformers import TrainerCallback

    class StepWindow(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            window.step_begin(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            window.step_end(state.global_step - 1)

    return StepWindow()


@contextlib.contextmanager
def frozen_gc():
    """What is alive before training leaves the collector's generations (the `gcfreeze` variant)."""
    import gc

    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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
    rn.add_argument("--batch", dest="batches", type=lambda v: [int(b) for b in v.split(",")], default=[2],
                    help="micro-batch size, or several (4,8,12) measured one after another on the same loaded model")
    rn.add_argument("--seq", type=int, default=2048)
    rn.add_argument("--steps", type=int, default=12)
    rn.add_argument("--warmup", type=int, default=3)
    rn.add_argument("--checkpointing", type=int, default=1)
    rn.add_argument("--max-grad-norm", type=float, default=1.0, help="bare loops clip like job's trainer; 0: no clipping")
    rn.add_argument("--precision", choices=["4bit", "16bit", "fp8"], default="4bit", help="base weights (unsloth, job)")
    rn.add_argument("--backend", choices=["unsloth", "hf"], default="unsloth", help="job only: the backend it loads with")
    rn.add_argument("--variant", default="default", help="job only: trainer settings (default, inline, noautocast, log5, gcfreeze, trl, interleaved: job's default "
                    "with blocks of the bare loop between its steps, in one process; interleaved-mask: the same, "
                    "with trl's attention mask of ones passed to the model, as trl passes it)")
    rn.add_argument("--compare", default="", help="job only: variants run one after another on the one loaded model, "
                                                   "'bare' for the bare loop on it, e.g. bare,default,inline; 'bare' only "
                                                   "first: after job's trainer has run, unsloth's checkpointing is off "
                                                   "for a bare loop on the same model (seen: 1B peak 5.4 GiB, not 1.7)")
    rn.add_argument("--profile", default="", help="run 3 more steps under torch.profiler and append their GPU busy fraction and host calls to this file")
    rn.add_argument("--py-spy", default="", help="sample every thread's Python stacks over the measured steps with py-spy "
                                                  "(on PATH) into this file, as collapsed stacks")
    rn.add_argument("--out", default="")
    args = parser.parse_args()
    if args.cmd == "make-model":
        make_model(args.shape, args.dir)
        return
    variants = args.compare.split(",")
    if "bare" in variants and (variants[0] != "bare" or variants.count("bare") > 1):
        raise SystemExit("--compare: 'bare' may come only first (see --help)")
    for result in run(args):
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
