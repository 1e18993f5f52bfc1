"""Rebuilds the two crafted GGUF fixtures (a few hundred bytes each, committed next to this script).

unknown-architecture.gguf: a valid GGUF whose general.architecture is one no library knows.
unknown-tensor-type.gguf: a valid llama GGUF whose only tensor claims ggml type 200, which does not exist.
"""

from pathlib import Path

import gguf
import numpy as np

HERE = Path(__file__).resolve().parent


def write(path: Path, arch: str) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def set_tensor_type(path: Path, name: bytes, ggml_type: int) -> None:
    # Tensor info: name, n_dims (u32), n_dims dimensions (u64 each), type (u32), offset (u64).
    raw = bytearray(path.read_bytes())
    at = raw.index(name) + len(name)
    n_dims = int.from_bytes(raw[at : at + 4], "little")
    at += 4 + 8 * n_dims
    raw[at : at + 4] = ggml_type.to_bytes(4, "little")
    path.write_bytes(bytes(raw))


if __name__ == "__main__":
    write(HERE / "unknown-architecture.gguf", "frobnicator")
    write(HERE / "unknown-tensor-type.gguf", "llama")
    set_tensor_type(HERE / "unknown-tensor-type.gguf", b"token_embd.weight", 200)
