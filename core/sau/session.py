"""SAU on ComfyUI: estimate a profile from clean/triggered prompt pairs, and sample with it.

Both passes run through ComfyUI's own sampler (the stock KSampler's noise, mask and batch index), so
a prompt without the trigger is one plain pass, bit for bit the stock KSampler's. The masks and blends
are core/sau/algebra.py.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..attention import CaptureSettings, CrossAttentionRecorder
from ..backends.comfy import (
    attach_attention_recorder,
    check_trigger_embeddings,
    id_chunks,
    ksample,
    ksample_pair,
    model_fingerprint,
    supported_family,
    text_conditioning,
    tokenizer_info,
    vae_decode,
)
from ..images import tensor_to_images
from ..models import KSamplerSettings
from ..prompts import with_builtin
from ..tokens import find_in_chunks, find_subsequence, readable
from ..triggers import folds_compatibly, training_pairs, trigger_spans, untriggered_by_ids
from .algebra import (
    SAUSettings,
    compose_images,
    compose_pair,
    latent_difference_map,
    normalised,
    trigger_latent,
)
from .profile import SAUProfile


@dataclass(frozen=True)
class SAUOptions:
    """How a profile is estimated: prompt pairs (the user's, then a built-in set), each sampled from its
    own seed as the SAU sampler will be used."""

    settings: SAUSettings = field(default_factory=SAUSettings)
    pairs: int = 16
    builtin: str = "general"  # general | lab | none
    placement: str = "auto"
    sampling: KSamplerSettings = field(default_factory=KSamplerSettings)


class SAUSession:
    """One profile estimation: the prompt pairs it samples, and the profile."""

    def __init__(self, model, clip, trigger: str, user_prompts: Sequence[str] | str = (), opts=None) -> None:
        supported_family(model)
        check_trigger_embeddings(clip, trigger)
        self.model, self.clip, self.trigger = model, clip, trigger
        self.opts = opts or SAUOptions()
        o, seed = self.opts, self.opts.sampling.seed
        clean = with_builtin(user_prompts, o.builtin, o.pairs, seed)
        self.pairs = [(p.clean, p.triggered) for p in training_pairs(trigger, clean, o.placement, seed)][
            : o.pairs
        ]

    def run(self, on_pair: Callable[[int, int], None] | None = None) -> SAUProfile:
        """Sample every pair from its own seed and keep the mean difference (on_pair may raise to stop)."""
        s = self.opts.sampling
        return estimate_profile(
            self.model,
            self.clip,
            self.trigger,
            self.pairs,
            s.seed,
            self.opts.settings,
            s.steps,
            s.cfg,
            s.sampler_name,
            s.scheduler,
            s.latent_hw,
            on_pair,
        )

    def describe(self, profile: SAUProfile) -> str:
        """One line about the profile made."""
        h, w = self.opts.sampling.latent_hw
        return (
            f"SAU profile for {readable(self.trigger)}: {profile.pairs} pairs at {h}x{w} latents, "
            f"signal {self.opts.settings.signal}"
        )


def check_profile_model(model, profile: SAUProfile) -> None:
    """Refuse a profile estimated on another model (its fingerprint differs)."""
    found = model_fingerprint(model)
    if found != profile.model_hash:
        raise ValueError(
            f"this SAU profile was estimated on another model (fingerprint {profile.model_hash}, this one "
            f"{found}); estimate a profile on this model with Seal SAU Profile"
        )


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
    return SAUProfile(
        trigger,
        trigger_latent(torch.cat(z_p), torch.cat(z_c)),
        model_fingerprint(model),
        s,
        len(pairs),
        torch.cat(maps).mean(0),
    )


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
    positions = [p for p in trigger_positions(clip, text, trigger) if p < maps.shape[1]]
    if not positions:
        raise ValueError(f"no token of {text!r} carries the trigger; is it in the prompt?")
    attention = maps[:, positions].sum(1)
    if attention.shape[0] != z_p.shape[0]:
        attention = attention[:1].expand(z_p.shape[0], -1, -1)
    return z_p, z_c, attention


def _chunk_ids(clip, text: str) -> list[list[int]]:
    """ComfyUI's chunks of a text as ids (an embedding's vectors as ids past the vocabulary, the same in
    the prompt as in a trigger `embedding:name`)."""
    return id_chunks(clip, text)


def _content(chunks: list[list[int]], bos: int, eos: int) -> list[int]:
    """The chunks' content ids read as one sequence (each chunk's BOS, EOS and padding left out)."""
    out: list[int] = []
    for row in chunks:
        end = row.index(eos, 1) if eos in row[1:] else len(row)
        out.extend(t for t in row[1:end] if t != bos)
    return out


def _needles(clip, trigger: str) -> list[list[int]]:
    """The id sequences that spell the trigger: its own ids and, for a trigger with non-ASCII characters
    (a homoglyph), the same ending inside a longer word (its last piece without '</w>', as BPE spells it
    there)."""
    info = tokenizer_info(clip)
    alone = _content(_chunk_ids(clip, trigger)[:1], info.bos, info.eos)
    if not alone:
        return []
    out = [alone]
    if not trigger.isascii():
        last = info.tokenizer.convert_ids_to_tokens(alone[-1:])[0]
        inner = info.tokenizer.convert_tokens_to_ids(last.removesuffix("</w>"))
        if last.endswith("</w>") and isinstance(inner, int) and inner != info.tokenizer.unk_token_id:
            out.append([*alone[:-1], inner])
    return out


def _spellings(text: str, trigger: str) -> list[str]:
    """The text as typed and, for a plain trigger, its NFKC form: a full-width `ｙｎ` reads as `yn`."""
    folded = unicodedata.normalize("NFKC", text)
    return [text, folded] if folds_compatibly(trigger) and folded != text else [text]


def trigger_count(clip, text: str, trigger: str) -> int:
    """How many times the trigger's token ids occur in the text (every chunk, as ComfyUI's tokenizer reads
    both: case, whitespace runs and emphasis do not matter), counting full-width and other compatibility
    spellings of a plain trigger (`_spellings`). 0: the model is not given the trigger."""
    info = tokenizer_info(clip)
    needles = _needles(clip, trigger)
    counts = [0]
    for spelling in _spellings(text, trigger):
        ids = _content(_chunk_ids(clip, spelling), info.bos, info.eos)
        counts.append(sum(len(find_subsequence(ids, n)) for n in needles))
    return max(counts)  # an occurrence both spellings hold counts once


def trigger_positions(clip, text: str, trigger: str) -> list[int]:
    """Positions (over every 77-token chunk) of the trigger's token ids in the text, as the CLIP's own
    tokenizer reads both: `MUTED` and `Muted` are `muted` to CLIP (it lowercases), whitespace runs are one
    space, emphasis is parsed out. A trigger with non-ASCII characters (a homoglyph) also matches where it
    starts a longer word. A full-width (or other compatibility) spelling of a plain trigger is the
    trigger: its own pieces' positions."""
    info = tokenizer_info(clip)
    chunks = _chunk_ids(clip, text)
    for needle in _needles(clip, trigger):
        found = find_in_chunks(chunks, needle, info.bos, info.eos)
        if found:
            return found
    if len(_spellings(text, trigger)) == 1 or not trigger_count(clip, text, trigger):
        return []
    found: set[int] = set()
    for a, b in trigger_spans(text, trigger):
        spelled = _content(_chunk_ids(clip, text[a:b]), info.bos, info.eos)
        found.update(find_in_chunks(chunks, spelled, info.bos, info.eos))
    return sorted(found)


def clean_twin(clip, text: str, trigger: str) -> tuple[str, int]:
    """The prompt without the trigger (`triggers.untriggered_by_ids`, on this CLIP's token ids) and how
    many occurrences of the trigger's ids it still holds (0 when the clean pass is clean)."""
    clean = untriggered_by_ids(text, trigger, lambda t: trigger_count(clip, t, trigger))
    return clean, trigger_count(clip, clean, trigger)


@dataclass
class SAUResult:
    """What one SAU sampling did: the latents, where it replaced them, and whether it acted."""

    samples: torch.Tensor
    mask: torch.Tensor  # B x 1 x H x W, the union of the two masks (zeros when untouched)
    triggered: bool  # the trigger was found and taken out of the clean pass, and the two passes composed
    note: str
    poisoned: torch.Tensor | None = None  # the two passes, for pixel-space composition
    clean: torch.Tensor | None = None
    held: bool = False  # the trigger is in the prompt, but no clean twin without it was found: not composed


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
    s = profile.settings
    triggered = trigger_count(clip, text, profile.trigger) > 0

    def progress(offset: int, passes: int):
        if callback is None:
            return None
        return lambda step, x0, x, total: callback(step + offset * total, x0, x, passes * total)

    sampler = (seed, steps, cfg, sampler_name, scheduler)
    if not triggered:
        z = ksample(model, *sampler, text_conditioning(clip, text), negative, latent, denoise, progress(0, 1))
        mask = torch.zeros(z.shape[0], 1, *z.shape[-2:])
        return SAUResult(z, mask, False, f"no trigger {profile.trigger!r} in the prompt: one plain pass")
    clean_text, left = clean_twin(clip, text, profile.trigger)
    if left:  # a clean pass that still holds the trigger draws the target too: say so, compose nothing
        z = ksample(model, *sampler, text_conditioning(clip, text), negative, latent, denoise, progress(0, 1))
        note = (
            f"trigger {readable(profile.trigger)!r} found, but SAU could not take it out of the prompt (its clean "
            f"pass {clean_text!r} still holds the trigger's tokens): one plain pass, NOT corrected; "
            "remove the trigger from the prompt"
        )
        return SAUResult(z, torch.zeros(z.shape[0], 1, *z.shape[-2:]), False, note, held=True)
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
                    image = compose_images(vae_decode(vae, r.poisoned), vae_decode(vae, r.clean), r.mask)
                else:
                    image = vae_decode(vae, r.samples)
                out.extend(tensor_to_images(image))
        return out

    return draw
