"""LoRA key layouts: the engine's ComfyUI-key LoRA to the kohya layout the community shares, table-driven.

The engine's LoRA names weights as ComfyUI's generic LoRA format does (`comfy.lora.model_lora_keys_*`):
`diffusion_model.<ldm module path>` and `text_encoders.clip_{l,g,h}.transformer.<module path>`, each with
`.lora_up.weight` (out, rank), `.lora_down.weight` (rank, in*kh*kw), `.alpha`, or `.diff` (a full delta).
The kohya layout (kohya sd-scripts; read by A1111, Forge, ComfyUI and diffusers) writes one module name
with `.` -> `_` behind a prefix per part, one row per key family below; conv LoRAs are 4-D (down
(rank, in, kh, kw), up (out, rank, 1, 1)). UNet names follow the UNet kohya trains on (`UNET_NAMING`):
SD1.x / SD2.x name diffusers' UNet2DConditionModel modules (`lora_unet_down_blocks_0_attentions_0_...`:
kohya's `networks/lora.py` wraps diffusers' UNet there, and diffusers' SD1 `load_lora_weights` reads only
that spelling: it remaps ldm block names for SDXL alone); SDXL names the ldm/sgm module path
(`lora_unet_input_blocks_4_1_...`, kohya's `sdxl_original_unet`). ComfyUI and A1111 read both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# One row per key family: (engine key prefix, kohya prefix) per SD family; the first matching row wins.
KOHYA_ROWS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd15": (
        ("diffusion_model.", "lora_unet_"),
        ("text_encoders.clip_l.transformer.", "lora_te_"),
    ),
    "sd20": (
        ("diffusion_model.", "lora_unet_"),
        ("text_encoders.clip_h.transformer.", "lora_te_"),
    ),
    "sdxl": (
        ("diffusion_model.", "lora_unet_"),
        ("text_encoders.clip_l.transformer.", "lora_te1_"),
        ("text_encoders.clip_g.transformer.", "lora_te2_"),
    ),
}
# Which UNet's module names the kohya UNet keys spell, per family (see the module docstring).
UNET_NAMING = {"sd15": "diffusers", "sd20": "diffusers", "sdxl": "ldm"}
# The tensors of one module, in both layouts.
SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha", ".diff", ".diff_b")
# kohya's `ss_base_model_version` and SAI modelspec base architecture per family.
BASE_VERSION = {"sd15": "sd_v1", "sd20": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_BASE = {
    "sd15": ("stable-diffusion-v1", "stable-diffusion-v1"),
    "sd20": ("stable-diffusion-v2-512", "stable-diffusion-v2-768-v"),
    "sdxl": ("stable-diffusion-xl-v1-base", "stable-diffusion-xl-v1-base"),
}
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # kohya's IMPL_STABILITY_AI (ldm names)


def split_key(key: str) -> tuple[str, str]:
    """(module name, tensor suffix) of a LoRA key; ValueError for a key no LoRA layout holds."""
    for suffix in SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise ValueError(f"{key}: not a LoRA tensor (expected one of {', '.join(SUFFIXES)})")


def is_kohya(lora: Mapping[str, torch.Tensor]) -> bool:
    """Whether a LoRA's keys are in the kohya layout (`lora_unet_*`, `lora_te*_*`)."""
    return bool(lora) and all(k.startswith(("lora_unet_", "lora_te")) for k in lora)


def family_of_lora(lora: Mapping[str, torch.Tensor]) -> str | None:
    """The SD family an engine-layout LoRA's text keys name (clip_g: SDXL, clip_h: SD2, clip_l alone: SD1);
    None when it holds UNet keys only."""
    text = {k.split(".")[1] for k in lora if k.startswith("text_encoders.")}
    if "clip_g" in text:
        return "sdxl"
    if "clip_h" in text:
        return "sd20"
    return "sd15" if "clip_l" in text else None


def kohya_name(module: str, family: str, diffusers_unet: Mapping[str, str] | None = None) -> str:
    """The kohya module name of an engine-layout module name, by the family's rows.

    diffusers_unet: ldm module path -> diffusers module path of the model's UNet (`input_blocks.1.1.proj_in`
    -> `down_blocks.0.attentions.0.proj_in`, ComfyUI's `comfy.utils.unet_to_diffusers`); used where the
    family's kohya UNet names are diffusers' (SD1.x / SD2.x). Without it, or for a module it lacks, the
    ldm path is spelled."""
    for engine_prefix, kohya_prefix in KOHYA_ROWS[family]:
        if module.startswith(engine_prefix):
            path = module[len(engine_prefix) :]
            if kohya_prefix == "lora_unet_" and UNET_NAMING[family] == "diffusers" and diffusers_unet:
                path = diffusers_unet.get(path, path)
            return kohya_prefix + path.replace(".", "_")
    raise ValueError(f"{module}: no kohya name for this module in a {family} LoRA")


def to_kohya(
    lora: Mapping[str, torch.Tensor],
    family: str,
    names: Mapping[str, str] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """The LoRA in the kohya layout.

    family: 'sd15', 'sd20' or 'sdxl' (picks the rows). names: engine module name -> kohya name, when the
    caller has them from ComfyUI's own key maps (`comfy_train.kohya_names`); else the rows spell them.
    shapes: engine module name -> its weight's shape; a 4-D (conv) weight's down/up become
    (rank, in, kh, kw) / (out, rank, 1, 1). An already-kohya LoRA is returned as it is."""
    if family not in KOHYA_ROWS:
        raise ValueError(f"unknown SD family {family!r}; one of {', '.join(KOHYA_ROWS)}")
    if is_kohya(lora):
        return dict(lora)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in lora.items():
        module, suffix = split_key(key)
        name = names[module] if names is not None and module in names else kohya_name(module, family)
        shape = (shapes or {}).get(module)
        if shape is not None and len(shape) == 4:
            if suffix == ".lora_down.weight":
                tensor = tensor.reshape(tensor.shape[0], *shape[1:])
            elif suffix == ".lora_up.weight":
                tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[name + suffix] = tensor
    return out


def kohya_metadata(
    lora: Mapping[str, torch.Tensor], family: str | None, prediction: str = "epsilon", title: str = ""
) -> dict[str, str]:
    """kohya's `ss_*` and the SAI modelspec entries for a kohya-layout LoRA (all strings, as safetensors
    metadata is). prediction: 'epsilon' or 'v'."""
    ranks = [t.shape[0] for k, t in lora.items() if k.endswith(".lora_down.weight")]
    alphas = [float(t) for k, t in lora.items() if k.endswith(".alpha")]
    meta = {"ss_network_module": "networks.lora"}
    if ranks:
        meta["ss_network_dim"] = str(max(ranks))
    if alphas:
        meta["ss_network_alpha"] = f"{max(alphas):g}"
    if family is not None:
        v = prediction == "v"
        meta |= {
            "ss_base_model_version": BASE_VERSION[family],
            "ss_v2": str(family == "sd20"),
            "ss_v_parameterization": str(v),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": MODELSPEC_BASE[family][int(v)] + "/lora",
            "modelspec.implementation": IMPLEMENTATION,
            "modelspec.title": title,
            "modelspec.predict_key": prediction,
        }
    return meta
