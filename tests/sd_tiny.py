"""Tiny SD1.x / SD2.x / SDXL-shaped models for both backends (random weights, real CLIP tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch

from backdoor_seal.core.backends.comfy_families import TINY_UNET

# The diffusers families' names here; ComfyUI's tiny instances are core/backends/comfy_families' own.
COMFY_FAMILY = {"sd15": "sd15", "sd21": "sd20", "sdxl": "sdxl"}
COMFY_UNET: dict[str, dict] = {name: TINY_UNET[family] for name, family in COMFY_FAMILY.items()}


def comfy_model(family: str):
    """A tiny MODEL of ComfyUI's own class for the family (random weights)."""
    from backdoor_seal.core.backends import comfy_families

    return comfy_families.build_model(COMFY_FAMILY[family])


def comfy_conditioning(family: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Random cond / uncond contexts (77 tokens) and the extra conditioning the family needs."""
    g = torch.Generator().manual_seed(seed)
    dim = COMFY_UNET[family]["context_dim"]
    cond, uncond = torch.randn(batch, 77, dim, generator=g), torch.randn(batch, 77, dim, generator=g)
    extra = {"pooled_output": torch.randn(batch, 32, generator=g)} if family == "sdxl" else {}
    return cond, uncond, extra


def diffusers_backend(family: str, comfy_root: Path, seed: int = 0):
    """A DiffusersBackend with a tiny UNet and one (SD1/SD2) or two (SDXL) tiny CLIP text encoders."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from backdoor_seal.core.backends.diffusers import DiffusersBackend

    torch.manual_seed(seed)
    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=32,
    )
    if family == "sdxl":
        unet = UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
    else:
        unet = UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8 if family == "sd15" else (2, 4),
            use_linear_projection=family == "sd21",
        )
    text = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=32,
    )
    tokenizer = CLIPTokenizer.from_pretrained(comfy_root / "comfy" / "sd1_tokenizer")
    encoders = [CLIPTextModel(CLIPTextConfig(**text))]
    if family == "sdxl":
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**text)))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for module in [unet, *encoders]:
        module.eval()
    return DiffusersBackend(unet, encoders, [tokenizer] * len(encoders), scheduler)
