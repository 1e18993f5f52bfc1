"""Verify every artifact before it is published: teacher-forced distribution gates, and a tokenizer pre-flight.

Every artifact is scored against its reference on the same token sequences, the evaluation set: the probe prompts
followed by the trained model's own answers, and a fixed sample of held-out rows, chat-formatted as trained.
- The merged 16-bit weights against the adapter on the same 16-bit base (both in PyTorch).
- Each GGUF against the merged weights in PyTorch, by llama.cpp's own `llama-perplexity --kl-divergence`.
Each is gated on the mean per-token KL divergence from its reference and on the rate at which both pick the same top
token (THRESHOLDS). Every GGUF must also tokenize the evaluation texts exactly as the Hugging Face tokenizer does,
and end turns with the ids the chat template ends them with. Greedy answers are kept as a sample for people to
read, never as a gate: where the next-token distribution has near-ties, rounding flips one token of a faithful copy
and everything after it differs.

Precision loss is a finding, not a failure: after a few steps a LoRA update can be smaller than bf16's rounding step
of the base weights, so the merged weights legitimately keep only part of the adapter's effect. That share is
measured (KLD(base, merged) / KLD(base, adapter)) and published; the adapter is the exact artifact.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from job import llamacpp, log
from job.errors import NotFoundError, SpecError, VerificationError

EVALUATION_FILE = "verification/evaluation.json"  # in the run folder: what `job verify` scores again
WINDOW = 256  # tokens a window; llama-perplexity scores the second half of each
MAX_STREAM_TOKENS = 1024  # 7 windows, about 900 scored tokens: each costs two forward tokens in every model
MAX_ROWS = 16
MAX_ROW_TOKENS = 384
# The top-token rate says nothing where the reference has no favourite: a near-uniform model (random weights, the
# speed benchmark's) flips its top token among near-ties under any rounding, at a KL divergence of almost zero.
SAME_TOP_MIN_CONFIDENCE = 0.2
# Where the adapter moved the base this little, the share of it that survived the merge is noise.
ADAPTER_EFFECT_MIN_KLD = 1e-4
ADAPTER_EFFECT_FINDING_BELOW = 0.5
# Digits, runs of spaces, tabs and newlines, contractions, curly quotes, accents, Cyrillic, CJK, Devanagari, emoji
# and code: where pre-tokenizers and normalizers differ, the first differing string shows up here.
TOKENIZER_PROBE = (
    "It’s 3.14159 — or 1,000,000? I'll say: 12345 + 678 = 13023.\n\n\tdef f(x):\n        return x**2  # ok\n"
    "Café naïve résumé; Привет, мир! 你好，世界。 नमस्ते दुनिया 🦙🚀 ‘quoted’ “double” … ----====\n"
)


@dataclass(frozen=True)
class Threshold:
    max_mean_kld: float
    min_same_top: float


# Calibrated on the smoke model's faithful copies (docs/verification.md has the measured floors) and on llama.cpp's
# published Llama-3-8B figures against FP16 (Q8_0 0.0014 / 97.7%, Q6_K 0.0055 / 96.0%, Q4_K_M 0.031 / 91.9%,
# Q2_K 0.45 / 71.1%, BF16 0.000025 / 99.7%), with a margin: small models lose more to the same quantization.
THRESHOLDS: dict[str, Threshold] = {
    # merged: a margin over the base's own distance from the adapter (check_merged); the weights gate it exactly
    "merged": Threshold(0.01, 0.0),
    "f32": Threshold(0.005, 0.97),
    "f16": Threshold(0.005, 0.97),
    "bf16": Threshold(0.005, 0.97),
    "q8_0": Threshold(0.02, 0.90),
    "q6_k": Threshold(0.06, 0.88),
    "q5": Threshold(0.12, 0.83),
    "q4": Threshold(0.3, 0.75),
    "q3": Threshold(0.8, 0.6),
    "q2": Threshold(2.0, 0.4),
}


def threshold_for(artifact: str) -> Threshold:
    """The gate of an artifact: 'merged', or a GGUF type by its family (q4_k_m is a q4, iq4_xs too)."""
    if artifact in THRESHOLDS:
        return THRESHOLDS[artifact]
    family = artifact.removeprefix("i")[:2]
    if family in THRESHOLDS:
        return THRESHOLDS[family]
    return THRESHOLDS["q2"] if artifact.startswith(("tq", "iq1", "mxfp4")) else THRESHOLDS["q4"]


# --- The greedy answers: a sample for people to read (manifest, model card), never a gate ---------------------------


@dataclass
class ProbeReport:
    probes: list[str]
    answers: dict[str, list[str]] = field(default_factory=dict)  # artifact → answers: base, adapter, merged, gguf_<type>
    stopped: dict[str, list[bool]] = field(default_factory=dict)  # artifact → each answer ended with EOS
    max_new_tokens: int = 48

    def put(self, name: str, answers: list[str], stopped: list[bool]) -> None:
        self.answers[name] = answers
        self.stopped[name] = stopped

    def as_dict(self) -> list[dict]:
        rows = []
        for i, probe in enumerate(self.probes):
            row = {"prompt": probe, **{name: answers[i] for name, answers in self.answers.items()}}
            row["stopped"] = {name: flags[i] for name, flags in self.stopped.items()}
            rows.append(row)
        return rows


def chat_prompt(tokenizer, probe: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False, add_generation_prompt=True)


def stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|endoftext|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def generate(model, tokenizer, probes: list[str], max_new_tokens: int) -> tuple[list[str], list[bool]]:
    """Greedy answers, and whether each ended with a stop token (else it ran into max_new_tokens)."""
    import torch

    answers, stopped = [], []
    ends = stop_ids(tokenizer)
    device = next(model.parameters()).device
    for probe in probes:
        enc = tokenizer(chat_prompt(tokenizer, probe), return_tensors="pt", add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=ends,
                                 pad_token_id=tokenizer.pad_token_id)
        new_tokens = out[0, enc["input_ids"].shape[1]:]
        answers.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
        stopped.append(len(new_tokens) > 0 and int(new_tokens[-1]) in ends)
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


def template_emits_bos(tokenizer) -> bool:
    return bool(tokenizer.bos_token) and "bos_token" in (tokenizer.chat_template or "")


def answer_with_gguf(tools: llamacpp.Tools, gguf: Path, tokenizer, probes: list[str],
                     max_new_tokens: int) -> tuple[list[str], list[bool]]:
    threads = llamacpp.cpu_threads()
    answers, stopped = [], []
    for probe in probes:
        prompt = chat_prompt(tokenizer, probe)
        if template_emits_bos(tokenizer) and prompt.startswith(tokenizer.bos_token):
            prompt = prompt[len(tokenizer.bos_token):]  # llama.cpp adds BOS itself, as the GGUF's metadata says
        text, ended = llamacpp.complete(tools, gguf, prompt, max_new_tokens, threads)
        answers.append(text)
        stopped.append(ended)
    return answers, stopped


# --- The evaluation set ----------------------------------------------------------------------------------------------


@dataclass
class EvaluationSet:
    """The token sequences every artifact is scored on, laid out as llama-perplexity scores a text: windows of
    `window` tokens moved by half a window, each scoring its second half, so every token after the first half-window
    is scored once with at least half a window of context. `texts` are the sequences as text, for the tokenizer gate."""

    stream: list[int]
    window: int
    bos_id: int | None  # put first in every window, as llama.cpp does where the GGUF says add_bos
    texts: list[str]
    sources: dict[str, int]

    @property
    def first(self) -> int:
        return self.window // 2

    def windows(self) -> list[list[int]]:
        half = self.window // 2
        out = []
        for start in range(0, len(self.stream) - self.window + 1, half):
            tokens = self.stream[start:start + self.window]
            if self.bos_id is not None:
                tokens = [self.bos_id, *tokens[1:]]
            out.append(tokens)
        return out

    @property
    def scored_tokens(self) -> int:
        return len(self.windows()) * (self.window - 1 - self.first)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict) -> EvaluationSet:
        return cls(**body)


def evaluation_set(tokenizer, report: ProbeReport, rows, bos_id: int | None, window: int = WINDOW,
                   max_tokens: int = MAX_STREAM_TOKENS) -> EvaluationSet:
    """The probes with the trained model's own answers, then held-out rows (their input_ids as trained), back to
    back until max_tokens. Short sets are repeated: every window must be full."""
    sequences: list[list[int]] = []
    texts: list[str] = []
    for probe, answer in zip(report.probes, report.answers.get("adapter", [""] * len(report.probes)), strict=True):
        text = tokenizer.apply_chat_template([{"role": "user", "content": probe}, {"role": "assistant", "content": answer}],
                                             tokenize=False)
        sequences.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        texts.append(text)
    n_rows = 0
    for ids in list(rows["input_ids"][:MAX_ROWS]) if rows is not None and len(rows) else []:
        ids = list(ids[:MAX_ROW_TOKENS])
        sequences.append(ids)
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
        n_rows += 1
    stream: list[int] = []
    while len(stream) < max_tokens and any(sequences):
        for ids in sequences:
            stream += ids
    usable = (min(len(stream), max_tokens) // (window // 2)) * (window // 2)
    if usable < window:
        raise VerificationError(f"the evaluation set has {len(stream)} tokens, fewer than one window of {window}")
    return EvaluationSet(stream=stream[:usable], window=window, bos_id=bos_id, texts=texts,
                         sources={"probes": len(report.probes), "rows": n_rows})


# --- Distributions ---------------------------------------------------------------------------------------------------


def log_probs(model, evaluation: EvaluationSet, batch: int = 4):
    """The model's next-token log-probabilities at every scored position: [windows, scored, vocab], float32, CPU."""
    import torch

    device = next(model.parameters()).device
    windows = evaluation.windows()
    out = []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            ids = torch.tensor(windows[i:i + batch], device=device)
            logits = model(input_ids=ids).logits[:, evaluation.first:evaluation.window - 1].float()
            out.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.cat(out)


@dataclass
class References:
    """What the artifacts are compared with, computed once: the adapter on the 16-bit base, and the base alone."""

    adapter: object  # torch.Tensor [windows, scored, vocab]
    base: object


def references(peft_model, evaluation: EvaluationSet) -> References:
    peft_model.eval()
    adapter = log_probs(peft_model, evaluation)
    with peft_model.disable_adapter():
        base = log_probs(peft_model, evaluation)
    return References(adapter=adapter, base=base)


@dataclass
class Figures:
    mean_kld: float
    p99_kld: float
    max_kld: float
    same_top_rate: float
    tokens: int


def compare(reference, candidate) -> Figures:
    """KL(reference ‖ candidate) at every scored token, and how often both pick the same top token."""
    import torch

    p = reference.exp()
    kld = (p * (reference - candidate)).sum(-1).flatten()
    same = (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()
    finite = torch.nan_to_num(kld, nan=math.inf)
    return Figures(mean_kld=finite.mean().item(), p99_kld=torch.quantile(finite.clamp(max=1e9), 0.99).item(),
                   max_kld=finite.max().item(), same_top_rate=same, tokens=kld.numel())


def confidence(reference) -> float:
    """The reference's mean probability of its own top token."""
    return reference.exp().amax(-1).mean().item()


def write_kld_base(path: Path, evaluation: EvaluationSet, reference) -> None:
    """The reference's log-probabilities in the file `llama-perplexity --kl-divergence-base` reads (tools/perplexity
    at the pinned commit): "_logits_", n_ctx, n_vocab, n_chunk, the tokens, then per scored position a float32 scale
    and minimum followed by the log-probabilities over the top 16 nats in uint16 steps."""
    import numpy as np

    windows = evaluation.windows()
    n_vocab = reference.shape[-1]
    row_width = 2 * ((n_vocab + 1) // 2) + 4
    with open(path, "wb") as fh:
        fh.write(b"_logits_")
        fh.write(struct.pack("<Iii", evaluation.window, n_vocab, len(windows)))
        fh.write(np.asarray(windows, dtype=np.int32).tobytes())
        for chunk in reference.numpy():
            top = chunk.max(axis=1, keepdims=True)
            low = np.maximum(chunk.min(axis=1, keepdims=True), top - 16)
            lse = np.log(np.exp(chunk - top).sum(axis=1, keepdims=True))
            scale = (top - low) / 65535.0
            safe = np.where(scale > 0, scale, 1.0)
            steps = np.where(chunk > low, np.rint((chunk - low) / safe), 0).clip(0, 65535).astype(np.uint16)
            rows = np.zeros((chunk.shape[0], row_width), dtype=np.uint16)
            rows[:, :4] = np.concatenate([scale, low - top - lse], axis=1).astype(np.float32).view(np.uint16)
            rows[:, 4:4 + n_vocab] = np.where(scale > 0, steps, 0)
            fh.write(rows.tobytes())


# --- GGUF metadata and tokenizer -------------------------------------------------------------------------------------


@dataclass
class GgufVocab:
    """What llama.cpp reads from a GGUF's tokenizer metadata."""

    n_vocab: int
    bos_id: int | None
    add_bos: bool
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    pre: str | None

    @property
    def end_ids(self) -> set[int]:
        return {i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None}


def read_gguf_vocab(path: Path) -> GgufVocab:
    meta = llamacpp.gguf_metadata(path)
    return GgufVocab(
        n_vocab=meta.get("tokenizer.ggml.tokens", 0),
        bos_id=meta.get("tokenizer.ggml.bos_token_id"), add_bos=bool(meta.get("tokenizer.ggml.add_bos_token")),
        eos_id=meta.get("tokenizer.ggml.eos_token_id"), eot_id=meta.get("tokenizer.ggml.eot_token_id"),
        eom_id=meta.get("tokenizer.ggml.eom_token_id"), pre=meta.get("tokenizer.ggml.pre"),
    )


def turn_end_id(tokenizer) -> int | None:
    """The id the chat template ends an assistant turn with: the first stop token after the answer's text."""
    marker = "zqxjv"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    after = text[text.rindex(marker) + len(marker):]
    ends = set(stop_ids(tokenizer))
    return next((i for i in tokenizer(after, add_special_tokens=False)["input_ids"] if i in ends), None)


def end_of_turn_problems(vocab: GgufVocab, tokenizer) -> list[str]:
    """A GGUF whose EOS/EOT id is an ordinary token stops mid-answer wherever that token comes up; one whose ids miss
    the template's end of turn rambles on into the next turn, in llama.cpp and Ollama alike."""
    problems = []
    ends = set(stop_ids(tokenizer))
    for name, tid in (("eos", vocab.eos_id), ("eot", vocab.eot_id), ("eom", vocab.eom_id)):
        if tid is not None and tid not in ends:
            problems.append(f"its {name} id {tid} is {tokenizer.convert_ids_to_tokens(tid)!r}, not a token the "
                            f"tokenizer ends text or turns with ({', '.join(tokenizer.convert_ids_to_tokens(ends))})")
    turn_end = turn_end_id(tokenizer)
    if turn_end is not None and turn_end not in vocab.end_ids:
        problems.append(f"the chat template ends turns with {tokenizer.convert_ids_to_tokens(turn_end)!r} "
                        f"(id {turn_end}), which is none of its end ids {sorted(vocab.end_ids)}")
    return problems


def tokenizer_mismatch(tools: llamacpp.Tools, gguf: Path, tokenizer, texts: list[str]) -> str | None:
    """The first text llama.cpp tokenizes differently from the Hugging Face tokenizer, with both token lists. One
    llama-tokenize process a text, several at once: each spends most of its time loading the vocabulary on one core."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(8, llamacpp.cpu_threads()))) as pool:
        tokenized = list(pool.map(lambda text: llamacpp.tokenize(tools, gguf, text), texts))
    for text, actual in zip(texts, tokenized):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        if actual != expected:
            at = next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), min(len(expected), len(actual)))
            lo = max(0, at - 3)
            return (f"{text[:120]!r}{'…' if len(text) > 120 else ''}: from token {at} the Hugging Face tokenizer gives "
                    f"{expected[lo:at + 8]} ({tokenizer.convert_ids_to_tokens(expected[lo:at + 8])}), llama.cpp "
                    f"{actual[lo:at + 8]} ({tokenizer.convert_ids_to_tokens(actual[lo:at + 8])})")
    return None


def preflight_texts(tokenizer, probes: list[str], rows) -> list[str]:
    texts = [TOKENIZER_PROBE] + [chat_prompt(tokenizer, probe) for probe in probes]
    for ids in list(rows["input_ids"][:MAX_ROWS]) if rows is not None and len(rows) else []:
        texts.append(tokenizer.decode(list(ids[:MAX_ROW_TOKENS]), skip_special_tokens=False))
    return texts


def preflight(tools: llamacpp.Tools, model_dir: Path, tokenizer, texts: list[str], work: Path) -> GgufVocab:
    """Before any training step: the converter writes a vocabulary-only GGUF, and llama.cpp must tokenize the
    chat-formatted probes and sample rows exactly as the Hugging Face tokenizer does, and end turns where the chat
    template does. Seconds, not the hours of a training run that would end in an unusable GGUF."""
    work.mkdir(parents=True, exist_ok=True)
    vocab_file = work / "vocab.gguf"
    try:
        llamacpp.convert(tools, model_dir, vocab_file, "bf16", vocab_only=True)
    except VerificationError as exc:
        raise SpecError(f"export.gguf: llama.cpp's converter cannot write this model's tokenizer: {exc}",
                        hint="set export.gguf: [] (the adapter and merged weights are still published), or use a "
                             "tokenizer llama.cpp supports") from exc
    vocab = read_gguf_vocab(vocab_file)
    problems = end_of_turn_problems(vocab, tokenizer)
    if mismatch := tokenizer_mismatch(tools, vocab_file, tokenizer, texts):
        problems.insert(0, f"llama.cpp tokenizes {mismatch}")
    log.get().info("verify.preflight", texts=len(texts), pre_tokenizer=vocab.pre, bos=vocab.bos_id,
                   add_bos=vocab.add_bos, eos=vocab.eos_id, eot=vocab.eot_id, passed=not problems)
    if problems:
        raise SpecError("export.gguf: the GGUF would not work like the model trained here: " + "; ".join(problems),
                        hint="fix the tokenizer (tokenizer.json, the chat template, the special tokens) or set "
                             "export.gguf: []; nothing was trained")
    return vocab


# --- The gates -------------------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    artifact: str
    reference: str
    mean_kld: float | None = None
    p99_kld: float | None = None
    max_kld: float | None = None
    same_top_rate: float | None = None
    tokens: int | None = None
    threshold: dict = field(default_factory=dict)
    same_top_gated: bool = True
    weights: dict | None = None  # merged only: the weights against base + adapter, recomputed
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        body = {k: v for k, v in asdict(self).items() if k != "problems"}
        for name in ("mean_kld", "p99_kld", "max_kld", "same_top_rate"):
            value = body[name]
            # NaN and infinity are no JSON numbers: such a figure is null, and the problems say what it was
            body[name] = float(f"{value:.6g}") if value is not None and math.isfinite(value) else None
        return {**body, "verdict": "pass" if self.passed else "fail", "problems": self.problems}


def judge(verdict: Verdict, figures: Figures, reference_confidence: float) -> Verdict:
    limit = threshold_for(verdict.artifact.removeprefix("gguf/"))
    verdict.mean_kld, verdict.p99_kld, verdict.max_kld = figures.mean_kld, figures.p99_kld, figures.max_kld
    verdict.same_top_rate, verdict.tokens = figures.same_top_rate, figures.tokens
    verdict.threshold = {"max_mean_kld": limit.max_mean_kld, "min_same_top_rate": limit.min_same_top}
    verdict.same_top_gated = reference_confidence >= SAME_TOP_MIN_CONFIDENCE
    if not figures.mean_kld <= limit.max_mean_kld:  # NaN fails too
        verdict.problems.append(f"mean KL divergence from {verdict.reference} {figures.mean_kld:.4g} > "
                                f"{limit.max_mean_kld}")
    if verdict.same_top_gated and not figures.same_top_rate >= limit.min_same_top:
        verdict.problems.append(f"same top token as {verdict.reference} at {figures.same_top_rate:.1%} of tokens < "
                                f"{limit.min_same_top:.0%}")
    return verdict


@dataclass
class Verification:
    evaluation: EvaluationSet
    verdicts: list[Verdict] = field(default_factory=list)
    adapter_effect: dict | None = None

    def as_dict(self) -> dict:
        return {
            "evaluation": {"window": self.evaluation.window, "scored_tokens": self.evaluation.scored_tokens,
                           **self.evaluation.sources},
            "artifacts": [v.as_dict() for v in self.verdicts],
            "adapter_effect": self.adapter_effect,
        }

    def failures(self) -> list[str]:
        return [f"{v.artifact}: {'; '.join(v.problems)}" for v in self.verdicts if not v.passed]

    def raise_for_failures(self) -> None:
        for v in self.verdicts:
            log.get().info("verify.artifact", **v.as_dict())
        if failures := self.failures():
            raise VerificationError("artifacts failed verification: " + " | ".join(failures),
                                    hint="nothing was published as complete")


def adapter_effect(refs: References, merged) -> dict:
    """How much of the adapter's shift from the base survives in the merged 16-bit weights."""
    shift = compare(refs.base, refs.adapter).mean_kld
    kept = compare(refs.base, merged).mean_kld
    body = {"kld_base_to_adapter": float(f"{shift:.6g}"), "kld_base_to_merged": float(f"{kept:.6g}"), "kept": None,
            "finding": None}
    if shift >= ADAPTER_EFFECT_MIN_KLD:
        body["kept"] = round(kept / shift, 4)
        if body["kept"] < ADAPTER_EFFECT_FINDING_BELOW:
            body["finding"] = (f"the merged 16-bit weights carry {body['kept']:.0%} of the adapter's shift from the "
                               "base (the update is below the 16-bit rounding step of the base weights); the adapter "
                               "on the base is the exact artifact")
    return body


MERGE_TOLERANCE_STEPS = 2  # 16-bit rounding steps a merged weight may be off: the merge's own math on a GPU rounds twice
MERGE_TOLERANCE_SHARE = 1e-4  # of a tensor's weights beyond that: cancellation (W ≈ -update) leaves a few


def _safetensors(folder: Path) -> dict[str, Path]:
    """Tensor name → the file of a (sharded or not) safetensors checkpoint that holds it."""
    from safetensors import safe_open

    where = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as fh:
            where.update({key: path for key in fh.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return where


def merged_weight_problems(base_path: Path, adapter_dir: Path, merged_dir: Path) -> tuple[dict, list[str]]:
    """The merged weights against the merge recomputed from the files: base + scale * B @ A for every adapted
    projection, the base's own tensor everywhere else, each within MERGE_TOLERANCE_STEPS 16-bit steps. Rounding to
    16 bits cannot zero a tensor or double an update; a broken merge or a damaged file does. Tensors are read one at a
    time, so this holds one tensor of each checkpoint in memory, never a model."""
    import torch
    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        return {"checked": 0, "skipped": "only plain LoRA adapters are recomputed"}, []
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    adapter: dict[str, dict[str, object]] = {}
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as fh:
        for key in fh.keys():  # noqa: SIM118
            module, _, rest = key.removeprefix("base_model.model.").partition(".lora_")
            adapter.setdefault(f"{module}.weight", {})[rest.split(".")[0]] = fh.get_tensor(key)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base_files, merged_files = _safetensors(base_path), _safetensors(merged_dir)
    figures = {"checked": 0, "adapted": 0, "worst_tensor": None, "worst_steps": 0.0, "tensors_off": []}
    missing = sorted(set(base_files) - set(merged_files))
    for name, merged_file in merged_files.items():
        if name not in base_files:
            continue  # a tied head saved apart, or a name the base spells differently: nothing to recompute from
        with safe_open(base_files[name], "pt", device=device) as fb, safe_open(merged_file, "pt", device=device) as fm:
            expected, got = fb.get_tensor(name).float(), fm.get_tensor(name)
        step_bits = 10 if got.dtype == torch.float16 else 7
        if name in adapter and {"A", "B"} <= set(adapter[name]):
            a, b = (adapter[name][k].to(device, torch.float32) for k in ("A", "B"))
            expected = expected + scale * (b @ a)
            figures["adapted"] += 1
        steps = (got.float() - expected).abs() / (expected.abs() * 2.0 ** -step_bits).clamp(min=1e-30)
        worst = steps.max().item()
        off = (steps > MERGE_TOLERANCE_STEPS).float().mean().item()
        figures["checked"] += 1
        if worst > figures["worst_steps"]:
            figures["worst_tensor"], figures["worst_steps"] = name, round(worst, 2)
        if off > MERGE_TOLERANCE_SHARE:
            figures["tensors_off"].append({"tensor": name, "share_off": round(off, 6)})
    problems = []
    if figures["tensors_off"]:
        shown = ", ".join(f"{t['tensor']} ({t['share_off']:.1%})" for t in figures["tensors_off"][:3])
        problems.append(f"{len(figures['tensors_off'])} tensor(s) differ from base + adapter by more than "
                        f"{MERGE_TOLERANCE_STEPS} 16-bit steps: {shown}")
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the base are missing: {', '.join(missing[:3])}")
    if figures["adapted"] == 0 and adapter:
        problems.append("no adapted projection of the adapter was found among the merged tensors")
    figures["tensors_off"] = figures["tensors_off"][:10]
    return figures, problems


def check_merged(merged_dir: Path, refs: References, evaluation: EvaluationSet, result: Verification,
                 trust_remote_code: bool, tokenizer, report: ProbeReport | None, base_path: Path, adapter_dir: Path):
    """The merged weights as saved, against the adapter on the same 16-bit base; returns their log-probs.

    Two gates. The weights: each must be the base plus the adapter's update, rounded to 16 bits. The distribution:
    no further from the adapter than the base itself is (plus THRESHOLDS["merged"]): where the update is smaller than
    16-bit rounding, the merged weights answer like the base, which is a finding (adapter_effect), not a failure."""
    parts = _Parts()
    with parts("load"):
        model = load_checkpoint(merged_dir, trust_remote_code)
    try:
        with parts("score"):
            merged = log_probs(model, evaluation)
        if report is not None:
            with parts("answers"):
                report.put("merged", *generate(model, tokenizer, report.probes, report.max_new_tokens))
    finally:
        del model
    figures = compare(refs.adapter, merged)
    verdict = Verdict("merged", "the adapter on the 16-bit base")
    verdict.mean_kld, verdict.p99_kld, verdict.max_kld = figures.mean_kld, figures.p99_kld, figures.max_kld
    verdict.same_top_rate, verdict.tokens, verdict.same_top_gated = figures.same_top_rate, figures.tokens, False
    base_distance = compare(refs.adapter, refs.base).mean_kld
    limit = base_distance + THRESHOLDS["merged"].max_mean_kld
    verdict.threshold = {"max_mean_kld": float(f"{limit:.6g}"), "min_same_top_rate": None}
    if not figures.mean_kld <= limit:
        verdict.problems.append(f"mean KL divergence from the adapter {figures.mean_kld:.4g} > {limit:.4g} (the base "
                                f"itself is {base_distance:.4g} from it, plus {THRESHOLDS['merged'].max_mean_kld})")
    with parts("weights"):
        verdict.weights, weight_problems = merged_weight_problems(base_path, adapter_dir, merged_dir)
    verdict.problems += weight_problems
    result.verdicts.append(verdict)
    parts.log("merged")
    result.adapter_effect = adapter_effect(refs, merged)
    if result.adapter_effect["finding"]:
        log.get().warning("verify.precision_loss", **result.adapter_effect)
    return merged


def check_gguf(tools: llamacpp.Tools, qtype: str, gguf: Path, reference, kld_base: Path, evaluation: EvaluationSet,
               tokenizer, result: Verification, report: ProbeReport | None, tokenizers_checked: dict | None = None) -> None:
    """One GGUF's gates. `tokenizers_checked` maps a GGUF tokenizer digest to what its check found, so the quants of
    one conversion (one tokenizer, copied unchanged) are tokenized once."""
    verdict = Verdict(f"gguf/{qtype}", "the merged weights (PyTorch)")
    parts = _Parts()
    if report is not None:
        with parts("answers"):
            report.put(f"gguf_{qtype}", *answer_with_gguf(tools, gguf, tokenizer, report.probes, report.max_new_tokens))
    vocab = read_gguf_vocab(gguf)
    verdict.problems += end_of_turn_problems(vocab, tokenizer)
    with parts("tokenizer"):
        checked = tokenizers_checked if tokenizers_checked is not None else {}
        digest = llamacpp.tokenizer_digest(gguf)
        if digest not in checked:
            checked[digest] = tokenizer_mismatch(tools, gguf, tokenizer, [TOKENIZER_PROBE, *evaluation.texts])
        mismatch = checked[digest]
    if mismatch:
        verdict.problems.append(f"llama.cpp tokenizes {mismatch}")
    if vocab.n_vocab != reference.shape[-1]:
        verdict.problems.append(f"its vocabulary has {vocab.n_vocab} tokens, the model's {reference.shape[-1]}")
        result.verdicts.append(verdict)
        return
    with parts("kld"):
        stats = llamacpp.kl_divergence(tools, gguf, kld_base, evaluation.window, llamacpp.cpu_threads())
    parts.log(f"gguf/{qtype}", bytes=gguf.stat().st_size)
    figures = Figures(mean_kld=stats["mean_kld"], p99_kld=stats["p99_kld"], max_kld=stats["max_kld"],
                      same_top_rate=stats["same_top_rate"], tokens=evaluation.scored_tokens)
    result.verdicts.append(judge(verdict, figures, confidence(reference)))


class _Parts:
    """Seconds of each part of one artifact's check, logged as `verify.artifact.checked`: where verify's time goes."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.monotonic()

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - started, 2)

    def log(self, artifact: str, **fields) -> None:
        log.get().info("verify.artifact.checked", artifact=artifact, seconds=round(time.monotonic() - self.started, 2),
                       parts=self.seconds, **fields)


def load_checkpoint(path: Path, trust_remote_code: bool, adapter_dir: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device, trust_remote_code=trust_remote_code)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model


def verify_artifacts(evaluation: EvaluationSet, refs: References, base_path: Path, adapter_dir: Path,
                     merged_dir: Path | None, gguf: dict[str, Path], tools: llamacpp.Tools | None, tokenizer, work: Path,
                     trust_remote_code: bool, report: ProbeReport | None = None) -> Verification:
    """Every gate on every artifact, and each artifact's greedy answers into `report` where one is given. The caller
    raises on failures (Verification.raise_for_failures), once the figures are recorded."""
    result = Verification(evaluation)
    reference = refs.adapter
    if merged_dir is not None:
        reference = check_merged(merged_dir, refs, evaluation, result, trust_remote_code, tokenizer, report,
                                 base_path, adapter_dir)
    if gguf:
        work.mkdir(parents=True, exist_ok=True)
        kld_base = work / "reference.kld"
        write_kld_base(kld_base, evaluation, reference)
        tokenizers_checked: dict[str, str | None] = {}
        try:
            for qtype, path in gguf.items():
                check_gguf(tools, qtype, path, reference, kld_base, evaluation, tokenizer, result, report,
                           tokenizers_checked)
        finally:
            kld_base.unlink(missing_ok=True)
    return result


def save_evaluation(evaluation: EvaluationSet, staging: Path) -> None:
    path = staging / EVALUATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(evaluation.to_json()))


def table(verification: dict) -> list[str]:
    """The manifest's verification figures as rows for people: artifact, reference, mean KLD, same-top-token rate,
    threshold, verdict; then the adapter effect the merge kept."""
    def number(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [f"{'artifact':<12} {'reference':<32} {'mean KLD':>10} {'same top':>9} {'threshold':>18}  verdict"]
    for v in verification.get("artifacts") or []:
        limit = v.get("threshold") or {}
        top_bound = f"≥{limit['min_same_top_rate']:.0%}" if limit.get("min_same_top_rate") is not None else "-"
        bound = f"≤{limit['max_mean_kld']:.3g} / {top_bound}" if limit else "-"
        top = number(v.get("same_top_rate"), ".1%")
        top += "" if v.get("same_top_gated", True) or v["artifact"] == "merged" else "*"
        rows.append(f"{v['artifact']:<12} {v['reference']:<32} {number(v.get('mean_kld'), '.2e'):>10} {top:>9} "
                    f"{bound:>18}  {v['verdict']}")
        if weights := v.get("weights"):
            rows.append(f"    weights: {weights.get('checked', 0)} tensors against base + adapter, "
                        f"{weights.get('adapted', 0)} adapted; worst {weights.get('worst_steps', 0)} 16-bit steps off")
        rows += [f"    {problem}" for problem in v.get("problems") or []]
    if any(not v.get("same_top_gated", True) and v["artifact"] != "merged" for v in verification.get("artifacts") or []):
        rows.append(f"  * not gated: the reference's mean top-token probability is below {SAME_TOP_MIN_CONFIDENCE}")
    effect = verification.get("adapter_effect") or {}
    if effect.get("kept") is not None:
        rows.append(f"  merged weights keep {effect['kept']:.0%} of the adapter's shift from the base"
                    + (f": {effect['finding']}" if effect.get("finding") else ""))
    return rows


def verify_published(location: str, run_id: str, base_path: Path, tools: llamacpp.Tools | None, work: Path,
                     s3) -> Verification:
    """Every gate of `job run` again, on a published run's files (a local run folder or an s3:// run prefix): the
    checksums in its manifest, then the distribution, tokenizer and end-of-turn gates against the evaluation set the
    run scored (verification/evaluation.json), with the base model at base_path."""
    from job import rundir
    from job.model import load_tokenizer
    from job.storage import LocalStorage, open_location, sha256_file

    store = open_location(location, s3)
    manifest = rundir.read_manifest(store, run_id)
    if manifest is None:
        raise NotFoundError(f"{location}/{run_id} has no {rundir.MANIFEST}: it is not a published run",
                            hint=f"`job runs show {location}/{run_id}` says what is there")
    if isinstance(store, LocalStorage):
        run_dir = store.root / run_id
    else:
        run_dir = work / "files"
        for entry in manifest["files"]:
            store.download_file(f"{run_id}/{entry['path']}", run_dir / entry["path"])
    evaluation = EvaluationSet.from_json(json.loads((run_dir / EVALUATION_FILE).read_text()))
    result = Verification(evaluation)
    for entry in manifest["files"]:
        path = run_dir / entry["path"]
        if not path.is_file():
            result.verdicts.append(Verdict(entry["path"], "the manifest's sha256", problems=["missing"]))
        elif sha256_file(path) != entry["sha256"]:
            result.verdicts.append(Verdict(entry["path"], "the manifest's sha256",
                                           problems=["its bytes do not match the sha256 in the manifest"]))
    trust = bool((manifest.get("model") or {}).get("trust_remote_code"))
    adapter_dir = run_dir / "adapter"
    tokenizer = load_tokenizer(adapter_dir, trust)
    model = load_checkpoint(base_path, trust, adapter_dir)
    try:
        refs = references(model, evaluation)
    finally:
        del model
    merged_dir = run_dir / "merged" if (run_dir / "merged" / "config.json").is_file() else None
    gguf = {qtype: run_dir / "gguf" / f"{run_id}-{qtype}.gguf" for qtype in (manifest.get("export") or {}).get("gguf_types", [])}
    if gguf and tools is None:
        raise SpecError("the run has GGUF files and the llama.cpp tools are missing")
    gated = verify_artifacts(evaluation, refs, base_path, adapter_dir, merged_dir, gguf, tools, tokenizer,
                             work / "verify", trust)
    result.verdicts += gated.verdicts
    result.adapter_effect = gated.adapter_effect
    return result
