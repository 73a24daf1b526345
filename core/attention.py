"""Cross-attention discovery (and, later, capture) for SD-family UNets."""

from __future__ import annotations

import torch


def is_cross_attention(name: str, module: torch.nn.Module) -> bool:
    """True for a text-conditioned attention layer (attn2 in ComfyUI's and diffusers' blocks)."""
    if getattr(module, "is_cross_attention", False):  # diffusers.Attention
        return True
    has_qkv = all(hasattr(module, p) for p in ("to_q", "to_k", "to_v"))
    return has_qkv and name.rsplit(".", 1)[-1] == "attn2"


def find_cross_attention_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every cross-attention layer of a UNet, in forward (module registration) order."""
    return [(n, m) for n, m in model.named_modules() if is_cross_attention(n, m)]


class UnsupportedModelError(ValueError):
    """The model has no cross-attention layers this engine can read."""


def require_cross_attention(
    model: torch.nn.Module, family: str = "this model"
) -> list[tuple[str, torch.nn.Module]]:
    """The cross-attention layers, or a clear error naming the supported families."""
    layers = find_cross_attention_layers(model)
    if not layers:
        raise UnsupportedModelError(
            f"{family} has no cross-attention (attn2) layers. backdoor-seal supports UNet models that "
            "condition on text through cross-attention (SD1.x, SD2.x, SDXL); DiT/MMDiT families "
            "(SD3, Flux) are not supported."
        )
    return layers
