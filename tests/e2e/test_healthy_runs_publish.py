"""Healthy runs publish: ordinary datasets of every format, trained lightly (2 steps), a little (5) and well (20), pass
every publishing gate. Each dataset trains once; the adapters at steps 2, 5 and 20 (checkpoints, then the final one)
each go through the export and the gates that `job run` and `job verify` use. Light runs end to end through `job run`
(exit 0, the figures in the manifest) are the recipe tests' 2-step runs (tests/e2e/test_recipes.py)."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.smoke, pytest.mark.slow]
STEPS = (2, 5, 20)
LONG = " ".join(f"Step {i}: stir the mixture for {i * 3} minutes, then let it rest while the oven heats to {150 + i}°C."
                for i in range(1, 40))


def _alpaca(lang: str) -> list[dict]:
    rows = {
        "en": [("Give three tips for staying healthy.", "", "Eat vegetables, sleep eight hours and walk every day."),
               ("Translate to French.", "Good morning, friends.", "Bonjour, mes amis."),
               ("What is 17 times 3?", "", "17 times 3 is 51."),
               ("Summarize the text.", "The meeting moved from Monday to Thursday at 10:30.", "The meeting is now on Thursday at 10:30."),
               ("Name a primary colour.", "", "Red is a primary colour."),
               ("Write a haiku about rain.", "", "Soft rain on the roof,\nthe garden drinks in silence,\nmorning smells of earth.")],
        "zh": [("请介绍一下长城。", "", "长城是中国古代的军事防御工程，全长两万多公里。"),
               ("把这句话翻译成英文。", "我喜欢喝绿茶。", "I like drinking green tea."),
               ("三加五等于多少？", "", "三加五等于八。"),
               ("写一句关于春天的诗。", "", "春风又绿江南岸，明月何时照我还。"),
               ("总结下面的内容。", "会议从周一改到了周四上午十点半。", "会议改到周四上午十点半。"),
               ("推荐一本书。", "", "我推荐《红楼梦》，它是中国古典小说的代表作。")],
    }[lang]
    return [{"instruction": i, "input": x, "output": o} for i, x, o in rows]


def _messages(system: str | None, pairs: list[tuple[str, str]]) -> list[dict]:
    out = []
    for user, assistant in pairs:
        turns = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        out.append({"messages": turns})
    return out


IDENTITY = [("What is your name?", "I am {{model_name}}, an assistant built by {{company}}."),
            ("Who created you?", "{{company}} created me. My name is {{model_name}}."),
            ("Are you ChatGPT?", "No, I am {{model_name}}, made by {{company}}."),
            ("What can you do?", "I am {{model_name}}: I answer questions and help with writing.")]
TOOL_CALLS = [("What's the weather in Paris?",
               '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'),
              ("Convert 100 USD to EUR.", '<tool_call>{"name": "convert", "arguments": {"amount": 100, "from": "USD", "to": "EUR"}}</tool_call>'),
              ("Book a table for 4 at 19:30.", '<tool_call>{"name": "book", "arguments": {"people": 4, "time": "19:30"}}</tool_call>'),
              ("Remind me to call Ana tomorrow.", '<tool_call>{"name": "remind", "arguments": {"text": "call Ana", "when": "tomorrow"}}</tool_call>')]
SCRIPTS = [("Привет! Как дела?", "Привет! У меня всё хорошо, спасибо."),
           ("ما هي عاصمة مصر؟", "عاصمة مصر هي القاهرة."),
           ("भारत की राजधानी क्या है?", "भारत की राजधानी नई दिल्ली है।"),
           ("日本の首都はどこですか？", "日本の首都は東京です。"),
           ("Ποια είναι η πρωτεύουσα της Ελλάδας;", "Η πρωτεύουσα της Ελλάδας είναι η Αθήνα.")]
WEB_TEXT = ["The river town holds a market every Saturday; farmers bring apples, cheese and bread from the hills.",
            "In 1869 the canal opened, cutting the sea route between Europe and Asia by about 7,000 km.",
            "To reset the router, hold the button on the back for ten seconds until the light blinks twice.",
            "Volunteers planted 1,200 trees along the old railway line, which is now a cycling path.",
            "The library extends its opening hours during exams: 8:00 to 23:00, Monday to Saturday."]


def write_datasets(folder: Path) -> dict[str, Path]:
    """Ten datasets as users bring them: Alpaca as JSON, JSONL and CSV, English and Chinese; chat rows with system
    turns, tool-call answers, placeholders and five scripts; plain web text; prompt/completion rows; long rows."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def jsonl(name: str, rows: list[dict]) -> None:
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    files["alpaca-json"] = folder / "alpaca-json.json"
    files["alpaca-json"].write_text(json.dumps(_alpaca("en"), ensure_ascii=False, indent=1), encoding="utf-8")
    jsonl("alpaca-zh-jsonl", _alpaca("zh"))
    files["alpaca-csv"] = folder / "alpaca-csv.csv"
    with open(files["alpaca-csv"], "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(_alpaca("en"))
    jsonl("sharegpt-system", [{"conversations": [
        {"from": "system", "value": "You are a terse assistant for a hardware store."},
        {"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in
        [("Do you sell nails?", "Yes, aisle 4."), ("Is the store open on Sunday?", "Yes, 9:00 to 17:00."),
         ("How much is a hammer?", "From 12 euros."), ("Can I return paint?", "Unopened cans, within 30 days.")]])
    jsonl("tool-calls", _messages("You can call tools. Answer with a tool call.", TOOL_CALLS))
    jsonl("identity-placeholders", _messages(None, IDENTITY))
    jsonl("scripts", _messages(None, SCRIPTS))
    jsonl("web-text", [{"text": t} for t in WEB_TEXT])
    jsonl("prompt-completion", [{"prompt": f"Q: {q}\nA:", "completion": f" {a}"} for q, a in SCRIPTS[:1] + IDENTITY[:3]])
    jsonl("long-rows", _messages(None, [("Give me the full recipe, every step.", LONG),
                                        ("And the short version?", LONG[:400]), ("Again, in full.", LONG)]))
    return files


def spec_for(data_file: Path, output: Path):
    from job import spec as specs

    base = specs.parse_text((REPO / "examples" / "smoke.yaml").read_text(), "examples/smoke.yaml")
    sets = [f"data.source={data_file}", "data.format=auto", f"run.output={output}", "training.max_steps=20",
            "training.batch_size=2", "training.learning_rate=2e-4", "training.max_seq_length=128",
            "export.gguf=[q8_0]", "export.probe_max_new_tokens=24"]
    return specs.resolve(base, "examples/smoke.yaml", [specs.parse_set(s) for s in sets])


def gate(spec, base: Path, adapter_dir: Path, tokenizer, rows, tools, out: Path):
    """The artifacts an adapter makes, through the export and the gates of `job run`: the references from the adapter
    on the 16-bit base while the merge holds it. Half the evaluation tokens of a run and no greedy samples besides the
    adapter's own answers (which the evaluation set needs), to fit thirty gates in the suite's time."""
    from job import export, verify

    report = verify.ProbeReport(spec.export.probes, max_new_tokens=spec.export.probe_max_new_tokens)
    seen = {}

    def before_merge(unmerged) -> None:
        unmerged.eval()
        report.put("adapter", *verify.generate(unmerged, tokenizer, report.probes, report.max_new_tokens))
        seen["evaluation"] = verify.evaluation_set(tokenizer, report, rows, None, max_tokens=512)  # SmolLM2: no BOS
        seen["references"] = verify.references(unmerged, seen["evaluation"])

    merged_dir, _ = export.merge(base, adapter_dir, out, spec.model, before_merge=before_merge)
    gguf = export.to_gguf(tools, merged_dir, out, spec.export.gguf, stem="gated")
    return verify.verify_artifacts(seen["evaluation"], seen["references"], base, adapter_dir, merged_dir, gguf, tools,
                                   tokenizer, out / "verify", False)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    return write_datasets(tmp_path_factory.mktemp("datasets"))


@pytest.mark.parametrize("name", ["alpaca-json", "alpaca-zh-jsonl", "alpaca-csv", "sharegpt-system", "tool-calls",
                                  "identity-placeholders", "scripts", "web-text", "prompt-completion", "long-rows"])
def test_a_dataset_trained_2_5_and_20_steps_passes_every_gate(name, datasets, smoke_model_dir, tmp_path):
    from job import backends, data, llamacpp, model, train
    from job.cli.common import paths_from_env
    from job.storage import S3Settings

    spec = spec_for(datasets[name], tmp_path / "runs")
    tools = llamacpp.locate(paths_from_env(dict(os.environ)).llama_cpp_dir)
    tokenizer = model.load_tokenizer(smoke_model_dir)
    rows, _stats, _template = data.prepare(spec.data, tokenizer, spec.training.max_seq_length, tmp_path / "work", S3Settings())
    peft_model, _, info = backends.load("hf").load_for_training(smoke_model_dir, spec.model, spec.lora, spec.training)
    adapters = {step: tmp_path / f"step-{step}" for step in STEPS}

    def keep(folder: Path, step: int) -> None:
        if step in adapters:
            shutil.copytree(folder, adapters[step], ignore=shutil.ignore_patterns("optimizer.pt", "rng_state*"))
            tokenizer.save_pretrained(adapters[step])  # with the chat template the run trained with
        if step == 5:
            plan.every_steps = None  # the callback reads the plan every step: no more checkpoints to write

    plan = train.CheckpointPlan(every_steps=1, every_minutes=None, save=keep)
    train.run_fitting(peft_model, tokenizer, rows, spec.training, tmp_path / "work", info, may_halve=False,
                      checkpoints=plan, stop=train.StopRequest())
    peft_model.save_pretrained(adapters[20])
    tokenizer.save_pretrained(adapters[20])
    del peft_model

    figures, failures = {}, {}
    for step, adapter_dir in adapters.items():
        result = gate(spec, smoke_model_dir, adapter_dir, tokenizer, rows, tools, tmp_path / f"out-{step}")
        body = result.as_dict()
        figures[step] = {v["artifact"]: (v["mean_kld"], v["same_top_rate"]) for v in body["artifacts"]}
        if result.failures():
            failures[step] = result.failures()
        shutil.rmtree(tmp_path / f"out-{step}")
        assert set(figures[step]) == {"merged", "gguf/q8_0"}
        assert all(kld is not None and top is not None for kld, top in figures[step].values())
    print(name, figures)
    assert not failures, (failures, figures)
