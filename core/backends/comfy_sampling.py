"""Sampling through ComfyUI's own samplers: conditioning, seeded noise, KSampler calls, prompt batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .comfy_objects import ensure_comfy_importable, supported_family
from .comfy_text import encode_prompts_pooled


def unet_conditioning(model, packed: torch.Tensor, latent_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The UNet's conditioning inputs for a (packed) context: c_crossattn, and for SDXL the ADM vector y
    that ComfyUI's sampler builds from the pooled embedding and the image size (model_base.SDXL.encode_adm,
    samplers.encode_model_conds: width/height = latent x 8, no crop)."""
    base = model.model
    if not getattr(base, "adm_channels", 0):
        return {"c_crossattn": packed}
    supported_family(model)
    pooled_width = int(base.adm_channels) - 6 * 256  # SDXL: clip_g's projection + six size embeddings
    context, pooled = packed[:, :-1], packed[:, -1, :pooled_width]
    h, w = latent_hw
    y = base.encode_adm(
        pooled_output=pooled,
        width=w * 8,
        height=h * 8,
        target_width=w * 8,
        target_height=h * 8,
        device=packed.device,
    )
    return {"c_crossattn": context, "y": y.to(packed.device, packed.dtype)}


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
    uncond_extra: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Sample latents with ComfyUI's own sampler (as KSampler does), batched per-item conditioning.

    cond_extra goes with the positive conditioning (e.g. {"pooled_output": ...} for SDXL), uncond_extra
    with the negative one (default: cond_extra)."""
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
        [[uncond, dict((cond_extra if uncond_extra is None else uncond_extra) or {})]],
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
    cond, pooled = encode_prompts_pooled(clip, prompts)
    uncond, uncond_pooled = encode_prompts_pooled(clip, [""])
    uncond = uncond.repeat(len(prompts), 1, 1)
    latent = torch.zeros(len(prompts), 4, *latent_hw)
    noise = seeded_noise(latent, seeds)
    extra = {"pooled_output": pooled} if pooled is not None else None
    uncond_extra = (
        {"pooled_output": uncond_pooled.repeat(len(prompts), 1)} if uncond_pooled is not None else None
    )
    return sample(
        model, noise, latent, cond, uncond, steps, cfg, sampler, scheduler, seeds[0], extra, uncond_extra
    )
