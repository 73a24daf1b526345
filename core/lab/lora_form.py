"""The lab's attacks as LoRA files, the form users download most.

An attacked lab model's change against its base is extracted as a LoRA of a fixed rank by SVD per weight
(LyCORIS's `lycoris.utils.extract_linear` / `extract_conv`, the method of kohya's
networks/extract_lora_from_models.py), written in the kohya layout users share, and measured again: a
LoRA keeps only what its layout and rank can carry (no 1-D weights, no text-encoder embeddings in the
kohya layout), so its attack success is its own figure, not the checkpoint's.

LoRA files live in `lab_models/loras/`; each names its base by file name, and the base is looked up only
among the shipped lab models, with the hash it was extracted against.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from . import zoo

LORA_DIR = zoo.LAB_MODELS / "loras"


def extract_lora(
    pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]], addressable: dict[str, str], rank: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The change from base to suspect as an engine-layout LoRA (ComfyUI key names: `<module>.lora_up.weight`
    (out, r), `.lora_down.weight` (r, in*kh*kw), `.alpha` = r) of rank `rank` per changed weight matrix.

    pairs: (live-weight key, base, suspect) as the backends' `weight_pairs` yields them; addressable: live
    key -> engine module name for every weight the target layout can hold (`lora_addressable`). A weight
    whose change needs half its output width or more is stored whole as `.diff` (LyCORIS's "full").
    Returns the LoRA and what it kept: per-tensor kept energy (1 - |residual|^2 / |change|^2) and the
    changed weights it cannot carry."""
    try:
        from lycoris.utils import extract_conv, extract_linear
    except ImportError as e:
        raise ImportError(
            "LoRA extraction needs LyCORIS: pip install 'backdoor-seal[lab]' (lycoris-lora)"
        ) from e

    if rank < 1:
        raise ValueError(f"rank must be 1 or more, got {rank}")
    lora: dict[str, torch.Tensor] = {}
    kept: dict[str, float] = {}
    dropped: list[str] = []
    for key, b, s in pairs:
        if b is s:
            continue
        d = s.detach().float() - b.detach().float()
        if not bool(d.any()):
            continue
        module = addressable.get(key)
        if module is None or d.ndim not in (2, 4):
            dropped.append(key)
            continue
        extract = extract_linear if d.ndim == 2 else extract_conv
        parts, mode = extract(d, "fixed", rank)
        if mode == "full":
            lora[f"{module}.diff"] = d
            kept[key] = 1.0
            continue
        down, up, residual = parts
        r = down.shape[0]
        lora[f"{module}.lora_up.weight"] = up.reshape(up.shape[0], r).contiguous()
        lora[f"{module}.lora_down.weight"] = down.reshape(r, -1).contiguous()
        lora[f"{module}.alpha"] = torch.tensor(float(r))
        kept[key] = 1.0 - float(residual.norm() ** 2 / d.norm() ** 2)
    if not lora:
        raise ValueError("the two models do not differ in any weight a LoRA can hold")
    return lora, {
        "rank": rank,
        "tensors": len(kept),
        "kept_energy_min": round(min(kept.values()), 4),
        "kept_energy_mean": round(sum(kept.values()) / len(kept), 4),
        "dropped": dropped,
    }


def lora_info(path: str | os.PathLike) -> dict[str, Any]:
    """The lab record of a lab LoRA file (attack, trigger, base, rank, measured figures); {} if none."""
    return zoo.lab_info(path)


def resolve_base(info: dict[str, Any], folder: str | os.PathLike = zoo.LAB_MODELS) -> Path:
    """The shipped lab model a lab LoRA was extracted from: by file name among the lab models only (a
    file's metadata never names a path), and only if its hash is the one recorded."""
    from ..safetensors_io import file_sha256

    name = str(info.get("base", ""))
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"the LoRA's base {name!r} is not the file name of a shipped lab model")
    base = Path(folder) / name
    if not base.is_file():
        raise FileNotFoundError(f"the LoRA's base {name} is not among the lab models in {folder}")
    if file_sha256(base) != info.get("base_sha256"):
        raise ValueError(f"the lab model {name} has changed since the LoRA was extracted from it")
    return base


def load_lab_lora(lora: str | os.PathLike):
    """A lab LoRA on the base it names, loaded as the stock LoraLoader loads it: (MODEL, CLIP, VAE, path,
    lab record). Raises ValueError for a file that is not a lab LoRA."""
    from ..backends import comfy_lab as cb
    from ..backends.comfy_train import apply_lora
    from ..safetensors_io import load_checkpoint

    path = Path(lora)
    if path.suffix != ".safetensors" or not path.is_file():
        raise FileNotFoundError(f"{path}: no such .safetensors file (only safetensors LoRAs are read)")
    info = lora_info(path)
    if info.get("form") != "lora":
        raise ValueError(
            f"{path.name}: not a lab LoRA (no lab record with form 'lora'; see `lab extract-lora`)"
        )
    model, clip, vae, _ = cb.load_lab_checkpoint(resolve_base(info))
    model, clip = apply_lora(model, clip, load_checkpoint(path)[0])
    return model, clip, vae, path, info


def lab_record(source_info: dict[str, Any], base: Path, stats: dict[str, Any], source: str) -> str:
    """The LoRA file's lab record (JSON): the attack it carries, its base, its rank and what it kept."""
    from ..safetensors_io import file_sha256

    record = {k: source_info[k] for k in ("attack", "trigger", "target", "spec") if k in source_info}
    record.update(
        {
            "form": "lora",
            "source": source,
            "base": base.name,
            "base_sha256": file_sha256(base),
            **{k: v for k, v in stats.items() if k != "dropped"},
            "dropped_tensors": len(stats["dropped"]),
        }
    )
    return json.dumps(record)
