"""Atomic, non-overwriting, safetensors-only checkpoint I/O."""

from __future__ import annotations

import pytest
import torch

from backdoor_seal.core.safetensors_io import atomic_save, load_checkpoint, read_metadata


def test_roundtrip_with_metadata(tmp_path):
    path = atomic_save({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "a.safetensors", {"k": "v"})
    tensors, info = load_checkpoint(path)
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3))
    assert info["metadata"]["k"] == "v"
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary left behind


def test_never_overwrites(tmp_path):
    path = atomic_save({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="never overwrites"):
        atomic_save({"w": torch.ones(2)}, path)
    assert path.read_bytes() == before


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 (any failure must clean up)
        atomic_save({"w": "not a tensor"}, tmp_path / "bad.safetensors")  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_refuses_pickled_checkpoints(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="only .safetensors"):
        read_metadata(bad)
