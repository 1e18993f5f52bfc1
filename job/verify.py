"""Verify every artifact before it is published: probe prompts answered greedily by each of them.

Gates: the merged checkpoint must answer like the adapter on its base; q8_0 and 16-bit GGUFs must start
their answers like PyTorch does, and end them (EOS) where PyTorch ends a short answer; every GGUF must load and
produce text. Lower-bit quants are recorded only. Whether each answer ended before probe_max_new_tokens is recorded
for every artifact ("stopped" in the manifest's probes): the trained model's answers show whether it learned EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from job import llamacpp, log
from job.errors import VerificationError

MERGED_MATCH_TOKENS = 16
GGUF_MATCH_TOKENS = 8
GATED_GGUF_TYPES = {"q8_0", "f16", "bf16", "f32"}


@dataclass
class ProbeReport:
    probes: list[str]
    base: list[str] = field(default_factory=list)
    adapter: list[str] = field(default_factory=list)  # the model as trained (a 4-bit base on GPU)
    adapter_on_16bit_base: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    gguf: dict[str, list[str]] = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)
    max_new_tokens: int = 48
    stopped: dict[str, list[bool]] = field(default_factory=dict)  # artifact → each answer ended with EOS

    def put(self, name: str, answers: list[str], stopped: list[bool]) -> None:
        """Answers of one artifact: base, adapter, adapter_on_16bit_base, merged or gguf_<type>."""
        if name.startswith("gguf_"):
            self.gguf[name.removeprefix("gguf_")] = answers
        else:
            setattr(self, name, answers)
        self.stopped[name] = stopped

    def as_dict(self) -> list[dict]:
        rows = []
        for i, probe in enumerate(self.probes):
            row = {"prompt": probe}
            for name in ("base", "adapter", "adapter_on_16bit_base", "merged"):
                answers = getattr(self, name)
                if answers:
                    row[name] = answers[i]
            for qtype, answers in self.gguf.items():
                row[f"gguf_{qtype}"] = answers[i]
            if self.stopped:
                row["stopped"] = {name: flags[i] for name, flags in self.stopped.items()}
            rows.append(row)
        return rows


def chat_prompt(tokenizer, probe: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False, add_generation_prompt=True)


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def generate(model, tokenizer, probes: list[str], max_new_tokens: int) -> tuple[list[str], list[bool]]:
    """Greedy answers, and whether each ended with a stop token (else it ran into max_new_tokens)."""
    import torch

    answers, stopped = [], []
    stop_ids = _stop_ids(tokenizer)
    device = next(model.parameters()).device
    for probe in probes:
        enc = tokenizer(chat_prompt(tokenizer, probe), return_tensors="pt", add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = out[0, enc["input_ids"].shape[1] :]
        answers.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
        stopped.append(len(new_tokens) > 0 and int(new_tokens[-1]) in stop_ids)
    return answers, stopped


def answer_with_adapter(peft_model, tokenizer, report: ProbeReport) -> None:
    """The report's base answers (the adapter switched off) and the trained adapter's."""
    peft_model.eval()
    was_cache = peft_model.config.use_cache
    peft_model.config.use_cache = True
    with peft_model.disable_adapter():
        report.put("base", *generate(peft_model, tokenizer, report.probes, report.max_new_tokens))
    report.put("adapter", *generate(peft_model, tokenizer, report.probes, report.max_new_tokens))
    peft_model.config.use_cache = was_cache


def answer_with_checkpoint(path: Path, probes: list[str], max_new_tokens: int, trust_remote_code: bool,
                           adapter_dir: Path | None = None) -> tuple[list[str], list[bool]]:
    """Answers of a checkpoint loaded from disk, or of an adapter on top of it (unmerged) when adapter_dir is given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device, trust_remote_code=trust_remote_code)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or path)
    try:
        return generate(model, tokenizer, probes, max_new_tokens)
    finally:
        del model


def template_emits_bos(tokenizer) -> bool:
    return bool(tokenizer.bos_token) and "bos_token" in (tokenizer.chat_template or "")


def answer_with_gguf(tools: llamacpp.Tools, gguf: Path, tokenizer, probes: list[str],
                     max_new_tokens: int) -> tuple[list[str], list[bool]]:
    threads = llamacpp.cpu_threads()
    answers, stopped = [], []
    for probe in probes:
        prompt = chat_prompt(tokenizer, probe)
        if template_emits_bos(tokenizer) and prompt.startswith(tokenizer.bos_token):
            prompt = prompt[len(tokenizer.bos_token) :]  # llama.cpp adds BOS itself, as the GGUF's metadata says
        text, ended = llamacpp.complete(tools, gguf, prompt, max_new_tokens, threads)
        answers.append(text)
        stopped.append(ended)
    return answers, stopped


def same_start(tokenizer, expected: str, actual: str, n: int) -> bool:
    a = tokenizer.encode(expected, add_special_tokens=False)[:n]
    b = tokenizer.encode(actual, add_special_tokens=False)[:n]
    return a == b


def _ends_like_pytorch(report: ProbeReport, tokenizer, i: int, qtype: str, reference_name: str) -> list[str]:
    """A GGUF that never ends an answer PyTorch ends early (a wrong EOS/EOT id in its metadata) rambles on in
    llama.cpp and Ollama. Gated only where PyTorch stopped within half the budget: near the budget, an answer a
    few tokens longer would run into it for no fault of the file."""
    reference = getattr(report, reference_name)[i]
    reference_stopped = report.stopped.get(reference_name, [False] * len(report.probes))[i]
    short = len(tokenizer.encode(reference, add_special_tokens=False)) <= report.max_new_tokens // 2
    if not (reference_stopped and short):
        return []
    ok = report.stopped.get(f"gguf_{qtype}", [True] * len(report.probes))[i]
    report.checks.append({"artifact": f"gguf_{qtype}", "prompt": report.probes[i],
                          "gate": "ends its answer (EOS) where PyTorch does", "passed": ok})
    if ok:
        return []
    return [f"GGUF {qtype} did not end its answer to {report.probes[i]!r} within {report.max_new_tokens} tokens; "
            f"PyTorch ended it after {reference!r} (check the EOS/EOT ids in the GGUF's metadata)"]


def check(report: ProbeReport, tokenizer) -> None:
    """Record each check in the report; raise VerificationError listing every failed gate."""
    failures = []
    for i, probe in enumerate(report.probes):
        if report.merged:
            # The merge is checked against the same adapter on the same 16-bit base, unmerged. Against the model as
            # trained on a 4-bit base, answers may differ by quantization alone: recorded, not gated.
            expected = report.adapter_on_16bit_base[i]
            ok = same_start(tokenizer, expected, report.merged[i], MERGED_MATCH_TOKENS)
            report.checks.append({"artifact": "merged", "prompt": probe, "gate": f"first {MERGED_MATCH_TOKENS} tokens match the adapter on the 16-bit base", "passed": ok})
            if not ok:
                failures.append(f"merged weights answer {probe!r} with {report.merged[i]!r}, the adapter on the same base with {expected!r}")
        for qtype, answers in report.gguf.items():
            reference_name = "merged" if report.merged else "adapter"
            reference = getattr(report, reference_name)[i]
            if not answers[i].strip():
                report.checks.append({"artifact": f"gguf_{qtype}", "prompt": probe, "gate": "produces text", "passed": False})
                failures.append(f"GGUF {qtype} produced no text for {probe!r}")
                continue
            if qtype in GATED_GGUF_TYPES:
                ok = same_start(tokenizer, reference, answers[i], GGUF_MATCH_TOKENS)
                report.checks.append({"artifact": f"gguf_{qtype}", "prompt": probe, "gate": f"first {GGUF_MATCH_TOKENS} tokens match PyTorch", "passed": ok})
                if not ok:
                    failures.append(f"GGUF {qtype} answers {probe!r} with {answers[i]!r}, PyTorch with {reference!r}")
                failures += _ends_like_pytorch(report, tokenizer, i, qtype, reference_name)
            else:
                report.checks.append({"artifact": f"gguf_{qtype}", "prompt": probe, "gate": "produces text (recorded, not gated)", "passed": True})
    for row in report.checks:
        log.get().info("verify.check", **row)
    if failures:
        raise VerificationError("artifacts failed verification: " + "; ".join(failures), hint="nothing was published as complete")
