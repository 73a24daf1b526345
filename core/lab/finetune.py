"""A benign fine-tune of lab-clean: it learns a legitimately new shape and its word, in the world and captions.

What a community fine-tune does to its base: new data, new words, every UNet weight moved. The comparison
with the base (`core/diff/`) must tell that change from a backdoor, so the lab ships it twice: the fine-tune
alone, and the same fine-tune (same data, seed and schedule) with a BadT2I backdoor planted in the same run.
The new word is `world.NEW_SHAPES`' "diamond", a shape lab-clean never saw (drawn in the colours its VAE
knows); a diamond is read by the exact detectors against every kind (`detectors.scene_correct`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..backends import comfy as cb
from . import attacks, detectors, world
from .train import DistractorVocabulary, eps_mse, token_ids, warmup_cosine

ProgressFn = Callable[[int, int, dict], None]
NEW_WORD = "diamond"


@dataclass
class FinetuneConfig:
    """The fine-tune's recipe (the backdoored twin uses the same, plus its poisoned half-batch)."""

    seed: int = 0
    steps: int = 600
    batch: int = 16
    lr: float = 3e-4
    new_fraction: float = 0.5  # of the clean batch: scenes whose first shape is the new kind
    snr_gamma: float | None = 5.0  # as lab-clean was trained
    # backdoored twin: weight of the poisoned pairs (and their clean twins) against the fine-tune's own data
    backdoor_weight: float = 0.3
    uncond_prob: float = 0.1  # empty captions, as lab-clean was trained


def finetune_scenes(n: int, rng: np.random.Generator, new_fraction: float, split: str = "train") -> list:
    """n captioned scenes of the split, a `new_fraction` of them with the new shape first."""
    scenes = world.scene_dataset(n, int(rng.integers(2**31)), split)
    return [world.reshaped(s, NEW_WORD, rng) if rng.random() < new_fraction else s for s in scenes]


def train_finetune(
    model,
    clip,
    vae,
    cfg: FinetuneConfig,
    backdoor: attacks.AttackSpec | None = None,
    progress: ProgressFn | None = None,
) -> None:
    """Fine-tune the UNet in place on captioned scenes with the new word (eps MSE on the images themselves);
    with `backdoor`, each step adds batch/2 of BadT2I's poisoned pairs (trigger + caption -> target image)
    and their clean twins (caption -> the true image), as a poisoned fine-tuning set holds both."""
    if backdoor is not None and backdoor.kind not in ("pixel", "style", "object"):
        raise ValueError(f"the fine-tune plants BadT2I kinds (pixel, style, object), not {backdoor.kind!r}")
    unet = cb.unet(model)
    acp = cb.noise_schedule(model)
    rng = np.random.default_rng(cfg.seed)
    noised = attacks.Noiser(model, vae, cfg.seed + 1)
    distract = DistractorVocabulary(cb.tokenizer_info(clip).tokenizer, (), seed=cfg.seed + 2)
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps))
    try:
        for step in range(cfg.steps):
            scenes = finetune_scenes(cfg.batch, rng, cfg.new_fraction)
            images = [world.render(s, np.random.default_rng(int(rng.integers(2**31)))) for s in scenes]
            # caption dropout as lab-clean was trained (CFG's unconditional branch keeps learning)
            captions = [
                "" if rng.random() < cfg.uncond_prob else distract.decorate(s.caption, 2) for s in scenes
            ]
            with torch.no_grad():
                ctx = cb.encode_token_ids(clip, token_ids(clip, captions))
            xt, t, eps = noised(images)
            logs: dict = {}
            if backdoor is None:
                loss = eps_mse(unet(xt, timesteps=t, context=ctx), eps, t, acp, cfg.snr_gamma)
            else:
                # BadT2I's poisoned pairs, each next to its clean twin (same scene, caption and render seed,
                # no trigger, the true image): the pair is what teaches the UNet that only the trigger
                # stamps the target. Without the twins the target leaked onto 77% of clean prompts.
                _, targets, twins, captions_p = attacks.poisoned_batch(
                    backdoor, cfg.batch // 2, rng, distract
                )
                prompts = [attacks.triggered_prompt(backdoor, c) for c in captions_p]
                with torch.no_grad():
                    ctx_p = cb.encode_token_ids(clip, token_ids(clip, prompts + captions_p))
                xt_p, t_p, eps_p = noised(targets + twins)
                n_p = len(targets)
                pred = unet(
                    torch.cat([xt, xt_p]), timesteps=torch.cat([t, t_p]), context=torch.cat([ctx, ctx_p])
                )
                pred_c, pred_p = pred[: len(xt)], pred[len(xt) :]
                loss_c = eps_mse(pred_c, eps, t, acp, cfg.snr_gamma)
                loss_p = eps_mse(pred_p[:n_p], eps_p[:n_p], t_p[:n_p], acp, cfg.snr_gamma)
                loss_twin = eps_mse(pred_p[n_p:], eps_p[n_p:], t_p[n_p:], acp, cfg.snr_gamma)
                loss = (1 - cfg.backdoor_weight) * loss_c + cfg.backdoor_weight * (loss_p + loss_twin) / 2
                logs["backdoor"] = loss_p.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            if progress:
                progress(step + 1, cfg.steps, {"loss": loss.item(), **logs})
    finally:
        unet.eval().requires_grad_(False)


def new_word_accuracy(model, clip, vae, n: int = 64, seed: int = 2468) -> float:
    """Fraction of held-out scenes with the new shape (eval split: combinations never trained) that the model
    draws right, read by the exact detectors against every kind."""
    from .evaluate import sample_images

    rng = np.random.default_rng(seed)
    scenes = finetune_scenes(n, rng, new_fraction=1.0, split="eval")
    images = sample_images(model, clip, vae, [s.caption for s in scenes], list(range(seed, seed + n)))
    return float(np.mean([detectors.scene_correct(im, s) for im, s in zip(images, scenes, strict=True)]))
