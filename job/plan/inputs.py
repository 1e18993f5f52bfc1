"""What `job plan` reads to plan a spec: the model's architecture (a config.json, a GGUF's metadata, an s3://
checkpoint, the hub when reachable, else the shipped table), the data's token counts, and the tokenizer when it is
already on this machine. Never weights; nothing is downloaded but a config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job import errors
from job.errors import NotFoundError, network_reason
from job.export import base_gguf_refusal
from job.plan.estimate import Arch, Disk, arch_from_config, arch_from_table, estimate_disk, normalize_model_id
from job.spec import PREFERENCE_METHODS

@dataclass(frozen=True)
class ResolvedArch:
    arch: Arch
    source: str  # where the numbers came from, said in the output


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(endpoint)
    try:
        with socket.create_connection((parsed.hostname or "huggingface.co", parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def read_gguf_config(path) -> dict[str, Any]:
    """A config.json-like dict from a GGUF file's metadata (the tensors are not read)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = reader.fields

    def value(key: str) -> Any:
        field = fields.get(key)
        if field is None:
            return None
        raw = field.parts[field.data[0]]
        return bytes(raw).decode() if field.types and field.types[0].name == "STRING" else raw[0].item()

    arch = value("general.architecture") or "llama"
    vocab = value(f"{arch}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in fields:
        vocab = len(fields["tokenizer.ggml.tokens"].data)
    heads = value(f"{arch}.attention.head_count")
    hidden = value(f"{arch}.embedding_length")
    return {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": value(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv") or heads,
        "head_dim": value(f"{arch}.attention.key_length") or (hidden // heads if hidden and heads else None),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "vocab_size": vocab,
        "num_local_experts": value(f"{arch}.expert_count") or 1,
        "num_experts_per_tok": value(f"{arch}.expert_used_count") or 1,
        # llama.cpp writes no output.weight when the head shares the embedding matrix
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }


def resolve_arch(model, *, s3=None, hub_endpoint: str = "https://huggingface.co", hub_offline: bool = False,
                 config_file=None) -> ResolvedArch:
    """The architecture of `model` (the spec's ModelSection) from config only, never weights: an explicit
    config.json, a local checkpoint's config.json, an s3:// checkpoint's config.json, a GGUF's metadata, the hub
    when reachable, else the shipped table of well-known models."""
    import json
    from pathlib import Path

    from job.storage import S3Settings, open_location

    name = model.name
    if config_file is not None:
        return ResolvedArch(arch_from_config(json.loads(Path(config_file).read_text()), name), f"config file {config_file}")
    if name.startswith("pkg://") or name.endswith(".gguf"):
        from job.model import package_file

        path = package_file(name, "model.name") if name.startswith("pkg://") else Path(name).expanduser()
        if not path.is_file():
            raise NotFoundError(f"model.name: no GGUF file at {path}")
        return ResolvedArch(arch_from_config(read_gguf_config(path), normalize_model_id(name)), f"GGUF metadata of {path.name}")
    if name.startswith("s3://"):
        store = open_location(name, s3 or S3Settings())
        return ResolvedArch(arch_from_config(json.loads(store.read_bytes("config.json")), normalize_model_id(name)),
                            f"config.json at {name}")
    local = Path(name).expanduser()
    if (local / "config.json").is_file():
        return ResolvedArch(arch_from_config(json.loads((local / "config.json").read_text()), local.name),
                            f"config.json in {local}")
    why = f"{name.split('://')[0]}:// sources are not read by plan" if "://" in name else "no such local checkpoint"
    if "://" not in name and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        why = _hub_config_unavailable(model, hub_endpoint, hub_offline)
        if isinstance(why, dict):
            return ResolvedArch(arch_from_config(why, normalize_model_id(name)), f"config.json from the hub ({name})")
    table = arch_from_table(name)
    if table is not None:
        return ResolvedArch(table, f"built-in table entry {table.name} ({why})")
    raise NotFoundError(f"model.name: no architecture for {name}: {why}, and it is not in the built-in table",
                        hint="pass --config path/to/config.json (the model's config.json; no weights needed)")


def disk_for_spec(spec, arch: Arch) -> Disk:
    """The run's predicted peak disk, the base's cached GGUF counted where the GGUFs are made from it."""
    return estimate_disk(arch, merged=spec.export.merged, gguf_types=spec.export.gguf,
                         base_gguf=base_gguf_refusal(spec.lora, spec.export) is None)


def disk_at_hand(spec) -> tuple[Disk, str] | str:
    """The run's predicted peak disk and where the model's numbers came from, from what this machine has (a local
    checkpoint or GGUF, the hub cache, the built-in table), never the network: what `job k8s render` sizes volumes
    with. Why not, as a string, when none of those knows the model."""
    if spec.model.name.startswith(("s3://", "https://", "http://")):
        return f"{spec.model.name.split('://')[0]}:// models are read only by `job plan`"
    try:
        resolved = resolve_arch(spec.model, hub_offline=True)
    except NotFoundError as exc:
        return str(exc)
    return disk_for_spec(spec, resolved.arch), resolved.source


def _hub_config_unavailable(model, endpoint: str, offline: bool) -> dict[str, Any] | str:
    """The hub's config.json for `model` (a dict), or why it could not be had (a string)."""
    import json

    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(model.name, "config.json", revision=model.revision)
    if isinstance(cached, str):
        return json.loads(open(cached).read())
    if offline:
        return "hub offline (HF_HUB_OFFLINE) and not cached"
    if not hub_reachable(endpoint):
        return f"hub {endpoint} unreachable"
    try:
        path = hf_hub_download(model.name, "config.json", revision=model.revision, endpoint=endpoint,
                               token=model.token.get_secret_value() if model.token else None)
    except Exception as exc:  # noqa: BLE001 - any hub failure falls back to the table, and says why
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return f"the hub answered HTTP {status}" if status else f"the hub could not be read ({network_reason(exc)})"
    return json.loads(open(path).read())


@dataclass(frozen=True)
class DataTokens:
    """The rows and tokens one epoch trains on, and how they were counted."""

    rows: int | None
    tokens: int | None
    lengths: tuple[int, ...]  # per row, after truncation to max_seq_length
    method: str

    @property
    def longest(self) -> int | None:
        return max(self.lengths) if self.lengths else None


def count_tokens(spec, *, work_dir, s3=None, tokenizer=None, hub_reachable: bool = False) -> DataTokens:
    """Count the training tokens: with the model's own tokenizer and chat template when one is given (exactly as
    `job run` tokenizes), else estimated from the text's bytes (4 bytes a token, plus a few per message)."""
    from pathlib import Path

    from job import data as datas
    from job.errors import JobError

    source = spec.data.source
    remote_hub = not (source.startswith(("pkg://", "s3://", "https://", "http://")) or Path(source).expanduser().exists())
    if remote_hub and not hub_reachable:
        return DataTokens(None, None, (), f"not counted: {source} is a hub dataset and the hub is unreachable")
    try:
        rows, _ = datas.read_rows(spec.data, Path(work_dir), s3)
        template = datas.choose_template(tokenizer, spec.data.chat_template) if tokenizer is not None else (
            spec.data.chat_template if spec.data.chat_template not in ("auto", "model") else "chatml")
        if spec.training.method in PREFERENCE_METHODS:
            return _preference_tokens(spec, rows, tokenizer)
        normalized = datas.normalize(rows, spec.data, template)
        limit = spec.training.max_seq_length
        if tokenizer is not None:
            tokenized = datas.tokenize(tokenizer, normalized, limit, spec.data.train_on_responses_only)
            lengths = tuple(len(ids) for ids in tokenized.input_ids)
            return DataTokens(len(lengths), sum(lengths), lengths, "counted with the model's tokenizer")
    except JobError as exc:
        return DataTokens(None, None, (), f"not counted: {exc}")
    lengths = tuple(min(limit, _estimated_tokens(example)) for _, example in normalized.examples)
    return DataTokens(len(lengths), sum(lengths), lengths, "estimated from bytes (4 bytes a token; no tokenizer at hand)")


def _preference_tokens(spec, rows, tokenizer) -> DataTokens:
    """Rows as job.preference prepares them (a pair, or one kto completion) and the tokens of all their sequences. A
    row's length is its longest sequence: trl pads a pair's sequences to one length."""
    from job import preference

    method, limit = spec.training.method, spec.training.max_seq_length
    normalized = preference.normalize(rows, spec.data, method)
    lengths, tokens = [], 0
    if tokenizer is not None:
        for _, row in preference.tokenize_rows(tokenizer, normalized, limit, method):
            if row.prompt_fills:
                continue  # the run drops it
            kept = row.sequence_lengths
            lengths.append(max(kept))
            tokens += sum(kept)
        return DataTokens(len(lengths), tokens, tuple(lengths), "counted with the model's tokenizer")
    per_message = 6  # as _estimated_tokens
    for _, answers in normalized.examples:
        for one in preference.unpaired(answers) if method == "kto" else [answers]:
            prompt = sum(len(m["content"].encode()) for m in one.prompt)
            texts = [one.completion] if one.completion is not None else [one.chosen, one.rejected]
            kept = [min(limit, math.ceil((prompt + len(text.encode())) / 4) + per_message * (len(one.prompt) + 1))
                    for text in texts]
            lengths.append(max(kept))
            tokens += sum(kept)
    return DataTokens(len(lengths), tokens, tuple(lengths), "estimated from bytes (4 bytes a token; no tokenizer at hand)")


def _estimated_tokens(example) -> int:
    texts = [m["content"] for m in example.messages or []] + [example.text or "", example.prompt or "", example.completion or ""]
    per_message = 6  # role markers and separators of a chat template
    return math.ceil(sum(len(t.encode()) for t in texts) / 4) + per_message * len(example.messages or [])


def tokenizer_at_hand(model, scratch: Path):
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
