"""Random-weight instances of the SD families users hold (SD1.x, SD2.x, SDXL), built with ComfyUI's classes.

`full` is the real architecture (the UNet configs ComfyUI's model detection lists, the text encoders'
own configs): timings, memory, key names and files are real, the images are noise. `tiny` runs the
same classes and code paths with small channels (the text encoders through ComfyUI's own
`<encoder>_model_config` overrides) in seconds, for tests. Nothing here stands in for a real
checkpoint in a figure of quality: real checkpoints are the user's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .comfy import ensure_comfy_importable, initialise_weights

FAMILIES = ("sd15", "sd20", "sdxl")
SIZES = ("tiny", "full")
PREDICTIONS = ("eps", "v")

_UNET_COMMON: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

# comfy/model_detection.py's configs of the real families (SD2.x is SD1.x's UNet with linear
# projections, OpenCLIP-H's 1024-wide context and 64-channel heads).
_SD1_FULL: dict[str, Any] = _UNET_COMMON | {
    "adm_in_channels": None,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}
FULL_UNET: dict[str, dict[str, Any]] = {
    "sd15": _SD1_FULL,
    "sd20": {k: v for k, v in _SD1_FULL.items() if k != "num_heads"}
    | {"use_linear_in_transformer": True, "context_dim": 1024, "num_head_channels": 64},
    "sdxl": _UNET_COMMON
    | {
        "num_classes": "sequential",
        "adm_in_channels": 2816,
        "model_channels": 320,
        "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10,
        "use_linear_in_transformer": True,
        "context_dim": 2048,
        "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    },
}

# The same shapes, small: cross-attention at both levels (SDXL: a 2-deep transformer below, none on
# top, as the real one); the contexts are the tiny text encoders' widths (SDXL: l + g side by side).
TINY_UNET: dict[str, dict[str, Any]] = {
    "sd15": _UNET_COMMON
    | {
        "adm_in_channels": None,
        "model_channels": 32,
        "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": 32,
        "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1],
    },
    "sd20": _UNET_COMMON
    | {
        "adm_in_channels": None,
        "model_channels": 64,
        "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": True,
        "context_dim": 48,
        "num_head_channels": 64,
        "transformer_depth_output": [1, 1, 1, 1],
    },
    "sdxl": _UNET_COMMON
    | {
        "num_classes": "sequential",
        "adm_in_channels": 32 + 6 * 256,  # clip_g's pooled projection + six 256-wide size embeddings
        "model_channels": 32,
        "num_res_blocks": [1, 1],
        "transformer_depth": [0, 2],
        "channel_mult": [1, 2],
        "transformer_depth_middle": 2,
        "use_linear_in_transformer": True,
        "context_dim": 64,
        "num_head_channels": 16,
        "transformer_depth_output": [0, 0, 2, 2],
    },
}

# Tiny text encoders: ComfyUI's own classes with these config entries overridden (real vocabulary).
_TINY_TEXT = {"intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4}
TINY_TEXT: dict[str, dict[str, Any]] = {
    "clip_l": _TINY_TEXT | {"hidden_size": 32, "projection_dim": 32},
    "clip_h": _TINY_TEXT | {"hidden_size": 48, "projection_dim": 48},
    "clip_g": _TINY_TEXT | {"hidden_size": 32, "projection_dim": 32},
}

_SD_VAE: dict[str, Any] = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
}
_TINY_VAE: dict[str, Any] = {
    "embed_dim": 4,
    "ddconfig": _SD_VAE["ddconfig"] | {"ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1},
}


def _check(family: str, size: str, prediction: str = "eps") -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown SD family {family!r}; one of {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; one of {', '.join(SIZES)}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; one of {', '.join(PREDICTIONS)}")


def model_config(family: str, size: str = "tiny"):
    """ComfyUI's supported-model object of the family (SD15, SD20, SDXL) with the UNet config of the size."""
    ensure_comfy_importable()
    import comfy.supported_models as sm

    _check(family, size)
    unet = (FULL_UNET if size == "full" else TINY_UNET)[family]
    classes = {"sd15": sm.SD15, "sd20": sm.SD20, "sdxl": sm.SDXL}
    return classes[family](dict(unet, dtype=torch.float32))


def text_options(size: str) -> dict[str, Any]:
    """The CLIP's model_options: fp32, and the tiny encoders' config overrides."""
    options: dict[str, Any] = {"dtype": torch.float32}
    if size == "tiny":
        options |= {f"{name}_model_config": dict(config) for name, config in TINY_TEXT.items()}
    return options


def build_model(
    family: str,
    size: str = "tiny",
    prediction: str = "eps",
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
):
    """A MODEL (ModelPatcher) of the family with random weights; prediction eps or v. `dtype` "auto" is the
    UNet weight dtype ComfyUI's checkpoint loader picks on this device (comfy.sd.load_state_dict_guess_config:
    fp16 or bf16 on most GPUs, with manual casting where the device cannot compute in it; fp32 on a CPU)."""
    ensure_comfy_importable()
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher

    _check(family, size, prediction)
    config = model_config(family, size)
    if dtype == "auto":
        dtype = mm.unet_dtype(supported_dtypes=config.supported_inference_dtypes)
    config.unet_config["dtype"] = dtype
    config.set_inference_dtype(
        dtype, mm.unet_manual_cast(dtype, mm.get_torch_device(), config.supported_inference_dtypes)
    )
    model_type = (
        comfy.model_base.ModelType.V_PREDICTION if prediction == "v" else comfy.model_base.ModelType.EPS
    )
    base_class = comfy.model_base.SDXL if family == "sdxl" else comfy.model_base.BaseModel
    model = base_class(config, model_type=model_type, device=mm.unet_offload_device())
    initialise_weights(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def build_clip(family: str, size: str = "tiny", seed: int = 0):
    """The family's CLIP (SD1.x: CLIP-L; SD2.x: OpenCLIP-H; SDXL: CLIP-L and OpenCLIP-bigG) with random weights."""
    ensure_comfy_importable()
    import comfy.sd

    clip = comfy.sd.CLIP(target=model_config(family, size).clip_target(), model_options=text_options(size))
    initialise_weights(clip.cond_stage_model, seed + 1)
    return clip


def build_vae(size: str = "tiny", seed: int = 0, state_dict: dict[str, torch.Tensor] | None = None):
    """An SD AutoencoderKL (4 latent channels at 1/8), random weights unless a state dict is given."""
    ensure_comfy_importable()
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = _SD_VAE if size == "full" else _TINY_VAE
    if state_dict is None:
        module = AutoencoderKL(**config)
        initialise_weights(module, seed + 2)
        state_dict = module.state_dict()
    return comfy.sd.VAE(sd=state_dict, config={"params": config})


def build_family(
    family: str,
    size: str = "tiny",
    prediction: str = "eps",
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
):
    """MODEL, CLIP and VAE of one SD family at one size, random weights (tests, benchmarks); `dtype` is the
    UNet's (build_model)."""
    return (
        build_model(family, size, prediction, seed, dtype),
        build_clip(family, size, seed),
        build_vae(size, seed),
    )


def load_family_state(
    state: dict[str, torch.Tensor], family: str, size: str = "tiny", prediction: str = "eps"
):
    """MODEL, CLIP, VAE from a single-file state dict of a known family and size, as ComfyUI's checkpoint
    loader reads one once it has detected the family (tiny files are too small for its detection)."""
    ensure_comfy_importable()
    import comfy.utils

    config = model_config(family, size)
    model = build_model(family, size, prediction)
    model.model.load_model_weights(state, "model.diffusion_model.")
    vae_state = comfy.utils.state_dict_prefix_replace(
        state, {k: "" for k in config.vae_key_prefix}, filter_keys=True
    )
    vae = build_vae(size, state_dict=config.process_vae_state_dict(vae_state))
    clip = build_clip(family, size)
    clip.load_sd(config.process_clip_state_dict(state), full_model=True)
    return model, clip, vae


# What ComfyUI's detection compares (supported_models_base.BASE.matches) to tell the tiny families apart.
_DETECTED_KEYS = ("context_dim", "model_channels", "use_linear_in_transformer", "adm_in_channels")


@contextmanager
def tiny_detection() -> Iterator[None]:
    """Inside, ComfyUI's own checkpoint detection (`comfy.sd.load_checkpoint_guess_config`) recognises the
    tiny instances' single files: subclasses of SD15 / SD20 / SDXL whose `unet_config` holds the tiny
    channel counts are put first in `comfy.supported_models.models` (the real classes match only the
    real widths). Pass `text_options("tiny")` as the loader's te_model_options; the tiny VAE is not
    detectable (load with output_vae=False)."""
    ensure_comfy_importable()
    import comfy.supported_models as sm

    classes = {"sd15": sm.SD15, "sd20": sm.SD20, "sdxl": sm.SDXL}
    tiny = [
        type(f"Tiny{cls.__name__}", (cls,), {"unet_config": {k: TINY_UNET[f].get(k) for k in _DETECTED_KEYS}})
        for f, cls in classes.items()
    ]
    saved = list(sm.models)
    sm.models[:0] = tiny
    try:
        yield
    finally:
        sm.models[:] = saved


def random_lora(
    model, clip, scope: str, rank: int = 4, seed: int = 0, scale: float = 0.1
) -> dict[str, torch.Tensor]:
    """A random nonzero LoRA in the engine's layout (ComfyUI key names, as `ComfyDistillation` writes one)
    over the weights a scope trains: up (out, rank), down (rank, in*kh*kw), alpha = rank, and a `.diff`
    for 1-D weights; `text` covers every encoder of the CLIP (SDXL: clip_l and clip_g). For tests of
    the saved files, which must hold exactly the LoRA whatever it learnt."""
    from .comfy_train import CLIP_LORA_PREFIX, UNET_MODULE_PREFIX, scope_selects, text_selects

    g = torch.Generator().manual_seed(seed)
    if scope == "text":
        root, prefix, selects = clip.cond_stage_model, CLIP_LORA_PREFIX, text_selects
    else:
        root, prefix = model.model.diffusion_model, UNET_MODULE_PREFIX

        def selects(name: str) -> bool:
            return scope_selects(scope, name)

    lora: dict[str, torch.Tensor] = {}
    for name, module in root.named_modules():
        weight = getattr(module, "weight", None)
        if (
            not hasattr(module, "weight_function")
            or not isinstance(weight, torch.Tensor)
            or not selects(name)
        ):
            continue
        key = prefix + name
        if weight.ndim >= 2:
            lora[f"{key}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=g) * scale
            lora[f"{key}.lora_down.weight"] = torch.randn(rank, weight[0].numel(), generator=g) * scale
            lora[f"{key}.alpha"] = torch.tensor(float(rank))
        else:
            lora[f"{key}.diff"] = torch.randn(weight.shape, generator=g) * scale * 0.1
    return lora
