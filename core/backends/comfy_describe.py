"""Descriptions of a MODEL and CLIP for reports: family, prediction, layers, tokenizers."""

from __future__ import annotations

from typing import Any

from ..attention import find_cross_attention_layers


def describe_model(model, clip=None) -> dict[str, Any]:
    """UNet family, cross-attention layers found by walking the model, and the tokenizer in use."""
    base = model.model
    unet = getattr(base, "diffusion_model", None)
    layers = find_cross_attention_layers(unet) if unet is not None else []
    info: dict[str, Any] = {
        "unet_family": type(base.model_config).__name__,
        "model_class": type(base).__name__,
        "prediction": getattr(base.model_type, "name", str(base.model_type)),
        "unet_parameters": sum(p.numel() for p in unet.parameters()) if unet is not None else 0,
        "cross_attention_layers": len(layers),
        "cross_attention_layer_names": [n for n, _ in layers],
        "context_dim": int(layers[0][1].to_k.in_features) if layers else None,
    }
    if clip is not None:
        info["text_encoders"] = describe_tokenizers(clip)
    return info


def describe_tokenizers(clip) -> list[dict[str, Any]]:
    """Each text encoder's tokenizer: name, class and vocabulary size."""
    out = []
    for name, tok in vars(clip.tokenizer).items():
        inner = getattr(tok, "tokenizer", None)
        if inner is None or not hasattr(inner, "get_vocab"):
            continue
        out.append(
            {
                "name": name,
                "tokenizer": type(inner).__name__,
                "vocab_size": len(inner.get_vocab()),
                "max_length": getattr(tok, "max_length", None),
            }
        )
    return out
