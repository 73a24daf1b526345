"""Single-file checkpoints on ComfyUI: load one (safetensors only) and build the state dict to save one."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import torch

from ..safetensors_io import CONFIG_KEY, CastOnRead, read_metadata
from .comfy import ensure_comfy_importable
from .comfy_lab import lab_config_of, lab_state_dict

# The parts of a single file, by key prefix (ComfyUI's state_dict_for_saving writes these).
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("unet", ("model.diffusion_model.",)),
    ("text", ("cond_stage_model.", "conditioner.embedders.")),
    ("vae", ("first_stage_model.",)),
)
_SAFETENSORS_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}

# SAI modelspec architecture per ComfyUI supported-model class: (eps, v-prediction). ComfyUI's own
# CheckpointSave (comfy_extras/nodes_model_merging.py) names SDXL and lists the SD1/SD2 names as TODO.
MODELSPEC_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "SD15": ("stable-diffusion-v1", "stable-diffusion-v1"),
    "SD20": ("stable-diffusion-v2-512", "stable-diffusion-v2-768-v"),
    "SDXL": ("stable-diffusion-xl-v1-base", "stable-diffusion-xl-v1-base"),
    "SDXLRefiner": ("stable-diffusion-xl-v1-refiner", "stable-diffusion-xl-v1-refiner"),
}
FAMILY_OF_CLASS = {"SD15": "sd15", "SD20": "sd20", "SDXL": "sdxl", "SDXLRefiner": "sdxl"}


def component_of(key: str) -> str | None:
    """'unet', 'text' or 'vae' for a single-file key (None for markers such as v_pred)."""
    for name, prefixes in COMPONENTS:
        if key.startswith(prefixes):
            return name
    return None


def checkpoint_dtypes(path: str | os.PathLike) -> dict[str, torch.dtype]:
    """The storage dtype of each component of a single-file checkpoint, read from its safetensors header
    (the most common floating dtype among the component's tensors; nothing is loaded). ComfyUI on CPU
    holds weights in fp32 whatever the file held, so a re-save must ask the file."""
    from safetensors import safe_open

    read_metadata(path)  # one-line error for a non-safetensors file
    counts: dict[str, Counter] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            part = component_of(key)
            dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
            if part is not None and dtype is not None:
                counts.setdefault(part, Counter())[dtype] += 1
    return {part: c.most_common(1)[0][0] for part, c in counts.items()}


def _config_class(model) -> str | None:
    """The name of the ComfyUI supported-model class (SD15, SD20, SDXL, ...) a MODEL's config is or derives from."""
    for cls in type(getattr(model.model, "model_config", None)).__mro__:
        if cls.__name__ in MODELSPEC_ARCHITECTURES:
            return cls.__name__
    return None


def sd_family(model) -> str | None:
    """'sd15', 'sd20' or 'sdxl' for a MODEL of those families (None for anything else)."""
    return FAMILY_OF_CLASS.get(_config_class(model) or "")


def checkpoint_markers(model, title: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and extra keys ComfyUI's CheckpointSave writes for this MODEL: `modelspec.*` (SAI
    model spec 1.0.0), `modelspec.predict_key`, and the prediction markers its loader reads back
    (`v_pred`, `ztsnr`, `edm_vpred.sigma_max/min`). Source: comfy_extras/nodes_model_merging.py
    save_checkpoint (ComfyUI 0.3.75)."""
    ensure_comfy_importable()
    import comfy.model_base
    import comfy.model_sampling

    base = model.model
    meta: dict[str, str] = {}
    extra: dict[str, torch.Tensor] = {}
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.ModelSamplingContinuousEDM) and isinstance(
        sampling, comfy.model_sampling.V_PREDICTION
    ):
        extra["edm_vpred.sigma_max"] = torch.tensor(sampling.sigma_max).float()
        extra["edm_vpred.sigma_min"] = torch.tensor(sampling.sigma_min).float()
    v = base.model_type == comfy.model_base.ModelType.V_PREDICTION
    if base.model_type == comfy.model_base.ModelType.EPS:
        meta["modelspec.predict_key"] = "epsilon"
    elif v:
        meta["modelspec.predict_key"] = "v"
        extra["v_pred"] = torch.tensor([])
        if getattr(sampling, "zsnr", False):
            extra["ztsnr"] = torch.tensor([])
    arch = MODELSPEC_ARCHITECTURES.get(_config_class(model) or "")
    if arch is not None:
        meta["modelspec.sai_model_spec"] = "1.0.0"
        meta["modelspec.architecture"] = arch[1] if v else arch[0]
        meta["modelspec.implementation"] = "sgm"
        meta["modelspec.title"] = title
    return meta, extra


def _cast(key: str, tensor: torch.Tensor, dtype) -> torch.Tensor:
    if not tensor.is_floating_point() or tensor.numel() == 0 or dtype is None:
        return tensor
    target = dtype.get(component_of(key)) if isinstance(dtype, dict) else dtype
    return tensor if target is None or component_of(key) is None else tensor.to(target)


def merged_checkpoint_state_dict(
    model, clip, vae, dtype: torch.dtype | dict[str, torch.dtype] | None = None, title: str = ""
) -> tuple[Mapping[str, torch.Tensor], dict[str, str]]:
    """The single-file state dict of MODEL/CLIP/VAE with every patch (LoRA) merged, as ComfyUI's
    save_checkpoint builds it, with its markers (see `checkpoint_markers`) and metadata.

    dtype: one storage dtype for every weight, or one per component ('unet', 'text', 'vae', as
    `checkpoint_dtypes` reads them); None keeps the dtype the weights are held in. A lab model stays a
    lab checkpoint (fp16, its config in the metadata)."""
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
    meta, extra = checkpoint_markers(model, title)
    sd.update(extra)
    # Cast when written (CastOnRead): an fp16 copy of every weight beside the fp32 ones would not fit
    # for SDXL on a 24 GB machine; the file is written one converted tensor at a time.
    return CastOnRead(sd, lambda k, v: _cast(k, v, dtype).contiguous()), meta


def _honour_prediction_marker(model, keys) -> None:
    """Make a freshly loaded SD2-class MODEL v-prediction when its file says so (`v_pred`, as ComfyUI's
    CheckpointSave writes it): ComfyUI 0.3.75 reads that key for SDXL only and guesses SD2 from weight
    statistics, which a fine-tune or a small model can defeat."""
    import comfy.model_base

    base = model.model
    if "v_pred" not in keys or base.model_type != comfy.model_base.ModelType.EPS:
        return
    if _config_class(model) != "SD20":
        return
    if "ztsnr" in keys:
        base.model_config.sampling_settings["zsnr"] = True
    base.model_type = comfy.model_base.ModelType.V_PREDICTION
    base.model_sampling = comfy.model_base.model_sampling(base.model_config, base.model_type)


def load_single_file_checkpoint(
    path: str | os.PathLike, te_model_options: dict | None = None, output_vae: bool = True
):
    """MODEL, CLIP, VAE of a single-file SD checkpoint (.safetensors only: nothing is unpickled), as
    ComfyUI's CheckpointLoaderSimple loads it; a file's `v_pred` marker is honoured for SD2 too.
    te_model_options: the text encoders' model_options (ComfyUI's te_model_options); output_vae=False
    leaves the VAE unread (None)."""
    ensure_comfy_importable()
    import comfy.sd
    from safetensors import safe_open

    read_metadata(path)  # a pickle, a folder or a corrupt file gets its one-line error here
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=output_vae, output_clip=True, te_model_options=te_model_options or {}
        )
    except RuntimeError as e:
        if "Could not detect model type" not in str(e):
            raise
        with safe_open(str(path), framework="pt") as f:
            lora = looks_like_lora(f.keys())
        raise ValueError(
            f"{path}: this is a LoRA, not a checkpoint: compare it on its base with `backdoor-seal diff --base "
            "BASE --lora FILE` (or Seal Compare LoRA in ComfyUI)"
            if lora
            else f"{path}: ComfyUI recognises no model in this file (backdoor-seal reads single-file SD1.x, "
            "SD2.x and SDXL checkpoints)"
        ) from None
    if model is None:
        raise ValueError(f"{path}: holds no diffusion model (a LoRA, VAE or text-encoder file?)")
    if clip is None:
        raise ValueError(f"{path} holds no text encoder; backdoor-seal needs a full single-file checkpoint")
    with safe_open(str(path), framework="pt") as f:
        _honour_prediction_marker(model, set(f.keys()))
    return model, clip, vae


def live_weights(model, clip) -> dict[str, torch.Tensor]:
    """Every UNet and text-encoder weight as the modules hold it once the patches (LoRA) are loaded, keyed
    'unet.<name>' / 'text.<name>': read from the live modules, not through the save path, so a check of a
    saved file against it is independent of how the file was written."""
    ensure_comfy_importable()
    import comfy.model_management as mm

    mm.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    out = {f"unet.{k}": v for k, v in model.model.diffusion_model.state_dict().items()}
    out.update({f"text.{k}": v for k, v in clip.cond_stage_model.state_dict().items()})
    return out


def _patched(patcher, prefix: str | None) -> Iterator[tuple[str, tuple, list]]:
    """(key, (the weight without patches, its convert function), the patches) of a ModelPatcher, read from
    its unpatched backups (ModelPatcher.get_key_patches)."""
    for key, ((weight, convert), *patches) in patcher.get_key_patches(prefix).items():
        yield key, (weight, convert), patches


def weight_pairs(
    base_model, base_clip, model, clip, select: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, base weight, suspect weight) for every UNet and text-encoder weight, keyed as `live_weights`
    keys them ('unet.<name>', 'text.<name>'), one at a time (two SDXL models never sit in memory twice).
    `select` keeps only the keys it accepts (nothing else is computed); with both CLIPs None only the UNet
    is read.

    Each weight is computed as ModelPatcher.patch_weight_to_device computes it (comfy.lora.calculate_weight
    over the patcher's patches, from the unpatched weight), so a LoRA loaded by the stock LoraLoader onto
    the base is read without touching the shared module. Weights neither side patches that are the same
    tensor are yielded as that one tensor twice (callers skip them by identity)."""
    ensure_comfy_importable()
    import comfy.lora

    def value(entry, patches, key):
        weight, convert = entry
        if not patches:
            return weight
        w = convert(weight.detach().to(torch.float32, copy=True), inplace=True)
        return comfy.lora.calculate_weight(patches, w, key)

    parts = [("unet.", "diffusion_model.", base_model, model, "diffusion_model.")]
    if base_clip is not None or clip is not None:
        parts.append(("text.", "", base_clip.patcher, clip.patcher, None))
    for label, strip, pb, ps, prefix in parts:
        suspect = dict(((k, (e, p)) for k, e, p in _patched(ps, prefix)))
        for key, entry, patches in _patched(pb, prefix):
            if key not in suspect:
                raise ValueError(f"base and suspect are different architectures (the suspect has no {key})")
            s_entry, s_patches = suspect.pop(key)
            name = label + key[len(strip) :]
            if select is not None and not select(name):
                continue
            if s_entry[0] is entry[0] and [id(p) for p in s_patches] == [id(p) for p in patches]:
                w = value(entry, patches, key)
                yield name, w, w
                continue
            yield name, value(entry, patches, key), value(s_entry, s_patches, key)
        if suspect:
            extra = next(iter(suspect))
            raise ValueError(f"base and suspect are different architectures (the base has no {extra})")


LORA_MARKERS = ("lora_up.", "lora_down.", "lora_A.", "lora_B.", ".alpha", "hada_w1", "lokr_w1")
CHECKPOINT_MARKERS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def looks_like_lora(keys) -> bool:
    """Whether a file's tensor names are a LoRA's (kohya / diffusers / LyCORIS)."""
    return any(m in k for k in keys for m in LORA_MARKERS)


def looks_like_checkpoint(keys) -> bool:
    """Whether a file's tensor names are a single-file checkpoint's."""
    return any(k.startswith(CHECKPOINT_MARKERS) for k in keys)
