"""`job plan`: memory, speed and cost of a spec on each GPU kind, before a GPU is rented (a thin command over
job.plan)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from job import errors
from job import plan as plans
from job.cli.common import exits, resolve_spec, set_option, setup_log, spec_option
from job.storage import S3Settings


@click.command()
@spec_option
@set_option
@click.option("--gpu", "kinds", multiple=True, metavar="KIND", help="Only these GPU kinds (repeatable; default: every kind in job/resources/gpus.yaml).")
@click.option("--prices", "prices_file", type=click.Path(exists=True, dir_okay=False), help="A price table to use instead of job/resources/prices.yaml.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="The model's config.json (no weights), when it cannot be found otherwise.")
@click.option("--headroom", default=0.10, show_default=True, type=click.FloatRange(0.0, 0.9), help="Fraction of each card's memory kept free.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plan(spec_arg, sets, kinds, prices_file, config_file, headroom, as_json) -> None:
    """Predict peak GPU memory, tokens/s, wall time and cost of a run spec on each GPU kind.

    Reads only the model's config (a local or s3:// checkpoint's config.json, a GGUF's metadata, the hub when
    reachable, else a built-in table of well-known models) and counts the data's tokens with the model's tokenizer
    when it is at hand (else estimates them from bytes). No GPU, no weights. Kinds predicted to run out of memory
    are marked and never recommended. Method and known error: docs/plan.md.
    """
    environ = dict(os.environ)
    setup_log(environ)
    endpoint = environ.get("HF_ENDPOINT") or "https://huggingface.co"
    offline = environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    with exits():
        spec = resolve_spec(spec_arg, sets, environ)
        cards = [plans.gpu(kind) for kind in kinds] or list(plans.gpus().values())
        prices = plans.load_prices(Path(prices_file).read_text()) if prices_file else plans.load_prices()
        s3 = S3Settings(spec.run.endpoint_url, spec.run.region)
        resolved = plans.resolve_arch(spec.model, s3=s3, hub_endpoint=endpoint, hub_offline=offline, config_file=config_file)
        with tempfile.TemporaryDirectory(prefix="job-plan-") as scratch:
            tokenizer = _tokenizer_at_hand(spec.model, Path(scratch))
            tokens = plans.count_tokens(spec, work_dir=Path(scratch), s3=s3, tokenizer=tokenizer,
                                        hub_reachable=not offline and plans._hub_reachable(endpoint))
        results = [plans.plan_kind(spec, resolved.arch, tokens, card, prices, headroom) for card in cards]
    best = plans.recommend(results)
    report = {
        "run_id": spec.run_id,
        "model": {"name": spec.model.name, "architecture_source": resolved.source, "arch": resolved.arch.__dict__,
                  "parameters": resolved.arch.total_params},
        "data": {"rows": tokens.rows, "tokens": tokens.tokens, "longest": tokens.longest, "method": tokens.method},
        "backend": plans.spec_backend(spec),
        "headroom": headroom,
        "prices": {"file": prices_file or "job/resources/prices.yaml", "date": prices.get("date")},
        "kinds": [r.as_dict() for r in results],
        "recommended": best.gpu.kind if best else None,
        "notes": plans.notes(spec, resolved.arch),
    }
    click.echo(json.dumps(report, indent=2) if as_json else render(report, results, best))


def _tokenizer_at_hand(model, scratch: Path):
    """The model's tokenizer when it is on this machine (a local checkpoint, a GGUF, or the hub cache), else None.
    Nothing is downloaded."""
    from job.model import load_tokenizer, package_file, repair_byte_level_tokenizer

    name = model.name
    try:
        if name.startswith("pkg://") or name.endswith(".gguf"):
            from transformers import AutoConfig, AutoTokenizer

            gguf = package_file(name, "model.name") if name.startswith("pkg://") else Path(name).expanduser()
            # As the run materializes it (job/model.materialize_gguf): transformers' GGUF tokenizer with the special
            # tokens the GGUF's config names (it mislabels SmolLM2's EOS), byte-level pieces restored.
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            for role in ("bos", "eos", "pad"):
                token_id = getattr(config, f"{role}_token_id", None)
                if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
                    setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
            tokenizer.save_pretrained(scratch / "tokenizer")
            repair_byte_level_tokenizer(gguf, scratch / "tokenizer" / "tokenizer.json")
            return load_tokenizer(scratch / "tokenizer")
        if Path(name).expanduser().is_dir():
            return load_tokenizer(Path(name).expanduser(), model.trust_remote_code)
        if "://" not in name and name.count("/") == 1:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name, revision=model.revision, local_files_only=True)
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
            return tokenizer
    except (OSError, ValueError, errors.JobError):
        return None
    return None


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
            r.gpu.kind + mark, f"{r.gpu.memory_gib:.0f}", "yes" if c.fits else "NO (OOM)", str(c.batch_size),
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
        lines.append("recommended: none - the spec as written is predicted to run out of memory on every kind")
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
