"""`job run`: the stages a user names, top to bottom.

resolve spec (cli.py) → fetch model → load data → train → export → verify → publish
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import yaml

from job import backends, card, data, export, llamacpp, log, model, publish, train, verify
from job.spec import Spec
from job.storage import S3Settings, open_location


@dataclass
class Paths:
    """Machine-local places, from the environment (see cli.py), never from the spec."""

    work_dir: Path
    cache_dir: Path
    llama_cpp_dir: Path


@dataclass
class RunResult:
    run_id: str
    destination: str
    manifest: dict


@contextlib.contextmanager
def stage(name: str, timings: dict):
    events = log.get()
    started = time.monotonic()
    with structlog.contextvars.bound_contextvars(stage=name):
        events.info("stage.started")
        yield
        timings[name] = round(time.monotonic() - started, 2)
        events.info("stage.finished", seconds=timings[name])


def run(spec: Spec, paths: Paths) -> RunResult:
    import torch

    # The backend is imported first: unsloth must patch transformers, trl and peft before anyone imports them.
    backend_name = backends.pick(spec.training, torch.cuda.is_available())
    backend = backends.load(backend_name)
    import datasets  # noqa: F401 - imported so their loggers can be routed now
    import transformers  # noqa: F401

    log.route_library_logs()
    run_id = spec.run_id
    s3 = S3Settings(spec.run.endpoint_url, spec.run.region)
    store = open_location(spec.run.output, s3)
    work = paths.work_dir / run_id
    staging = work / "out"
    export.clean(staging)
    staging.mkdir(parents=True)
    timings: dict[str, float] = {}
    cuda = torch.cuda.is_available()
    # Fail on missing tools and unreachable storage before paying for a model download or training.
    tools = llamacpp.locate(paths.llama_cpp_dir) if spec.export.gguf else None
    store.list(f"{run_id}/")

    with stage("fetch_model", timings):
        fetched = model.fetch(spec.model, paths.cache_dir, s3)
        tokenizer = model.load_tokenizer(fetched.path, spec.model.trust_remote_code)

    with stage("load_data", timings):
        dataset, data_stats, template = data.prepare(spec.data, tokenizer, spec.training.max_seq_length, work, s3)

    with stage("train", timings):
        peft_model, _, info = backend.load_for_training(fetched.path, spec.model, spec.lora, spec.training)
        result = train.run(peft_model, tokenizer, dataset, spec.training, work, info)
        backend.for_inference(peft_model)
        report = verify.ProbeReport(spec.export.probes)
        report.base, report.adapter = verify.answer_with_adapter(
            peft_model, tokenizer, spec.export.probes, spec.export.probe_max_new_tokens
        )

    with stage("export", timings):
        exported = export.Exported(adapter_dir=export.save_adapter(peft_model, tokenizer, staging))
        del peft_model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if spec.export.merged:
            exported.merged_dir, exported.merge_method = export.merge(fetched.path, exported.adapter_dir, staging, spec.model)
        if tools:
            exported.gguf = export.to_gguf(tools, exported.merged_dir, staging, spec.export.gguf, stem=run_id)
            family = card.template_family(tokenizer.chat_template, template)
            first = exported.gguf[spec.export.gguf[0]].name
            system = card.default_system(tokenizer, family)
            (staging / "gguf" / "Modelfile").write_text(card.modelfile(first, family, system))

    with stage("verify", timings):
        if exported.merged_dir:
            probes, limit, trust = spec.export.probes, spec.export.probe_max_new_tokens, spec.model.trust_remote_code
            report.adapter_on_16bit_base = verify.answer_with_checkpoint(fetched.path, probes, limit, trust, exported.adapter_dir)
            report.merged = verify.answer_with_checkpoint(exported.merged_dir, probes, limit, trust)
        for qtype, path in exported.gguf.items():
            report.gguf[qtype] = verify.answer_with_gguf(tools, path, tokenizer, spec.export.probes, spec.export.probe_max_new_tokens)
        verify.check(report, tokenizer)

    with stage("publish", timings):
        body = {
            "status": "complete",
            "spec": spec.masked(),
            "model": {"source": fetched.source, "description": fetched.description, "trust_remote_code": spec.model.trust_remote_code},
            "data": data_stats,
            "training": {**info, "steps": result.steps, "first_loss": result.first_loss, "final_loss": result.final_loss,
                         "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
                         "peak_gpu_memory_gib": result.peak_gpu_memory_gib},
            "export": {"merge_method": exported.merge_method, "gguf_types": list(exported.gguf),
                       "llama_cpp": {"commit": tools.commit, "source": llamacpp.SOURCE} if tools else None},
            "probes": report.as_dict(),
            "checks": report.checks,
            "versions": publish.package_versions(),
            "timings_seconds": timings,
        }
        (staging / "metrics.jsonl").write_bytes(result.metrics_path.read_bytes())
        (staging / "spec.yaml").write_text(yaml.safe_dump(spec.masked(), sort_keys=False))
        files = [p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()]
        (staging / "README.md").write_text(card.model_card({**body, "run_id": run_id}, files))
        manifest = publish.publish(staging, store, run_id, body)

    return RunResult(run_id=run_id, destination=f"{store.uri}/{run_id}", manifest=manifest)
