"""The lab family on ComfyUI: builders from a lab config (plain data) and lab checkpoint I/O.

A lab checkpoint is an SD1-style single file whose metadata carries the config it was built from
(`backdoor_seal.config`); an attacked model may store only the tensors it changed and name its base.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..safetensors_io import CONFIG_KEY, atomic_save, file_sha256, load_checkpoint, read_metadata
from .comfy import ensure_comfy_importable, initialise_weights

LAB_FAMILY = "backdoor-seal-lab"  # the config's "family"
UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."
BASE_KEY = "backdoor_seal.base"  # a delta checkpoint names the full checkpoint it overlays
BASE_SHA_KEY = "backdoor_seal.base_sha256"


@functools.cache
def _lab_model_config_class():
    ensure_comfy_importable()
    from comfy import latent_formats, supported_models_base

    class LabLatentFormat(latent_formats.LatentFormat):
        scale_factor = 1.0

    class LabSD(supported_models_base.BASE):
        """The backdoor-seal lab family: SD1-shaped, tiny."""

        unet_config: dict[str, Any] = {}
        unet_extra_config: dict[str, Any] = {}
        latent_format = LabLatentFormat
        memory_usage_factor = 1.0
        supported_inference_dtypes = [torch.float32, torch.bfloat16, torch.float16]

    return LabSD


def build_lab_unet(config: dict[str, Any]):
    """A ComfyUI ModelPatcher around a freshly initialised lab UNet."""
    ensure_comfy_importable()
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher

    cls = _lab_model_config_class()
    unet_config = dict(config["unet"], dtype=torch.float32)
    model = comfy.model_base.BaseModel(
        cls(unet_config), model_type=comfy.model_base.ModelType.EPS, device=mm.unet_offload_device()
    )
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )
    return rescale_latents(patcher, config)


def build_lab_clip(config: dict[str, Any], embedding_directory: list[str] | str | None = None):
    """A ComfyUI CLIP with the real CLIP BPE tokenizer and the lab's small text transformer; prompts'
    `embedding:name` resolve in `embedding_directory` as the stock loader's do in models/embeddings."""
    ensure_comfy_importable()
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    text_config = dict(config["text"])
    clip_model = functools.partial(
        comfy.sd1_clip.SDClipModel, textmodel_json_config=text_config, return_projected_pooled=False
    )
    clip_cls = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=clip_model)
    tok_cls = functools.partial(
        comfy.sd1_clip.SD1Tokenizer,
        tokenizer=functools.partial(comfy.sd1_clip.SDTokenizer, embedding_size=text_config["hidden_size"]),
    )
    target = comfy.supported_models_base.ClipTarget(tok_cls, clip_cls)
    return comfy.sd.CLIP(
        target=target, embedding_directory=embedding_directory, model_options={"dtype": torch.float32}
    )


def build_lab_vae(config: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None):
    """A ComfyUI VAE (small AutoencoderKL, 4 latent channels at 1/8)."""
    ensure_comfy_importable()
    import comfy.sd

    if state_dict is None:  # a full (uninitialised) state dict keeps comfy from warning about missing keys
        from comfy.ldm.models.autoencoder import AutoencoderKL

        state_dict = AutoencoderKL(**config["vae"]).state_dict()
    return comfy.sd.VAE(sd=state_dict, config={"params": config["vae"]})


def new_lab_models(config: dict[str, Any], seed: int = 0):
    """Freshly initialised lab MODEL, CLIP and VAE (for training from scratch)."""
    model, clip, vae = build_lab_unet(config), build_lab_clip(config), build_lab_vae(config)
    initialise_weights(model.model.diffusion_model, seed)
    initialise_weights(clip.cond_stage_model, seed + 1)
    initialise_weights(vae.first_stage_model, seed + 2)
    return model, clip, vae


def rescale_latents(model, config: dict[str, Any]):
    """Set the MODEL's latent scale factor from the config (the lab latent format is per model)."""
    model.model.latent_format.scale_factor = float(config.get("latent_scale", 1.0))
    model.model.seal_lab_config = config  # lets a sanitized lab model be saved as a lab checkpoint again
    return model


def is_lab_checkpoint(path: str | os.PathLike) -> bool:
    """Whether a safetensors file carries a lab config (shipped, attacked, trained or sanitized lab models)."""
    meta = read_metadata(path)
    try:
        return json.loads(meta.get(CONFIG_KEY, "{}")).get("family") == LAB_FAMILY
    except (json.JSONDecodeError, AttributeError):
        return False


def lab_config_of(model) -> dict[str, Any] | None:
    """The lab config a MODEL was built from; None for any other model."""
    return getattr(model.model, "seal_lab_config", None)


def is_lab_model(model) -> bool:
    """Whether a MODEL is one of the pack's lab models (8x8 latents, the lab grammar)."""
    return lab_config_of(model) is not None


def _strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def read_lab_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors of a lab checkpoint; a delta checkpoint is overlaid on the base file it names."""
    path = Path(path)
    tensors, info = load_checkpoint(path)
    base_name = info["metadata"].get(BASE_KEY)
    if base_name:
        # a file's metadata never steers a read outside its own folder, and the base must be the one hashed
        if Path(base_name).name != base_name or base_name in ("", ".", ".."):
            raise ValueError(f"{path.name}: its base {base_name!r} is not a file name in its own folder")
        if not info["metadata"].get(BASE_SHA_KEY):
            raise ValueError(f"{path.name}: names a base {base_name} but no hash of it; refusing to overlay")
        base = path.parent / base_name
        if not base.is_file():
            raise FileNotFoundError(
                f"{path.name} stores only what its attack changed and needs its base {base_name} "
                f"in the same folder ({path.parent})."
            )
        if file_sha256(base) != info["metadata"][BASE_SHA_KEY]:
            raise ValueError(f"{path.name}: its base {base_name} has changed since the delta was made.")
        full, _ = load_checkpoint(base)
        full.update(tensors)
        tensors = full
    return tensors, info


def load_lab_checkpoint(path: str | os.PathLike, embedding_directory: list[str] | str | None = None):
    """MODEL, CLIP, VAE and metadata from a lab checkpoint (SD1-style keys, config in metadata); the CLIP
    resolves `embedding:name` in `embedding_directory` (build_lab_clip)."""
    tensors, info = read_lab_tensors(path)
    config = info["config"]
    if config.get("family") != LAB_FAMILY:
        raise ValueError(
            f"{Path(path).name} is not a backdoor-seal lab checkpoint (no lab config in its metadata)."
        )
    tensors = {k: v.float() for k, v in tensors.items()}
    model = build_lab_unet(config)
    model.model.diffusion_model.load_state_dict(_strip_prefix(tensors, UNET_PREFIX), strict=True)
    clip = build_lab_clip(config, embedding_directory)
    text_sd = _strip_prefix(tensors, TEXT_PREFIX)
    missing, unexpected = clip.cond_stage_model.clip_l.transformer.load_state_dict(text_sd, strict=False)
    if [m for m in missing if "position_ids" not in m] or unexpected:
        raise ValueError(
            f"{Path(path).name}: text encoder keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    vae = build_lab_vae(config, _strip_prefix(tensors, VAE_PREFIX))
    return model, clip, vae, info


def save_lab_vae(
    path: str | os.PathLike, vae, config: dict[str, Any], extra_metadata: dict[str, str]
) -> Path:
    """Save a lab VAE alone (first_stage_model. keys, config with its latent scale in metadata)."""
    meta = {CONFIG_KEY: json.dumps(config), **extra_metadata}
    tensors = {VAE_PREFIX + k: v for k, v in vae.first_stage_model.state_dict().items()}
    return atomic_save(tensors, path, metadata=meta)


def load_lab_vae(path: str | os.PathLike):
    """A lab VAE and its config from a lab checkpoint or a VAE-only file."""
    tensors, info = read_lab_tensors(path)
    config = info["config"]
    if config.get("family") != LAB_FAMILY or "latent_scale" not in config:
        raise ValueError(f"{Path(path).name} holds no trained lab VAE (no lab config with a latent scale).")
    vae_sd = {k: v.float() for k, v in _strip_prefix(tensors, VAE_PREFIX).items()}
    return build_lab_vae(config, vae_sd), config


def round_weights(model, clip, vae, dtype: torch.dtype = torch.float16) -> None:
    """Round every weight to dtype and back, in place: the model then computes what its saved file will."""
    modules = (model.model.diffusion_model, clip.cond_stage_model, vae.first_stage_model)
    with torch.no_grad():
        for module in modules:
            for t in list(module.parameters()) + list(module.buffers()):
                if t.is_floating_point():
                    t.copy_(t.to(dtype).to(t.dtype))


def lab_state_dict(model, clip, vae) -> dict[str, torch.Tensor]:
    """The SD1-style single-file state dict of lab MODEL/CLIP/VAE objects."""
    out = {UNET_PREFIX + k: v for k, v in model.model.diffusion_model.state_dict().items()}
    out.update({TEXT_PREFIX + k: v for k, v in clip.cond_stage_model.clip_l.transformer.state_dict().items()})
    out.update({VAE_PREFIX + k: v for k, v in vae.first_stage_model.state_dict().items()})
    return out


def save_lab_checkpoint(
    path: str | os.PathLike,
    model,
    clip,
    vae,
    extra_metadata: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
    config: dict[str, Any] | None = None,
    base: str | os.PathLike | None = None,
) -> Path:
    """Save lab MODEL/CLIP/VAE atomically as one safetensors file with the config in metadata (by default
    the config the MODEL was built from).

    With `base` (a full lab checkpoint in the same folder), only the tensors that differ from it
    are stored and the loader overlays them on the base: an attacked model costs what it changed.
    """
    meta = {CONFIG_KEY: json.dumps(config or lab_config_of(model))}
    meta.update(extra_metadata or {})
    tensors = {
        k: v.to(dtype) if v.is_floating_point() else v for k, v in lab_state_dict(model, clip, vae).items()
    }
    if base is not None:
        base = Path(base)
        if base.resolve().parent != Path(path).resolve().parent:
            raise ValueError(f"a delta checkpoint must sit next to its base {base.name}")
        base_tensors, base_info = load_checkpoint(base)
        if BASE_KEY in base_info["metadata"]:
            raise ValueError(f"{base.name} is itself a delta; use a full checkpoint as the base")
        tensors = {
            k: v for k, v in tensors.items() if k not in base_tensors or not torch.equal(base_tensors[k], v)
        }
        meta.update({BASE_KEY: base.name, BASE_SHA_KEY: file_sha256(base)})
    return atomic_save(tensors, path, metadata=meta)
