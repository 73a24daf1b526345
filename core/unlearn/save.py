"""Saving sanitized checkpoints and LoRAs: safetensors, atomic, never over an existing file."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..safetensors_io import atomic_save

PROVENANCE_KEY = "backdoor_seal.sanitized"


def free_path(prefix: str | os.PathLike, suffix: str = "") -> Path:
    """prefix.safetensors if given so and free; else the first free prefix{suffix}_NNNNN.safetensors."""
    prefix = Path(prefix)
    if prefix.suffix == ".safetensors":
        return prefix  # an explicit name: atomic_save refuses it if it exists
    parent, stem = prefix.parent, prefix.name + suffix
    parent.mkdir(parents=True, exist_ok=True)
    taken = [
        int(m.group(1))
        for p in parent.glob(f"{stem}_*.safetensors")
        if (m := re.search(r"_(\d{5})\.safetensors$", p.name))
    ]
    return parent / f"{stem}_{max(taken, default=0) + 1:05d}.safetensors"


def save_sanitized(
    prefix: str | os.PathLike,
    model=None,
    clip=None,
    vae=None,
    lora: dict[str, torch.Tensor] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Save a full checkpoint (model, clip, vae) or a LoRA with provenance metadata; returns the path."""
    meta = {PROVENANCE_KEY: json.dumps(provenance or {}, sort_keys=True)}
    if model is not None:
        from ..backends.comfy_checkpoint import merged_checkpoint_state_dict

        tensors, extra = merged_checkpoint_state_dict(model, clip, vae)
        meta.update(extra)
        return atomic_save(tensors, free_path(prefix), metadata=meta)
    if lora is None:
        raise ValueError("nothing to save")
    return atomic_save(dict(lora), free_path(prefix, "_lora"), metadata=meta)
