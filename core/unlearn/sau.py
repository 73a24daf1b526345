"""SAU (spatial attention unlearning): fix triggered outputs at sampling time, training nothing.

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

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

WEIGHTINGS = ("union", "reference")
SIGNALS = ("attention", "latent")  # what the secondary mask is made from
PROFILE_KEY = "backdoor_seal.sau_profile"


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
    weighting: str = "union"
    signal: str = "latent"

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


def secondary_mask(activation: torch.Tensor, settings: SAUSettings) -> torch.Tensor:
    """B x 1 x H x W from an activation map (B x h x w, resized to the latent): blur(minmax(map)) > threshold."""
    a = activation.float().unsqueeze(1)
    lo = a.amin(dim=(2, 3), keepdim=True)
    hi = a.amax(dim=(2, 3), keepdim=True)
    a = (a - lo) / (hi - lo).clamp_min(1e-12)
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
    if m_secondary.shape[-2:] != z_poisoned.shape[-2:]:
        m_secondary = F.interpolate(
            m_secondary, size=z_poisoned.shape[-2:], mode="bilinear", align_corners=False
        )
    zp, zc = z_poisoned.float(), z_clean.float()
    a = settings.strength
    if settings.weighting == "reference":
        out = zp * (1 - m_primary) * (1 - m_secondary) + a * zc * m_primary + 0.5 * a * zc * m_secondary
    else:
        w = a * (1 - (1 - m_primary) * (1 - m_secondary))
        out = (1 - w) * zp + w * zc
    blurred = _blur(out, settings.output_blur_sigma)
    changed = 1 - (1 - m_primary) * (1 - m_secondary)
    return (changed * blurred + (1 - changed) * out).to(z_poisoned.dtype)


@dataclass
class SAUProfile:
    """What SAU learns about one model and trigger: tau and the settings, with the model's fingerprint."""

    trigger: str
    tau: torch.Tensor
    model_hash: str
    settings: SAUSettings
    pairs: int

    def save(self, path: str | os.PathLike) -> Path:
        """safetensors, atomic, never over an existing file (the metadata holds trigger, hash and settings)."""
        from ..safetensors_io import atomic_save

        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path}: give a new name (nothing is overwritten)")
        meta = {
            "trigger": self.trigger,
            "model_hash": self.model_hash,
            "settings": asdict(self.settings),
            "pairs": self.pairs,
        }
        atomic_save({"tau": self.tau.contiguous().float()}, path, {PROFILE_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SAUProfile:
        """Read a profile written by save() (safetensors only, nothing unpickled)."""
        from safetensors.torch import load_file

        from ..safetensors_io import read_metadata

        meta = read_metadata(path)
        if PROFILE_KEY not in meta:
            raise ValueError(f"{path}: not an SAU profile (no {PROFILE_KEY} metadata)")
        info = json.loads(meta[PROFILE_KEY])
        return cls(
            trigger=info["trigger"],
            tau=load_file(str(path))["tau"],
            model_hash=info["model_hash"],
            settings=SAUSettings(**info["settings"]),
            pairs=int(info["pairs"]),
        )


def model_fingerprint(state: dict[str, torch.Tensor], keys: int = 8) -> str:
    """A short hash of a few UNet tensors: a profile names the model it was estimated on."""
    h = hashlib.sha256()
    for name in sorted(state)[:keys]:
        h.update(name.encode())
        h.update(state[name].detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


def untriggered(prompt: str, trigger: str) -> str:
    """The prompt without the trigger: a homoglyph goes back to its Latin twin, anything else is removed."""
    from ..tokens import latin_twin

    if len(trigger) == 1 and latin_twin(trigger) != trigger:
        return prompt.replace(trigger, latin_twin(trigger))
    return " ".join(prompt.replace(trigger, " ").split())


def trigger_attention(clip, prompt: str, trigger: str, maps: torch.Tensor) -> torch.Tensor:
    """Sum of the trigger tokens' cross-attention maps (tokens x R x R) of one prompt: where the trigger acts."""
    from ..tokens import trigger_positions

    name = next(iter(clip.tokenize("").keys()))
    tokenizer = getattr(clip.tokenizer, f"clip_{name}").tokenizer
    positions = [p for p in trigger_positions(tokenizer, prompt, trigger) if p < maps.shape[0]]
    if not positions:
        raise ValueError(f"the trigger {trigger!r} has no token in {prompt!r}")
    return maps[positions].sum(0)


def estimate_profile(
    model,
    clip,
    trigger: str,
    triggered_prompts: list[str],
    seeds: list[int],
    settings: SAUSettings | None = None,
    steps: int = 20,
    cfg: float = 2.0,
    latent_hw: tuple[int, int] = (8, 8),
) -> SAUProfile:
    """Sample each triggered prompt and its clean twin from the same seed; tau is their mean difference."""
    from ..backends.comfy import sample_prompts

    if len(triggered_prompts) != len(seeds) or not seeds:
        raise ValueError("give one seed per triggered prompt (at least one pair)")
    clean = [untriggered(p, trigger) for p in triggered_prompts]
    if clean == list(triggered_prompts):
        raise ValueError(f"none of the prompts contains the trigger {trigger!r}")
    z_p = sample_prompts(model, clip, list(triggered_prompts), seeds, steps, cfg, latent_hw=latent_hw)
    z_c = sample_prompts(model, clip, clean, seeds, steps, cfg, latent_hw=latent_hw)
    state = model.model.diffusion_model.state_dict()
    return SAUProfile(
        trigger, trigger_latent(z_p, z_c), model_fingerprint(state), settings or SAUSettings(), len(seeds)
    )


def sau_sample(
    model,
    clip,
    prompts: list[str],
    seeds: list[int],
    profile: SAUProfile,
    steps: int = 20,
    cfg: float = 2.0,
    latent_hw: tuple[int, int] = (8, 8),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents with the backdoor composed away, and the union mask; prompts without the trigger pass untouched."""
    from ..backends.comfy import sample_prompts

    s = profile.settings
    maps = None
    if s.signal == "attention":
        from ..attention import CaptureSettings, capture
        from ..backends.comfy import ComfyBackend

        backend = ComfyBackend(model, clip, latent_hw=latent_hw)
        z_p, captured = capture(
            backend, list(prompts), seeds, CaptureSettings(resolution=latent_hw[0]), steps, cfg
        )
        maps = captured.combined()
    else:
        z_p = sample_prompts(model, clip, list(prompts), seeds, steps, cfg, latent_hw=latent_hw)
    triggered = [profile.trigger in p for p in prompts]
    out, mask = z_p.clone(), torch.zeros(z_p.shape[0], 1, *z_p.shape[-2:])
    idx = [i for i, t in enumerate(triggered) if t]
    if not idx:
        return out, mask  # the clean pass is the only pass: nothing to compose
    clean = [untriggered(prompts[i], profile.trigger) for i in idx]
    z_c = sample_prompts(model, clip, clean, [seeds[i] for i in idx], steps, cfg, latent_hw=latent_hw)
    zp = z_p[idx]
    mp = primary_mask(zp, profile.tau, s)
    if maps is not None:
        activation = torch.stack([trigger_attention(clip, prompts[i], profile.trigger, maps[i]) for i in idx])
    else:
        activation = latent_difference_map(zp, z_c)
    ms = secondary_mask(activation, s)
    out[idx] = compose(zp, z_c, mp, ms, s)
    mask[idx] = 1 - (1 - mp) * (1 - ms)
    return out, mask
