"""Where packed rows lose their speed: FineTome-like ShareGPT rows packed into 2048-token sequences, against rows of
exactly 2048 tokens, through a bare unsloth + trl trainer and through `job run`, each variant in its own process.

  python bench/packed_throughput.py make-rows --out rows.jsonl --rows 3000 --tokenizer DIR
  python bench/packed_throughput.py run --variant bare-packed|bare-fixed|job-packed --model-dir DIR --rows rows.jsonl \
      --precision fp8 --batch 4 --out packed.jsonl

  bare-packed  FastLanguageModel + trl's SFTTrainer, packing=True with trl's default strategy (bfd) and
               padding_free=False as job sets them (trl turns padding-free on for bfd anyway), the rows rendered in
               the ChatML template job uses, trl tokenizing the `text` field as the FineTome recipe's source does.
  bare-fixed   the same trainer on rows of exactly --seq tokens (the same rendered text, cut into blocks), not
               packed and not padding-free, the all-ones attention mask left out as job's trainer leaves it out: what
               the model sees in bench/train_throughput.py's bare loop.
  job-packed   `job run` on examples/finetome-llama31-8b-chatml.yaml with the same model, rows and settings, run in
               this process through job's own CLI entry point, so that the same observing callback rides in job's
               trainer (job.train.make_trainer is wrapped; nothing else changes). job's own train.step events are
               kept beside the callback's figures.

Every variant appends one JSON line: tokens/s over real tokens (step wall time from one synchronised step end to
the next, median after --warmup steps), how full the sequence slots were, documents per packed sequence, peak GPU
memory, the attention implementation (the model config's and unsloth's dispatch), torch.compile graphs made during
the measured steps, host time around the steps, and one profiled step after the measured ones (torch.profiler as a
TrainerCallback: the top CUDA kernels, which of them are attention kernels, which SDPA operator ran, host syncs).

Without CUDA, `--backend hf` (transformers + peft, no unsloth) runs every variant on a tiny model (`make-tiny`) so
the CPU tests can run the script end to end; no figure means anything there.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

STARTED = time.monotonic()
REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data"
SPEC = REPO / "examples" / "finetome-llama31-8b-chatml.yaml"
VARIANTS = ("bare-packed", "bare-fixed", "job-packed")
# The FineTome recipe's adapter (examples/finetome-llama31-8b-chatml.yaml).
LORA = dict(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# Substrings of CUDA kernel names that mark an attention kernel: flash (torch's or flash-attn's), fmha (memory-
# efficient / xformers' cutlass), cuDNN's fused SDPA, and the names the brief asked to look for.
ATTENTION_MARKS = ("flash", "fmha", "efficient_attention", "xformers", "sdpa", "math", "cudnn", "attention")
# Host-side operators that say which SDPA backend ran (aten::_scaled_dot_product_{flash,efficient,cudnn}_attention,
# the math fallback) and unsloth's own varlen path.
SDPA_OP_MARKS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention", "varlen")
# Host calls that wait for the GPU: a training step that makes them cannot queue ahead of the card.
SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
            "aten::item", "aten::nonzero")


# --- rows ----------------------------------------------------------------------------------------------------------


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def corpus_words() -> list[str]:
    """Every word of the example datasets, in file order: the text rows are cut from (only lengths matter here)."""
    words = []
    for path in sorted(DATA.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for text in _strings(rows):
            # English only: a Chinese sentence has no spaces and would count as one long "word"
            words.extend(word for word in text.split() if word.isascii())
    return words


def target_lengths(n: int, rng: random.Random, median: float = 330, sigma: float = 0.8, longest: int = 2200) -> list[int]:
    """Token lengths shaped like FineTome-100k's rows in the Llama 3 tokenizer: log-normal around a median of a few
    hundred, a tail past 1,500 and a few rows beyond 2,048 (which bfd packing truncates, as it would FineTome's)."""
    return [max(24, min(longest, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def conversation(rng: random.Random, words: list[str], tokens: int, tokens_per_word: float) -> list[dict]:
    """ShareGPT turns of about `tokens` tokens: mostly one exchange, some two or three (FineTome has a few
    multi-turn rows); each question a tenth to two fifths of its exchange."""
    exchanges = rng.choices([1, 2, 3], weights=[88, 9, 3])[0]
    per_exchange = tokens / exchanges
    turns = []
    for _ in range(exchanges):
        asked = max(4, round(per_exchange * rng.uniform(0.1, 0.4)))
        for role, size in (("human", asked), ("gpt", max(4, round(per_exchange - asked)))):
            count = max(2, round(size / tokens_per_word))
            start = rng.randrange(len(words))
            text = " ".join(words[(start + i) % len(words)] for i in range(count))
            turns.append({"from": role, "value": text})
    return turns


def messages(row: dict) -> list[dict]:
    return [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]} for turn in row["conversations"]]


def chatml(row: dict) -> str:
    """The row as job renders it with data.chat_template: chatml (job/chat_templates.py's CHATML)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages(row))


def load_tokenizer_json(directory: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    return [len(enc.ids) for enc in tokenizer.encode_batch(texts, add_special_tokens=False)]


def length_stats(lengths: list[int], seq: int = 2048) -> dict:
    """What a length distribution looks like, and how much of it a --seq slot can hold."""
    ordered = sorted(lengths)

    def pct(p):
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"rows": len(ordered), "tokens": sum(ordered), "mean": round(statistics.fmean(ordered), 1),
            "median": statistics.median(ordered), "p10": pct(0.10), "p90": pct(0.90), "p99": pct(0.99),
            "max": ordered[-1], "over_seq": sum(n > seq for n in ordered)}


def make_rows(out: str, rows: int, tokenizer_dir: str, seed: int = 0, median: float = 330) -> dict:
    tokenizer = load_tokenizer_json(tokenizer_dir)
    words = corpus_words()
    tokens_per_word = len(tokenizer.encode(" ".join(words), add_special_tokens=False).ids) / len(words)
    rng = random.Random(seed)
    made = [{"conversations": conversation(rng, words, n, tokens_per_word)} for n in target_lengths(rows, rng, median)]
    with open(out, "w") as fh:
        for row in made:
            fh.write(json.dumps(row) + "\n")
    stats = {**length_stats(token_lengths(tokenizer, [chatml(r) for r in made])), "tokens_per_word": round(tokens_per_word, 3),
             "multi_turn_rows": sum(len(r["conversations"]) > 2 for r in made)}
    Path(out + ".stats.json").write_text(json.dumps(stats) + "\n")
    return stats


def make_tiny(directory: str) -> None:
    """A tiny random Llama and a word-level tokenizer over the example data's words, for the CPU tests: long enough
    rows to pack, ids that fit the model's vocabulary."""
    from collections import Counter

    import torch
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    common = [w for w, _ in Counter(w.lower() for w in corpus_words()).most_common(1000 - len(special))]
    vocab = {token: i for i, token in enumerate(special + [w for w in common if w not in special])}
    inner = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    inner.normalizer = normalizers.Lowercase()
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", additional_special_tokens=special[4:])
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096,
                         bos_token_id=2, eos_token_id=3, pad_token_id=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)


# --- measurement ---------------------------------------------------------------------------------------------------


def merged_us(spans) -> float:
    """Time covered by the union of (start, end) intervals: how long at least one kernel ran."""
    busy, start, end = 0.0, None, None
    for s, e in sorted(spans):
        if end is None or s > end:
            if end is not None:
                busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    return busy + (end - start if end is not None else 0.0)


def summarize_profile(records: list[dict], spans, wall_ms: float, top: int = 15) -> dict:
    """One profiled step reduced to what says where its time went. `records`: {"name", "cuda", "self_us", "count"}
    per operator or kernel (torch.profiler's key averages); `spans`: each kernel's (start, end) in microseconds."""
    kernels = sorted((r for r in records if r["cuda"]), key=lambda r: -r["self_us"])
    host = [r for r in records if not r["cuda"]]

    def shown(r):
        return {"name": r["name"][:120], "ms": round(r["self_us"] / 1000, 3), "count": r["count"]}

    attention = [r for r in kernels if any(m in r["name"].lower() for m in ATTENTION_MARKS)]
    sdpa = sorted((r for r in host if any(m in r["name"].lower() for m in SDPA_OP_MARKS)), key=lambda r: -r["count"])
    busy = merged_us(spans)
    return {
        "profiled_step_ms": round(wall_ms, 1),
        "gpu_busy_ms": round(busy / 1000, 1),
        "gpu_busy_fraction": round(busy / 1000 / wall_ms, 3) if wall_ms and spans else None,
        "gpu_kernel_ms": round(sum(r["self_us"] for r in kernels) / 1000, 1),
        "kernel_launches": sum(r["count"] for r in kernels),
        "host_ops": sum(r["count"] for r in host),
        "top_kernels": [shown(r) for r in kernels[:top]],
        "attention_kernel_found": bool(attention),
        "attention_kernel_marks": sorted({m for r in attention for m in ATTENTION_MARKS if m in r["name"].lower()}),
        "attention_kernel_ms": round(sum(r["self_us"] for r in attention) / 1000, 3),
        "attention_kernels": [shown(r) for r in attention[:6]],
        "sdpa_ops": {r["name"][:80]: r["count"] for r in sdpa[:8]},
        "compiled_region_calls": sum(r["count"] for r in host if r["name"].startswith("Torch-Compiled Region")),
        "sync_calls": {name: n for name in SYNC_OPS if (n := sum(r["count"] for r in host if r["name"] == name))},
    }


def profile_records(prof):
    import torch

    cuda = torch.autograd.DeviceType.CUDA
    records = []
    for e in prof.key_averages():
        is_cuda = e.device_type == cuda
        self_us = getattr(e, "self_device_time_total", None) if is_cuda else e.self_cpu_time_total
        if self_us is None:  # older torch spells the device time after CUDA
            self_us = getattr(e, "self_cuda_time_total", 0)
        records.append({"name": e.key, "cuda": is_cuda, "self_us": float(self_us), "count": e.count})
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == cuda]
    return records, spans


def step_figures(begins: dict, ends: dict, tokens: dict, docs: dict, warmup: int, steps: int, rows_per_step: int,
                 seq: int) -> dict:
    """Rates over steps warmup..steps-1, each timed from the previous step's synchronised end to its own (the
    previous step's log line and this step's batch fetch included, as a training run lives them)."""
    measured = [k for k in range(max(warmup, 1), steps) if k in ends and k - 1 in ends and k in tokens]
    if not measured:
        return {"steps_measured": 0}
    walls = [ends[k] - ends[k - 1] for k in measured]
    gaps = [begins[k] - ends[k - 1] for k in measured if k in begins]
    real, slots = sum(tokens[k] for k in measured), len(measured) * rows_per_step * seq
    return {
        "steps_measured": len(measured),
        "tokens_per_second": round(statistics.median(tokens[k] / w for k, w in zip(measured, walls)), 1),
        "tokens_per_second_overall": round(real / sum(walls), 1),
        "step_ms": [round(w * 1000) for w in walls],
        "tokens_per_step": round(real / len(measured), 1),
        "fill_fraction": round(real / slots, 4),
        "docs_per_sequence": round(sum(docs.get(k, 0) for k in measured) / (len(measured) * rows_per_step), 2),
        # after a step's synchronised end: its log line (a read of the loss) and the next batch's fetch
        "host_gap_ms_median": round(statistics.median(gaps) * 1000, 2) if gaps else None,
    }


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def dynamo_graphs() -> int | None:
    """Graphs torch.compile has made in this process so far: growth during measured steps means recompiles."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a torch without the counter: report nothing
        return None


class StepProbe:
    """Observes a trl/transformers training loop from a TrainerCallback and two wrapped trainer methods: the end of
    each step synchronised with the GPU and timed, every micro-batch's real tokens and documents, the host time in
    training_step and in fetching batches, and one step under torch.profiler (step `steps`, after the measured ones,
    so its overhead stays out of them)."""

    def __init__(self, warmup: int, steps: int, profile_table: str = "", deadline_s: float = 0):
        self.warmup, self.steps, self.profile_table, self.deadline_s = warmup, steps, profile_table, deadline_s
        self.begins, self.ends, self.tokens, self.docs, self.graphs = {}, {}, {}, {}, {}
        self.training_step_s, self.fetch_s = {}, {}
        self.pending = []  # (step, "tokens"|"docs", device tensor): read once training is over
        self.prof, self.profile, self.peak_gib, self.first_step_s = None, {}, None, None
        self.rows_per_step, self.seq, self.trainer = 1, 0, None

    # callback side
    def begin(self, step: int) -> None:
        if step == self.steps and self.deadline_s and time.monotonic() - STARTED > self.deadline_s:
            # a profiled step takes a while to process: past the deadline the row would not get written in time
            self.profile = {"skipped": f"past {self.deadline_s:.0f} s"}
        elif step == self.steps and self.prof is None:
            import torch

            synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            try:
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.start()
            except Exception as exc:  # noqa: BLE001 - no profiler (CUPTI) here: the row goes without one
                self.prof, self.profile = None, {"error": repr(exc)[:300]}
        self.begins[step] = time.perf_counter()

    def end(self, step: int) -> None:
        synchronize()
        self.ends[step] = time.perf_counter()
        if self.first_step_s is None:  # from process start: loading, data preparation, compiling the first step
            self.first_step_s = round(time.monotonic() - STARTED, 1)
        self.graphs[step] = dynamo_graphs()
        if step == self.steps - 1:
            self.peak_gib = peak_gib()
        if self.prof is not None and step == self.steps:
            began = time.perf_counter()
            try:
                self.prof.stop()
                records, spans = profile_records(self.prof)
                self.profile = summarize_profile(records, spans, (self.ends[step] - self.begins[step]) * 1000)
                if self.profile_table:
                    with open(self.profile_table, "w") as fh:
                        fh.write(json.dumps(self.profile) + "\n")
                        fh.write(self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40) + "\n")
            except Exception as exc:  # noqa: BLE001 - the measured steps are in already: keep them, say what failed
                self.profile = {"error": repr(exc)[:300]}
            self.profile["processing_s"] = round(time.perf_counter() - began, 1)
            self.prof = None

    def callback(self):
        import torch
        from transformers import TrainerCallback

        probe = self

        class PackedProbe(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()

            def on_step_begin(self, args, state, control, **kwargs):
                probe.begin(state.global_step)

            def on_step_end(self, args, state, control, **kwargs):
                probe.end(state.global_step - 1)

        return PackedProbe()

    # trainer side
    def batch(self, step: int, inputs) -> None:
        """A micro-batch's real tokens and documents, without waiting for the GPU (shapes, or sums read later)."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is None:  # padding-free rows and job's batches without a mask: every id is a real token
            self.tokens[step] = self.tokens.get(step, 0) + ids.numel()
        else:
            self.pending.append((step, "tokens", mask.sum()))
        lengths, positions = inputs.get("packed_seq_lengths"), inputs.get("position_ids")
        if lengths is not None:  # unsloth's packing metadata: one entry a document
            self.docs[step] = self.docs.get(step, 0) + lengths.numel()
        elif positions is not None:  # trl's padding-free rows: each document restarts its positions at 0
            self.pending.append((step, "docs", (positions == 0).sum()))
        else:
            self.docs[step] = self.docs.get(step, 0) + ids.shape[0]

    def settle(self) -> None:
        for step, field, value in self.pending:
            target = self.tokens if field == "tokens" else self.docs
            target[step] = target.get(step, 0) + int(value)
        self.pending = []

    def report(self) -> dict:
        self.settle()
        figures = step_figures(self.begins, self.ends, self.tokens, self.docs, self.warmup, self.steps,
                               self.rows_per_step, self.seq)
        measured = range(max(self.warmup, 1), self.steps)

        def median_ms(values):
            return round(statistics.median(values) * 1000, 2) if values else None

        before, after = self.graphs.get(self.warmup - 1), self.graphs.get(self.steps - 1)
        return {
            **figures,
            "peak_gpu_memory_gib": self.peak_gib,
            "time_to_first_step_s": self.first_step_s,
            "host_ms_training_step": median_ms([self.training_step_s[k] for k in measured if k in self.training_step_s]),
            "host_ms_fetch_batch": median_ms([self.fetch_s[k] for k in measured if k in self.fetch_s]),
            "compile_graphs_total": after,
            "compile_graphs_in_measured_steps": (after - before) if None not in (before, after) else None,
            "profile": self.profile,
        }


def peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def instrument(trainer, probe: StepProbe) -> None:
    """Wrap this trainer's training_step and get_batch_samples (instance attributes over the class's, which unsloth
    may have patched): they record each micro-batch and the host time spent in each."""
    probe.trainer = trainer
    args = trainer.args
    probe.rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    probe.seq = args.max_length
    training_step, get_batch_samples = trainer.training_step, trainer.get_batch_samples

    def timed_training_step(model, inputs, *rest, **kwargs):
        step = trainer.state.global_step
        probe.batch(step, inputs)
        began = time.perf_counter()
        try:
            return training_step(model, inputs, *rest, **kwargs)
        finally:
            probe.training_step_s[step] = probe.training_step_s.get(step, 0.0) + time.perf_counter() - began

    def timed_get_batch_samples(*a, **kwargs):
        began = time.perf_counter()
        try:
            return get_batch_samples(*a, **kwargs)
        finally:
            probe.fetch_s[trainer.state.global_step] = time.perf_counter() - began

    trainer.training_step, trainer.get_batch_samples = timed_training_step, timed_get_batch_samples


def packed_dataset_figures(trainer, seq: int) -> dict:
    """How bfd packed the whole training set: packed rows, documents in each, filled share of the slots."""
    dataset = trainer.train_dataset
    if "seq_lengths" not in getattr(dataset, "column_names", []):
        return {"packed_rows": len(dataset)}
    lengths = dataset["seq_lengths"]
    return {"packed_rows": len(lengths), "dataset_docs_per_sequence": round(statistics.fmean(map(len, lengths)), 2),
            "dataset_fill_fraction": round(sum(map(sum, lengths)) / (len(lengths) * seq), 4)}


def packing_settings(trainer) -> dict:
    """What the trainer packs with: trl turns padding-free on for bfd packing whatever the config says."""
    args = trainer.args
    return {"packing": bool(args.packing), "packing_strategy": args.packing_strategy if args.packing else None,
            "padding_free": bool(getattr(trainer, "padding_free", args.padding_free))}


def attention_info(model) -> dict:
    """Which attention the model runs: its config's implementation and, under unsloth, what unsloth's dispatch picks
    for packed (varlen) and dense calls with the kernels this host has."""
    import torch

    config = getattr(model, "config", None)
    info = {"attn_implementation": getattr(config, "_attn_implementation", None), "torch": torch.__version__}
    if torch.cuda.is_available():
        cuda = torch.backends.cuda
        info["sdp_enabled"] = {name: bool(getattr(cuda, f"{name}_sdp_enabled", lambda: None)())
                               for name in ("flash", "mem_efficient", "math", "cudnn")}
    if "unsloth" in sys.modules:
        try:
            from unsloth.utils import attention_dispatch as ad

            info["unsloth"] = {"has_flash_attn": bool(getattr(ad, "HAS_FLASH_ATTENTION", None)),
                               "has_xformers": bool(getattr(ad, "HAS_XFORMERS", None)),
                               "torch_varlen": getattr(ad, "_TORCH_VARLEN_ATTN", None) is not None,
                               "sdpa_packed_segments": getattr(ad, "_SDPA_PACKED_SEGMENTS", None),
                               "packed_backend": ad.select_attention_backend(True),
                               "dense_backend": ad.select_attention_backend(False)}
        except Exception as exc:  # noqa: BLE001 - another unsloth: say so in the row
            info["unsloth"] = {"error": repr(exc)[:200]}
        try:
            from unsloth.models._block_compile import _enabled

            info["unsloth_block_compile"] = bool(_enabled())
        except Exception:  # noqa: BLE001
            pass
    return info


def environment() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(("UNSLOTH_", "TORCH_")) and k != "UNSLOTH_DISABLE_STATISTICS"}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "trl", "peft", "unsloth", "unsloth_zoo", "torchao", "flash_attn", "xformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


# --- variants ------------------------------------------------------------------------------------------------------


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_bare(args):
    """The model with the recipe's adapter: unsloth as its notebooks load it (job's backend does the same and resets
    the inductor flags torchao leaves on after an fp8 load), or transformers + peft on the CPU."""
    import torch

    if args.backend == "unsloth":
        if not torch.cuda.is_available():
            raise SystemExit("--backend unsloth needs CUDA; use --backend hf on the CPU")
        from unsloth import FastLanguageModel  # first: unsloth patches transformers, trl and peft as it loads

        model, tokenizer = FastLanguageModel.from_pretrained(
            args.model_dir, max_seq_length=args.seq, dtype=None, load_in_4bit=args.precision == "4bit",
            load_in_fp8=True if args.precision == "fp8" else False)
        if args.precision == "fp8":  # as job/backends/unsloth.py: else unsloth's per-layer compile autotunes for minutes
            import torch._inductor.config as inductor

            inductor.coordinate_descent_tuning = False
            inductor.coordinate_descent_check_all_directions = False
        model = FastLanguageModel.get_peft_model(
            model, use_gradient_checkpointing="unsloth" if args.checkpointing else False, random_state=0, **LORA)
        return model, tokenizer
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA)), AutoTokenizer.from_pretrained(args.model_dir)


def fixed_blocks(tokenizer, texts: list[str], seq: int, count: int) -> list[list[int]]:
    """`count` rows of exactly `seq` tokens cut from the rendered rows' token stream (EOS between rows)."""
    stream = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [tokenizer.eos_token_id])
        if len(stream) >= seq * count:
            break
    while len(stream) < seq * count:  # too few rows: go round again
        stream = stream + stream
    return [stream[i * seq:(i + 1) * seq] for i in range(count)]


def bare_config(args, packed: bool, steps: int):
    """job's SFTConfig where it bears on speed (job/train.py: packing, padding_free, max_length, no per-step NaN
    filter), trl's and transformers' defaults elsewhere, as a notebook would leave them."""
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(Path(args.work) / "trainer"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum, learning_rate=3e-4, warmup_steps=10, lr_scheduler_type="linear",
        weight_decay=0.01, max_grad_norm=1.0, optim="adamw_8bit" if cuda else "adamw_torch", seed=0, max_steps=steps,
        logging_steps=1, logging_nan_inf_filter=False, save_strategy="no", report_to=[], disable_tqdm=True,
        max_length=args.seq, packing=packed, padding_free=False, dataset_text_field="text", completion_only_loss=None,
        assistant_only_loss=False, gradient_checkpointing=False, bf16=cuda, use_cpu=not cuda,
        dataloader_num_workers=args.workers, dataset_num_proc=None)


def without_trl_metrics(base: type) -> type:
    """trl's SFTTrainer with transformers' own compute_loss, as job's trainer has it: trl's adds an entropy and a
    token accuracy over the full logits with host reads every step, and needs an attention mask or position ids."""
    from transformers import Trainer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    return type("BareSFTTrainer", (base,), {"compute_loss": compute_loss})


def run_bare(args) -> dict:
    model, tokenizer = load_bare(args)
    import datasets
    from trl import SFTTrainer

    from job.chat_templates import NAMED

    packed = args.variant == "bare-packed"
    steps = args.steps + 1  # the last one profiled
    tokenizer.chat_template = NAMED["chatml"]  # what job sets for data.chat_template: chatml
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [tokenizer.apply_chat_template(messages(row), tokenize=False) for row in read_rows(args.rows)]
    if packed:
        dataset = datasets.Dataset.from_dict({"text": texts})
    else:
        count = steps * args.batch * args.grad_accum
        dataset = datasets.Dataset.from_dict({"input_ids": fixed_blocks(tokenizer, texts, args.seq, count)})
    probe = StepProbe(args.warmup, args.steps, args.profile_table, args.profile_deadline)
    trainer_class = SFTTrainer if args.trl_metrics else without_trl_metrics(SFTTrainer)
    trainer = trainer_class(model=model, args=bare_config(args, packed, steps), train_dataset=dataset,
                            processing_class=tokenizer, callbacks=[probe.callback()])
    if not packed and not args.trl_metrics:
        # trl's collator adds a mask of ones; the bare loop and job's trainer pass none (docs/benchmarks.md), and
        # trl's own loss, which reads it, is not used here
        from job.trainer_overrides import WithoutFullAttentionMask

        trainer.data_collator = WithoutFullAttentionMask(trainer.data_collator)
    instrument(trainer, probe)
    trainer.train()
    return {**probe.report(), **packed_dataset_figures(trainer, args.seq), **attention_info(trainer.model),
            **packing_settings(trainer)}


class EventTee(io.TextIOBase):
    """sys.stdout while job runs in this process: each line still goes to the real stdout, and job's JSON events are
    kept. It has no file descriptor, so job writes its events here rather than to a duplicate of descriptor 1."""

    def __init__(self, stream):
        self.stream, self.partial, self.events = stream, "", []

    def write(self, text: str) -> int:
        self.stream.write(text)
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            if line.startswith("{"):
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


def job_arguments(args, run_id: str) -> list[str]:
    sets = {"model.name": args.model_dir, "data.source": args.rows, "run.id": run_id,
            "run.output": str(Path(args.work) / "runs"), "training.max_steps": args.steps + 1,
            "training.max_seq_length": args.seq, "training.gradient_accumulation_steps": args.grad_accum,
            "export.merged": "false", "export.gguf": "[]", "export.probe_max_new_tokens": 8}
    if not args.job_auto:  # the settings `auto` picks on an H100, fixed so every variant runs the same
        sets.update({"model.precision": args.precision, "training.batch_size": args.batch,
                     "training.gradient_checkpointing": str(bool(args.checkpointing)).lower()})
    else:
        sets.update({"model.precision": "auto", "training.batch_size": "auto", "training.gradient_checkpointing": "auto"})
    if args.backend == "hf":
        sets["training.backend"] = "hf"
    return ["run", "--spec", str(SPEC), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def job_events(events: list[dict], warmup: int, steps: int) -> dict:
    """What job's own log says: its per-step rates (each over the steps since the previous line), settings and
    data counts, and how the run ended."""
    by_name = {}
    for e in events:
        by_name.setdefault(e.get("event"), []).append(e)

    def first(name, *keys):
        found = by_name.get(name, [{}])[0]
        return {k: found[k] for k in keys if k in found}

    rates = [e["tokens_per_second"] for e in by_name.get("train.step", []) if warmup < e.get("step", 0) <= steps]
    failed = by_name.get("run.failed", []) + by_name.get("run.crashed", [])
    return {
        "job_tokens_per_second_logged": round(statistics.median(rates), 1) if rates else None,
        "job_step_rates": [round(r) for r in rates],
        "job_train_started": first("train.started", "backend", "precision", "batch_size", "gradient_accumulation_steps", "rows"),
        "job_data": first("data.load.finished", "rows_used", "rows_truncated", "tokens", "trained_tokens"),
        "job_train_finished": first("train.finished", "steps", "tokens_per_second", "peak_gpu_memory_gib", "seconds"),
        "job_failed": {k: failed[0].get(k) for k in ("event", "error", "message", "exit_code") if k in failed[0]} if failed else None,
    }


def run_job(args) -> dict:
    """`job run` on the FineTome recipe in this process (job's CLI, as `python -m job.cli run` calls it), with the
    probe added to the trainer job makes."""
    import job.train

    probe, made = StepProbe(args.warmup, args.steps, args.profile_table, args.profile_deadline), {}
    original = job.train.make_trainer

    def make_trainer(variant, config, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), probe.callback()]
        trainer = original(variant, config, **kwargs)
        instrument(trainer, probe)
        made["trainer"] = trainer
        return trainer

    job.train.make_trainer = make_trainer
    os.environ.setdefault("JOB_WORK_DIR", str(Path(args.work) / "job-work"))
    from job.cli.main import main as job_main

    tee, real = EventTee(sys.stdout), sys.stdout
    sys.stdout, code = tee, 0
    try:
        job_main(args=job_arguments(args, f"packed-{os.getpid()}"), prog_name="job", standalone_mode=False)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdout = real
    row = {**probe.report(), **job_events(tee.events, args.warmup, args.steps), "job_exit": code}
    if "trainer" in made:
        trainer = made["trainer"]
        row.update({**packed_dataset_figures(trainer, args.seq), **attention_info(trainer.model),
                    **packing_settings(trainer)})
    return row


def run(args) -> dict:
    import torch

    if args.backend == "unsloth" and not torch.cuda.is_available():
        raise SystemExit("--backend unsloth needs CUDA; use --backend hf on the CPU")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    head = {"variant": args.label or args.variant, "kind": args.variant, "backend": args.backend,
            "precision": args.precision, "batch": args.batch,
            "grad_accum": args.grad_accum, "seq": args.seq, "checkpointing": bool(args.checkpointing),
            "steps": args.steps, "warmup": args.warmup, "workers": args.workers if args.variant != "job-packed" else "job's",
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "env": environment(),
            "versions": versions()}
    body = run_job(args) if args.variant == "job-packed" else run_bare(args)
    return {**head, **body, "wall_s": round(time.monotonic() - STARTED, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-rows", help="FineTome-like ShareGPT rows (JSONL); their token statistics beside them")
    mk.add_argument("--out", required=True)
    mk.add_argument("--rows", type=int, default=3000)
    mk.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json (the Llama 3 tokenizer on the GPU)")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--median-tokens", type=float, default=330, help="the rows' median before the template's tags")
    tiny = sub.add_parser("make-tiny", help="a tiny random Llama and word-level tokenizer for the CPU tests")
    tiny.add_argument("--dir", required=True)
    rn = sub.add_parser("run")
    rn.add_argument("--variant", choices=VARIANTS, required=True)
    rn.add_argument("--label", default="", help="the row's name when the environment changes a variant")
    rn.add_argument("--model-dir", required=True)
    rn.add_argument("--rows", required=True)
    rn.add_argument("--backend", choices=["unsloth", "hf"], default="unsloth")
    rn.add_argument("--precision", choices=["fp8", "4bit", "16bit"], default="fp8")
    rn.add_argument("--batch", type=int, default=4)
    rn.add_argument("--grad-accum", type=int, default=1)
    rn.add_argument("--seq", type=int, default=2048)
    rn.add_argument("--checkpointing", type=int, default=0)
    rn.add_argument("--steps", type=int, default=20, help="steps timed, warm-up included; one more is profiled")
    rn.add_argument("--warmup", type=int, default=5)
    rn.add_argument("--workers", type=int, default=0, help="bare variants: data loader workers (transformers' default 0)")
    rn.add_argument("--trl-metrics", action="store_true", help="bare variants: keep trl's compute_loss (entropy and "
                    "token accuracy each step) and, on fixed rows, its attention mask of ones")
    rn.add_argument("--job-auto", action="store_true", help="job-packed: leave precision, batch and checkpointing to auto")
    rn.add_argument("--work", default=f"/tmp/packed-bench-{os.getpid()}")
    rn.add_argument("--profile-table", default="", help="write the profiled step's operator table here")
    rn.add_argument("--profile-deadline", type=float, default=0,
                    help="seconds from the process start after which the profiled step is left out (0: never)")
    rn.add_argument("--out", default="")
    args = parser.parse_args()
    if args.cmd == "make-rows":
        print(json.dumps(make_rows(args.out, args.rows, args.tokenizer, args.seed, args.median_tokens)))
        return
    if args.cmd == "make-tiny":
        make_tiny(args.dir)
        return
    row = run(args)
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
