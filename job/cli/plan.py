"""`job plan`: memory, speed and cost of a spec on each GPU kind, before a GPU is rented (a thin command over
job.plan)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from job import log
from job.plan import estimate, inputs, report
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
        cards = [estimate.gpu(kind) for kind in kinds] or list(estimate.gpus().values())
        prices = report.load_prices(Path(prices_file).read_text()) if prices_file else report.load_prices()
        s3 = S3Settings(spec.run.endpoint_url, spec.run.region)
        events = log.get()
        events.info("plan.architecture.reading", model=spec.model.name)
        resolved = inputs.resolve_arch(spec.model, s3=s3, hub_endpoint=endpoint, hub_offline=offline, config_file=config_file)
        # Loading a GGUF's tokenizer and tokenizing the data take tens of seconds: say so before the wait.
        events.info("plan.tokens.counting", data=spec.data.source)
        with tempfile.TemporaryDirectory(prefix="job-plan-") as scratch:
            tokenizer = inputs.tokenizer_at_hand(spec.model, Path(scratch))
            tokens = inputs.count_tokens(spec, work_dir=Path(scratch), s3=s3, tokenizer=tokenizer,
                                         hub_reachable=not offline and inputs.hub_reachable(endpoint))
        results = [report.plan_kind(spec, resolved.arch, tokens, card, prices, headroom) for card in cards]
    best = report.recommend(results)
    body = report.as_dict(spec, resolved, tokens, results, best, headroom=headroom, prices=prices,
                          prices_file=prices_file or "job/resources/prices.yaml")
    click.echo(json.dumps(body, indent=2) if as_json else report.render(body, results, best))
