"""Which checkpoint a restart picks, and which it refuses."""

import json

import pytest

from job import checkpoint
from job.errors import SpecError, TransientError
from job.storage import LocalStorage


def write_checkpoint(tmp_path, store, step, *, record=True, meta=None):
    folder = tmp_path / f"local-{step}"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights %d" % step)
    (folder / "optimizer.pt").write_bytes(b"optimizer %d" % step)
    checkpoint.upload(store, "r", folder, step, meta or {"fingerprint": "f", "world_size": 1})
    if not record:
        store.delete(f"r/checkpoints/step-{step:08d}/{checkpoint.RECORD}")


def test_latest_skips_a_checkpoint_whose_record_was_never_written(tmp_path):
    store = LocalStorage(str(tmp_path / "out"))
    write_checkpoint(tmp_path, store, 2)
    # A later checkpoint cut off before its record: its files are there, but it must not be picked.
    folder = tmp_path / "out" / "r" / "checkpoints" / "step-00000004"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"half")
    assert checkpoint.latest(store, "r").step == 2


def test_a_new_checkpoint_replaces_the_older_ones(tmp_path):
    store = LocalStorage(str(tmp_path / "out"))
    write_checkpoint(tmp_path, store, 2)
    write_checkpoint(tmp_path, store, 4)
    assert [c.step for c in checkpoint.complete(store, "r")] == [4]
    assert not [k for k in store.list("r/checkpoints/") if "step-00000002" in k]


def test_download_verifies_every_file(tmp_path):
    store = LocalStorage(str(tmp_path / "out"))
    write_checkpoint(tmp_path, store, 2)
    latest = checkpoint.latest(store, "r")
    got = checkpoint.download(store, latest, tmp_path / "got")
    assert (got / "optimizer.pt").read_bytes() == b"optimizer 2"
    (tmp_path / "out" / "r" / "checkpoints" / "step-00000002" / "optimizer.pt").write_bytes(b"bit rot")
    with pytest.raises(TransientError, match="sha256"):
        checkpoint.download(store, latest, tmp_path / "again")


def test_a_checkpoint_of_another_spec_or_world_size_is_refused(tmp_path):
    store = LocalStorage(str(tmp_path / "out"))
    write_checkpoint(tmp_path, store, 2, meta={"fingerprint": "f", "world_size": 2})
    latest = checkpoint.latest(store, "r")
    checkpoint.check_compatible(latest, "f", 2)
    with pytest.raises(SpecError, match="different spec"):
        checkpoint.check_compatible(latest, "g", 2)
    with pytest.raises(SpecError, match="2 process"):
        checkpoint.check_compatible(latest, "f", 1)
    assert json.loads(store.read_bytes("r/checkpoints/step-00000002/checkpoint.json"))["step"] == 2
