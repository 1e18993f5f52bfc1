"""Time job's tokenizer pre-flight, export and verify stages at the Llama-3.1-8B shape on the GPU host.

Random weights of the real shape with the real Llama 3 tokenizer (shared/gpu/make-llama3-tokenizer.py) and a random
LoRA adapter (r=16 on all 7 projections): the converter and llama.cpp treat the model like the real one, and the
gates must pass on its faithful copies. Each stage calls the same functions as `job run`; one JSON line per step.

  python bench/verify_time.py --tokenizer DIR --llama-cpp DIR --work DIR --out OUT.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHAPE_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                max_position_embeddings=8192, tie_word_embeddings=False)
PROBES = ["What is the capital of France?", "Write a haiku about rain."]


class Clock:
    def __init__(self, out: Path):
        self.out = out

    def step(self, name: str, fn, **extra):
        import torch

        started = time.monotonic()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        row = {"step": name, "seconds": round(time.monotonic() - started, 2), **extra}
        with open(self.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return result


def make_model(directory: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**SHAPE_8B, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()


def make_adapter(base: Path, directory: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map="cuda")
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # a trained-looking update: B starts at zero in a fresh adapter
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(base).save_pretrained(directory)
    del model
    torch.cuda.empty_cache()


def bare_tools(clock: Clock, base: Path, adapter_dir: Path, work: Path, tools) -> None:
    """The same post-training work with the bare tools, one after another: peft's merge and save, llama.cpp's
    converter to a bf16 GGUF, llama-quantize to Q4_K_M and Q8_0 (as many threads as job gives it)."""
    import os
    import subprocess
    import sys

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job import llamacpp

    merged = work / "merged"

    def merge_and_save() -> None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map="cuda")
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        model.save_pretrained(merged, safe_serialization=True)
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(merged)
        del model
        torch.cuda.empty_cache()

    def run(*cmd, env=None) -> None:
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True, env=env)

    threads = llamacpp.cpu_threads()
    bf16 = work / "bare-bf16.gguf"
    clock.step("bare_merge_save", merge_and_save)
    clock.step("bare_convert_bf16", lambda: run(sys.executable, tools.converter, merged, "--outfile", bf16,
                                                "--outtype", "bf16",
                                                env=dict(os.environ, PYTHONPATH=str(tools.home / "gguf-py"))))
    for qtype in ("Q4_K_M", "Q8_0"):
        clock.step(f"bare_quantize_{qtype.lower()}", lambda q=qtype: run(tools.quantize, bf16, work / f"bare-{q}.gguf",
                                                                          q, threads), threads=threads)

    import shutil

    shutil.rmtree(merged)  # the GPU host's disk is 64 GiB: the base and bf16 copies are 32 of them already
    for qtype in ("Q4_K_M", "Q8_0"):
        (work / f"bare-{qtype}.gguf").unlink()

    def both_at_once() -> None:  # would quantizing in parallel pay? (llama-quantize's threads against processes)
        procs = [subprocess.Popen([str(tools.quantize), str(bf16), str(work / f"both-{q}.gguf"), q, str(threads)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for q in ("Q4_K_M", "Q8_0")]
        assert all(p.wait() == 0 for p in procs)

    clock.step("bare_quantize_both_at_once", both_at_once, threads=threads)
    shutil.rmtree(work)  # the disk and page cache as job's steps will find them


def overlapped_export(clock: Clock, args, base: Path, adapter_dir: Path, staging: Path, tokenizer, template, tools,
                      data_source: str, evaluation, references: list):
    """job's export stage as `job run` calls it, with the base's GGUF converted first (a run converts it while the
    adapter trains, so it is timed apart): llama-export-lora and the quants on the CPU while the merge runs."""
    from types import SimpleNamespace

    import torch

    from job import export, pipeline
    from job.spec import Spec

    spec = Spec.model_validate({"model": {"name": str(base)}, "data": {"source": data_source},
                                "export": {"gguf": ["q4_k_m", "q8_0"], "probes": PROBES},
                                "run": {"id": "bench", "output": str(args.work / "runs")}})
    env = pipeline._Environment(torch, "hf", None, None, args.work / "run", staging)
    base_gguf = export.BaseGguf(tools, base, tokenizer, args.cache or args.work / "cache", env.work)
    clock.step("base_gguf_convert_during_training", lambda: base_gguf.start().wait())
    exported, refs = clock.step("export_from_base_gguf", lambda: pipeline._export(
        spec, env, SimpleNamespace(path=base), adapter_dir, tokenizer, template, tools, base_gguf, evaluation,
        send=lambda path: None))
    references[:] = refs
    return exported.merged_dir, exported.gguf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--llama-cpp", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bare", action="store_true", help="also time the bare tools, one after another, first")
    parser.add_argument("--skip-gates-only", action="store_true")
    parser.add_argument("--route", choices=("merged", "base", "both"), default="both",
                        help="how job's export makes the GGUFs: from the merged weights (the converter after the merge), "
                             "from the base's cached GGUF (llama-export-lora while the merge runs), or both, one after "
                             "the other (verify checks the last)")
    parser.add_argument("--cache", type=Path, help="where the base's GGUF is cached (default: WORK/cache)")
    args = parser.parse_args()

    import torch

    from job import data, export, llamacpp, log, verify
    from job.model import load_tokenizer
    from job.spec import DataSection, ModelSection
    from job.storage import S3Settings

    # job's own events (each llama.cpp tool's seconds, each artifact's check by part) beside the steps
    log.setup(json_logs=True, level="DEBUG", stream=open(args.out.with_name("events.jsonl"), "a"))
    clock = Clock(args.out)
    base, adapter_dir, staging = args.work / "base", args.work / "adapter", args.work / "out"
    clock.step("make_model", lambda: make_model(base, args.tokenizer))
    clock.step("make_adapter", lambda: make_adapter(base, adapter_dir))
    tools = llamacpp.locate(args.llama_cpp)
    tokenizer = load_tokenizer(base)
    section = DataSection(source=str(Path(__file__).resolve().parent.parent / "examples/data/alpaca-en.jsonl"),
                          format="alpaca")
    rows, _, template = data.prepare(section, tokenizer, 2048, args.work / "data", S3Settings())

    texts = verify.preflight_texts(tokenizer, PROBES, rows)
    vocab = clock.step("preflight", lambda: verify.preflight(tools, base, tokenizer, texts, args.work / "preflight"),
                       texts=len(texts))

    report = verify.ProbeReport(PROBES, max_new_tokens=48)

    def answer() -> None:  # what the train stage does once training ends (not part of verify)
        verify.answer_with_adapter(verify.load_checkpoint(base, False, adapter_dir), tokenizer, report)
        torch.cuda.empty_cache()

    clock.step("train_stage_probe_answers", answer)
    evaluation = verify.evaluation_set(tokenizer, report, rows, vocab.bos_id if vocab.add_bos else None)

    references = []

    def before_merge(unmerged):
        references.append(clock.step("references_in_merge", lambda: verify.references(unmerged, evaluation),
                                     scored_tokens=evaluation.scored_tokens))

    if args.bare:
        bare_tools(clock, base, adapter_dir, args.work / "bare", tools)
    import shutil

    if args.route in ("merged", "both"):
        merged_dir, _ = clock.step("export_merge", lambda: export.merge(base, adapter_dir, staging,
                                                                         ModelSection(name=str(base)),
                                                                         before_merge=before_merge))
        torch.cuda.empty_cache()
        gguf = clock.step("export_gguf", lambda: export.to_gguf(tools, merged_dir, staging, ["q4_k_m", "q8_0"],
                                                                stem="bench"), threads=llamacpp.cpu_threads())
    if args.route in ("base", "both"):
        if args.route == "both":  # the GPU host's 64 GiB disk holds one route's files at a time
            shutil.rmtree(staging / "gguf")
            shutil.rmtree(staging / "merged")
            references.clear()
        merged_dir, gguf = overlapped_export(clock, args, base, adapter_dir, staging, tokenizer, template, tools,
                                             section.source, evaluation, references)
    result = clock.step("verify_stage", lambda: verify.verify_artifacts(
        evaluation, references[0], base, adapter_dir, merged_dir, gguf, tools, tokenizer, args.work / "verify", False,
        report))
    with open(args.out, "a") as fh:
        fh.write(json.dumps({"step": "verification", **result.as_dict()}) + "\n")
    from job import publish

    # publish's own work before any byte moves: a sha256 of every staged file (merged shards and GGUFs)
    clock.step("publish_inventory", lambda: publish.inventory(staging), threads=publish.HASHING_THREADS)
    publish.HASHING_THREADS = 1
    clock.step("publish_inventory_one_thread", lambda: publish.inventory(staging))
    print("\n".join(verify.table(result.as_dict())), flush=True)
    if args.skip_gates_only:
        return
    # The verify stage without the greedy samples: the gates alone
    clock.step("verify_gates_only", lambda: verify.verify_artifacts(
        evaluation, references[0], base, adapter_dir, merged_dir, gguf, tools, tokenizer, args.work / "verify", False))


if __name__ == "__main__":
    main()
