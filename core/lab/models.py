"""The lab model family: a tiny SD-shaped UNet, CLIP-style text encoder and VAE (configs only)."""

from __future__ import annotations

import copy
from typing import Any

from ..backends.comfy_lab import LAB_FAMILY

# 64x64 RGB images, 8x8x4 latents (1/8, as in SD). Cross-attention at both UNet levels and the middle.
LAB_UNET_CONFIG: dict[str, Any] = {
    "image_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 64,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1],
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "legacy": False,
    "context_dim": 64,
    "num_heads": -1,
    "num_head_channels": 32,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "use_checkpoint": False,
}

# The real CLIP BPE vocabulary (49,408 tokens) with a small transformer.
LAB_TEXT_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "projection_dim": 64,
}

LAB_VAE_CONFIG: dict[str, Any] = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 64,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 1, 2, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
}

# Latents are used unscaled: the lab VAE is trained to give roughly unit-variance latents.
LAB_LATENT_SCALE = 1.0
IMAGE_SIZE = 64


def lab_config() -> dict[str, Any]:
    """A fresh copy of the whole lab model config, as stored in checkpoint metadata."""
    return {
        "family": LAB_FAMILY,
        "unet": copy.deepcopy(LAB_UNET_CONFIG),
        "text": copy.deepcopy(LAB_TEXT_CONFIG),
        "vae": copy.deepcopy(LAB_VAE_CONFIG),
        "latent_scale": LAB_LATENT_SCALE,
        "image_size": IMAGE_SIZE,
    }


def lab_config_with_scale(latent_scale: float) -> dict[str, Any]:
    """The lab config with a measured latent scale (unit-variance latents for the UNet)."""
    config = lab_config()
    config["latent_scale"] = float(latent_scale)
    return config
