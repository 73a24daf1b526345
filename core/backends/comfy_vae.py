"""The VAE seam: latents to images through ComfyUI's VAE, and the AutoencoderKL passes the lab trains."""

from __future__ import annotations

import torch


def vae_module(vae) -> torch.nn.Module:
    """A VAE's autoencoder (ComfyUI's AutoencoderKL)."""
    return vae.first_stage_model


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images (B x H x W x 3, float in [0, 1]) of latents (B x C x h x w, unscaled as samplers return them),
    as the stock VAEDecode does: ComfyUI's VAE.decode (its tiling fallback and device moves included)."""
    return vae.decode(latents)


def posterior(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log-variance (each B x C x h x w) of an AutoencoderKL's latent posterior for images
    x (B x 3 x H x W in [-1, 1]), log-variance clamped to [-30, 20] as the diagonal Gaussian does."""
    moments = module.quant_conv(module.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30, 20)


def reconstruct(module: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """An AutoencoderKL's decoder on latents z (B x C x h x w, unscaled): images B x 3 x H x W in [-1, 1],
    with gradient (the lab trains its VAE through this)."""
    return module.decoder(module.post_quant_conv(z))
