"""Named chat templates for models that have none (or when the spec asks for another).

Written as Jinja so the tokenizer saved with the adapter, the merged weights and the GGUF all carry the
template the model was trained with.
"""

from __future__ import annotations

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA_3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# The classic Stanford Alpaca prompt as unsloth's notebooks write it (always with an Input section).
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}"
    "{{- '" + ALPACA_PREAMBLE + "\\n\\n### Instruction:\\n' + message['content'] + '\\n\\n### Input:\\n' "
    "+ (message['input'] if message['input'] is defined and message['input'] else '') + '\\n\\n### Response:\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

NAMED = {"chatml": CHATML, "llama-3": LLAMA_3, "alpaca": ALPACA}

# Strings that end an assistant turn in each named template, for the Ollama Modelfile's stop parameters.
STOPS = {"chatml": ["<|im_end|>", "<|im_start|>"], "llama-3": ["<|eot_id|>", "<|start_header_id|>"], "alpaca": ["### Instruction:"]}
