"""The run spec: one pydantic model, validated once at the start of a run and passed down.

Sources, first found wins: `--spec PATH|s3://…|https://…`, env `JOB_SPEC` (inline YAML or JSON),
env `JOB_SPEC_URI`. Then overrides: env `JOB__SECTION__FIELD=value`, then `--set section.field=value`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from job.errors import SpecError

# llama-quantize's own type names (tools/quantize/quantize.cpp at the pinned commit), lower-cased.
GGUF_TYPES = (
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_k", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_k",
    "q4_0", "q4_1", "q3_k_m", "q3_k_s", "q3_k_l", "q3_k", "q2_k", "q2_k_s", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0",
    "mxfp4_moe",
)  # fmt: skip
# The i-quants below 4 bits need an importance matrix, which the job does not compute.
SECRET_FIELDS = ("model.token",)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    id: str | None = Field(
        None,
        description="Run id: names the output folder and the Kubernetes Job (lowercase letters, digits, '-'). "
        "Default: 'run-' and a hash of the resolved spec, so a restarted run finds its own outputs.",
    )
    output: str = Field(
        "runs",
        description="Where artifacts go: a local directory or s3://bucket/prefix. The run lands in OUTPUT/RUN_ID/.",
    )
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (R2, MinIO, RunPod). Default: the AWS environment (AWS_ENDPOINT_URL_S3)."
    )
    region: str | None = Field(None, description="S3 region. Default: the AWS environment.")

    @field_validator("id")
    @classmethod
    def _dns_label(cls, value: str | None) -> str | None:
        if value is not None and not DNS_LABEL.match(value):
            raise ValueError("must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit")
        return value

    @field_validator("output")
    @classmethod
    def _output(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a local directory or s3://bucket/prefix")
        if value.startswith("~"):
            value = str(Path(value).expanduser())
        if "://" in value and not value.startswith("s3://"):
            raise ValueError("must be a local path or s3://bucket/prefix")
        if value.startswith("s3://") and not value[5:].split("/")[0]:
            raise ValueError("s3:// URI needs a bucket name")
        return value.rstrip("/") or "/"


class ModelSection(Section):
    name: str = Field(
        ...,
        description="Base model: a Hugging Face id (env HF_ENDPOINT for a mirror, HF_TOKEN for gated models), "
        "modelscope://owner/name (ModelScope; env MODELSCOPE_API_TOKEN), a local checkpoint directory, a local .gguf "
        "file, s3://bucket/prefix holding a checkpoint, or pkg://python_package/file.gguf (a model shipped in a package). "
        "unsloth's pre-quantized '-bnb-4bit' ids and their plain counterparts stand in for each other: the run downloads "
        "the one its precision and exports need, and the manifest records which (model.weights_used).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit; ModelScope default: master).")
    precision: Literal["auto", "4bit", "16bit", "fp8"] = Field(
        "auto",
        description="Base weights while training: 4bit (QLoRA, CUDA only), 16bit, or fp8 (unsloth, compute capability "
        ">= 9.0 only). auto: on CUDA the fastest that fits the card's free memory (job plan's estimate; fp8 only "
        "with the unsloth backend on compute capability >= 9.0 and without gradient checkpointing), recorded in the "
        "manifest with the reason; 16bit on CPU.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype. auto: bfloat16 on CUDA cards that have it, float32 on CPU."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off unless you trust it.")
    token: SecretStr | None = Field(
        None, description="Hub token for gated or private models (prefer env HF_TOKEN or MODELSCOPE_API_TOKEN)."
    )
    adapter: str | None = Field(
        None,
        description="Start from a published run's adapter: s3://bucket/prefix/RUN_ID/ or a local run folder (one "
        "holding manifest.json and adapter/). Its base must be this spec's model.name and its LoRA settings this "
        "spec's lora; the manifest records the parent run. With a preference method the reference model is the base "
        "with this adapter as loaded.",
    )

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.strip() or ("://" in value and not value.startswith("s3://")):
            raise ValueError("must be s3://bucket/prefix/RUN_ID/ or a local run folder")
        if value.startswith("~"):
            value = str(Path(value).expanduser())
        return value.rstrip("/")

    @field_validator("name")
    @classmethod
    def _modelscope_id(cls, value: str) -> str:
        if value.startswith("modelscope://") and not re.fullmatch(r"modelscope://[\w.-]+/[\w.-]+", value):
            raise ValueError("a ModelScope model is modelscope://owner/name, e.g. modelscope://LLM-Research/Meta-Llama-3.1-8B-Instruct")
        return value


class LoraSection(Section):
    r: int = Field(16, gt=0, le=1024, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names that get adapters.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling.")
    loftq_config: dict[str, Any] | None = Field(None, description="LoftQ initialisation, e.g. {loftq_bits: 4}.")


class DataSection(Section):
    source: str = Field(
        ...,
        description="A local file or directory, s3://bucket/key or s3://bucket/prefix/, an https:// URL of one file, "
        "or a Hugging Face dataset id. Files: .jsonl, .json, .parquet, .csv.",
    )
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text", "prompt_completion", "preference",
                    "preference_messages", "kto"] = Field(
        "auto",
        description="Row format. auto detects it from the columns and logs what it picked. For training.method dpo, "
        "orpo and kto: preference (prompt, chosen, rejected as strings), preference_messages (chosen and rejected "
        "as message lists that share their first turns, or follow a prompt given as a message list) and, for kto "
        "only, kto (prompt, completion, label: true for a desirable completion).",
    )
    split: str = Field("train", description="Split of a hub dataset.")
    chat_template: Literal["auto", "model", "chatml", "llama-3", "alpaca"] = Field(
        "auto",
        description="auto: the model's own template when it has one, else chatml. model: require the model's own.",
    )
    train_on_responses_only: bool = Field(True, description="Loss on assistant/completion tokens only.")
    system_prompt: str | None = Field(
        None,
        description="A system message put first in every conversation that has none (alpaca, sharegpt and messages "
        "rows), as recipes that train a persona do.",
    )
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows.")
    eval: str | None = Field(None, description="A separate evaluation source (same forms as source).")
    eval_split: float | None = Field(
        None, gt=0, lt=1, description="Hold out this fraction of the training rows for evaluation (seeded by training.seed)."
    )

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataSection:
        if self.eval and self.eval_split:
            raise ValueError("set data.eval or data.eval_split, not both")
        return self


class DpoSection(Section):
    """trl's DPOConfig fields that a DPO run may set, under trl's names."""

    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference (higher: less).")
    loss_type: list[Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                            "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]] = Field(
        ["sigmoid"], min_length=1, description="trl's loss type(s); several are summed with loss_weights.")
    loss_weights: list[float] | None = Field(None, description="One weight per loss_type (default 1.0 each).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Robust DPO's flip probability, EXO's epsilon.")
    use_weighting: bool = Field(False, description="WPO weighting of pairs by the policy's probabilities.")
    ld_alpha: float | None = Field(None, ge=0, le=1, description="LD-DPO's weight of the verbose tokens.")

    @model_validator(mode="after")
    def _weights(self) -> DpoSection:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} weights for {len(self.loss_type)} loss_type(s)")
        return self


class OrpoSection(Section):
    """trl's ORPOConfig fields that an ORPO run may set, under trl's names."""

    beta: float = Field(0.1, gt=0, description="The weight of the odds-ratio term (lambda in the ORPO paper).")


class KtoSection(Section):
    """trl's KTOConfig fields that a KTO run may set, under trl's names."""

    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference (higher: less).")
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    desirable_weight: float = Field(1.0, gt=0, description="Weight of the desirable completions' losses.")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of the undesirable completions' losses.")


PREFERENCE_METHODS = ("dpo", "orpo", "kto")


class TrainingSection(Section):
    method: Literal["sft", "dpo", "orpo", "kto"] = Field(
        "sft",
        description="sft: supervised fine-tuning. dpo, orpo, kto: preference tuning through trl's trainers, on "
        "preference data (data.format); each reads its own section (training.dpo, .orpo, .kto). dpo and kto train "
        "against a reference: the base with model.adapter's adapter as loaded, or the base alone.",
    )
    dpo: DpoSection | None = Field(None, description="DPO's settings (training.method: dpo).")
    orpo: OrpoSection | None = Field(None, description="ORPO's settings (training.method: orpo).")
    kto: KtoSection | None = Field(None, description="KTO's settings (training.method: kto).")
    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto", description="auto: unsloth when CUDA is present, else transformers+peft (hf)."
    )
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 trains num_epochs.")
    num_epochs: float = Field(1.0, gt=0)
    batch_size: int | Literal["auto"] = Field(
        2, description="Per-device micro-batch size, or auto: the fastest that fits the card's free memory with headroom."
    )
    gradient_accumulation_steps: int = Field(4, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(5, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts"] = "linear"
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: Literal["adamw_8bit", "adamw_torch", "paged_adamw_8bit", "adamw_torch_fused", "sgd"] = "adamw_8bit"
    seed: int = 3407
    max_seq_length: int = Field(2048, gt=0)
    packing: bool = Field(False, description="Pack several rows into each max_seq_length sequence.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        True, description="Trade compute for memory (unsloth's offloaded variant on GPU). auto: only when needed to fit."
    )
    logging_steps: int = Field(1, gt=0)
    dataloader_workers: Annotated[int, Field(ge=0, le=32)] | Literal["auto"] = Field(
        "auto",
        description="Processes that collate batches ahead of the step. auto: 2 on a GPU (the step no longer waits "
                    "for collation; pinned memory, copies that do not block), 0 on CPU.",
    )
    checkpoint_every: int | None = Field(
        None, gt=0, description="Write a resumable checkpoint to the output location every N optimizer steps."
    )
    checkpoint_every_minutes: float | None = Field(
        30.0, gt=0, description="Also write one when this many minutes have passed since the last (null: only by steps)."
    )
    eval_every: int | None = Field(None, gt=0, description="Evaluate every N steps (needs data.eval or data.eval_split).")
    sharding: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: ddp replicates the model on every GPU. fsdp (sharding it) is not built yet."
    )

    @model_validator(mode="after")
    def _method_settings(self) -> TrainingSection:
        for method in PREFERENCE_METHODS:
            if getattr(self, method) is not None and self.method != method:
                raise ValueError(f"training.{method} is set but training.method is {self.method}: set training.method: "
                                 f"{method}, or remove training.{method}")
        if self.method in PREFERENCE_METHODS and self.packing:
            raise ValueError(f"training.packing is for sft; trl's {self.method} trainer pads each pair instead")
        return self

    def method_settings(self) -> BaseModel | None:
        """The preference method's section, its defaults where the spec left it out (None for sft)."""
        if self.method == "sft":
            return None
        given = getattr(self, self.method)
        return given if given is not None else {"dpo": DpoSection, "orpo": OrpoSection, "kto": KtoSection}[self.method]()

    @field_validator("sharding")
    @classmethod
    def _sharding(cls, value: str) -> str:
        # Refused, not ignored: a run that asked for sharding must not quietly train one full copy per GPU.
        if value == "fsdp":
            raise ValueError("fsdp is not built yet (a model sharded across GPUs, through unsloth's FSDP2, needs its "
                             "export path gathered onto rank 0 and a GPU run to prove it); use ddp, which keeps one "
                             "copy of the model per GPU")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be a positive integer or auto")
        return value

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be a positive number of steps, or -1 to train num_epochs")
        return value


class ExportSection(Section):
    merged: bool = Field(True, description="Publish merged 16-bit weights (safetensors).")
    gguf: list[str] = Field(
        ["q4_k_m", "q8_0"], description=f"GGUF quantizations to publish (llama.cpp types: {', '.join(GGUF_TYPES)})."
    )
    probes: list[str] = Field(
        ["What is the capital of France?"],
        description="Prompts answered greedily by every artifact before publishing; the answers go in the manifest.",
    )
    probe_max_new_tokens: int = Field(48, gt=0, le=1024)

    @field_validator("gguf")
    @classmethod
    def _gguf_types(cls, value: list[str]) -> list[str]:
        lowered = [v.lower() for v in value]
        unknown = [v for v in lowered if v not in GGUF_TYPES]
        if unknown:
            raise ValueError(f"unknown GGUF type(s) {unknown}; known: {', '.join(GGUF_TYPES)}")
        if len(set(lowered)) != len(lowered):
            raise ValueError("lists a GGUF type twice")
        return lowered


class LoggingSection(Section):
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        [], description="Trackers, through transformers' own integrations. TensorBoard files are published with the run."
    )


class Spec(Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    export: ExportSection = Field(default_factory=ExportSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> Spec:
        if self.export.gguf and not self.export.merged:
            raise ValueError("export.gguf needs export.merged: true (GGUF files are converted from the merged weights)")
        if self.training.eval_every and not (self.data.eval or self.data.eval_split):
            raise ValueError("training.eval_every needs data.eval or data.eval_split")
        preference = self.training.method in PREFERENCE_METHODS
        if self.data.format in ("preference", "preference_messages", "kto") and not preference:
            raise ValueError(f"data.format {self.data.format} is preference data: set training.method to dpo, orpo or kto")
        if preference and self.data.format not in ("auto", "preference", "preference_messages", "kto"):
            raise ValueError(f"training.method {self.training.method} trains on preference data: set data.format to "
                             "preference, preference_messages, kto or auto")
        if self.data.format == "kto" and self.training.method != "kto":
            raise ValueError(f"data.format kto has one completion a row, with a label: training.method "
                             f"{self.training.method} needs pairs (data.format preference or preference_messages)")
        return self

    @property
    def run_id(self) -> str:
        if self.run.id:
            return self.run.id
        body = self.model_dump(mode="json", exclude={"run": {"id"}, "model": {"token"}})
        return "run-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]

    def masked(self) -> dict[str, Any]:
        """The resolved spec as plain data with secrets masked and the run id filled in."""
        data = self.model_dump(mode="json")
        data["run"]["id"] = self.run_id
        return data


# --- loading -----------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping: PyYAML would keep the last one silently."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise SpecError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in one mapping "
                                f"(first on line {seen[key]})", hint="remove one; YAML would keep only the last")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_text(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except SpecError as exc:
        exc.where = origin
        raise
    except yaml.YAMLError as exc:
        raise SpecError(f"is not valid YAML or JSON: {exc}", where=origin) from exc
    if not isinstance(data, dict):
        raise SpecError("must be a mapping with sections run, model, lora, data, training, export", where=origin)
    return data


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def apply_override(data: dict[str, Any], dotted: str, raw_value: str, origin: str) -> None:
    path = [p for p in dotted.strip().split(".") if p]
    if not path:
        raise SpecError(f"override {dotted!r} names no field", where=origin)
    if not raw_value.strip():
        # An empty JOB__RUN__OUTPUT= would otherwise publish to the file system's root.
        raise SpecError(f"{'.'.join(path)} is set to an empty value", where=origin,
                        hint="give it a value, or unset it to keep the spec's")
    node = data
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SpecError(f"cannot set {dotted}: {key} is not a section", where=origin)
        node = child
    node[path[-1]] = _parse_value(raw_value)


def env_overrides(environ: dict[str, str]) -> list[tuple[str, str, str]]:
    """`JOB__TRAINING__LEARNING_RATE=1e-4` → ("training.learning_rate", "1e-4", origin)."""
    found = []
    for key in sorted(environ):
        if key.startswith("JOB__") and len(key) > 5:
            dotted = ".".join(part.lower() for part in key[5:].split("__"))
            found.append((dotted, environ[key], f"env {key}"))
    return found


def parse_set(item: str) -> tuple[str, str, str]:
    if "=" not in item:
        raise SpecError(f"--set {item!r} must look like section.field=value")
    dotted, value = item.split("=", 1)
    return dotted, value, f"--set {dotted}"


def validate(data: dict[str, Any], origin: str, set_by: dict[str, str] | None = None) -> Spec:
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, set_by), where=origin, hint="see `job schema` for every field") from exc


def format_validation_error(exc: ValidationError, set_by: dict[str, str] | None = None) -> str:
    """One line per invalid field; `set_by` maps a dotted path to the override that set it (env or --set)."""
    by_field: dict[str, list[dict]] = {}
    for err in exc.errors():
        by_field.setdefault(".".join(map(str, _field_loc(err["loc"]))) or "(top level)", []).append(err)
    lines = [f"{len(by_field)} invalid field(s):"]
    for path, errs in by_field.items():
        err = errs[0]
        if err["type"] == "extra_forbidden":
            message = "unknown field (a typo? unknown fields are refused so nothing trains with silent defaults)"
            message += _did_you_mean(err["loc"])
        elif err["type"] == "missing":
            message = "required field is missing"
        else:  # a union (int or 'auto') reports each alternative
            message = " or ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errs))
        value = err.get("input")
        # An unknown field's value says nothing the name does not, and may be a secret under a misspelled name.
        hidden = err["type"] in ("missing", "extra_forbidden") or path.startswith(SECRET_FIELDS) or isinstance(value, dict)
        shown = "" if hidden else f" (got {value!r})"
        origin = (set_by or {}).get(path)
        lines.append(f"  {path}: {message}{shown}" + (f" [from {origin}]" if origin else ""))
    return "\n".join(lines)


def _section_type(annotation: Any) -> Any:
    """A field's section model, also where the section is optional (`DpoSection | None`)."""
    import typing

    if isinstance(annotation, type):
        return annotation
    models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else annotation


def _field_loc(loc: tuple) -> tuple:
    """The error location up to the field, without the union-member tags pydantic appends ('int', "literal['auto']")."""
    section: Any = Spec
    for depth, key in enumerate(loc):
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            return loc[:depth] + tuple(k for k in loc[depth:] if isinstance(k, int))[:1]
        field = section.model_fields.get(key)
        if field is None:
            return loc[: depth + 1]
        section = _section_type(field.annotation)
    return loc


def _did_you_mean(loc: tuple) -> str:
    section: Any = Spec
    for key in loc[:-1]:
        field = section.model_fields.get(key) if isinstance(section, type) and issubclass(section, BaseModel) else None
        if field is None:
            return ""
        section = _section_type(field.annotation)
    if not (isinstance(section, type) and issubclass(section, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)
    return f"; did you mean {'.'.join(map(str, (*loc[:-1], close[0])))}?" if close else ""


def resolve(base: dict[str, Any], origin: str, overrides: list[tuple[str, str, str]]) -> Spec:
    data = json.loads(json.dumps(base))  # a deep copy that also rejects non-JSON YAML oddities early
    for dotted, raw, where in overrides:
        apply_override(data, dotted, raw, where)
    return validate(data, origin, {".".join(p for p in dotted.strip().split(".") if p): where for dotted, _, where in overrides})


def json_schema() -> dict[str, Any]:
    return Spec.model_json_schema()


def check_override(dotted: str, raw_value: str, where: str) -> None:
    """One override checked against its field alone (its name, type and bounds), for a spec that is not at hand
    here (an s3:// or https:// spec a remote machine will read): what can be said before anything is sent."""
    path = [p for p in dotted.strip().split(".") if p]
    section: Any = Spec
    for depth, key in enumerate(path):
        fields = section.model_fields if isinstance(section, type) and issubclass(section, BaseModel) else {}
        field = fields.get(key)
        if field is None:
            name = ".".join(path[: depth + 1])
            raise SpecError(f"{name}: unknown field{_did_you_mean(tuple(path[: depth + 1]))} [from {where}]",
                            hint="see `job schema` for every field")
        if depth == len(path) - 1:
            value = _parse_value(raw_value)
            try:
                typed = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
                TypeAdapter(typed).validate_python(value)
            except ValidationError as exc:
                message = " or ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in exc.errors()))
                shown = "" if dotted.strip() in SECRET_FIELDS else f" (got {value!r})"
                raise SpecError(f"{dotted.strip()}: {message}{shown} [from {where}]",
                                hint="see `job schema` for every field") from None
            return
        section = _section_type(field.annotation)
    raise SpecError(f"override {dotted!r} names no field", where=where)


def check_sendable(base: dict[str, Any] | None, origin: str, experiments: list[list[tuple[str, str, str]]], *,
                   base_travels: bool = True) -> list[Spec | None]:
    """What `job k8s render` and `job launch` send elsewhere, validated here as the run will validate it, before
    anything is printed or sent: each experiment's whole spec when its text is at hand (`base`), else each override
    against its field. A secret field never travels as a value: the target's secret mechanism carries it. The
    output must be remote: a machine's local disk goes with it. `base_travels`: the spec's text goes into what is sent
    (a ConfigMap), rather than being read by the target from its URI. Returns each experiment's resolved spec (None
    where the spec's text is not at hand)."""
    for dotted in SECRET_FIELDS if base_travels else ():
        section, _, name = dotted.partition(".")
        if isinstance((base or {}).get(section), dict) and base[section].get(name):
            raise SpecError(f"{dotted} must not be written into a manifest, task or launch request", where=origin,
                            hint="remove it from the spec and give the token as HF_TOKEN through the target's secrets: "
                                 "the hf-token Secret on Kubernetes (docs/deploy.md), --pass-env HF_TOKEN for launch")
    resolved: list[Spec | None] = []
    for overrides in experiments:
        for dotted, raw, where in overrides:
            if dotted.strip() in SECRET_FIELDS:
                raise SpecError(f"{dotted.strip()} must not be written into a manifest, task or launch request "
                                f"[from {where}]", hint="give the token as HF_TOKEN through the target's secrets: the "
                                "hf-token Secret on Kubernetes, --pass-env HF_TOKEN for launch targets")
            if base is None:
                check_override(dotted, raw, where)
        spec = resolve(base, origin, overrides) if base is not None else None
        given = [(_parse_value(raw), where) for dotted, raw, where in overrides if dotted.strip() == "run.output"]
        output, where = given[-1] if given else ("s3://", origin)
        if spec is not None:
            output = spec.run.output
        if not str(output).startswith("s3://"):
            raise SpecError(f"run.output {output!r} is a local path: on a remote machine the artifacts would vanish "
                            f"with it [from {where}]", hint="set run.output to s3://bucket/prefix")
        if spec is not None and spec.model.adapter and not spec.model.adapter.startswith("s3://"):
            raise SpecError(f"model.adapter {spec.model.adapter!r} is a local path, which the remote machine does not "
                            "have", where=origin, hint="chain from the parent run's folder in object storage: "
                            "s3://bucket/prefix/RUN_ID/")
        resolved.append(spec)
    return resolved
