"""The ComfyUI backend: builds and reads ComfyUI MODEL/CLIP/VAE objects. Imports comfy lazily."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..attention import (
    CrossAttentionRecorder,
    UnsupportedModelError,
    find_cross_attention_layers,
    selected_cross_attention,
)
from ..lab.models import lab_config
from ..safetensors_io import CONFIG_KEY, atomic_save, file_sha256, load_checkpoint
from ..tokens import position_labels

PACK_ROOT = Path(__file__).resolve().parents[2]
UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."
BASE_KEY = "backdoor_seal.base"  # a delta checkpoint names the full checkpoint it overlays
BASE_SHA_KEY = "backdoor_seal.base_sha256"


def _comfy_candidates() -> list[Path]:
    found = []
    if os.environ.get("COMFYUI_PATH"):
        found.append(Path(os.environ["COMFYUI_PATH"]))
    found.append(PACK_ROOT.parent.parent)  # <ComfyUI>/custom_nodes/<pack>
    found.append(PACK_ROOT / ".comfyui")  # the development host (scripts/provision.sh)
    return found


def ensure_comfy_importable() -> Path:
    """Make `import comfy` work (inside ComfyUI it already does); force CPU where CUDA is absent."""
    if importlib.util.find_spec("comfy") is None:
        for root in _comfy_candidates():
            if (root / "comfy" / "model_management.py").is_file():
                sys.path.insert(0, str(root))
                break
        else:
            raise ImportError(
                "ComfyUI not found: set COMFYUI_PATH to a ComfyUI folder, or run `make provision`."
            )
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        if not torch.cuda.is_available():
            args.cpu = True  # must precede the first import of comfy.model_management
    import comfy.model_management

    return Path(comfy.model_management.__file__).resolve().parent.parent


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


SD_FAMILIES = ("sd15", "sd21", "sdxl")


def build_sd_model(family: str, unet_config: dict[str, Any], seed: int = 0):
    """A ComfyUI MODEL of an SD family with this UNet config and random weights (tests, benchmarks)."""
    ensure_comfy_importable()
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    classes = {"sd15": sm.SD15, "sd21": sm.SD20, "sdxl": sm.SDXL}
    if family not in classes:
        raise ValueError(f"unknown SD family {family!r}; one of {', '.join(SD_FAMILIES)}")
    model_config = classes[family](dict(unet_config, dtype=torch.float32))
    model = model_config.get_model({}, device=mm.unet_offload_device())
    initialise_weights(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def build_lab_clip(config: dict[str, Any]):
    """A ComfyUI CLIP with the real CLIP BPE tokenizer and the lab's small text transformer."""
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
    return comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})


def build_lab_vae(config: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None):
    """A ComfyUI VAE (small AutoencoderKL, 4 latent channels at 1/8)."""
    ensure_comfy_importable()
    import comfy.sd

    if state_dict is None:  # a full (uninitialised) state dict keeps comfy from warning about missing keys
        from comfy.ldm.models.autoencoder import AutoencoderKL

        state_dict = AutoencoderKL(**config["vae"]).state_dict()
    return comfy.sd.VAE(sd=state_dict, config={"params": config["vae"]})


_INIT_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def initialise_weights(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give freshly built comfy modules real initial weights (comfy's ops skip init for speed)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in module.modules():
            for base in _INIT_TYPES:
                if isinstance(m, base):
                    base.reset_parameters(m)
                    break
            else:
                if isinstance(m, torch.nn.Embedding):
                    torch.nn.init.normal_(m.weight, std=0.02)  # CLIP's initialisation
    finally:
        torch.random.set_rng_state(gen_state)
    return module


def new_lab_models(config: dict[str, Any] | None = None, seed: int = 0):
    """Freshly initialised lab MODEL, CLIP and VAE (for training from scratch)."""
    config = config or lab_config()
    model, clip, vae = build_lab_unet(config), build_lab_clip(config), build_lab_vae(config)
    initialise_weights(model.model.diffusion_model, seed)
    initialise_weights(clip.cond_stage_model, seed + 1)
    initialise_weights(vae.first_stage_model, seed + 2)
    return model, clip, vae


def lab_config_with_scale(latent_scale: float) -> dict[str, Any]:
    """The lab config with a measured latent scale (unit-variance latents for the UNet)."""
    config = lab_config()
    config["latent_scale"] = float(latent_scale)
    return config


def rescale_latents(model, config: dict[str, Any]):
    """Set the MODEL's latent scale factor from the config (the lab latent format is per model)."""
    model.model.latent_format.scale_factor = float(config.get("latent_scale", 1.0))
    model.model.seal_lab_config = config  # lets a sanitized lab model be saved as a lab checkpoint again
    return model


def _strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def read_lab_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors of a lab checkpoint; a delta checkpoint is overlaid on the base file it names."""
    path = Path(path)
    tensors, info = load_checkpoint(path)
    base_name = info["metadata"].get(BASE_KEY)
    if base_name:
        base = path.parent / base_name
        if not base.is_file():
            raise FileNotFoundError(
                f"{path.name} stores only what its attack changed and needs its base {base_name} "
                f"in the same folder ({path.parent})."
            )
        want = info["metadata"].get(BASE_SHA_KEY)
        if want and file_sha256(base) != want:
            raise ValueError(f"{path.name}: its base {base_name} has changed since the delta was made.")
        full, _ = load_checkpoint(base)
        full.update(tensors)
        tensors = full
    return tensors, info


def load_lab_checkpoint(path: str | os.PathLike):
    """MODEL, CLIP, VAE and metadata from a lab checkpoint (SD1-style keys, config in metadata)."""
    tensors, info = read_lab_tensors(path)
    config = info["config"]
    if config.get("family") != "backdoor-seal-lab":
        raise ValueError(
            f"{Path(path).name} is not a backdoor-seal lab checkpoint (no lab config in its metadata)."
        )
    tensors = {k: v.float() for k, v in tensors.items()}
    model = build_lab_unet(config)
    model.model.diffusion_model.load_state_dict(_strip_prefix(tensors, UNET_PREFIX), strict=True)
    clip = build_lab_clip(config)
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
    if config.get("family") != "backdoor-seal-lab" or "latent_scale" not in config:
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
    """Save lab MODEL/CLIP/VAE atomically as one safetensors file with the config in metadata.

    With `base` (a full lab checkpoint in the same folder), only the tensors that differ from it
    are stored and the loader overlays them on the base: an attacked model costs what it changed.
    """
    meta = {CONFIG_KEY: json.dumps(config or lab_config())}
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


def sample(
    model,
    noise: torch.Tensor,
    latent: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    steps: int,
    cfg: float,
    sampler: str = "euler",
    scheduler: str = "normal",
    seed: int = 0,
    cond_extra: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Sample latents with ComfyUI's own sampler (as KSampler does), batched per-item conditioning.

    cond_extra is added to both conditionings (e.g. {"pooled_output": ...} for SDXL)."""
    ensure_comfy_importable()
    import comfy.sample

    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        sampler,
        scheduler,
        [[cond, dict(cond_extra or {})]],
        [[uncond, dict(cond_extra or {})]],
        latent,
        disable_pbar=True,
        seed=seed,
    )


def _ksampler_call(
    model, noise, latent_image, seed, sampler: tuple, positive, negative, denoise, mask, callback
):
    """comfy.sample.sample as common_ksampler calls it; sampler = (steps, cfg, sampler_name, scheduler)."""
    import comfy.sample

    steps, cfg, sampler_name, scheduler = sampler
    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent_image,
        denoise=denoise,
        noise_mask=mask,
        callback=callback,
        disable_pbar=True,
        seed=seed,
    )


def ksample(
    model,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: list,
    negative: list,
    latent: dict[str, Any],
    denoise: float = 1.0,
    callback: Callable | None = None,
) -> torch.Tensor:
    """The stock KSampler's sampling (nodes.common_ksampler): same noise, noise mask and batch index."""
    ensure_comfy_importable()
    import comfy.sample

    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sampler = (steps, cfg, sampler_name, scheduler)
    return _ksampler_call(
        model,
        noise,
        latent_image,
        seed,
        sampler,
        positive,
        negative,
        denoise,
        latent.get("noise_mask"),
        callback,
    )


def ksample_pair(
    model,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive_a: list,
    positive_b: list,
    negative: list,
    latent: dict[str, Any],
    denoise: float = 1.0,
    callback: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two prompts from the same noise in one sampler call of twice the batch (rows a, then b), or None
    when the conditionings carry more than a text embedding and a pooled output (sample them apart)."""
    ensure_comfy_importable()
    import comfy.sample

    if len(positive_a) != 1 or len(positive_b) != 1:
        return None
    (cond_a, extra_a), (cond_b, extra_b) = positive_a[0], positive_b[0]
    if set(extra_a) != set(extra_b) or not set(extra_a) <= {"pooled_output"} or cond_a.shape[0] != 1:
        return None
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    b = latent_image.shape[0]
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    rows = lambda x, y: torch.cat([x.expand(b, *x.shape[1:]), y.expand(b, *y.shape[1:])])  # noqa: E731
    extra = {k: rows(extra_a[k], extra_b[k]) for k in extra_a}
    mask = latent.get("noise_mask")
    if mask is not None and mask.shape[0] == b and b > 1:
        mask = torch.cat([mask, mask])
    out = _ksampler_call(
        model,
        torch.cat([noise, noise]),
        torch.cat([latent_image, latent_image]),
        seed,
        (steps, cfg, sampler_name, scheduler),
        [[rows(cond_a, cond_b), extra]],
        negative,
        denoise,
        mask,
        callback,
    )
    return out[:b], out[b:]


def seeded_noise(latent: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Per-item initial noise, each item as ComfyUI would make it from its own seed."""
    ensure_comfy_importable()
    import comfy.sample

    return torch.cat([comfy.sample.prepare_noise(latent[:1], s) for s in seeds])


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


# --- cross-attention capture -------------------------------------------------------------------


def attn2_patch_key(layer: str) -> tuple[str, int, int]:
    """ComfyUI's attn2 replace-patch key (block, number, transformer index) for a UNet module name."""
    parts = layer.split(".")
    try:
        index = int(parts[parts.index("transformer_blocks") + 1])
        if parts[0] == "input_blocks":
            return ("input", int(parts[1]), index)
        if parts[0] == "middle_block":
            return ("middle", 0, index)
        if parts[0] == "output_blocks":
            return ("output", int(parts[1]), index)
    except (ValueError, IndexError):
        pass
    raise UnsupportedModelError(
        f"cross-attention layer {layer!r} is not inside a UNet input/middle/output block"
    )


def _conditional_rows(cond_or_uncond: list[int] | None, batch: int) -> torch.Tensor | None:
    """Batch rows of the conditional (positive) half; None when every row is conditional."""
    if not cond_or_uncond or all(c == 0 for c in cond_or_uncond):
        return None
    per = batch // len(cond_or_uncond)
    return torch.tensor(
        [i for i, c in enumerate(cond_or_uncond) if c == 0 for i in range(i * per, (i + 1) * per)]
    )


class ComfyCrossAttentionCapture:
    """An attn2 replace patch: ComfyUI's optimized attention computes the output; the maps go to a recorder.

    ComfyUI deep-copies model options on every clone; this patch and its recorder survive as themselves.
    """

    def __init__(self, recorder: CrossAttentionRecorder, layer: str, inner=None) -> None:
        from comfy.ldm.modules.attention import optimized_attention

        self.recorder, self.layer, self.inner = recorder, layer, inner
        self._attention = optimized_attention

    def __deepcopy__(self, memo: dict) -> ComfyCrossAttentionCapture:
        return self

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict
    ) -> torch.Tensor:
        rec = self.recorder
        step = rec.step_of(extra_options.get("sample_sigmas"), extra_options.get("sigmas"))
        if rec.wants(self.layer, step):
            shape = extra_options.get("original_shape") or extra_options["activations_shape"]
            rows = _conditional_rows(extra_options.get("cond_or_uncond"), q.shape[0])
            rec.record(self.layer, q, k, extra_options["n_heads"], (shape[-2], shape[-1]), step, rows)
        if self.inner is not None:  # another node's attn2 patch on this layer keeps working
            return self.inner(q, k, v, extra_options)
        return self._attention(
            q,
            k,
            v,
            extra_options["n_heads"],
            attn_precision=extra_options.get("attn_precision"),
            transformer_options=extra_options,
        )


def attach_attention_recorder(model, recorder: CrossAttentionRecorder):
    """A clone of a ComfyUI MODEL whose selected cross-attention layers feed the recorder."""
    unet = getattr(model.model, "diffusion_model", None)
    family = type(model.model).__name__
    if unet is None:
        raise UnsupportedModelError(f"{family} has no diffusion_model to read cross-attention from")
    layers = selected_cross_attention(unet, recorder.settings, family)
    patched = model.clone()
    existing = (
        patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    )
    for name, _ in layers:
        key = attn2_patch_key(name)
        patched.set_model_attn2_replace(ComfyCrossAttentionCapture(recorder, name, existing.get(key)), *key)
    return patched


def clip_position_labels(clip, prompt: str) -> list[str]:
    """One label per conditioning position for this prompt, as ComfyUI's CLIP tokenizes it."""
    tokens = clip.tokenize(prompt)
    name, chunks = next(iter(tokens.items()))  # SDXL's g and l encoders see the same tokens
    inner = getattr(clip.tokenizer, f"clip_{name}", None) or next(
        t for t in vars(clip.tokenizer).values() if hasattr(t, "tokenizer")
    )
    ids = [int(tok[0]) for chunk in chunks for tok in chunk]
    return position_labels(inner.tokenizer, ids, inner.start_token, inner.end_token, chunk=len(chunks[0]))


def sample_prompts(
    model,
    clip,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    cfg: float = 1.0,
    sampler: str = "euler",
    scheduler: str = "normal",
    latent_hw: tuple[int, int] = (8, 8),
) -> torch.Tensor:
    """Latents for per-item prompts and seeds in one batch, through ComfyUI's sampler."""
    cond = torch.cat([clip.encode_from_tokens(clip.tokenize(p)) for p in prompts])
    uncond = clip.encode_from_tokens(clip.tokenize("")).repeat(len(prompts), 1, 1)
    latent = torch.zeros(len(prompts), 4, *latent_hw)
    noise = seeded_noise(latent, seeds)
    return sample(model, noise, latent, cond, uncond, steps, cfg, sampler, scheduler, seed=seeds[0])


class ComfyBackend:
    """A ComfyUI MODEL and CLIP, sampled with ComfyUI's own sampler (capture through attn2 patches)."""

    name = "comfy"

    def __init__(
        self,
        model,
        clip,
        latent_hw: tuple[int, int] = (8, 8),
        sampler: str = "euler",
        scheduler: str = "normal",
    ) -> None:
        self.model, self.clip, self.latent_hw, self.sampler, self.scheduler = (
            model,
            clip,
            latent_hw,
            sampler,
            scheduler,
        )

    def unet(self) -> torch.nn.Module:
        """The denoiser module."""
        return self.model.model.diffusion_model

    def position_labels(self, prompt: str) -> list[str]:
        """One label per conditioning position for this prompt."""
        return clip_position_labels(self.clip, prompt)

    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int = 20,
        cfg: float = 1.0,
        recorder: CrossAttentionRecorder | None = None,
    ) -> torch.Tensor:
        """Latents for per-item prompts and seeds in one batch, recording into recorder if given."""
        model = attach_attention_recorder(self.model, recorder) if recorder is not None else self.model
        return sample_prompts(
            model, self.clip, prompts, seeds, steps, cfg, self.sampler, self.scheduler, self.latent_hw
        )


def merged_checkpoint_state_dict(model, clip, vae) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The single-file state dict of MODEL/CLIP/VAE with every patch (LoRA) merged, as CheckpointSave
    builds it, and the metadata it needs (a lab model stays a lab checkpoint: its config travels along)."""
    ensure_comfy_importable()
    import comfy.model_management as mm

    lab_config = getattr(model.model, "seal_lab_config", None)
    if lab_config is not None:
        mm.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
        tensors = {
            k: v.to(torch.float16) if v.is_floating_point() else v
            for k, v in lab_state_dict(model, clip, vae).items()
        }
        return tensors, {CONFIG_KEY: json.dumps(lab_config)}
    clip_sd = clip.get_sd()
    mm.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    sd = model.model.state_dict_for_saving(clip_sd, vae.get_sd(), None)
    return {k: v.contiguous() for k, v in sd.items()}, {}


def load_single_file_checkpoint(path: str | os.PathLike):
    """MODEL, CLIP, VAE of a single-file SD checkpoint (.safetensors only: nothing is unpickled)."""
    ensure_comfy_importable()
    import comfy.sd

    if Path(path).suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors checkpoints are loaded (never pickled files)")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    if clip is None:
        raise ValueError(f"{path} holds no text encoder; backdoor-seal needs a full single-file checkpoint")
    return model, clip, vae
