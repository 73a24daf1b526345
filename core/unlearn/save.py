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


LORA_LAYOUTS = ("kohya", "comfy")
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save_sanitized(
    prefix: str | os.PathLike,
    model=None,
    clip=None,
    vae=None,
    lora: dict[str, torch.Tensor] | None = None,
    provenance: dict[str, Any] | None = None,
    dtype: torch.dtype | dict[str, torch.dtype] | None = None,
) -> Path:
    """Save a full checkpoint (model, clip, vae) or a LoRA (kohya layout) with provenance; returns the path.

    dtype: the checkpoint's storage dtype, one for all or one per component ('unet', 'text', 'vae');
    None keeps what the weights are held in. The file carries what ComfyUI's CheckpointSave writes
    (modelspec metadata, v_pred / ztsnr markers) beside the provenance key."""
    meta = {PROVENANCE_KEY: json.dumps(provenance or {}, sort_keys=True)}
    if model is not None:
        from ..backends.comfy_checkpoint import merged_checkpoint_state_dict

        path = free_path(prefix)
        tensors, extra = merged_checkpoint_state_dict(model, clip, vae, dtype=dtype, title=path.stem)
        return atomic_save(tensors, path, metadata=extra | meta)
    if lora is None:
        raise ValueError("nothing to save")
    return save_lora(prefix, lora, provenance=provenance)


def save_lora(
    prefix: str | os.PathLike,
    lora: dict[str, torch.Tensor],
    model=None,
    clip=None,
    provenance: dict[str, Any] | None = None,
    layout: str = "kohya",
) -> Path:
    """Save a LoRA: `kohya` (lora_unet_* / lora_te*_* with ss_* and modelspec metadata: A1111, Forge, kohya
    and diffusers read it) or `comfy` (the engine's ComfyUI key names). With the MODEL (and CLIP) it
    belongs to, every kohya name is checked against ComfyUI's key maps and conv LoRAs get 4-D shapes;
    without, names follow the layout's rows and the family is read from the text keys."""
    if layout not in LORA_LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; one of {', '.join(LORA_LAYOUTS)}")
    path = free_path(prefix, "_lora")
    if path.exists():  # before any conversion: an existing file is never replaced
        raise FileExistsError(
            f"{path} already exists; choose another name (backdoor-seal never overwrites files)."
        )
    meta = {PROVENANCE_KEY: json.dumps(provenance or {}, sort_keys=True)}
    tensors = dict(lora)
    if layout == "kohya":
        if model is not None:
            from ..backends.comfy_train import kohya_lora

            tensors, extra = kohya_lora(model, clip, tensors, title=path.stem)
        else:
            from ..backends.lora_layout import family_of_lora, kohya_metadata, to_kohya

            family = family_of_lora(tensors)
            tensors = to_kohya(tensors, family or "sd15")  # UNet names stay ldm paths without the MODEL
            extra = kohya_metadata(tensors, family, title=path.stem)
        meta = extra | meta
    return atomic_save(tensors, path, metadata=meta)
