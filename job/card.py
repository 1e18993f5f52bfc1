"""The model card (README.md) and the Ollama Modelfile published next to the artifacts."""

from __future__ import annotations

from job import verify
from job.chat_templates import STOPS

# Ollama's Go templates for the template families we know, written with only .System/.Prompt/.Response so a
# test can render them and compare with the Jinja template the model was trained with.
OLLAMA_TEMPLATES = {
    "chatml": (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
    ),
    "llama-3": (
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
    ),
    "alpaca": (
        "{{ if .System }}{{ .System }}\n\n{{ end }}"
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n{{ .Prompt }}\n\n"
        "### Input:\n\n\n### Response:\n{{ .Response }}"
    ),
}


def template_family(chat_template: str | None, named: str) -> str | None:
    """Which known family a tokenizer's Jinja template belongs to (None: unknown, Ollama reads the GGUF's own)."""
    if named in OLLAMA_TEMPLATES:
        return named
    text = chat_template or ""
    if "<|im_start|>" in text:
        return "chatml"
    if "<|start_header_id|>" in text:
        return "llama-3"
    return None


_SYSTEM_BLOCKS = {"chatml": ("<|im_start|>system\n", "<|im_end|>"),
                  "llama-3": ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")}


def default_system(tokenizer, family: str | None) -> str | None:
    """The system prompt a chat template inserts when a conversation has none (SmolLM2's does). Training rows were
    rendered with it, so the Modelfile must send it too."""
    if family not in _SYSTEM_BLOCKS:
        return None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    start, end = _SYSTEM_BLOCKS[family]
    if start not in rendered:
        return None
    return rendered.split(start, 1)[1].split(end, 1)[0]


def modelfile(gguf_name: str, family: str | None, system: str | None = None) -> str:
    lines = [f"FROM ./{gguf_name}", ""]
    if family:
        lines.append('TEMPLATE """' + OLLAMA_TEMPLATES[family] + '"""')
        if system:
            lines.append('SYSTEM """' + system + '"""')
        lines.extend(f'PARAMETER stop "{stop}"' for stop in STOPS[family])
    else:
        lines.append("# The chat template embedded in the GGUF (tokenizer.chat_template) is used as is.")
    lines.extend(["PARAMETER temperature 0.7", ""])
    return "\n".join(lines)


# How the card names what a preference trainer logs; the margin, accuracy and log-probabilities lead its table.
PREFERENCE_LABELS = {
    "rewards/margins": "reward margin (chosen - rejected)",
    "rewards/accuracies": "reward accuracy (share of pairs with chosen above rejected)",
    "logps/chosen": "log-probability of the chosen answers",
    "logps/rejected": "log-probability of the rejected answers",
    "rewards/chosen": "reward of the chosen answers",
    "rewards/rejected": "reward of the rejected answers",
    "kl": "KL divergence from the reference",
    "log_odds_ratio": "log odds ratio (chosen over rejected)",
    "log_odds_chosen": "log odds of the chosen answers",
    "nll_loss": "NLL loss of the chosen answers",
}


def _lineage(manifest_body: dict) -> str:
    parent = (manifest_body.get("lineage") or {}).get("parent")
    if not parent:
        return ""
    return (f"\n**Lineage:** continues the adapter of run `{parent.get('run_id')}` ({parent.get('method')}); "
            f"parent manifest `{parent.get('manifest')}` (sha256 `{parent.get('manifest_sha256')}`).\n")


def _preference(train: dict) -> str:
    metrics = [(k, v) for k, v in (train.get("preference") or {}).items() if v is not None]
    if not metrics:
        return ""
    order = list(PREFERENCE_LABELS)
    metrics.sort(key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))
    rows = "\n".join(f"| {PREFERENCE_LABELS.get(k, k)} | `{k}` | {v:.4g} |" if isinstance(v, (int, float))
                     else f"| {PREFERENCE_LABELS.get(k, k)} | `{k}` | {v} |" for k, v in metrics)
    return f"""
## Preference metrics ({train.get('method') or 'preference'}, last logged step)
| metric | logged as | value |
|---|---|---|
{rows}
"""


def model_card(manifest_body: dict, files: list[str]) -> str:
    spec = manifest_body["spec"]
    train = manifest_body.get("training", {})
    data = manifest_body.get("data", {})
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    rows = "\n".join(f"| {k} | {v} |" for k, v in [
        ("base model", spec["model"]["name"]),
        ("weights used", manifest_body.get("model", {}).get("description", "")),
        ("data", f"{data.get('source')} ({data.get('format')}, {data.get('rows_used')} rows, template {data.get('chat_template')})"),
        ("LoRA", f"r={spec['lora']['r']} alpha={spec['lora']['alpha']} dropout={spec['lora']['dropout']} rslora={spec['lora']['use_rslora']}"),
        *([("method", train["method"])] if train.get("method") else []),
        ("training", f"lr={spec['training']['learning_rate']} batch={spec['training']['batch_size']}x{spec['training']['gradient_accumulation_steps']} steps={train.get('steps')} seed={spec['training']['seed']}"),
        ("loss", f"{train.get('first_loss')} → {train.get('final_loss')}"),
        ("backend", f"{train.get('backend')} ({train.get('precision')})"),
    ])
    probes = "\n".join(
        f"- **{p['prompt']}** → {p.get('merged') or p.get('adapter')}" for p in manifest_body.get("probes", [])
    )
    verification = "\n".join(verify.table(manifest_body.get("verification") or {}))
    gguf_lines = "\n".join(f"llama-cli -m {g} -cnv" for g in ggufs) or "(no GGUF exported)"
    loss_plot = "\n## Loss\n![loss](loss.png)\n" if "loss.png" in files else ""
    return f"""# {manifest_body['run_id']}

Fine-tuned with `job` (QLoRA/LoRA). Complete only when `manifest.json` sits next to this file.

| what | value |
|---|---|
{rows}
{_lineage(manifest_body)}{_preference(train)}{loss_plot}
## Verification
Each artifact was scored against its reference on the same tokens (the probes with the model's own answers, and
held-out rows) before publishing: the mean KL divergence of its next-token distribution, and how often both pick
the same top token. `job verify` runs the same gates again on the published files.
```
{verification}
```

## Probe answers (greedy, a sample to read; not a gate)
{probes}

## How to run each artifact
- LoRA adapter (`adapter/`): `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{spec['model']['name']}"), "adapter")`
- Merged 16-bit weights (`merged/`): `AutoModelForCausalLM.from_pretrained("merged")`
- GGUF (`gguf/`), llama.cpp:
```
{gguf_lines}
```
- Ollama: `cd gguf && ollama create {manifest_body['run_id']} -f Modelfile && ollama run {manifest_body['run_id']}`
"""
