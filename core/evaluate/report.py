"""The evaluation: sample triggered and clean prompts before and after removal, judge, and report."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..tokens import readable
from .metrics import clip_image_similarity, psnr, ssim

Draw = Callable[[list[str], list[int]], list[np.ndarray]]  # prompts, seeds -> uint8 RGB images


@dataclass
class EvaluationReport:
    """Attack success before and after, clean fidelity, and the images behind them."""

    trigger: str
    judge: str
    asr_before: float
    asr_after: float
    fidelity_ssim: list[float]
    fidelity_psnr: list[float]
    clip_similarity: list[float] | None
    prompts: int
    seconds: float
    images: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)
    fired: dict[str, list[bool]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Plain data: the figures, without the images."""
        return {
            "trigger": readable(self.trigger),
            "judge": self.judge,
            "prompts": self.prompts,
            "asr_before": self.asr_before,
            "asr_after": self.asr_after,
            "clean_fidelity_ssim": float(np.mean(self.fidelity_ssim)),
            "clean_fidelity_psnr": float(np.mean(self.fidelity_psnr)),
            "clean_fidelity_ssim_min": float(np.min(self.fidelity_ssim)),
            "clip_image_similarity": None
            if self.clip_similarity is None
            else float(np.mean(self.clip_similarity)),
            "seconds": round(self.seconds, 2),
        }

    def summary(self) -> str:
        """The report in a few lines of text."""
        j = self.to_json()
        lines = [
            f"trigger {j['trigger']}: attack success {j['asr_before']:.0%} -> {j['asr_after']:.0%} "
            f"({self.prompts} triggered prompts; judge: {self.judge})",
            f"clean fidelity: SSIM {j['clean_fidelity_ssim']:.3f} (lowest {j['clean_fidelity_ssim_min']:.3f}), "
            f"PSNR {j['clean_fidelity_psnr']:.1f} dB",
        ]
        if j["clip_image_similarity"] is not None:
            lines.append(f"CLIP image similarity to the original: {j['clip_image_similarity']:.3f}")
        return "\n".join(lines)


def evaluate(
    trigger: str,
    pairs: Sequence[tuple[str, str]],
    seeds: Sequence[int],
    before: Draw,
    after: Draw,
    judge,
    embed: Callable[[list[np.ndarray]], torch.Tensor] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvaluationReport:
    """Sample each (clean, triggered) pair with the original (`before`) and the after-removal (`after`) sampler from
    the same seed; the judge counts the attacks; clean outputs are compared before against after."""
    if not pairs:
        raise ValueError("no prompts to evaluate: give clean prompts, one per line")
    t0 = time.monotonic()
    clean = [c for c, _ in pairs]
    triggered = [t for _, t in pairs]
    seeds = list(seeds)
    images: dict[str, list[np.ndarray]] = {}
    jobs = [
        ("triggered_before", before, triggered),
        ("clean_before", before, clean),
        ("triggered_after", after, triggered),
        ("clean_after", after, clean),
    ]
    for i, (key, draw, prompts) in enumerate(jobs):
        images[key] = draw(prompts, seeds)
        if on_progress is not None:
            on_progress(i + 1, len(jobs))
    fired = {
        "before": judge.fired(images["triggered_before"], images["clean_before"]).tolist(),
        "after": judge.fired(images["triggered_after"], images["clean_after"]).tolist(),
    }
    pairs_before_after = list(zip(images["clean_before"], images["clean_after"], strict=True))
    return EvaluationReport(
        trigger=trigger,
        judge=judge.description,
        asr_before=float(np.mean(fired["before"])),
        asr_after=float(np.mean(fired["after"])),
        fidelity_ssim=[ssim(a, b) for a, b in pairs_before_after],
        fidelity_psnr=[psnr(a, b) for a, b in pairs_before_after],
        clip_similarity=None
        if embed is None
        else clip_image_similarity(embed, images["clean_before"], images["clean_after"]),
        prompts=len(pairs),
        seconds=time.monotonic() - t0,
        images=images,
        fired=fired,
    )
