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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

WEIGHTINGS = ("union", "reference")
SIGNALS = ("attention", "latent", "both")  # what the secondary mask is made from ("both": their product)
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


@dataclass
class SAUProfile:
    """What SAU learns about one model and trigger: tau and the settings, with the model's fingerprint."""

    trigger: str
    tau: torch.Tensor
    model_hash: str
    settings: SAUSettings
    pairs: int
    activation: torch.Tensor | None = (
        None  # H x W: the mean normalised activation map of the estimation pairs
    )

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
        tensors = {"tau": self.tau.contiguous().float()}
        if self.activation is not None:
            tensors["activation"] = self.activation.contiguous().float()
        atomic_save(tensors, path, {PROFILE_KEY: json.dumps(meta)})
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
        tensors = load_file(str(path))
        return cls(
            trigger=info["trigger"],
            tau=tensors["tau"],
            model_hash=info["model_hash"],
            settings=SAUSettings(**info["settings"]),
            pairs=int(info["pairs"]),
            activation=tensors.get("activation"),
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


def _tokenizer(clip):
    name = next(iter(clip.tokenize("").keys()))
    return getattr(clip.tokenizer, f"clip_{name}").tokenizer


def text_conditioning(clip, text: str) -> list:
    """CONDITIONING for a text, exactly as the stock CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def estimate_profile(
    model,
    clip,
    trigger: str,
    pairs: list[tuple[str, str]],
    seed: int = 0,
    settings: SAUSettings | None = None,
    steps: int = 20,
    cfg: float = 2.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    latent_hw: tuple[int, int] = (8, 8),
    on_pair: Callable[[int, int], None] | None = None,
) -> SAUProfile:
    """tau from (clean, triggered) prompt pairs, each pair sampled from one seed (seed + its index)."""

    if not pairs:
        raise ValueError("no prompt pairs to estimate the trigger latent from")
    if all(clean == triggered for clean, triggered in pairs):
        raise ValueError(f"none of the prompts contains the trigger {trigger!r}")
    s = settings or SAUSettings()
    latent = {"samples": torch.zeros(1, 4, *latent_hw)}
    negative = text_conditioning(clip, "")
    z_p, z_c, maps = [], [], []
    for i, (clean, triggered) in enumerate(pairs):
        zp, zc, attention = two_passes(
            model,
            clip,
            trigger,
            triggered,
            clean,
            negative,
            latent,
            s,
            ((seed + i) % 2**64, steps, cfg, sampler_name, scheduler),
        )
        z_p.append(zp)
        z_c.append(zc)
        maps.append(
            normalised(attention if attention is not None else latent_difference_map(zp, zc), latent_hw)
        )
        if on_pair is not None:
            on_pair(i + 1, len(pairs))
    state = model.model.diffusion_model.state_dict()
    return SAUProfile(
        trigger,
        trigger_latent(torch.cat(z_p), torch.cat(z_c)),
        model_fingerprint(state),
        s,
        len(pairs),
        torch.cat(maps).mean(0),
    )


def normalised(activation: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B x H x W activation maps at the latent size, min-max normalised per map."""
    a = F.interpolate(activation.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
    lo, hi = a.amin(dim=(1, 2), keepdim=True), a.amax(dim=(1, 2), keepdim=True)
    return (a - lo) / (hi - lo).clamp_min(1e-12)


def two_passes(
    model,
    clip,
    trigger: str,
    text: str,
    clean_text: str,
    negative: list,
    latent: dict,
    settings: SAUSettings,
    sampler: tuple,
    denoise: float = 1.0,
    progress: Callable[[int, int], Callable | None] = lambda _, __: None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """z_p (the prompt) and z_c (its clean twin) from the same noise; with the attention signal also the
    trigger tokens' cross-attention (B x R x R) recorded during the first pass."""
    from ..attention import CaptureSettings, CrossAttentionRecorder
    from ..backends.comfy import attach_attention_recorder, ksample, ksample_pair
    from ..tokens import trigger_token_positions

    recorder, first = None, model
    if settings.signal != "latent":
        recorder = CrossAttentionRecorder(CaptureSettings(resolution=max(latent["samples"].shape[-2:])))
        first = attach_attention_recorder(model, recorder)
    positive, clean = text_conditioning(clip, text), text_conditioning(clip, clean_text)
    pair = None
    if settings.batch_passes:
        pair = ksample_pair(first, *sampler, positive, clean, negative, latent, denoise, progress(0, 1))
    if pair is not None:  # one call of twice the batch: on most hardware well under twice the time
        z_p, z_c = pair
    else:
        z_p = ksample(first, *sampler, positive, negative, latent, denoise, progress(0, 2))
        z_c = ksample(model, *sampler, clean, negative, latent, denoise, progress(1, 2))
    if recorder is None:
        return z_p, z_c, None
    maps = recorder.maps().combined()[: z_p.shape[0]]  # B x tokens x R x R (the triggered rows come first)
    positions = [p for p in trigger_token_positions(_tokenizer(clip), text, trigger) if p < maps.shape[1]]
    if not positions:
        raise ValueError(f"no token of {text!r} carries the trigger; is it in the prompt?")
    attention = maps[:, positions].sum(1)
    if attention.shape[0] != z_p.shape[0]:
        attention = attention[:1].expand(z_p.shape[0], -1, -1)
    return z_p, z_c, attention


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


@dataclass
class SAUResult:
    """What one SAU sampling did: the latents, where it replaced them, and whether the trigger was there."""

    samples: torch.Tensor
    mask: torch.Tensor  # B x 1 x H x W, the union of the two masks (zeros when untouched)
    triggered: bool
    note: str
    poisoned: torch.Tensor | None = None  # the two passes, for pixel-space composition
    clean: torch.Tensor | None = None


def sau_ksample(
    model,
    clip,
    text: str,
    negative: list,
    latent: dict,
    profile: SAUProfile,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    denoise: float = 1.0,
    callback: Callable | None = None,
) -> SAUResult:
    """KSampler with SAU: a prompt without the trigger is one plain pass, bit for bit the stock KSampler's;
    a triggered prompt is sampled again without the trigger from the same noise, and the two composed."""
    from ..backends.comfy import ksample

    s = profile.settings
    triggered = profile.trigger in text

    def progress(offset: int, passes: int):
        if callback is None:
            return None
        return lambda step, x0, x, total: callback(step + offset * total, x0, x, passes * total)

    sampler = (seed, steps, cfg, sampler_name, scheduler)
    if not triggered:
        z = ksample(model, *sampler, text_conditioning(clip, text), negative, latent, denoise, progress(0, 1))
        mask = torch.zeros(z.shape[0], 1, *z.shape[-2:])
        return SAUResult(z, mask, False, f"no trigger {profile.trigger!r} in the prompt: one plain pass")
    clean_text = untriggered(text, profile.trigger)
    z_p, z_c, attention = two_passes(
        model, clip, profile.trigger, text, clean_text, negative, latent, s, sampler, denoise, progress
    )
    out, mask = compose_pair(z_p, z_c, profile.tau.to(z_p.device), s, attention)
    note = f"trigger found: composed with {clean_text!r}; SAU replaced {float(mask.mean()):.0%} of the latent"
    return SAUResult(out, mask.cpu(), True, note, z_p, z_c)


def sau_drawer(
    model,
    clip,
    vae,
    profile: SAUProfile,
    latent_hw: tuple[int, int],
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    pixel_blend: bool = True,
) -> Callable[[list[str], list[int]], list]:
    """Images drawn with SAU (one prompt and seed at a time), decoded as Seal SAU Decode does or as VAEDecode."""
    from ..lab.train import tensor_to_images

    negative = text_conditioning(clip, "")
    latent = {"samples": torch.zeros(1, 4, *latent_hw)}

    def draw(prompts: list[str], seeds: list[int]) -> list:
        out = []
        with torch.inference_mode():
            for prompt, seed in zip(prompts, seeds, strict=True):
                r = sau_ksample(
                    model, clip, prompt, negative, latent, profile, seed, steps, cfg, sampler_name, scheduler
                )
                if r.triggered and pixel_blend:
                    image = compose_images(vae.decode(r.poisoned), vae.decode(r.clean), r.mask)
                else:
                    image = vae.decode(r.samples)
                out.extend(tensor_to_images(image))
        return out

    return draw
