"""`job plan`'s report: each GPU kind's plan for a spec (fit, speed, time and cost from the price table), the
recommendation, what the estimate does not model, and the table printed for a person."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

import yaml

from job.errors import SpecError
from job.plan.estimate import (FORWARD_ONLY_FRACTION, METHOD_SEQUENCES, UNSLOTH_PREFERENCE_LOGIT_BYTES, Arch, Choice,
                               Gpu, choose_for_spec, estimate_throughput, expected_batch_length, gpu, gpus,
                               micro_batches, shipped_table, spec_backend)
from job.plan.inputs import DataTokens, disk_for_spec


def load_prices(text: str | None = None) -> dict[str, Any]:
    """The price table: job/resources/prices.yaml, or the YAML text of a `--prices FILE`."""
    data = yaml.safe_load(text) if text is not None else shipped_table("prices.yaml")
    if not isinstance(data, dict) or not isinstance(data.get("prices"), dict):
        raise SpecError("a price table must be a mapping with `prices: {KIND: {usd_per_hour: N, source: ...}}`")
    kinds = gpus()
    for kind, entry in data["prices"].items():
        if kind not in kinds:
            try:
                close = [gpu(str(kind)).kind]
            except SpecError:
                close = difflib.get_close_matches(str(kind), list(kinds), n=1)
            raise SpecError(f"prices.{kind}: not a GPU kind of job/resources/gpus.yaml, so its price would be ignored"
                            + (f"; did you mean {close[0]}?" if close else ""), hint=f"known kinds: {', '.join(kinds)}")
        value = entry.get("usd_per_hour") if isinstance(entry, dict) else entry
        if not isinstance(value, (int, float)) or value < 0:
            raise SpecError(f"prices.{kind}: usd_per_hour must be a non-negative number (got {value!r})")
    return data


def price_per_hour(prices: dict[str, Any], kind: str) -> float | None:
    entry = prices["prices"].get(kind)
    if entry is None:
        return None
    return float(entry["usd_per_hour"] if isinstance(entry, dict) else entry)


@dataclass(frozen=True)
class KindPlan:
    gpu: Gpu
    choice: Choice  # the spec as written, its auto fields resolved for this card
    all_auto: Choice  # batch size, checkpointing and precision all left to auto
    padded_length: float  # mean tokens per row after padding to the longest in its micro-batch
    micro_batches: int | None
    seconds: float | None  # training only: model load, export and verification are not counted
    usd_per_hour: float | None
    usd: float | None

    @property
    def usd_per_million_tokens(self) -> float | None:
        if self.usd_per_hour is None or not self.choice.fits or self.choice.tokens_per_second <= 0:
            return None
        return self.usd_per_hour / (self.choice.tokens_per_second * 3600) * 1e6

    def as_dict(self) -> dict[str, Any]:
        per_million = self.usd_per_million_tokens
        return {"kind": self.gpu.kind, "gpu": self.gpu.name, "memory_gib": self.gpu.memory_gib, "fits": self.choice.fits,
                "choice": self.choice.as_dict(), "all_auto": self.all_auto.as_dict(),
                "padded_length": round(self.padded_length, 1), "micro_batches": self.micro_batches,
                "hours": round(self.seconds / 3600, 3) if self.seconds is not None else None,
                "usd_per_hour": self.usd_per_hour, "usd": round(self.usd, 4) if self.usd is not None else None,
                "usd_per_million_tokens": round(per_million, 4) if per_million is not None else None}


def plan_kind(spec, arch: Arch, tokens: DataTokens, card: Gpu, prices: dict[str, Any], headroom: float = 0.10) -> KindPlan:
    training, backend = spec.training, spec_backend(spec)
    longest = training.max_seq_length if training.packing or tokens.longest is None else min(tokens.longest, training.max_seq_length)
    choice = choose_for_spec(spec, arch, card, longest=tokens.longest, rows=tokens.rows, headroom=headroom)
    all_auto = choose_for_spec(spec, arch, card, longest=tokens.longest, rows=tokens.rows, headroom=headroom, all_auto=True)
    if training.packing or not tokens.lengths:
        padded = float(longest)
    else:
        padded = expected_batch_length(list(tokens.lengths), choice.batch_size)
    count = None
    if training.max_steps > 0 or tokens.rows is not None:
        count = micro_batches(tokens.rows or 0, tokens.tokens or 0, batch_size=choice.batch_size,
                              accumulation=training.gradient_accumulation_steps, epochs=training.num_epochs,
                              max_steps=training.max_steps, packing=training.packing, seq_len=training.max_seq_length)
    seconds = None
    if count is not None and choice.fits:
        speed = estimate_throughput(arch, card, precision=choice.precision, lora_r=spec.lora.r,
                                    target_modules=tuple(spec.lora.target_modules), batch_size=choice.batch_size,
                                    seq_len=max(1, round(padded)), checkpointing=choice.gradient_checkpointing, backend=backend,
                                    packed=training.packing, method=training.method)
        seconds = count * speed.step_seconds
    rate = price_per_hour(prices, card.kind)
    usd = seconds / 3600 * rate if seconds is not None and rate is not None else None
    return KindPlan(card, choice, all_auto, padded, count, seconds, rate, usd)


def recommend(plans: list[KindPlan]) -> KindPlan | None:
    """The cheapest kind predicted to fit the spec as written: by the run's cost, or by the cost of a million
    tokens when the run's length is unknown; the fastest where prices are unknown. Never one predicted to run out
    of memory."""
    fitting = [p for p in plans if p.choice.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda p: (p.usd if p.usd is not None else math.inf,
                                       p.usd_per_million_tokens if p.usd_per_million_tokens is not None else math.inf,
                                       -p.choice.tokens_per_second))


# What one row of each method runs a step, as the report says it.
METHOD_ROWS = {
    "sft": "1 sequence a row",
    "dpo": "2 sequences a row (chosen and rejected) forward and backward, and the reference forward over both",
    "orpo": "2 sequences a row (chosen and rejected) forward and backward; no reference pass",
    "kto": "1 sequence a row forward and backward, a mismatched completion forward for the KL term, and the "
           "reference forward over both",
}


def method_summary(method: str) -> dict[str, Any]:
    """How the estimate counts training.method: sequences a row, those trained, whether a reference runs."""
    sequences = METHOD_SEQUENCES[method]
    return {"name": method, "sequences_per_row": sequences.per_row, "trained_sequences_per_row": sequences.trained,
            "reference_pass": sequences.reference, "description": METHOD_ROWS[method]}


def notes(spec, arch: Arch) -> list[str]:
    """What the estimate does not model for this spec."""
    out = []
    method = spec.training.method
    if method != "sft":
        trained = METHOD_SEQUENCES[method].trained
        how = [f"{trained} sequence{'s' if trained > 1 else ''} a row through forward and backward"]
        if METHOD_SEQUENCES[method].forward_only:
            how.append(f"a forward without gradient at {FORWARD_ONLY_FRACTION:.2f} of a training step")
        if spec_backend(spec) == "unsloth":
            how.append(f"trl's full logits at {UNSLOTH_PREFERENCE_LOGIT_BYTES} bytes a token and vocabulary entry")
        out.append(f"training.method {method}: modelled from sft's measurements ({'; '.join(how)}), never measured "
                   "itself; tok/s counts the trained sequences' tokens")
    if spec_backend(spec) == "unsloth" and (spec.lora.dropout > 0 or spec.lora.bias != "none"):
        out.append("lora.dropout > 0 or lora.bias != none turns off unsloth's fused LoRA kernels: expect lower "
                   "tokens/s than predicted (not measured)")
    if arch.num_experts > 1:
        out.append("mixture-of-experts model: memory counts every expert, speed the active ones; never measured")
    if spec_backend(spec) == "hf":
        out.append("backend hf: fitted on 1B and checked on 3B and 8B 4-bit shapes only (docs/benchmarks.md); "
                   "hf with a 16-bit base was never measured and is modelled like hf 4-bit (pessimistic)")
    if spec.model.precision == "fp8" and spec_backend(spec) == "hf":
        out.append("model.precision fp8 is an unsloth feature; the hf backend has no fp8 path")
    unknown = [m for m in spec.lora.target_modules if m not in arch.projections()]
    if unknown:
        out.append(f"lora.target_modules {unknown} are not decoder projections the estimate knows: not counted")
    return out


def as_dict(spec, resolved, tokens: DataTokens, results: list[KindPlan], best: KindPlan | None, *, headroom: float,
            prices: dict[str, Any], prices_file: str) -> dict[str, Any]:
    """The report `job plan --json` prints and `render` lays out."""
    return {
        "run_id": spec.run_id,
        "model": {"name": spec.model.name, "architecture_source": resolved.source, "arch": resolved.arch.__dict__,
                  "parameters": resolved.arch.total_params},
        "data": {"rows": tokens.rows, "tokens": tokens.tokens, "longest": tokens.longest, "method": tokens.method},
        "backend": spec_backend(spec),
        "method": method_summary(spec.training.method),
        "disk_gib": disk_for_spec(spec, resolved.arch).as_dict(),
        "headroom": headroom,
        "prices": {"file": prices_file, "date": prices.get("date")},
        "kinds": [r.as_dict() for r in results],
        "recommended": best.gpu.kind if best else None,
        "notes": notes(spec, resolved.arch),
    }


def _disk_line(disk: dict[str, float]) -> str:
    parts = [f"model cache {disk['model_cache']:.1f}"]
    parts += [f"{name} {disk[key]:.1f}" for key, name in (("base_gguf", "base GGUF"), ("merged", "merged"),
                                                           ("gguf_intermediate", "16-bit GGUF"),
                                                           ("gguf", "GGUF files")) if disk[key]]
    return f"disk     peak {disk['total']:.1f} GiB ({' + '.join(parts)}), approximate"


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _dollars(usd: float) -> str:
    return "<$0.01" if usd < 0.01 else f"${usd:,.2f}"


def render(report: dict, results, best) -> str:
    data = report["data"]
    lines = [
        f"model    {report['model']['name']}: {report['model']['parameters'] / 1e9:.2f} B parameters "
        f"({report['model']['architecture_source']})",
        f"data     {data['rows'] if data['rows'] is not None else '?'} rows, {data['tokens'] if data['tokens'] is not None else '?'} tokens, "
        f"longest {data['longest'] if data['longest'] is not None else '?'} ({data['method']})",
        _disk_line(report["disk_gib"]),
        *([f"method   {report['method']['name']}: {report['method']['description']}"]
          if report["method"]["name"] != "sft" else []),
        f"backend  {report['backend']}; {report['headroom']:.0%} of each card kept free; prices {report['prices']['file']} "
        f"({report['prices']['date'] or 'undated'})",
        "",
    ]
    header = ("kind", "GiB", "fits", "batch", "ckpt", "precision", "needs GiB", "tok/s", "time", "$/h", "$/Mtok", "cost")
    rows = []
    for r in results:
        c = r.choice
        mark = "*" if best is not None and r is best else ""
        rows.append((
            r.gpu.kind + mark, f"{r.gpu.memory_gib:.0f}", "yes" if c.fits else "NO (fp8)" if c.unsupported else "NO (OOM)", str(c.batch_size),
            "on" if c.gradient_checkpointing else "off", c.precision, f"{c.memory.total:.1f}",
            f"{c.tokens_per_second:,.0f}" if c.fits else "-", _hours(r.seconds) if c.fits else "-",
            f"{r.usd_per_hour:.2f}" if r.usd_per_hour is not None else "?",
            f"{r.usd_per_million_tokens:.3f}" if r.usd_per_million_tokens is not None else "-",
            _dollars(r.usd) if r.usd is not None else ("-" if not c.fits else "?"),
        ))
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        lines.append("  ".join(str(x).ljust(w) if i < 6 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths))))
    lines.append("")
    if best is not None:
        basis = "run cost" if best.usd is not None else "cost per million tokens (the run's length is unknown)"
        lines.append(f"recommended: {best.gpu.kind} ({best.gpu.name}) - lowest {basis} among kinds predicted to fit; * marks it")
    else:
        lines.append("recommended: none - the spec as written is predicted not to run on any kind")
        fitting = [r for r in results if r.all_auto.fits]
        if fitting:
            lines.append("  with training.batch_size, training.gradient_checkpointing and model.precision set to auto, "
                         f"it would fit on: {', '.join(r.gpu.kind for r in fitting)}")
    for r in results:
        if not r.choice.fits:
            lines.append(f"  {r.gpu.kind}: {r.choice.reason}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    if data["tokens"] is None and results and results[0].seconds is not None:
        lines.append("time assumes every row fills training.max_seq_length (the data was not counted): an upper bound")
    lines.append("time is training only (model load, export and verification excluded); method and error: docs/plan.md")
    return "\n".join(lines)
