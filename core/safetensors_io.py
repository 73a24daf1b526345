"""Safe, atomic file I/O: safetensors (never a pickle) and JSON; never overwrite, never leave half a file."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

CONFIG_KEY = "backdoor_seal.config"


class CastOnRead(Mapping):
    """A read-only view of a state dict whose tensors are converted when read (for write_streamed).

    describe(key, tensor) -> (dtype, shape), optional: what cast will return, without computing it
    (write_streamed's header pass then converts nothing)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], cast, describe=None) -> None:
        self._tensors, self._cast, self._describe = tensors, cast, describe

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._cast(key, self._tensors[key])

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of what reading `key` gives."""
        if self._describe is None:
            t = self[key]
            return t.dtype, tuple(t.shape)
        return self._describe(key, self._tensors[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_streamed(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Write the safetensors format one tensor at a time (spec: huggingface/safetensors README, "Format").

    safetensors' save_file needs every tensor in memory in its stored dtype at once; a checkpoint held
    in fp32 and stored in fp16 would then need both (SDXL on a CPU: 14 GB + 7 GB). With a Mapping that
    casts on read, only one converted tensor exists at a time. Reading it back is the library's job."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset, names = 0, sorted(tensors)
    spec = getattr(tensors, "spec", None)
    for name in names:  # a first pass for shapes and dtypes only
        if spec is not None:
            dtype, shape = spec(name)
        else:
            t = tensors[name]
            dtype, shape = t.dtype, tuple(t.shape)
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the library pads it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            t = tensors[name]
            if _DTYPES[t.dtype] != header[name]["dtype"] or list(t.shape) != header[name]["shape"]:
                raise RuntimeError(f"{name}: read as {t.dtype} {tuple(t.shape)}, not as its header says")
            t = t.detach().cpu().contiguous().reshape(-1)
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def atomic_save(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a safetensors file via a temporary file and rename; refuse to replace an existing file. A dict
    is written by the library; any other Mapping (one that casts on read) is written tensor by tensor."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; choose another name (backdoor-seal never overwrites files)."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if isinstance(tensors, dict):
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        else:
            write_streamed(tensors, tmp, metadata)
        # mkstemp creates 0600 and save_file may recreate the file: set an ordinary file's mode after.
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if another writer created the file meanwhile
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (no tensors are read).

    Raises FileNotFoundError for a missing file and ValueError (one line, naming the file) for anything
    that is not a readable .safetensors file: a pickle, a folder, a truncated or corrupt header."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path.name}: only .safetensors files are loaded (pickled checkpoints can run code)."
        )
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and the decoded backdoor-seal config (empty dict when absent) of a safetensors file."""
    meta = read_metadata(path)
    try:
        config = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else {}
        return load_file(str(path)), {"config": config, "metadata": meta}
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json(path: str | os.PathLike, data: dict, overwrite: bool = False) -> Path:
    """Write JSON atomically; an existing file is refused unless overwrite (then replaced only once complete)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: give a new name (nothing is overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is an ordinary file
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the name appeared meanwhile
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
