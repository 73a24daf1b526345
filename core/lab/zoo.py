"""The shipped lab models: find them by name, read what each carries, and write the manifest."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..safetensors_io import read_metadata
from ..triggers import spell_trigger, trigger_names

LAB_INFO_KEY = "backdoor_seal.lab"
LAB_MODELS = Path(__file__).resolve().parents[2] / "lab_models"
MANIFEST = "manifest.json"
CLEAN_NAME = "lab-clean"


def lab_info(path: str | os.PathLike) -> dict[str, Any]:
    """The lab record in a checkpoint's metadata (attack, trigger, measured figures); {} if none."""
    meta = read_metadata(path)
    return json.loads(meta[LAB_INFO_KEY]) if LAB_INFO_KEY in meta else {}


def shipped(folder: str | os.PathLike = LAB_MODELS) -> list[Path]:
    """Lab checkpoints in a folder, clean model first."""
    files = sorted(Path(folder).glob("*.safetensors"))
    return sorted(files, key=lambda p: (p.stem != CLEAN_NAME, p.stem))


def resolve(name: str, folder: str | os.PathLike = LAB_MODELS) -> Path:
    """A shipped model's file from its name, `lab:NAME` as every command spells it (or a path to any lab
    checkpoint)."""
    name = name.removeprefix("lab:")
    as_path = Path(name)
    if as_path.suffix == ".safetensors" and as_path.is_file():
        return as_path
    candidate = Path(folder) / f"{name.removesuffix('.safetensors')}.safetensors"
    if candidate.is_file():
        return candidate
    names = ", ".join(p.stem for p in shipped(folder)) or "none"
    raise FileNotFoundError(f"no lab model named {name!r}; shipped: {names} (or give a .safetensors path)")


def listing(folder: str | os.PathLike = LAB_MODELS) -> list[dict[str, Any]]:
    """One {"name", "attack", "trigger"} per lab checkpoint in the folder."""
    out = []
    for path in shipped(folder):
        info = lab_info(path)
        if info:
            out.append(
                {"name": path.stem, "attack": info.get("attack", "none"), "trigger": info.get("trigger")}
            )
    return out


def write_manifest(folder: str | os.PathLike = LAB_MODELS) -> Path:
    """Rewrite manifest.json from the checkpoints' own metadata (the single source of truth), atomically."""
    folder = Path(folder)
    entries = []
    for path in shipped(folder):
        info = lab_info(path)
        if not info:
            continue
        entry = {"name": path.stem, "file": path.name, "bytes": path.stat().st_size}
        entry.update(info)
        if info.get("trigger") is not None:
            entry["trigger_spelled"] = spell_trigger(info["trigger"])
            entry["trigger_unicode_names"] = trigger_names(info["trigger"])
        entries.append(entry)
    text = json.dumps({"models": entries}, indent=2, ensure_ascii=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, folder / MANIFEST)  # the manifest is derived data, so replacing it loses nothing
    return folder / MANIFEST
