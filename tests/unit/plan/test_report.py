"""job.plan.report: a spec's plan as `job plan` prints it, for sft and the preference methods."""

from __future__ import annotations

from job.plan import estimate, inputs, report
from job.spec import Spec


def _plan(method: str, **training):
    data = {"source": "d.jsonl"} if method == "sft" else {"source": "d.jsonl", "format": "preference"}
    spec = Spec.model_validate({"model": {"name": "unsloth/Llama-3.1-8B-Instruct", "precision": "4bit"}, "data": data,
                                "training": {"method": method, "batch_size": 2, "max_seq_length": 2048, **training}})
    resolved = inputs.ResolvedArch(estimate.arch_from_table("llama-3.1-8b"), "built-in table entry llama-3.1-8b")
    tokens = inputs.DataTokens(1000, 1_000_000, (1000,) * 1000, "counted with the model's tokenizer")
    prices = report.load_prices()
    results = [report.plan_kind(spec, resolved.arch, tokens, estimate.gpu("h100-sxm"), prices)]
    best = report.recommend(results)
    body = report.as_dict(spec, resolved, tokens, results, best, headroom=0.10, prices=prices, prices_file="prices.yaml")
    return body, report.render(body, results, best), results[0]


def test_the_plan_names_the_method_and_its_sequences_a_row():
    body, text, _ = _plan("dpo")
    assert body["method"] == {"name": "dpo", "sequences_per_row": 2, "trained_sequences_per_row": 2,
                              "reference_pass": True, "description": report.METHOD_ROWS["dpo"]}
    assert "method   dpo: 2 sequences a row (chosen and rejected)" in text
    assert any(note.startswith("training.method dpo: modelled from sft's measurements") for note in body["notes"])
    orpo, text, _ = _plan("orpo")
    assert not orpo["method"]["reference_pass"] and "no reference pass" in text
    kto, _, _ = _plan("kto")
    assert (kto["method"]["sequences_per_row"], kto["method"]["trained_sequences_per_row"]) == (2, 1)
    sft, text, _ = _plan("sft")
    assert sft["method"]["sequences_per_row"] == 1 and "\nmethod " not in text  # sft's table is as it was
    assert not any(note.startswith("training.method") for note in sft["notes"])


def test_a_dpo_run_of_the_same_rows_takes_longer_than_sft_and_orpo():
    _, _, sft = _plan("sft")
    _, _, dpo = _plan("dpo")
    _, _, orpo = _plan("orpo")
    assert sft.micro_batches == dpo.micro_batches  # rows are pairs: as many micro-batches
    assert dpo.seconds > orpo.seconds > sft.seconds
    assert dpo.choice.memory.total > sft.choice.memory.total
