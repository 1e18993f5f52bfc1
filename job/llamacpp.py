"""The pinned llama.cpp tools, built ahead of time: the converter, llama-quantize, llama-completion, llama-perplexity
(its KL-divergence mode), llama-tokenize, and the LoRA converter with llama-export-lora.

The image builds them at image build time (docker/Dockerfile); developer and CI machines build them once
into a cache with docker/build-llama-cpp.sh. Nothing is cloned or compiled while a job runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from job import log
from job.errors import JobError, OutOfResources, ToolMissingError, VerificationError

PINNED_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
SOURCE = "llama-cpp-python==0.3.36 sdist (vendor/llama.cpp)"
END_MARKER = "[end of text]"  # what llama-completion prints when generation hits an end-of-generation token


@dataclass
class Tools:
    home: Path
    commit: str

    @property
    def converter(self) -> Path:
        return self.home / "convert_hf_to_gguf.py"

    @property
    def quantize(self) -> Path:
        return self.home / "bin" / "llama-quantize"

    @property
    def completion(self) -> Path:
        return self.home / "bin" / "llama-completion"

    @property
    def perplexity(self) -> Path:
        return self.home / "bin" / "llama-perplexity"

    @property
    def tokenizer(self) -> Path:
        return self.home / "bin" / "llama-tokenize"

    @property
    def lora_converter(self) -> Path:
        return self.home / "convert_lora_to_gguf.py"

    @property
    def export_lora(self) -> Path:
        return self.home / "bin" / "llama-export-lora"


def locate(home: Path) -> Tools:
    tools = Tools(home, "")
    missing = [p for p in (tools.converter, tools.quantize, tools.completion, tools.perplexity, tools.tokenizer,
                           tools.lora_converter, tools.export_lora) if not p.exists()]
    if missing:
        raise ToolMissingError(
            f"llama.cpp tools not found in {home} (missing {', '.join(p.name for p in missing)})",
            hint=f"build them once: bash docker/build-llama-cpp.sh {home}  (needs cmake, g++, make), "
            "or set JOB_LLAMA_CPP_DIR to where they are",
        )
    commit_file = home / "COMMIT"
    tools.commit = commit_file.read_text().strip() if commit_file.exists() else "unknown"
    return tools


def text_architectures(tools: Tools) -> set[str]:
    """The Hugging Face architectures (config.json `architectures`) the pinned converter turns into a text GGUF:
    its own table, read in a child process so the converter's package never enters ours."""
    code = "import json; from conversion import TEXT_MODEL_MAP; print(json.dumps(sorted(TEXT_MODEL_MAP)))"
    env = dict(os.environ, PYTHONPATH=f"{tools.home}{os.pathsep}{tools.home / 'gguf-py'}")
    try:
        proc = run_tool([sys.executable, "-c", code], "reading the converter's architectures", env=env, timeout=300)
    except VerificationError as exc:
        raise ToolMissingError(f"the llama.cpp converter in {tools.home} does not load: {exc}",
                               hint=f"build the tools again: bash docker/build-llama-cpp.sh {tools.home}") from exc
    return set(json.loads(proc.stdout))


def cpu_threads(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a pod's limits.cpu), which
    os.cpu_count() does not see. llama.cpp with one thread per node core under an 8-CPU quota spends its time
    throttled, and a spinning thread that is descheduled stalls all the others."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return count


def run_tool(cmd: list[str], what: str, env: dict | None = None, timeout: int = 3 * 3600,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    started = time.monotonic()
    try:
        # llama-completion prints each token's raw bytes: text cut at the token limit may end inside a character.
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise VerificationError(f"{what} did not finish within {timeout} s") from exc
    log.get().debug("llamacpp.tool.finished", tool=what, seconds=round(time.monotonic() - started, 2),
                    exit_code=proc.returncode)
    if proc.returncode != 0:
        raise _failure(what, proc.returncode, (proc.stderr or proc.stdout)[-2000:])
    return proc


def _failure(what: str, returncode: int, tail: str) -> JobError:
    """What a failed llama.cpp tool means for the user: the pod's memory or disk, or the artifact itself."""
    if returncode == -signal.SIGKILL:
        # A SIGKILL nobody sent by hand is the kernel's out-of-memory killer at the container's memory limit:
        # the converter and llama-quantize hold whole tensors of the merged model in host memory.
        return OutOfResources(f"{what} was killed (SIGKILL), most likely at the container's memory limit",
                              hint="give the container more memory (resources.limits.memory on Kubernetes)")
    if "no space left on device" in tail.lower():
        return OutOfResources(f"{what} ran out of disk space: {tail}",
                              hint="give the scratch volume more space: it holds the merged 16-bit weights (2 bytes "
                                   "a parameter) and each GGUF file")
    return VerificationError(f"{what} failed with exit code {returncode}: {tail}")


def convert(tools: Tools, checkpoint: Path, out_file: Path, outtype: str = "bf16", vocab_only: bool = False) -> None:
    env = dict(os.environ, PYTHONPATH=str(tools.home / "gguf-py"), NO_LOCAL_GGUF="")
    run_tool([sys.executable, str(tools.converter), str(checkpoint), "--outfile", str(out_file), "--outtype", outtype,
          *(["--vocab-only"] if vocab_only else [])], "convert_hf_to_gguf.py", env=env)


def convert_lora(tools: Tools, adapter_dir: Path, base_dir: Path, out_file: Path) -> None:
    """A PEFT LoRA adapter as a GGUF adapter; `base_dir` gives the base's config.json (no weights are read)."""
    env = dict(os.environ, PYTHONPATH=str(tools.home / "gguf-py"), NO_LOCAL_GGUF="")
    run_tool([sys.executable, str(tools.lora_converter), str(adapter_dir), "--base", str(base_dir), "--outfile",
              str(out_file), "--outtype", "f32"], "convert_lora_to_gguf.py", env=env)


def export_lora(tools: Tools, base: Path, lora: Path, out_file: Path, threads: int, scale: float = 1.0) -> None:
    """`lora` merged into `base` with llama.cpp's alpha / r times `scale`; run beside the adapter, which is named
    relative to it (--lora-scaled splits its value at ':' and ',')."""
    run_tool([str(tools.export_lora), "-m", str(base.resolve()), "--lora-scaled", f"{lora.name}:{scale!r}",
              "-o", str(out_file.resolve()), "-t", str(threads)], "llama-export-lora", cwd=lora.parent)


def quantize(tools: Tools, source: Path, target: Path, qtype: str, threads: int) -> None:
    run_tool([str(tools.quantize), str(source), str(target), qtype.upper(), str(threads)], f"llama-quantize {qtype}")


def complete(tools: Tools, gguf: Path, prompt: str, max_tokens: int, threads: int) -> tuple[str, bool]:
    """Greedy completion of an already templated prompt: the generated text, and whether it ended with an
    end-of-generation token (else it ran into max_tokens)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as fh:
        fh.write(prompt)
        prompt_file = fh.name
    try:
        proc = run_tool(
            [str(tools.completion), "-m", str(gguf), "-f", prompt_file, "-n", str(max_tokens), "--temp", "0",
             "--top-k", "1", "-s", "0", "-no-cnv", "--no-display-prompt", "--simple-io", "--no-warmup",
             "-c", "4096", "-t", str(threads), "--no-perf"],
            f"llama-completion on {gguf.name}", timeout=1800,
        )
    finally:
        os.unlink(prompt_file)
    text = proc.stdout.strip()
    return text.removesuffix(END_MARKER).rstrip(), text.endswith(END_MARKER)


def tokenize(tools: Tools, gguf: Path, text: str) -> list[int]:
    """The token ids llama.cpp gives a text, special tokens parsed, no BOS added (the text carries what it needs)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as fh:
        fh.write(text)
        text_file = fh.name
    try:
        proc = run_tool([str(tools.tokenizer), "-m", str(gguf), "-f", text_file, "--ids", "--no-bos", "--no-escape",
                     "--log-disable"], f"llama-tokenize on {gguf.name}", timeout=600)
    finally:
        os.unlink(text_file)
    return json.loads(proc.stdout.strip().splitlines()[-1])


_KLD_LINES = {
    "mean_kld": re.compile(r"^Mean\s+KLD:\s*(\S+)", re.M),
    "max_kld": re.compile(r"^Maximum KLD:\s*(\S+)", re.M),
    "p99_kld": re.compile(r"^99\.0%\s+KLD:\s*(\S+)", re.M),
    "same_top_rate": re.compile(r"^Same top p:\s*(\S+)", re.M),
}


def kl_divergence(tools: Tools, gguf: Path, base: Path, window: int, threads: int) -> dict[str, float]:
    """llama-perplexity's KL-divergence mode: the GGUF scored on the tokens of a reference file (verify.write_kld_base)
    against the reference's log-probabilities. Its summary, as numbers (NaN where the model produced NaN)."""
    proc = run_tool([str(tools.perplexity), "-m", str(gguf), "--kl-divergence-base", str(base), "--kl-divergence",
                 "-c", str(window), "-b", str(max(window, 2048)), "-t", str(threads)],
                f"llama-perplexity --kl-divergence on {gguf.name}", timeout=3 * 3600)
    text = proc.stdout + proc.stderr
    figures = {}
    for name, pattern in _KLD_LINES.items():
        found = pattern.search(text)
        if not found:
            raise VerificationError(f"llama-perplexity on {gguf.name} printed no {name}: {text[-1500:]}")
        figures[name] = float(found.group(1))
    figures["same_top_rate"] /= 100
    return figures


def gguf_metadata(path: Path) -> dict:
    """A GGUF's header keys: scalars and strings as values, arrays as their lengths. Read straight from the header with
    gguf-py's type table: its GGUFReader turns every element of every array (a vocabulary's 50,000-250,000 strings and
    merges) into numpy views, 7 s for SmolLM2's vocabulary on two cores, where skipping them takes milliseconds."""
    return {key: value for key, value, _raw in _header_entries(path)}


def tokenizer_digest(path: Path) -> str:
    """sha256 of the GGUF's tokenizer.* keys and values as stored: two GGUFs with one digest tokenize alike in
    llama.cpp (llama-quantize copies the converter's tokenizer unchanged into every quant)."""
    import hashlib

    digest = hashlib.sha256()
    for key, _value, raw in _header_entries(path):
        if key.startswith("tokenizer."):
            digest.update(raw)
    return digest.hexdigest()


def _header_entries(path: Path):
    """(key, value, the entry's raw bytes) for each key of a GGUF header; arrays' values are their lengths."""
    import mmap

    from gguf import GGUFValueType

    scalars = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
               GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
               GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise VerificationError(f"{path.name} is not a GGUF file (no GGUF magic)")
        offset = 8  # magic, version
        _n_tensors, n_kv = struct.unpack_from("<QQ", data, offset)
        offset += 16

        def string(at: int) -> tuple[str, int]:
            (length,) = struct.unpack_from("<Q", data, at)
            return data[at + 8:at + 8 + length].decode("utf-8", errors="replace"), at + 8 + length

        for _ in range(n_kv):
            entry = offset
            key, offset = string(offset)
            (kind,) = struct.unpack_from("<I", data, offset)
            offset += 4
            if kind == GGUFValueType.STRING:
                value, offset = string(offset)
            elif kind == GGUFValueType.ARRAY:
                item, count = struct.unpack_from("<IQ", data, offset)
                offset += 12
                if item == GGUFValueType.STRING:
                    for _ in range(count):
                        offset += 8 + struct.unpack_from("<Q", data, offset)[0]
                elif item in scalars:
                    offset += count * struct.calcsize(scalars[item])
                else:
                    raise VerificationError(f"{path.name}: key {key} holds arrays of arrays, which job does not read")
                value = count
            else:
                (value,) = struct.unpack_from("<" + scalars[GGUFValueType(kind)], data, offset)
                offset += struct.calcsize(scalars[GGUFValueType(kind)])
            yield key, value, data[entry:offset]
