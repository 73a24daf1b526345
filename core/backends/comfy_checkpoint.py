"""Single-file checkpoints on ComfyUI: load one (safetensors only) and build the state dict to save one."""

from __future__ import annotations

import json
import os

import torch

from ..safetensors_io import CONFIG_KEY, read_metadata
from .comfy import ensure_comfy_importable
from .comfy_lab import lab_config_of, lab_state_dict


def merged_checkpoint_state_dict(model, clip, vae) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The single-file state dict of MODEL/CLIP/VAE with every patch (LoRA) merged, as CheckpointSave
    builds it, and the metadata it needs (a lab model stays a lab checkpoint: its config travels along)."""
    ensure_comfy_importable()
    import comfy.model_management as mm

    lab_config = lab_config_of(model)
    if lab_config is not None:
        mm.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
        tensors = {
            k: v.to(torch.float16) if v.is_floating_point() else v
            for k, v in lab_state_dict(model, clip, vae).items()
        }
        return tensors, {CONFIG_KEY: json.dumps(lab_config)}
    # The patches (the LoRA) are merged into the weights by loading; only then are the weights read.
    mm.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    sd = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    return {k: v.contiguous() for k, v in sd.items()}, {}


def load_single_file_checkpoint(path: str | os.PathLike):
    """MODEL, CLIP, VAE of a single-file SD checkpoint (.safetensors only: nothing is unpickled)."""
    ensure_comfy_importable()
    import comfy.sd

    read_metadata(path)  # a pickle, a folder or a corrupt file gets its one-line error here
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True
        )
    except RuntimeError as e:
        if "Could not detect model type" not in str(e):
            raise
        raise ValueError(
            f"{path}: ComfyUI recognises no model in this file (backdoor-seal reads single-file SD1.x, SD2.x "
            "and SDXL checkpoints)"
        ) from None
    if model is None:
        raise ValueError(f"{path}: holds no diffusion model (a LoRA, VAE or text-encoder file?)")
    if clip is None:
        raise ValueError(f"{path} holds no text encoder; backdoor-seal needs a full single-file checkpoint")
    return model, clip, vae
