"""One evaluation on ComfyUI MODEL/CLIP/VAE objects, shared by Seal Evaluate and `backdoor-seal evaluate`.

The original model is sampled against what removal made of it: an unlearned MODEL/CLIP, or SAU
sampling of the original with a profile. Held-out prompt pairs (the user's clean prompts first, then
the built-in evaluation set, each with the trigger inserted) are drawn from the same seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..backends.comfy import check_trigger_embeddings, sample_prompts, supported_family, vae_decode
from ..images import tensor_to_images
from ..models import KSamplerSettings
from ..prompts import evaluation_prompts, prompt_lines
from ..sau.session import sau_drawer
from ..triggers import training_pairs
from .report import Draw, EvaluationReport, evaluate


@dataclass(frozen=True)
class EvaluationOptions:
    """Which held-out prompts, and how every image is sampled (pair i from seed + i)."""

    count: int = 16  # prompt pairs
    lab: bool = False  # the lab grammar's evaluation split, or held-out everyday captions
    placement: str = "auto"
    sampling: KSamplerSettings = field(default_factory=KSamplerSettings)


def model_drawer(
    model,
    clip,
    vae,
    latent_hw: tuple[int, int],
    steps: int,
    cfg: float,
    sampler: str,
    scheduler: str,
    batch: int | None = None,
) -> Draw:
    """Images from a ComfyUI MODEL / CLIP / VAE with ComfyUI's sampler, per-item prompts and seeds.

    `batch` images per sampler call; None: 32 at the lab's 8 x 8 latent down to 8 from a 16 x 16 latent up
    (noise is seeded per image, so the images do not depend on it; per call, the sampler's own overhead
    made batches of 8 a third slower on the lab)."""
    if batch is None:
        batch = max(8, min(32, 2048 // (latent_hw[0] * latent_hw[1])))

    def draw(prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for i in range(0, len(prompts), batch):
                z = sample_prompts(
                    model,
                    clip,
                    prompts[i : i + batch],
                    seeds[i : i + batch],
                    steps,
                    cfg,
                    sampler,
                    scheduler,
                    latent_hw,
                )
                out.extend(tensor_to_images(vae_decode(vae, z)))
        return out

    return draw


class EvaluationSession:
    """Original against unlearned (or against SAU sampling): the pairs, the two samplers, the judge."""

    def __init__(
        self,
        model,
        clip,
        vae,
        trigger: str,
        judge,
        user_prompts: str | Sequence[str] = (),
        opts: EvaluationOptions | None = None,
        unlearned_model=None,
        unlearned_clip=None,
        sau_profile=None,
        embed: Callable[[list[np.ndarray]], torch.Tensor] | None = None,
    ) -> None:
        if unlearned_model is None and sau_profile is None:
            raise ValueError("nothing to compare: connect the unlearned MODEL, or an SAU profile")
        supported_family(model)
        check_trigger_embeddings(clip, trigger)
        self.opts = o = opts or EvaluationOptions()
        self.trigger, self.judge, self.embed = trigger, judge, embed
        seed, drawing = o.sampling.seed, o.sampling.drawing
        clean = prompt_lines(user_prompts) + evaluation_prompts(o.lab, o.count, seed)
        self.pairs = [(p.clean, p.triggered) for p in training_pairs(trigger, clean, o.placement, seed)][
            : o.count
        ]
        self.seeds = [(seed + i) % 2**64 for i in range(len(self.pairs))]
        self.before = model_drawer(model, clip, vae, *drawing)
        if sau_profile is not None:
            self.method = "sau"
            self.after = sau_drawer(model, clip, vae, sau_profile, *drawing)
        else:
            self.method = "model"
            self.after = model_drawer(unlearned_model, unlearned_clip or clip, vae, *drawing)

    def run(self, on_progress: Callable[[int, int], None] | None = None) -> EvaluationReport:
        """Sample the four image sets (on_progress after each; it may raise to stop) and judge them."""
        return evaluate(
            self.trigger, self.pairs, self.seeds, self.before, self.after, self.judge, self.embed, on_progress
        )

    def report_json(self, report: EvaluationReport) -> dict:
        """The report's figures as plain data, with which removal was evaluated."""
        return {**report.to_json(), "method": self.method}
