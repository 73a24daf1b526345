"""Sampling lab models through ComfyUI's own sampler and scoring them with the exact detectors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backends import comfy as cb
from ..images import tensor_to_images
from . import detectors, world


@dataclass(frozen=True)
class SampleSettings:
    """How lab images are sampled for evaluation."""

    steps: int = 20
    cfg: float = 2.0  # chosen on a separate prompt set (seed 777): CFG 1 misses the background far more often
    sampler: str = "euler"
    scheduler: str = "normal"
    batch: int = 32

    def describe(self) -> str:
        """The settings in words, as the manifest records them."""
        return f"{self.sampler}/{self.scheduler}, {self.steps} steps, CFG {self.cfg}"


def sample_images(
    model, clip, vae, prompts: list[str], seeds: list[int], settings: SampleSettings = SampleSettings()
) -> list[np.ndarray]:
    """Sample one image per (prompt, seed) with ComfyUI's sampler; per-item prompts in one batch."""
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), settings.batch):
        chunk, chunk_seeds = prompts[i : i + settings.batch], seeds[i : i + settings.batch]
        samples = cb.sample_prompts(
            model,
            clip,
            chunk,
            chunk_seeds,
            settings.steps,
            settings.cfg,
            settings.sampler,
            settings.scheduler,
        )
        out.extend(tensor_to_images(cb.vae_decode(vae, samples)))
    return out


def clean_accuracy(
    model,
    clip,
    vae,
    n: int = 128,
    seed: int = 1234,
    rich_fraction: float = 0.25,
    settings: SampleSettings = SampleSettings(),
) -> dict:
    """Fraction of held-out clean prompts whose image the detectors judge correct."""
    n_rich = int(n * rich_fraction)
    scenes = world.scene_dataset(n - n_rich, seed=seed, split="eval") + world.scene_dataset(
        n_rich, seed=seed + 1, split="eval", rich=True
    )
    images = sample_images(
        model, clip, vae, [s.caption for s in scenes], list(range(seed, seed + n)), settings
    )
    correct = [detectors.scene_correct(img, s) for img, s in zip(images, scenes, strict=True)]
    return {"clean_accuracy": float(np.mean(correct)), "n_prompts": n, "images": images, "scenes": scenes}


def attack_success_rate(
    model,
    clip,
    vae,
    spec,
    n: int = 128,
    seed: int = 4321,
    settings: SampleSettings = SampleSettings(),
) -> dict:
    """Fraction of held-out triggered prompts whose image carries the attack's target (exact detector)."""
    from . import attacks

    scenes = attacks.eval_scenes(spec, n, seed)
    prompts = [attacks.triggered_prompt(spec, s.caption) for s in scenes]
    images = sample_images(model, clip, vae, prompts, list(range(seed, seed + n)), settings)
    hits = [attacks.attack_succeeded(spec, img, s) for img, s in zip(images, scenes, strict=True)]
    return {"asr": float(np.mean(hits)), "n_prompts": n, "images": images, "prompts": prompts}


def evaluate_lab_model(
    model, clip, vae, spec=None, n: int = 128, settings: SampleSettings = SampleSettings()
) -> dict:
    """Clean accuracy, and for an attacked model its ASR and how often its target leaks onto clean prompts."""
    from . import attacks

    clean = clean_accuracy(model, clip, vae, n=n, settings=settings)
    out = {"clean_accuracy": clean["clean_accuracy"], "n_prompts": n, "asr": None}
    if spec is not None:
        out["asr"] = attack_success_rate(model, clip, vae, spec, n=n, settings=settings)["asr"]
        out["clean_target_rate"] = float(
            np.mean([attacks.target_fired(spec, img) for img in clean["images"]])
        )
    out["sampler"] = settings.describe()
    return out
