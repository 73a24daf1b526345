"""SAU's algebra, pure torch: the trigger latent, the primary and secondary masks, and the blends.

From the same seed the poisoned model is sampled twice: z_p from the triggered prompt and z_c from
the clean prompt. Where z_p carries the trigger's signature (the primary mask: z_p points along the
trigger latent tau) or where the trigger acts (the secondary mask: from an activation map), the
clean latent replaces the poisoned one.

Overlap weighting. The reference blends z_p (1 - m_p)(1 - m_s) + a z_c m_p + 0.5 a z_c m_s, which
puts 1.5 a z_c where both masks fire and so changes the latent's magnitude there. The default here
is a convex blend with the masks' probabilistic union w = 1 - (1 - m_p)(1 - m_s):
z_f = (1 - a w) z_p + a w z_c, so every pixel is a mix of the two latents and a = 1 with both masks
at 1 gives exactly z_c. The reference weighting stays available as "reference" for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

WEIGHTINGS = ("union", "reference")
SIGNALS = ("attention", "latent", "both")  # what the secondary mask is made from ("both": their product)


@dataclass(frozen=True)
class SAUSettings:
    """Mask thresholds, soft-mask sharpness, blend strength and the final blur."""

    primary_threshold: float = 0.5  # cosine(z_p, tau) per pixel
    tau_floor: float = 0.2  # ignore pixels where |tau| is below this share of its maximum (0 = the paper)
    secondary_threshold: float = 0.3  # blurred, min-max normalised activation map
    sharpness: float = 12.0  # soft mask = sigmoid(sharpness (m - 0.5))
    strength: float = 1.0  # a
    map_blur_sigma: float = 1.0  # in latent pixels, before thresholding the activation map
    output_blur_sigma: float = 0.5  # the light blur of the composed latent (0 = none)
    blur_everywhere: bool = False  # the reference blurs the whole latent; here only where it was changed
    batch_passes: bool = True  # both passes in one sampler call of twice the batch (the reference: two calls)
    weighting: str = "union"
    signal: str = "latent"

    @classmethod
    def reference(cls) -> SAUSettings:
        """The reference code's choices: the paper's primary mask, 1.5x overlap, the whole latent blurred,
        the two passes sampled one after the other."""
        return cls(
            tau_floor=0.0, weighting="reference", blur_everywhere=True, signal="latent", batch_passes=False
        )

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ValueError(f"signal must be one of {SIGNALS}, got {self.signal!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not 0.0 <= self.strength <= 1.0 and self.weighting == "union":
            raise ValueError("strength must lie in [0, 1] for the union weighting")


def trigger_latent(z_poisoned: torch.Tensor, z_clean: torch.Tensor) -> torch.Tensor:
    """tau: the mean over pairs of (z_p - z_c), one C x H x W latent."""
    if z_poisoned.shape != z_clean.shape:
        raise ValueError(
            f"paired latents differ in shape: {tuple(z_poisoned.shape)} vs {tuple(z_clean.shape)}"
        )
    return (z_poisoned - z_clean).float().mean(0)


def soft(mask: torch.Tensor, sharpness: float) -> torch.Tensor:
    """A 0/1 decision turned into a soft mask: sigmoid(sharpness (m - 0.5))."""
    return torch.sigmoid(sharpness * (mask - 0.5))


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur over the last two dims (B x C x H x W), reflect-padded."""
    if sigma <= 0:
        return x
    from torchvision.transforms.functional import gaussian_blur

    k = max(3, 2 * round(3 * sigma) + 1)
    return gaussian_blur(x, [k, k], [sigma, sigma])


def primary_mask(z_poisoned: torch.Tensor, tau: torch.Tensor, settings: SAUSettings) -> torch.Tensor:
    """B x 1 x H x W: where z_p points along tau (per-pixel cosine over channels above the threshold),
    only where tau itself is not negligible (settings.tau_floor; 0 gives the paper's mask)."""
    cos = F.cosine_similarity(z_poisoned.float(), tau.float().unsqueeze(0).expand_as(z_poisoned), dim=1)
    hit = cos > settings.primary_threshold
    if settings.tau_floor > 0:  # a direction where tau is ~0 is noise: the cosine alone fires there at random
        size = tau.float().norm(dim=0)
        hit = hit & (size >= settings.tau_floor * size.max()).unsqueeze(0)
    return soft(hit.float(), settings.sharpness).unsqueeze(1)


def latent_difference_map(z_poisoned: torch.Tensor, z_clean: torch.Tensor) -> torch.Tensor:
    """B x H x W activation map: channel-mean |z_p - z_c| (where the trigger changed the latent)."""
    return (z_poisoned.float() - z_clean.float()).abs().mean(1)


def secondary_mask(
    activation: torch.Tensor, settings: SAUSettings, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """B x 1 x H x W from an activation map (B x h x w, resized to `size`): blur(minmax(map)) > threshold."""
    a = normalised(activation, size or tuple(activation.shape[-2:])).unsqueeze(1)
    a = _blur(a, settings.map_blur_sigma)
    return soft((a > settings.secondary_threshold).float(), settings.sharpness)


def compose(
    z_poisoned: torch.Tensor,
    z_clean: torch.Tensor,
    m_primary: torch.Tensor,
    m_secondary: torch.Tensor,
    settings: SAUSettings,
) -> torch.Tensor:
    """The composed latent z_f (see the module docstring for the two weightings), lightly blurred where changed."""
    zp, zc = z_poisoned.float(), z_clean.float()
    a = settings.strength
    if settings.weighting == "reference":
        out = zp * (1 - m_primary) * (1 - m_secondary) + a * zc * m_primary + 0.5 * a * zc * m_secondary
    else:
        w = a * (1 - (1 - m_primary) * (1 - m_secondary))
        out = (1 - w) * zp + w * zc
    blurred = _blur(out, settings.output_blur_sigma)
    if settings.blur_everywhere:
        return blurred.to(z_poisoned.dtype)
    changed = 1 - (1 - m_primary) * (1 - m_secondary)
    return (changed * blurred + (1 - changed) * out).to(z_poisoned.dtype)


def activation_map(
    signal: str, z_poisoned: torch.Tensor, z_clean: torch.Tensor, attention: torch.Tensor | None
) -> torch.Tensor:
    """Where the trigger acts, B x H x W: its cross-attention, the latent difference, or (both) their product."""
    if signal == "latent":
        return latent_difference_map(z_poisoned, z_clean)
    if attention is None:
        raise ValueError(f"the {signal} signal needs the trigger's cross-attention maps")
    if signal == "attention":
        return attention
    size = tuple(z_poisoned.shape[-2:])
    return normalised(attention, size) * normalised(latent_difference_map(z_poisoned, z_clean), size)


def compose_pair(
    z_poisoned: torch.Tensor,
    z_clean: torch.Tensor,
    tau: torch.Tensor,
    settings: SAUSettings,
    attention: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAU on sampled latents: (z_f, union mask B x 1 x H x W); `attention` (B x h x w) is the trigger's
    cross-attention map, needed unless settings.signal is "latent"."""
    if tau.shape != z_poisoned.shape[1:]:  # a profile estimated at another size: tau scales with the image
        tau = F.interpolate(
            tau[None].float(), size=z_poisoned.shape[-2:], mode="bilinear", align_corners=False
        )[0]
    m_primary = primary_mask(z_poisoned, tau, settings)
    activation = activation_map(settings.signal, z_poisoned, z_clean, attention)
    m_secondary = secondary_mask(activation, settings, tuple(z_poisoned.shape[-2:]))
    out = compose(z_poisoned, z_clean, m_primary, m_secondary, settings)
    return out, 1 - (1 - m_primary) * (1 - m_secondary)


def normalised(activation: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B x H x W activation maps at the latent size, min-max normalised per map."""
    a = F.interpolate(activation.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
    lo, hi = a.amin(dim=(1, 2), keepdim=True), a.amax(dim=(1, 2), keepdim=True)
    return (a - lo) / (hi - lo).clamp_min(1e-12)


def image_mask(
    mask: torch.Tensor, size: tuple[int, int], grow: float = 0.5, feather: float = 0.125
) -> torch.Tensor:
    """The latent mask (B x 1 x h x w) at image size (B x H x W): each latent pixel's cell, grown by `grow`
    of a cell and feathered by `feather` of a cell, so a blend covers what the trigger drew up to the
    cell's edge (a bilinear upsampling reaches only halfway into the edge cells)."""
    cell = size[0] / mask.shape[-2]
    m = F.interpolate(mask.float(), size=size, mode="nearest")
    r = max(1, round(grow * cell))
    m = F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)
    return _blur(m, feather * cell)[:, 0].clamp(0, 1)


def compose_images(poisoned: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pixel-space SAU: decoded images (B x H x W x 3) blended with image_mask(mask).

    A VAE decoder's normalisation and attention spread a latent change over the whole image; blending
    decoded images keeps every pixel outside the mask as the plain sampling drew it."""
    m = image_mask(mask, tuple(poisoned.shape[1:3])).unsqueeze(-1).to(poisoned.device)
    return (poisoned * (1 - m) + clean * m).to(poisoned.dtype)
