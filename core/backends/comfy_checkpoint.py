"""Single-file checkpoints on ComfyUI: load one (safetensors only) and build the state dict to save one."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import torch

from ..safetensors_io import CONFIG_KEY, CastOnRead, read_metadata
from .comfy import ensure_comfy_importable
from .comfy_lab import lab_config_of

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


def _target(key: str, dtype) -> torch.dtype | None:
    """The storage dtype asked for a single-file key (None: keep what it is held in)."""
    if dtype is None or component_of(key) is None:
        return None
    return dtype.get(component_of(key)) if isinstance(dtype, dict) else dtype


def merge_fp32(weight: torch.Tensor, convert, patches: list, key: str) -> torch.Tensor:
    """One weight with its patches (LoRA), computed in fp32 on the CPU from the unpatched weight, with
    comfy.lora.calculate_weight at intermediate_dtype fp32: whatever dtype and device the host patches
    in (ComfyUI 0.8.0 merges in fp16 on a GPU, `model_management.lora_compute_dtype`), the result is
    the same fp32 tensor (shape of `weight`), to be cast once to where it is stored."""
    import comfy.lora

    w = convert(weight.detach().to("cpu", torch.float32, copy=True), inplace=True)
    if not patches:
        return w
    return comfy.lora.calculate_weight(patches, w, key, intermediate_dtype=torch.float32)


# A weight for saving: (the unpatched weight, its convert function, its patches).
_Entry = tuple[torch.Tensor, Callable, list]


def _same(tensor: torch.Tensor, **_) -> torch.Tensor:
    return tensor


def _entries(patcher, prefix: str | None) -> dict[str, _Entry]:
    return {key: (weight, convert, patches) for key, (weight, convert), patches in _patched(patcher, prefix)}


def _for_saving(
    process: Callable[[dict], dict], entries: dict[str, _Entry], strip: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, _Entry]], set[str]]:
    """process (the host's renaming for saving) applied to the unpatched weights (keys less `strip`):
    (the saved dict, saved key -> (source key, entry) of each patched weight, merged when written,
    the saved keys whose tensors process or a merge computed).

    A patched weight is followed through `process` by identity; one the host transforms (SD2's q/k/v
    fused into in_proj_weight) loses it, so those are merged first (fp32) and processed again."""
    patched = {k for k, e in entries.items() if e[2]}
    eager: dict[str, torch.Tensor] = {}
    while True:
        given = {k[len(strip) :]: eager.get(k, e[0]) for k, e in entries.items()}
        out = process(dict(given))
        source = {id(entries[k][0]): k for k in patched - eager.keys()}
        lazy = {name: (source[id(v)], entries[source[id(v)]]) for name, v in out.items() if id(v) in source}
        lost = patched - eager.keys() - {k for k, _ in lazy.values()}
        if not lost:
            inputs = {id(v) for k, v in given.items() if k not in eager}
            return out, lazy, {name for name, v in out.items() if id(v) not in inputs}
        eager.update({k: merge_fp32(*entries[k], k) for k in lost})


def _held_dtypes(parts: dict[str, dict[str, _Entry]]) -> dict[str, torch.dtype]:
    """The most common floating dtype each component's weights are held in."""
    out = {}
    for part, entries in parts.items():
        counts = Counter(e[0].dtype for e in entries.values() if e[0].is_floating_point())
        if counts:
            out[part] = counts.most_common(1)[0][0]
    return out


def host_save_extras(base, vae_sd: dict) -> dict[str, torch.Tensor]:
    """The host's single-file dict of a BaseModel for saving, with the VAE and its markers (v_pred,
    scaled-fp8 / quantization markers) and no text encoder. ComfyUI to 0.8 reads the live UNet itself,
    `state_dict_for_saving(clip, vae, clip_vision)`; later ones (ModelPatcher.state_dict_for_saving passes
    it) take the UNet dict first, `state_dict_for_saving(unet_state_dict, clip_state_dict=, ...)`:
    given an empty one there, the result holds no UNet weight."""
    import inspect

    if "unet_state_dict" in inspect.signature(base.state_dict_for_saving).parameters:
        return base.state_dict_for_saving({}, vae_state_dict=vae_sd)
    return base.state_dict_for_saving(None, vae_sd, None)


def merged_checkpoint_state_dict(
    model, clip, vae, dtype: torch.dtype | dict[str, torch.dtype] | None = None, title: str = ""
) -> tuple[Mapping[str, torch.Tensor], dict[str, str]]:
    """The single-file state dict of MODEL/CLIP/VAE with every patch (LoRA) merged, keyed as ComfyUI's
    save_checkpoint keys it (the host's state_dict_for_saving renames), with its markers (see
    `checkpoint_markers`) and metadata.

    Each patched weight is its unpatched weight + its patches computed in fp32 (`merge_fp32`) and cast
    once to the storage dtype when written; the host's own merge (fp16 on a GPU in ComfyUI 0.8.0) is
    never read. Unpatched weights are the weights as held, cast once.

    dtype: one storage dtype for every weight, or one per component ('unet', 'text', 'vae', as
    `checkpoint_dtypes` reads them); None keeps the dtype each component's weights are held in. A
    lab model stays a lab checkpoint (fp16, its config in the metadata)."""
    ensure_comfy_importable()
    from .comfy_lab import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

    unet = _entries(model, "diffusion_model.")
    text = _entries(clip.patcher, None)
    held = _held_dtypes({"unet": unet, "text": text})
    lab_config = lab_config_of(model)
    if lab_config is not None:
        lab = "clip_l.transformer."
        sd, lazy, computed = _for_saving(
            lambda d: {UNET_PREFIX + k: v for k, v in d.items()}, unet, "diffusion_model."
        )
        text_sd, text_lazy, text_computed = _for_saving(
            lambda d: {TEXT_PREFIX + k[len(lab) :]: v for k, v in d.items() if k.startswith(lab)}, text
        )
        sd |= text_sd | {VAE_PREFIX + k: v for k, v in vae.first_stage_model.state_dict().items()}
        dtype, meta = torch.float16, {CONFIG_KEY: json.dumps(lab_config)}
    else:
        # as CLIP.get_sd: the tokenizer's state (none for SD's CLIP tokenizers) goes with the encoders
        text |= {k: (v, _same, []) for k, v in clip.tokenizer.state_dict().items()}
        config = model.model.model_config
        unet_sd, lazy, computed = _for_saving(
            config.process_unet_state_dict_for_saving, unet, "diffusion_model."
        )
        text_sd, text_lazy, text_computed = _for_saving(config.process_clip_state_dict_for_saving, text)
        # the host's extras (scaled-fp8 / quantization markers) and the VAE; its live UNet (patched as
        # the host patches) is replaced by ours, under the same names
        sd = host_save_extras(model.model, vae.get_sd())
        stray = {k for k in sd if k.startswith(UNET_PREFIX)} - unet_sd.keys()
        if stray:
            raise RuntimeError(f"the host saves UNet weights the pack does not merge (e.g. {min(stray)})")
        sd.update(unet_sd)
        sd.update(text_sd)
        meta, extra = checkpoint_markers(model, title)
        sd.update(extra)
    lazy |= text_lazy
    computed |= text_computed

    def target(key: str, v: torch.Tensor) -> torch.dtype:
        if not v.is_floating_point() or v.numel() == 0:
            return v.dtype
        asked = _target(key, dtype)
        if asked is not None:
            return asked
        if key in lazy:
            return lazy[key][1][0].dtype
        return held.get(component_of(key) or "", v.dtype) if key in computed else v.dtype

    def read(key: str, v: torch.Tensor) -> torch.Tensor:
        if key in lazy:
            v = merge_fp32(*lazy[key][1], lazy[key][0])
        return v.to(target(key, v)).contiguous()

    # Cast when written (CastOnRead): an fp16 copy of every weight beside the fp32 ones would not fit
    # for SDXL on a 24 GB machine; the file is written one merged, converted tensor at a time.
    return CastOnRead(sd, read, lambda k, v: (target(k, v), tuple(v.shape))), meta


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

    patchers = [model, clip.patcher]
    if not any(_is_dynamic(p) for p in patchers):
        mm.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
        out = {f"unet.{k}": v for k, v in model.model.diffusion_model.state_dict().items()}
        out.update({f"text.{k}": v for k, v in clip.cond_stage_model.state_dict().items()})
        return out
    # A dynamic-VRAM patcher (ComfyUI after 0.8, on a GPU) refuses force_patch_weights and patches
    # at compute time: each patched weight is asked of the host's own merge (return_weight).
    out = {}
    for label, patcher, prefix in (("unet.", model, "diffusion_model."), ("text.", clip.patcher, "")):
        for key, (weight, _), patches in _patched(patcher, prefix or None):
            if patches:
                weight = patcher.patch_weight_to_device(
                    key, device_to=patcher.load_device, return_weight=True
                )
            out[label + key[len(prefix) :]] = weight
    return out


def _is_dynamic(patcher) -> bool:
    """Whether a ModelPatcher loads weights on demand (ModelPatcherDynamic; absent before 0.9)."""
    is_dynamic = getattr(patcher, "is_dynamic", None)
    return bool(is_dynamic()) if callable(is_dynamic) else False


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
