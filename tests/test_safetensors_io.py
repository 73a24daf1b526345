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


def test_a_mapping_that_casts_on_read_is_written_tensor_by_tensor_in_the_librarys_format(tmp_path):
    """Checkpoints are cast to their storage dtype while written (no second copy of every weight); the
    file is the safetensors format the library reads back, every dtype and shape kept."""
    from safetensors import safe_open

    from backdoor_seal.core.safetensors_io import CastOnRead, atomic_save

    g = torch.Generator().manual_seed(0)
    source = {
        "w": torch.randn(3, 5, generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(7),
        "b": torch.randn(4, generator=g).to(torch.bfloat16),
        "flag": torch.tensor([True, False]),
    }
    reads = []

    def cast(key, t):
        reads.append(key)
        return t.to(torch.float16) if t.dtype == torch.float32 else t

    path = atomic_save(CastOnRead(source, cast), tmp_path / "x.safetensors", metadata={"k": "v"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}
        assert set(f.keys()) == set(source)
        for key, t in source.items():
            got = f.get_tensor(key)
            assert torch.equal(got, cast(key, t)) and got.dtype == cast(key, t).dtype


def test_a_described_mapping_is_cast_once_per_tensor_and_refused_when_its_description_is_wrong(tmp_path):
    """With describe, the header pass converts nothing (a merge is computed once per tensor, when written);
    a tensor read otherwise than described is refused and no file is left."""
    from safetensors.torch import load_file

    from backdoor_seal.core.safetensors_io import CastOnRead, atomic_save

    source = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    reads = []

    def cast(key, t):
        reads.append(key)
        return t.half()

    described = CastOnRead(source, cast, lambda k, t: (torch.float16, tuple(t.shape)))
    path = atomic_save(described, tmp_path / "x.safetensors")
    assert sorted(reads) == ["a", "b"]
    assert all(torch.equal(v, source[k].half()) for k, v in load_file(str(path)).items())
    wrong = CastOnRead(source, cast, lambda k, t: (torch.float32, tuple(t.shape)))
    with pytest.raises(RuntimeError, match="not as its header says"):
        atomic_save(wrong, tmp_path / "y.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
